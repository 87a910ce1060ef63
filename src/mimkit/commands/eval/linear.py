"""`mimkit eval linear`: linear probes of frozen features, one per learning rate, trained in one pass."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mimkit.commands.eval.common import (
    check_options,
    data_options,
    data_record,
    eval_device,
    evaluation_parser,
    labelled_splits,
    random_init_option,
    run_label,
    save_result_of,
    split_features,
    writable_results,
)

if TYPE_CHECKING:
    from mimkit.models.encoder import Encoder

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
"""Same as `mimkit.eval.linear.DEFAULT_LRS` (repeated here to keep torch out of the parser; a test checks)."""


def add(evaluations: argparse._SubParsersAction) -> None:
    linear = evaluation_parser(
        evaluations, "linear", "linear probes of frozen features, one per lr, trained in one pass", run_linear
    )
    linear.add_argument(
        "--variant",
        choices=["cls", "last4", "cls+avg"],
        help="last [CLS]; [CLS] of each of the last 4 blocks, concatenated (DINO/iBOT ViT-S); [CLS] + patch mean "
        "(default: last4 where the encoder has it, a transformer of 4 or more blocks, else cls)",
    )
    linear.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="lrs to sweep (%(default)s)")
    linear.add_argument("--epochs", type=int, default=100, help="SGD epochs over the features (%(default)s)")
    linear.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction of the train features to select the lr (default 0: select on the test split)",
    )
    linear.add_argument("--cache", action="store_true", help="save/reuse features in RUN/eval/features_*.pt")
    random_init_option(linear)
    linear.add_argument(
        "--raw-pixels",
        action="store_true",
        help="probe the normalised pixels instead of an encoder (the logistic-regression baseline)",
    )
    data_options(linear, batch_size=256, workers=0, what="feature extraction and probe SGD batch")


def run_linear(args: argparse.Namespace) -> int:
    check_options(args)
    import torch

    from mimkit.config import ConfigError
    from mimkit.eval.features import RawPixels
    from mimkit.eval.linear import train_linear_probes
    from mimkit.runs import load_run

    if args.raw_pixels and args.random_init:
        raise ConfigError("--raw-pixels and --random-init are two different baselines; give one of them")
    run = load_run(args.run_path, args.overrides, random_init=args.random_init)
    writable_results(run)
    splits = labelled_splits(run, args, "the linear probe")
    classes = splits[0][1].info.num_classes
    encoder, label, variant = (
        (RawPixels(), "raw pixels", "cls")
        if args.raw_pixels
        else (run.encoder(), run_label(run), args.variant or default_variant(run.encoder()))
    )
    train, test = (split_features(encoder, run, split, args, label, variant) for split in splits)
    device = eval_device()
    train_x, train_y = train.features.to(device), train.labels
    val: dict[str, torch.Tensor] = {}
    if args.val_fraction > 0:
        held_out = round(args.val_fraction * len(train_y))
        if not 0 < held_out < len(train_y):
            raise ConfigError(f"--val-fraction {args.val_fraction} of {len(train_y)} train images leaves a split empty")
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))
        val = {"val_x": train_x[order[:held_out]], "val_y": train_y[order[:held_out]]}
        train_x, train_y = train_x[order[held_out:]], train_y[order[held_out:]]
    result = train_linear_probes(
        train_x, train_y, test.features.to(device), test.labels, classes, args.lrs, args.epochs, args.batch_size, **val
    )
    selection = (
        f"lr selected on {len(val['val_y'])} held-out train images; test top-1 unbiased"
        if val
        else "lr selected on the test split, as DINO/iBOT report; --val-fraction holds out train images instead"
    )
    subject = "raw pixels" if args.raw_pixels else f"{'random init of ' if run.random_init else ''}{run.checkpoint}"
    print(f"Linear probe: {variant} features, {args.epochs} epochs, {len(train_y)} train images - {subject}")
    print(result.to_markdown())
    print(f"best lr {result.best_lr:g}: top-1 {100 * result.best_top1:.2f}% ({selection})")
    table = [
        {"lr": lr, "top1": t1, "top5": t5} for lr, t1, t5 in zip(result.lrs, result.top1, result.top5, strict=True)
    ]
    if result.val_top1 is not None:
        for row, val_top1 in zip(table, result.val_top1, strict=True):
            row["val_top1"] = val_top1
    save_result_of(
        run,
        "linear",
        {
            "checkpoint": str(run.checkpoint),
            "features_of": label,
            "random_init": run.random_init,
            "variant": variant,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "limit": args.limit,
            "selection": "val" if val else "test",
            "val_fraction": args.val_fraction,
            "table": table,
            "best_lr": result.best_lr,
            "best_top1": result.best_top1,
        },
        f"{label}, {variant} features: top-1 {100 * result.best_top1:.2f} (lr {result.best_lr:g} chosen on the "
        f"{'held-out train images' if val else 'test split'})",
        result.best_top1,
        data=data_record(run, splits, args),
        label=label,
    )
    return 0


def default_variant(encoder: Encoder) -> str:
    """DINO/iBOT's last-4 [CLS] probe where the encoder can give it, else its image feature (a CNN, a shallow ViT):
    the default then works on every encoder, and the output names the variant it used."""
    from mimkit.config import ConfigError

    try:
        encoder.check_block_features(4)
    except ConfigError:
        return "cls"
    return "last4"
