"""Evaluations of a run's frozen features from Python: typed settings in, a result out. `mimkit eval knn` and
`mimkit eval linear` only parse their options into these settings, print the result and save it.

    from mimkit.eval.frozen import KnnConfig, evaluate_knn
    result = evaluate_knn(load_run("runs/ibot"), KnnConfig(ks=(20,)))
    result.rows["pretrained"][20]

Features are cached (`FeatureOptions.cache`) under a key of what changes them: the checkpoint file and its
modification time, the data config, the split, the image size, the feature variant, the image limit and whose
features they are (the run's, its random init's, the raw pixels').
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mimkit.config import ConfigError
from mimkit.data.sources import ImageSource, same_images_notice
from mimkit.eval.features import Features, RawPixels, encoder_image_size
from mimkit.eval.knn import DEFAULT_KS, knn_accuracy
from mimkit.eval.linear import DEFAULT_LRS, ProbeResult, train_linear_probes
from mimkit.eval.probe import cached_features, probe_features
from mimkit.eval.results import evaluated_data
from mimkit.models.encoder import Encoder
from mimkit.runs import LoadedRun

PRETRAINED = "pretrained"

Split = tuple[str, ImageSource]


@dataclass(frozen=True)
class FeatureOptions:
    """How frozen features are extracted: batch, loader processes, the first `limit` images of each split, and
    whether they are saved to (and reused from) `RUN/eval/features_*.pt`."""

    batch_size: int = 256
    num_workers: int = 0
    limit: int | None = None
    cache: bool = False


def eval_device() -> torch.device:
    """This process's GPU (the first, unless a launcher gave it another), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def run_label(run: LoadedRun) -> str:
    return "random init" if run.random_init else PRETRAINED


def result_suffix(label: str) -> str:
    """Results of a baseline (random init, raw pixels) sit beside the run's own, never over them."""
    return "" if label == PRETRAINED else "_" + label.replace(" ", "_")


def labelled_splits(run: LoadedRun, limit: int | None, evaluation: str) -> tuple[list[Split], str | None]:
    """The run's train and eval splits by name (first `limit` images each), and a notice when the eval split holds
    the training images themselves; an error if the data has no labels."""
    data = run.cfg.data
    splits = [(split, run.source(split, limit=limit)) for split in (data.split, data.eval_split)]
    if not splits[0][1].info.num_classes:
        raise ConfigError(f"{evaluation} needs labelled data; {data.source} at {data.root} has no labels")
    notice = same_images_notice(data)
    return splits, None if notice is None else f"{notice} (data.val_fraction=0.1 goes after the run folder)"


def data_record(run: LoadedRun, splits: list[Split], limit: int | None) -> dict[str, Any]:
    """What an evaluation read (source, folder, splits and their image counts, limit): saved with its result."""
    return evaluated_data(run.cfg.data, splits, run.cfg.data.limit if limit is None else limit)


def feature_key(run: LoadedRun, split: str, size: int, variant: str, limit: int | None, label: str) -> dict[str, Any]:
    """Everything a split's frozen features depend on: a cached file saved under another key is recomputed."""
    return {
        "checkpoint": str(run.checkpoint),
        "modified": run.checkpoint.stat().st_mtime_ns,
        "data": asdict(run.cfg.data),
        "size": size,
        "split": split,
        "variant": variant,
        "limit": limit,
        "features_of": label,
    }


def split_features(
    encoder: Encoder, run: LoadedRun, split: Split, options: FeatureOptions, label: str, variant: str
) -> Features:
    """Frozen features of a (name, source) split (`variant`: a pooling or last4), cached when `options.cache`."""
    name, source = split
    size = encoder_image_size(encoder, source)
    device = eval_device()
    cached = options.cache
    path = run.run_dir / "eval" / f"features_{variant}_{name}{result_suffix(label)}.pt" if cached else None
    key = feature_key(run, name, size, variant, options.limit, label) if cached else {}

    def compute() -> Features:
        return probe_features(
            encoder.to(device),
            source,
            size,
            variant,  # type: ignore[arg-type]
            options.batch_size,
            options.num_workers,
            device,
            description=f"{label}: {name} features",
        )

    return cached_features(path, key, compute)


@dataclass(frozen=True)
class KnnConfig:
    """Weighted k-NN (DINO/iBOT): neighbour counts (None: those of `DEFAULT_KS` the bank holds), vote temperature,
    feature pooling, the random-init and raw-pixel baselines, and the bank's storage and chunking
    (`mimkit.eval.knn`)."""

    ks: tuple[int, ...] | None = None
    temperature: float = 0.07
    pooling: str = "cls"
    baselines: bool = False
    bank_dtype: str = "float32"
    bank_chunk: int = 131072
    features: FeatureOptions = field(default_factory=FeatureOptions)


@dataclass
class KnnResult:
    ks: tuple[int, ...]
    rows: dict[str, dict[int, float]]
    """Top-1 (a fraction) per k, per row: pretrained (or random init), and with baselines random init, raw pixels."""
    data: dict[str, Any]
    notices: list[str]


def evaluate_knn(run: LoadedRun, cfg: KnnConfig, random_init: LoadedRun | None = None) -> KnnResult:
    """k-NN accuracy of the run's encoder; with `cfg.baselines`, also of `random_init` (the run opened with
    `random_init=True`) and of the raw pixels."""
    splits, notice = labelled_splits(run, cfg.features.limit, "k-NN")
    notices = [] if notice is None else [notice]
    bank = len(splits[0][1])
    ks = cfg.ks or tuple(k for k in DEFAULT_KS if k <= bank) or (bank,)
    encoders: dict[str, tuple[Encoder, LoadedRun]] = {run_label(run): (run.encoder(), run)}
    if cfg.baselines:
        if random_init is None:
            raise ValueError("evaluate_knn: baselines need the run opened with random_init=True")
        encoders |= {"random init": (random_init.encoder(), random_init), "raw pixels": (RawPixels(), run)}
    rows = {label: _knn_row(encoder, owner, splits, cfg, ks, label) for label, (encoder, owner) in encoders.items()}
    return KnnResult(ks, rows, data_record(run, splits, cfg.features.limit), notices)


def _knn_row(
    encoder: Encoder, run: LoadedRun, splits: list[Split], cfg: KnnConfig, ks: tuple[int, ...], label: str
) -> dict[int, float]:
    train, test = (split_features(encoder, run, split, cfg.features, label, cfg.pooling) for split in splits)
    if max(ks) > len(train.labels):
        raise ConfigError(
            f"--k: {max(ks)} neighbours of only {len(train.labels)} training images; use k <= "
            f"{len(train.labels)} (or more images: a larger --limit)"
        )
    classes = splits[0][1].info.num_classes or 0
    return knn_accuracy(
        *(train.features, train.labels, test.features, test.labels, classes, ks, cfg.temperature),
        bank_chunk_size=cfg.bank_chunk,
        bank_dtype=getattr(torch, cfg.bank_dtype),
    )


@dataclass(frozen=True)
class LinearConfig:
    """Linear probes of frozen features, one per lr, trained in one pass (`mimkit.eval.linear`): the feature
    variant (None: last-4 [CLS] where the encoder has it, else cls), lrs, SGD epochs, the fraction of the train
    features held out to select the lr (0: select on the eval split, as DINO/iBOT report), raw pixels instead of
    the encoder."""

    variant: str | None = None
    lrs: tuple[float, ...] = DEFAULT_LRS
    epochs: int = 100
    val_fraction: float = 0.0
    raw_pixels: bool = False
    features: FeatureOptions = field(default_factory=FeatureOptions)


@dataclass
class LinearResult:
    probes: ProbeResult
    label: str
    variant: str
    train_images: int
    held_out: int
    """Train images held out to select the lr (0: selected on the eval split)."""
    data: dict[str, Any]
    notices: list[str]


def linear_probe(run: LoadedRun, cfg: LinearConfig) -> LinearResult:
    """Linear probes of the run's encoder (or of the raw pixels) on its labelled splits."""
    if cfg.raw_pixels and run.random_init:
        raise ConfigError("--raw-pixels and --random-init are two different baselines; give one of them")
    splits, notice = labelled_splits(run, cfg.features.limit, "the linear probe")
    classes = splits[0][1].info.num_classes or 0
    encoder, label, variant = (
        (RawPixels(), "raw pixels", "cls")
        if cfg.raw_pixels
        else (run.encoder(), run_label(run), cfg.variant or default_variant(run.encoder()))
    )
    train, test = (split_features(encoder, run, split, cfg.features, label, variant) for split in splits)
    device = eval_device()
    train_x, train_y = train.features.to(device), train.labels
    val: dict[str, torch.Tensor] = {}
    if cfg.val_fraction > 0:
        held_out = round(cfg.val_fraction * len(train_y))
        if not 0 < held_out < len(train_y):
            raise ConfigError(f"--val-fraction {cfg.val_fraction} of {len(train_y)} train images leaves a split empty")
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))
        val = {"val_x": train_x[order[:held_out]], "val_y": train_y[order[:held_out]]}
        train_x, train_y = train_x[order[held_out:]], train_y[order[held_out:]]
    probes = train_linear_probes(
        *(train_x, train_y, test.features.to(device), test.labels, classes, list(cfg.lrs), cfg.epochs),
        cfg.features.batch_size,
        **val,
    )
    held = len(val["val_y"]) if val else 0
    notices = [] if notice is None else [notice]
    return LinearResult(
        probes, label, variant, len(train_y), held, data_record(run, splits, cfg.features.limit), notices
    )


def default_variant(encoder: Encoder) -> str:
    """DINO/iBOT's last-4 [CLS] probe where the encoder can give it, else its image feature (a CNN, a shallow ViT):
    the default then works on every encoder, and the output names the variant it used."""
    try:
        encoder.check_block_features(4)
    except ConfigError:
        return "cls"
    return "last4"
