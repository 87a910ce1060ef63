"""`mimkit eval knn`: weighted k-NN accuracy of the frozen features, with the random-init and raw-pixel baselines on
request."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
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


def run_knn(args: argparse.Namespace) -> int:
    check_options(args)
    from rich.console import Console
    from rich.table import Table

    from mimkit.eval.frozen import KnnConfig, evaluate_knn

    run, random_init = opened_runs(args)
    cfg = KnnConfig(
        ks=None if args.k is None else tuple(args.k),
        temperature=args.temperature,
        pooling=args.pooling,
        baselines=args.baselines,
        bank_dtype=args.bank_dtype,
        bank_chunk=args.bank_chunk,
        features=feature_options(args),
    )
    with launched_processes() as rank:
        result = evaluate_knn(run, cfg, random_init)
    if rank:
        return 0
    warn(result.notices)
    ks, rows = list(result.ks), result.rows
    if args.k is None and len(ks) < len(DEFAULT_KS):
        print(
            f"k-NN: {result.data['splits'][0]['images']} training images, so k = {' '.join(map(str, ks))}",
            file=sys.stderr,
        )
    table = Table(title=f"k-NN accuracy (T = {args.temperature}, {args.pooling} features) - {run.checkpoint}")
    table.add_column("features")
    for k in ks:
        table.add_column(f"k = {k}", justify="right")
    for name, accuracies in rows.items():
        table.add_row(name, *(f"{100 * accuracies[k]:.2f}" for k in ks))
    Console().print(table)
    settings = {
        "checkpoint": str(run.checkpoint),
        "temperature": args.temperature,
        "pooling": args.pooling,
        "limit": args.limit,
        "bank_dtype": args.bank_dtype,
    }
    accuracy = {name: {str(k): v for k, v in acc.items()} for name, acc in rows.items()}
    headline = "; ".join(f"k={k}: " + ", ".join(f"{name} {100 * acc[k]:.2f}" for name, acc in rows.items()) for k in ks)
    main_k = 20 if 20 in ks else ks[0]
    full = {**settings, "accuracy": {**_earlier_knn_rows(run, settings, result.data), **accuracy}}
    save_result_of(run, "knn", full, headline, rows["pretrained"][main_k], data=result.data)
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
