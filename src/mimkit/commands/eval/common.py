"""What every `mimkit eval` evaluation shares: the RUN argument and data options, checks of option values, the run's
labelled splits, frozen features (cached on request) and saving results to `RUN/eval/`.

Imports of torch and the evaluation code happen inside the functions, so `mimkit --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mimkit.data.sources import ImageSource
    from mimkit.eval.features import Features
    from mimkit.runs import LoadedRun


def evaluation_parser(
    sub: argparse._SubParsersAction, name: str, help: str, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    parser.add_argument("run_path", metavar="RUN", help="run folder or checkpoint file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data overrides, e.g. data.root=/data")
    parser.set_defaults(run=run)
    return parser


def data_options(parser: argparse.ArgumentParser, batch_size: int, workers: int | None, what: str = "batch") -> None:
    parser.add_argument("--limit", type=int, help="use only the first N train and test images")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"{what} size (%(default)s)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=workers,
        help="data loading processes (" + ("%(default)s)" if workers is not None else "default: the run's)"),
    )


def eval_device() -> torch.device:
    """The first GPU, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_options(args: argparse.Namespace) -> None:
    """Option values that cannot work, as a ConfigError naming the option (exit 2), before any run is opened."""
    from mimkit.config import ConfigError

    rules = [
        ("k", lambda v: v is None or all(k >= 1 for k in v), "every k must be >= 1"),
        ("lrs", lambda v: all(lr > 0 for lr in v), "every lr must be > 0"),
        ("temperature", lambda v: v > 0, "must be > 0"),
        ("epochs", lambda v: v >= 1, "must be >= 1"),
        ("batch_size", lambda v: v >= 1, "must be >= 1"),
        ("limit", lambda v: v is None or v >= 1, "must be >= 1"),
        ("num_workers", lambda v: v is None or v >= 0, "must be >= 0"),
        ("val_fraction", lambda v: 0 <= v < 1, "must lie in [0, 1)"),
        ("lr", lambda v: v > 0, "must be > 0"),
        ("bank_chunk", lambda v: v >= 1, "must be >= 1"),
    ]
    for name, ok, rule in rules:
        if hasattr(args, name) and not ok(getattr(args, name)):
            value = getattr(args, name)
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            raise ConfigError(f"--{name.replace('_', '-')}: {rule}; got {shown}")


def labelled_splits(run: LoadedRun, args: argparse.Namespace, evaluation: str) -> list[tuple[str, ImageSource]]:
    """The run's train and eval splits by name (first `args.limit` images each); an error if unlabelled."""
    from mimkit.config import ConfigError
    from mimkit.data.sources import same_images_notice

    data = run.cfg.data
    splits = [(split, run.source(split, limit=args.limit)) for split in (data.split, data.eval_split)]
    if not splits[0][1].info.num_classes:
        raise ConfigError(f"{evaluation} needs labelled data; {data.source} at {data.root} has no labels")
    if (notice := same_images_notice(data)) is not None:
        print(f"mimkit: warning: {notice} (data.val_fraction=0.1 goes after the run folder)", file=sys.stderr)
    return splits


def data_record(run: LoadedRun, splits: list[tuple[str, ImageSource]], args: argparse.Namespace) -> dict[str, Any]:
    """What an evaluation read (source, folder, splits and their image counts, limit): saved with its result."""
    from mimkit.eval.results import evaluated_data

    data = run.cfg.data
    return evaluated_data(data, splits, data.limit if args.limit is None else args.limit)


def split_features(
    encoder: torch.nn.Module,
    run: LoadedRun,
    split: tuple[str, ImageSource],
    args: argparse.Namespace,
    label: str,
    variant: str,
) -> Features:
    """Frozen features of a (name, source) split (`variant`: a pooling or last4), cached when `args.cache`."""
    from dataclasses import asdict

    from mimkit.eval.features import encoder_image_size
    from mimkit.eval.probe import cached_features, probe_features

    name, source = split
    size = encoder_image_size(encoder, source)
    device = eval_device()
    path, key = None, {}
    if getattr(args, "cache", False) and run.checkpoint is not None:
        path = run.run_dir / "eval" / f"features_{variant}_{name}{result_suffix(label)}.pt"
        modified = run.checkpoint.stat().st_mtime_ns
        key = {"checkpoint": str(run.checkpoint), "modified": modified, "data": asdict(run.cfg.data), "size": size}
        key |= {"split": name, "variant": variant, "limit": args.limit, "features_of": label}

    def compute() -> Features:
        return probe_features(
            encoder.to(device),
            source,
            size,
            variant,  # type: ignore[arg-type]
            args.batch_size,
            args.num_workers,
            device,
            description=f"{label}: {name} features",
        )

    return cached_features(path, key, compute)


PRETRAINED = "pretrained"


def run_label(run: LoadedRun) -> str:
    return "random init" if run.random_init else PRETRAINED


def result_suffix(label: str) -> str:
    """Results of a baseline (random init, raw pixels) sit beside the run's own, never over them."""
    return "" if label == PRETRAINED else "_" + label.replace(" ", "_")


def random_init_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="evaluate the run's initialisation instead of its trained weights (the from-scratch baseline)",
    )


def writable_results(run: LoadedRun) -> None:
    """Fail before evaluating when RUN/eval cannot take the results: a read-only or full run folder, or one that lies
    inside the data it evaluates on (or holds images)."""
    from mimkit.data.output_folder import check_output_folder
    from mimkit.engine.checkpoint import ensure_writable

    folder = run.run_dir / "eval"
    check_output_folder(
        folder,
        "eval",
        "move the run folder out of the data folder and evaluate it there",
        {"data.root": run.cfg.data.root},
    )
    ensure_writable(folder, "eval", "copy the run folder somewhere writable and evaluate it there")


def save_result_of(
    run: LoadedRun,
    name: str,
    result: dict,
    headline: str,
    score: float,
    *,
    data: dict[str, Any],
    label: str = PRETRAINED,
) -> None:
    """Save a result with the data it was computed on (`data_record`); says on stderr when it replaces one computed
    on other data."""
    from mimkit.eval.results import replaced_notice, save_result

    evaluation = f"{name}{result_suffix(label)}"
    if (notice := replaced_notice(run.run_dir, evaluation, data)) is not None:
        print(f"mimkit: warning: {notice}", file=sys.stderr)
    out = save_result(run.run_dir, evaluation, result, headline, score, data)
    print(f"saved {out} (and a line in {out.parent / 'history.jsonl'})")
