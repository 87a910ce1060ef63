"""What every `mimkit eval` evaluation shares: the RUN argument and data options, checks of option values, printing
an evaluation's notices and saving results to `RUN/eval/`. The evaluations themselves are in `mimkit.eval`.

Imports of torch and the evaluation code happen inside the functions, so `mimkit --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mimkit.eval.frozen import FeatureOptions
    from mimkit.runs import LoadedRun


def evaluation_parser(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    run: Callable[[argparse.Namespace], int],
    overrides: str = "data overrides, e.g. data.root=/data",
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    parser.add_argument("run_path", metavar="RUN", help="run folder or checkpoint file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides)
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


def check_options(args: argparse.Namespace) -> None:
    """Option values that cannot work, as a ConfigError naming the option (exit 2), before any run is opened."""
    from mimkit.config import ConfigError

    rules = [
        ("k", lambda v: v is None or all(k >= 1 for k in v), "every k must be >= 1"),
        ("lrs", lambda v: all(lr > 0 for lr in v), "every lr must be > 0"),
        ("temperature", lambda v: v > 0, "must be > 0"),
        ("epochs", lambda v: v is None or v >= 1, "must be >= 1"),
        ("batch_size", lambda v: v is None or v >= 1, "must be >= 1"),
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


def feature_options(args: argparse.Namespace) -> FeatureOptions:
    """The feature-extraction options of an evaluation's command line."""
    from mimkit.eval.frozen import FeatureOptions

    return FeatureOptions(args.batch_size, args.num_workers, args.limit, getattr(args, "cache", False))


@contextmanager
def launched_processes() -> Iterator[int]:
    """Under torchrun, the processes share out the feature extraction (each gets every feature back); yields this
    process's rank, 0 alone: only rank 0 prints and saves."""
    from mimkit.distributed import join_launched_processes
    from mimkit.engine.runtime import process_group_released

    with process_group_released():
        yield join_launched_processes()


def warn(notices: list[str]) -> None:
    for notice in notices:
        print(f"mimkit: warning: {notice}", file=sys.stderr)


def random_init_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="evaluate the run's initialisation instead of its trained weights (the from-scratch baseline)",
    )


def opened_runs(args: argparse.Namespace) -> tuple[LoadedRun, LoadedRun | None]:
    """The run to evaluate (at its initialisation with `--random-init`), refused before any work when its results
    cannot be written, and with `--baselines` the same run opened at its initialisation."""
    from mimkit.runs import load_run

    run = load_run(args.run_path, args.overrides, random_init=getattr(args, "random_init", False))
    _writable_results(run)
    baselines = getattr(args, "baselines", False)
    return run, load_run(args.run_path, args.overrides, random_init=True) if baselines else None


def _writable_results(run: LoadedRun) -> None:
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
    label: str = "pretrained",
    metric: str = "top-1",
) -> None:
    """Save a result with the data it was computed on (`data_record`); says on stderr when it replaces one computed
    on other data."""
    from mimkit.eval.frozen import result_suffix
    from mimkit.eval.results import replaced_notice, save_result

    evaluation = f"{name}{result_suffix(label)}"
    if (notice := replaced_notice(run.run_dir, evaluation, data)) is not None:
        print(f"mimkit: warning: {notice}", file=sys.stderr)
    out = save_result(run.run_dir, evaluation, result, headline, score, data, metric)
    print(f"saved {out} (and a line in {out.parent / 'history.jsonl'})")
