"""`mimkit eval ...`: judge the encoder of a pretraining run by k-NN, linear probe or full fine-tuning.

Parsers are built without importing torch or timm (fast `--help`); each command imports what it runs. Results
go to `RUN/eval/<evaluation>.json` (the latest) and `RUN/eval/history.jsonl` (every evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mimkit.data.sources import ImageSource
    from mimkit.eval.features import Features
    from mimkit.runs import LoadedRun

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
"""Same as `mimkit.eval.linear.DEFAULT_LRS` (repeated here to keep torch out of the parser; a test checks)."""


def add(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval", help="evaluate a run's encoder: k-NN, linear probe, fine-tuning")
    sub = p.add_subparsers(title="evaluations", metavar="EVAL", required=True)

    knn = _command(sub, "knn", "weighted k-NN accuracy of frozen features (cosine, exp(sim/T) votes)", run_knn)
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
    _data_options(knn, batch_size=256, workers=0)

    linear = _command(sub, "linear", "linear probes of frozen features, one per lr, trained in one pass", run_linear)
    linear.add_argument(
        "--variant",
        choices=["cls", "last4", "cls+avg"],
        default="last4",
        help="last [CLS]; [CLS] of each of the last 4 blocks, concatenated (DINO/iBOT ViT-S); [CLS] + patch mean "
        "(%(default)s)",
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
    _random_init_option(linear)
    linear.add_argument(
        "--raw-pixels",
        action="store_true",
        help="probe the normalised pixels instead of an encoder (the logistic-regression baseline)",
    )
    _data_options(linear, batch_size=256, workers=0, what="feature extraction and probe SGD batch")

    ft = _command(sub, "finetune", "full fine-tuning with layer-wise lr decay, mixup/cutmix, drop path", run_finetune)
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
    _random_init_option(ft)
    _data_options(ft, batch_size=128, workers=None)


def _command(
    sub: argparse._SubParsersAction, name: str, help: str, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    parser.add_argument("run_path", metavar="RUN", help="run folder or checkpoint file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data overrides, e.g. data.root=/data")
    parser.set_defaults(run=run)
    return parser


def _data_options(parser: argparse.ArgumentParser, batch_size: int, workers: int | None, what: str = "batch") -> None:
    parser.add_argument("--limit", type=int, help="use only the first N train and test images")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"{what} size (%(default)s)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=workers,
        help="data loading processes (" + ("%(default)s)" if workers is not None else "default: the run's)"),
    )


# ---------------------------------------------------------------------------------------------------
# Shared helpers


def _device() -> torch.device:
    """The first GPU, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_options(args: argparse.Namespace) -> None:
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
    ]
    for name, ok, rule in rules:
        if hasattr(args, name) and not ok(getattr(args, name)):
            value = getattr(args, name)
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            raise ConfigError(f"--{name.replace('_', '-')}: {rule}; got {shown}")


def _labelled_splits(run: LoadedRun, args: argparse.Namespace, evaluation: str) -> list[tuple[str, ImageSource]]:
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


def _features(
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
    device = _device()
    path, key = None, {}
    if getattr(args, "cache", False) and run.checkpoint is not None:
        path = run.run_dir / "eval" / f"features_{variant}_{name}{_suffix(label)}.pt"
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


def _label(run: LoadedRun) -> str:
    return "random init" if run.random_init else PRETRAINED


def _suffix(label: str) -> str:
    """Results of a baseline (random init, raw pixels) sit beside the run's own, never over them."""
    return "" if label == PRETRAINED else "_" + label.replace(" ", "_")


def _random_init_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="evaluate the run's initialisation instead of its trained weights (the from-scratch baseline)",
    )


def _writable_results(run: LoadedRun) -> None:
    """Fail before evaluating when RUN/eval cannot take the results (a read-only or full run folder)."""
    from mimkit.engine.checkpoint import ensure_writable

    ensure_writable(run.run_dir / "eval", "eval", "copy the run folder somewhere writable and evaluate it there")


def _save(run: LoadedRun, name: str, result: dict, headline: str, score: float, label: str = PRETRAINED) -> None:
    from mimkit.eval.results import save_result

    out = save_result(run.run_dir, f"{name}{_suffix(label)}", result, headline, score)
    print(f"saved {out} (and a line in {out.parent / 'history.jsonl'})")


# ---------------------------------------------------------------------------------------------------
# k-NN


def _knn_row(
    encoder: torch.nn.Module,
    run: LoadedRun,
    splits: list[tuple[str, ImageSource]],
    args: argparse.Namespace,
    label: str,
) -> dict[int, float]:
    from mimkit.eval.knn import knn_accuracy

    train, test = (_features(encoder, run, split, args, label, args.pooling) for split in splits)
    if max(args.k) > len(train.labels):
        from mimkit.config import ConfigError

        raise ConfigError(
            f"--k: {max(args.k)} neighbours of only {len(train.labels)} training images; use k <= "
            f"{len(train.labels)} (or more images: a larger --limit)"
        )
    classes = splits[0][1].info.num_classes
    return knn_accuracy(train.features, train.labels, test.features, test.labels, classes, args.k, args.temperature)


def run_knn(args: argparse.Namespace) -> int:
    _check_options(args)
    from rich.console import Console
    from rich.table import Table

    from mimkit.eval.features import RawPixels
    from mimkit.runs import load_run

    run = load_run(args.run_path, args.overrides)
    _writable_results(run)
    splits = _labelled_splits(run, args, "k-NN")
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
    }
    accuracy = {name: {str(k): v for k, v in acc.items()} for name, acc in rows.items()}
    headline = "; ".join(
        f"k={k}: " + ", ".join(f"{name} {100 * acc[k]:.2f}" for name, acc in rows.items()) for k in args.k
    )
    main_k = 20 if 20 in args.k else args.k[0]
    result = {**settings, "accuracy": {**_earlier_knn_rows(run, settings), **accuracy}}
    _save(run, "knn", result, headline, rows[PRETRAINED][main_k])
    return 0


def _earlier_knn_rows(run: LoadedRun, settings: dict) -> dict[str, dict[str, float]]:
    """Rows of an earlier `eval knn` with the same settings (its --baselines, say), kept beside the new ones."""
    path = run.run_dir / "eval" / "knn.json"
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    same = all(earlier.get(key) == value for key, value in settings.items())
    return earlier.get("accuracy", {}) if same else {}


# ---------------------------------------------------------------------------------------------------
# Linear probe


def run_linear(args: argparse.Namespace) -> int:
    _check_options(args)
    import torch

    from mimkit.config import ConfigError
    from mimkit.eval.features import RawPixels
    from mimkit.eval.linear import train_linear_probes
    from mimkit.runs import load_run

    if not 0 <= args.val_fraction < 1:
        raise ConfigError(f"--val-fraction: must lie in [0, 1); got {args.val_fraction}")
    if args.raw_pixels and args.random_init:
        raise ConfigError("--raw-pixels and --random-init are two different baselines; give one of them")
    run = load_run(args.run_path, args.overrides, random_init=args.random_init)
    _writable_results(run)
    splits = _labelled_splits(run, args, "the linear probe")
    classes = splits[0][1].info.num_classes
    encoder, label, variant = (
        (RawPixels(), "raw pixels", "cls") if args.raw_pixels else (run.encoder(), _label(run), args.variant)
    )
    train, test = (_features(encoder, run, split, args, label, variant) for split in splits)
    device = _device()
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
    _save(
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
        label,
    )
    return 0


# ---------------------------------------------------------------------------------------------------
# Fine-tuning


def run_finetune(args: argparse.Namespace) -> int:
    _check_options(args)
    from dataclasses import asdict

    from rich.console import Console
    from safetensors.torch import save_file

    from mimkit.eval.features import encoder_image_size
    from mimkit.eval.finetune import FinetuneConfig, finetune
    from mimkit.runs import load_run

    run = load_run(args.run_path, args.overrides, random_init=args.random_init)
    _writable_results(run)
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
    (_, train_source), (_, eval_source) = _labelled_splits(run, args, "fine-tuning")
    size = encoder_image_size(encoder, train_source)
    device = _device()
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
    weights = run.run_dir / "eval" / f"finetune{_suffix(_label(run))}.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}, str(weights))
    _save(
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
        f"{_label(run)}: top-1 {100 * result.top1:.2f} after {cfg.epochs} epochs (best {100 * best['top1']:.2f})",
        result.top1,
        _label(run),
    )
    return 0
