"""`mimkit eval knn`: weighted k-NN accuracy of the frozen features, with the random-init and raw-pixel baselines on
request."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from mimkit.commands.eval.common import (
    PRETRAINED,
    check_options,
    data_options,
    data_record,
    evaluation_parser,
    labelled_splits,
    save_result_of,
    split_features,
    writable_results,
)

if TYPE_CHECKING:
    import torch

    from mimkit.data.sources import ImageSource
    from mimkit.runs import LoadedRun

DEFAULT_KS = (10, 20, 100, 200)


def add(evaluations: argparse._SubParsersAction) -> None:
    knn = evaluation_parser(
        evaluations, "knn", "weighted k-NN accuracy of frozen features (cosine, exp(sim/T) votes)", run_knn
    )
    knn.add_argument(
        "--k",
        type=int,
        nargs="+",
        help=f"neighbour counts, one pass (default: {' '.join(map(str, DEFAULT_KS))}, those the bank of training "
        "images holds)",
    )
    knn.add_argument("--temperature", type=float, default=0.07, help="T of the exp(sim/T) votes (%(default)s)")
    knn.add_argument("--pooling", choices=["cls", "avg", "cls+avg"], default="cls", help="features (%(default)s)")
    knn.add_argument("--baselines", action="store_true", help="also the random-init backbone and raw pixels")
    knn.add_argument(
        "--bank-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="storage of the normalised training features: float16 halves it (ImageNet ViT-B: 3.9 -> 2.0 GB); "
        "products stay float32 (%(default)s)",
    )
    knn.add_argument(
        "--bank-chunk", type=int, default=131072, help="training features per similarity product (%(default)s)"
    )
    data_options(knn, batch_size=256, workers=0)


def _knn_row(
    encoder: torch.nn.Module,
    run: LoadedRun,
    splits: list[tuple[str, ImageSource]],
    args: argparse.Namespace,
    label: str,
) -> dict[int, float]:
    import torch

    from mimkit.eval.knn import knn_accuracy

    train, test = (split_features(encoder, run, split, args, label, args.pooling) for split in splits)
    if max(args.k) > len(train.labels):
        from mimkit.config import ConfigError

        raise ConfigError(
            f"--k: {max(args.k)} neighbours of only {len(train.labels)} training images; use k <= "
            f"{len(train.labels)} (or more images: a larger --limit)"
        )
    classes = splits[0][1].info.num_classes
    return knn_accuracy(
        *(train.features, train.labels, test.features, test.labels, classes, args.k, args.temperature),
        bank_chunk_size=args.bank_chunk,
        bank_dtype=getattr(torch, args.bank_dtype),
    )


def run_knn(args: argparse.Namespace) -> int:
    check_options(args)
    from rich.console import Console
    from rich.table import Table

    from mimkit.eval.features import RawPixels
    from mimkit.runs import load_run

    run = load_run(args.run_path, args.overrides)
    writable_results(run)
    splits = labelled_splits(run, args, "k-NN")
    if args.k is None:  # the defaults that the bank of training images holds
        bank = len(splits[0][1])
        args.k = [k for k in DEFAULT_KS if k <= bank] or [bank]
        if len(args.k) < len(DEFAULT_KS):
            print(f"k-NN: {bank} training images, so k = {' '.join(map(str, args.k))}", file=sys.stderr)
    rows = {PRETRAINED: _knn_row(run.encoder(), run, splits, args, PRETRAINED)}
    if args.baselines:
        random_init = load_run(args.run_path, args.overrides, random_init=True)
        rows["random init"] = _knn_row(random_init.encoder(), random_init, splits, args, "random init")
        rows["raw pixels"] = _knn_row(RawPixels(), run, splits, args, "raw pixels")
    table = Table(title=f"k-NN accuracy (T = {args.temperature}, {args.pooling} features) - {run.checkpoint}")
    table.add_column("features")
    for k in args.k:
        table.add_column(f"k = {k}", justify="right")
    for name, accuracies in rows.items():
        table.add_row(name, *(f"{100 * accuracies[k]:.2f}" for k in args.k))
    Console().print(table)
    settings = {
        "checkpoint": str(run.checkpoint),
        "temperature": args.temperature,
        "pooling": args.pooling,
        "limit": args.limit,
        "bank_dtype": args.bank_dtype,
    }
    accuracy = {name: {str(k): v for k, v in acc.items()} for name, acc in rows.items()}
    headline = "; ".join(
        f"k={k}: " + ", ".join(f"{name} {100 * acc[k]:.2f}" for name, acc in rows.items()) for k in args.k
    )
    main_k = 20 if 20 in args.k else args.k[0]
    data = data_record(run, splits, args)
    result = {**settings, "accuracy": {**_earlier_knn_rows(run, settings, data), **accuracy}}
    save_result_of(run, "knn", result, headline, rows[PRETRAINED][main_k], data=data)
    return 0


def _earlier_knn_rows(run: LoadedRun, settings: dict, data: dict) -> dict[str, dict[str, float]]:
    """Rows of an earlier `eval knn` with the same settings on the same data (its --baselines, say), kept beside the
    new ones."""
    path = run.run_dir / "eval" / "knn.json"
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    same = earlier.get("data") == data and all(earlier.get(key) == value for key, value in settings.items())
    return earlier.get("accuracy", {}) if same else {}
