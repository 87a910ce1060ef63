"""`mimkit eval ...`: judge the encoder of a pretraining run.

Parsers are built without importing torch or timm (fast `--help`); each command imports what it runs.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mimkit.eval.features import Features
    from mimkit.eval.run import LoadedRun

DEFAULT_KS = (10, 20, 100, 200)


def add(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval", help="evaluate a run's encoder: k-NN, linear probe, fine-tuning")
    sub = p.add_subparsers(title="evaluations", metavar="EVAL", required=True)
    knn = sub.add_parser("knn", help="weighted k-NN accuracy of frozen features (cosine, exp(sim/T) votes)")
    knn.add_argument("run", help="run folder or checkpoint file")
    knn.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data overrides, e.g. data.root=/data")
    knn.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), help="neighbour counts (one pass)")
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--pooling", choices=["cls", "avg", "cls+avg"], default="cls")
    knn.add_argument("--baselines", action="store_true", help="also the random-init backbone and raw pixels")
    knn.add_argument("--limit", type=int, help="use only the first N train and test images")
    knn.add_argument("--batch-size", type=int, default=256)
    knn.add_argument("--num-workers", type=int, default=0)
    knn.set_defaults(run=run_knn)


def _device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _features(encoder: torch.nn.Module, run: LoadedRun, split: str, args: argparse.Namespace, label: str) -> Features:
    from mimkit.eval.features import extract_features

    source = run.source(split, limit=args.limit)
    size = getattr(encoder, "image_size", None) or (source.info.image_size or (224, 224))[0]
    device = _device()
    return extract_features(
        encoder.to(device),
        source,
        size,
        args.pooling,
        args.batch_size,
        args.num_workers,
        device,
        description=f"{label}: {split} features",
    )


def knn_row(encoder: torch.nn.Module, run: LoadedRun, args: argparse.Namespace, label: str) -> dict[int, float]:
    from mimkit.config import ConfigError
    from mimkit.eval.knn import knn_accuracy

    train = _features(encoder, run, run.cfg.data.split, args, label)
    test = _features(encoder, run, run.cfg.data.eval_split, args, label)
    classes = run.source(run.cfg.data.split, limit=args.limit).info.num_classes
    if not classes:
        raise ConfigError(f"k-NN needs labelled data; {run.cfg.data.source} at {run.cfg.data.root} has no labels")
    return knn_accuracy(train.features, train.labels, test.features, test.labels, classes, args.k, args.temperature)


def run_knn(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from mimkit.eval.features import RawPixels
    from mimkit.eval.run import load_run

    run = load_run(args.run, args.overrides)
    rows = {"pretrained": knn_row(run.encoder(), run, args, "pretrained")}
    if args.baselines:
        random_init = load_run(args.run, args.overrides, random_init=True)
        rows["random init"] = knn_row(random_init.encoder(), random_init, args, "random init")
        rows["raw pixels"] = knn_row(RawPixels(), run, args, "raw pixels")
    table = Table(title=f"k-NN accuracy (T = {args.temperature}, {args.pooling} features) - {run.checkpoint}")
    table.add_column("features")
    for k in args.k:
        table.add_column(f"k = {k}", justify="right")
    for name, accuracies in rows.items():
        table.add_row(name, *(f"{100 * accuracies[k]:.2f}" for k in args.k))
    Console().print(table)
    out = run.run_dir / "eval" / "knn.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "checkpoint": str(run.checkpoint),
        "temperature": args.temperature,
        "pooling": args.pooling,
        "limit": args.limit,
        "accuracy": {name: {str(k): v for k, v in acc.items()} for name, acc in rows.items()},
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")
    return 0
