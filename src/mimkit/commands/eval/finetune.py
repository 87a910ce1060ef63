"""`mimkit eval finetune`: a paper's fine-tuning protocol (`-c finetune/<name>`) on a run's encoder, trained by the
engine in a run folder of its own (`RUN/finetune/<protocol>`); the scores go to `RUN/eval/` as well."""

from __future__ import annotations

import argparse

from mimkit.commands.eval.common import check_options, evaluation_parser, random_init_option

DEFAULT_PROTOCOL = "finetune/vit_base_mae"


def add(evaluations: argparse._SubParsersAction) -> None:
    ft = evaluation_parser(
        evaluations,
        "finetune",
        "fine-tune a run's encoder with a paper's protocol, as a resumable multi-process run",
        run_finetune,
        "overrides of the protocol and the run's data, e.g. train.devices=8 data.root=/data",
    )
    ft.epilog = "RUN may also be a `mimkit export` folder (give data.* overrides then)."
    ft.add_argument(
        "-c",
        "--protocol",
        default=DEFAULT_PROTOCOL,
        help="a protocol of `mimkit recipes finetune`, or a YAML file (%(default)s)",
    )
    ft.add_argument("--out", help="the fine-tune's run folder (default: RUN/finetune/<protocol>)")
    ft.add_argument("--resume", action="store_true", help="continue the fine-tune in its run folder")
    ft.add_argument("--force", action="store_true", help="let --resume apply changed optim.* settings")
    ft.add_argument("--epochs", type=int, help="train.epochs (default: the protocol's)")
    ft.add_argument("--batch-size", type=int, help="data.global_batch: images per step over all processes")
    ft.add_argument("--num-workers", type=int, help="data.num_workers (default: the run's)")
    ft.add_argument("--limit", type=int, help="use only the first N train and eval images")
    random_init_option(ft)


def run_finetune(args: argparse.Namespace) -> int:
    check_options(args)
    from rich.console import Console

    from mimkit.eval.finetune import eval_source, finetune_config, pretrained, protocol_name, run_finetune_config
    from mimkit.eval.results import save_result

    fields = {
        "epochs": "train.epochs",
        "batch_size": "data.global_batch",
        "num_workers": "data.num_workers",
        "limit": "data.limit",
    }
    shortcuts = [f"{key}={getattr(args, name)}" for name, key in fields.items() if getattr(args, name) is not None]
    start = pretrained(args.run_path, random_init=args.random_init)
    cfg = finetune_config(start, args.protocol, [*args.overrides, *shortcuts], output_dir=args.out, resume=args.resume)
    source = eval_source(cfg)
    console = Console()
    weights_of = "the random init of " if start.init is None else ""
    console.print(f"fine-tuning {weights_of}{args.run_path} with {args.protocol}: run folder {cfg.output_dir}")
    result = run_finetune_config(cfg, source, force=args.force)
    best = result.best
    console.print(
        f"final top-1 {100 * result.top1:.2f}%, top-5 {100 * result.top5:.2f}% (best top-1 "
        f"{100 * best['top1']:.2f}% at epoch {int(best['epoch'])}, selected on the eval split)"
    )
    label = protocol_name(args.protocol) + ("" if start.init else "_random_init")
    out = save_result(
        start.folder,
        f"finetune_{label}",
        {"protocol": args.protocol, "run_dir": str(result.run_dir), "init": start.init, **result.scores()},
        f"{label}: top-1 {100 * result.top1:.2f} after {len(result.history)} epochs (best {100 * best['top1']:.2f})",
        result.top1,
    )
    print(f"saved {out}; best weights in {result.run_dir / 'best.safetensors'}")
    return 0
