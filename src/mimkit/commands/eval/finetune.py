"""`mimkit eval finetune`: full fine-tuning of the encoder's timm model with layer-wise lr decay, mixup/cutmix and
drop path (the papers' protocol); the weights and the history go to `RUN/eval/`."""

from __future__ import annotations

import argparse

from mimkit.commands.eval.common import (
    check_options,
    data_options,
    evaluation_parser,
    random_init_option,
    save_result_of,
    warn,
    writable_results,
)


def add(evaluations: argparse._SubParsersAction) -> None:
    ft = evaluation_parser(
        evaluations, "finetune", "full fine-tuning with layer-wise lr decay, mixup/cutmix, drop path", run_finetune
    )
    ft.add_argument("--epochs", type=int, default=100, help="passes over the train split (%(default)s)")
    ft.add_argument("--lr", type=float, default=1e-3, help="peak lr of the head, absolute (%(default)s)")
    ft.add_argument("--min-lr", type=float, default=1e-6, help="lr at the end of the cosine (%(default)s)")
    ft.add_argument("--warmup-epochs", type=float, default=5.0, help="linear warm-up from 0 (%(default)s)")
    ft.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (%(default)s)")
    ft.add_argument(
        "--layer-decay", type=float, default=0.75, help="lr factor per layer towards the input (%(default)s)"
    )
    ft.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the last block (%(default)s)")
    ft.add_argument("--mixup", type=float, default=0.8, help="mixup alpha, 0: off (%(default)s)")
    ft.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha, 0: off (%(default)s)")
    ft.add_argument("--label-smoothing", type=float, default=0.1, help="of the targets, mixed or not (%(default)s)")
    ft.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=[0.08, 1.0],
        metavar=("MIN", "MAX"),
        help="RandomResizedCrop area range (%(default)s)",
    )
    ft.add_argument("--seed", type=int, default=0, help="head init, batch order, augmentation (%(default)s)")
    random_init_option(ft)
    data_options(ft, batch_size=128, workers=None)


def run_finetune(args: argparse.Namespace) -> int:
    check_options(args)
    from dataclasses import asdict

    from rich.console import Console
    from safetensors.torch import save_file

    from mimkit.eval.features import encoder_image_size
    from mimkit.eval.finetune import FinetuneConfig, finetune
    from mimkit.eval.frozen import data_record, eval_device, labelled_splits, result_suffix, run_label
    from mimkit.runs import load_run

    run = load_run(args.run_path, args.overrides, random_init=args.random_init)
    writable_results(run)
    encoder = run.encoder()
    model = encoder.timm_model()
    cfg = FinetuneConfig(
        epochs=args.epochs,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay,
        layer_decay=args.layer_decay,
        drop_path=args.drop_path,
        mixup=args.mixup,
        cutmix=args.cutmix,
        label_smoothing=args.label_smoothing,
        batch_size=args.batch_size,
        num_workers=run.cfg.data.num_workers if args.num_workers is None else args.num_workers,
        crop_scale=tuple(args.crop_scale),
        seed=args.seed,
    )
    splits, notice = labelled_splits(run, args.limit, "fine-tuning")
    warn([] if notice is None else [notice])
    (_, train_source), (_, eval_source) = splits
    size = encoder_image_size(encoder, train_source)
    device = eval_device()
    console = Console()
    weights_of = "the random init of " if run.random_init else ""
    console.print(f"fine-tuning {weights_of}{run.checkpoint} at {size}px on {device} for {cfg.epochs} epochs")

    def report(row: dict[str, float]) -> None:
        console.print(
            f"epoch {row['epoch']:>3}  loss {row['loss']:.4f}  top-1 {100 * row['top1']:.2f}%  "
            f"top-5 {100 * row['top5']:.2f}%"
        )

    result = finetune(model, encoder.block_types, train_source, eval_source, size, cfg, device, report)
    best = result.best
    console.print(
        f"final top-1 {100 * result.top1:.2f}%, top-5 {100 * result.top5:.2f}% "
        f"(best top-1 {100 * best['top1']:.2f}% at epoch {best['epoch']}, selected on the eval split)"
    )
    weights = run.run_dir / "eval" / f"finetune{result_suffix(run_label(run))}.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}, str(weights))
    save_result_of(
        run,
        "finetune",
        {
            "checkpoint": str(run.checkpoint),
            "random_init": run.random_init,
            "image_size": size,
            "num_classes": train_source.info.num_classes,
            "limit": args.limit,
            "settings": asdict(cfg),
            "history": result.history,
            "top1": result.top1,
            "top5": result.top5,
            "best": best,
            "weights": str(weights),
        },
        f"{run_label(run)}: top-1 {100 * result.top1:.2f} after {cfg.epochs} epochs (best {100 * best['top1']:.2f})",
        result.top1,
        data=data_record(run, splits, args.limit),
        label=run_label(run),
    )
    return 0
