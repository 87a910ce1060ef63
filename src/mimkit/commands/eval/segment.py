"""`mimkit eval segment`: linear segmentation probes of frozen patch tokens, one per learning rate, in one pass."""

from __future__ import annotations

import argparse

from mimkit.commands.eval.common import (
    check_options,
    data_options,
    evaluation_parser,
    feature_options,
    launched_processes,
    opened_runs,
    save_result_of,
    warn,
)

SEGMENT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Same as `mimkit.eval.segment.SEGMENT_LRS` (repeated here to keep torch out of the parser; a test checks)."""


def add(evaluations: argparse._SubParsersAction) -> None:
    segment = evaluation_parser(
        evaluations,
        "segment",
        "linear segmentation probes of frozen patch tokens (mIoU), one per lr, trained in one pass",
        run_segment,
        overrides="data overrides, e.g. data.source=segfolder data.root=/data/ADEChallengeData2016",
    )
    segment.add_argument("--lrs", type=float, nargs="+", default=list(SEGMENT_LRS), help="lrs to sweep (%(default)s)")
    segment.add_argument("--epochs", type=int, default=10, help="SGD epochs over the token maps (%(default)s)")
    segment.add_argument(
        "--no-standardise",
        dest="standardise",
        action="store_false",
        help="a plain linear layer of the raw tokens (default: tokens standardised per channel first, the "
        "affine-free BatchNorm of DINOv2's linear head)",
    )
    segment.add_argument(
        "--baselines",
        action="store_true",
        help="also probe the run's random init and each patch's raw pixels on the same token grid",
    )
    data_options(segment, batch_size=64, workers=0, what="token-extraction and probe SGD batch (images)")


def run_segment(args: argparse.Namespace) -> int:
    check_options(args)
    from mimkit.eval.dense import PROBE_FILE, SegmentConfig, result_record, save_probe, segment_probe
    from mimkit.eval.frozen import PRETRAINED

    run, random_init = opened_runs(args)
    cfg = SegmentConfig(
        lrs=tuple(args.lrs),
        epochs=args.epochs,
        standardise=args.standardise,
        baselines=args.baselines,
        features=feature_options(args),
    )
    with launched_processes() as rank:
        result = segment_probe(run, cfg, random_init)
    if rank:
        return 0
    warn(result.notices)
    h, w = result.grid
    print(
        f"Linear segmentation probe: {len(result.classes)} classes, {h}x{w} tokens upsampled to "
        f"{result.image_size}x{result.image_size}, {args.epochs} epochs - {run.checkpoint}"
    )
    for label, probes in result.rows.items():
        print(f"\n{label}:\n{probes.to_markdown()}")
        record = {
            "checkpoint": str(run.checkpoint),
            **result_record(result, label),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "limit": args.limit,
            "standardise": args.standardise,
            "selection": "eval split",
        }
        headline = (
            f"{label}: mIoU {100 * probes.best.miou:.2f}, pixel accuracy {100 * probes.best.pixel_accuracy:.2f} "
            f"(lr {probes.best_lr:g} chosen on the eval split)"
        )
        save_result_of(run, "segment", record, headline, probes.best.miou, data=result.data, label=label, metric="mIoU")
    if PRETRAINED in result.rows:
        save_probe(run.run_dir / "eval" / PROBE_FILE, result, PRETRAINED, run.checkpoint)
        print(f"its best probe: {run.run_dir / 'eval' / PROBE_FILE} (draw it: mimkit viz RUN --what segmentation)")
    return 0
