"""`mimkit eval linear`: linear probes of frozen features, one per learning rate, trained in one pass."""

from __future__ import annotations

import argparse

from mimkit.commands.eval.common import (
    check_options,
    data_options,
    evaluation_parser,
    feature_options,
    launched_processes,
    opened_runs,
    random_init_option,
    save_result_of,
    warn,
)

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
    from mimkit.eval.frozen import LinearConfig, linear_probe

    run, _ = opened_runs(args)
    cfg = LinearConfig(
        variant=args.variant,
        lrs=tuple(args.lrs),
        epochs=args.epochs,
        val_fraction=args.val_fraction,
        raw_pixels=args.raw_pixels,
        features=feature_options(args),
    )
    with launched_processes() as rank:
        result = linear_probe(run, cfg)
    if rank:
        return 0
    warn(result.notices)
    probes, label, variant, val = result.probes, result.label, result.variant, result.held_out
    selection = (
        f"lr selected on {val} held-out train images; test top-1 unbiased"
        if val
        else "lr selected on the test split, as DINO/iBOT report; --val-fraction holds out train images instead"
    )
    subject = "raw pixels" if args.raw_pixels else f"{'random init of ' if run.random_init else ''}{run.checkpoint}"
    print(f"Linear probe: {variant} features, {args.epochs} epochs, {result.train_images} train images - {subject}")
    print(probes.to_markdown())
    print(f"best lr {probes.best_lr:g}: top-1 {100 * probes.best_top1:.2f}% ({selection})")
    table = [
        {"lr": lr, "top1": t1, "top5": t5} for lr, t1, t5 in zip(probes.lrs, probes.top1, probes.top5, strict=True)
    ]
    if probes.val_top1 is not None:
        for row, val_top1 in zip(table, probes.val_top1, strict=True):
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
            "best_lr": probes.best_lr,
            "best_top1": probes.best_top1,
        },
        f"{label}, {variant} features: top-1 {100 * probes.best_top1:.2f} (lr {probes.best_lr:g} chosen on the "
        f"{'held-out train images' if val else 'test split'})",
        probes.best_top1,
        data=result.data,
        label=label,
    )
    return 0
