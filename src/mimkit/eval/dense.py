"""Dense evaluation of a run from Python: the linear segmentation probe (`mimkit.eval.segment`) on the run's data
splits, with its baselines; `mimkit eval segment` parses its options into `SegmentConfig` and saves the result.

    from mimkit.eval.dense import SegmentConfig, segment_probe
    result = segment_probe(load_run("runs/ibot"), SegmentConfig(epochs=10))
    result.rows["pretrained"].best.miou
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mimkit.config import ConfigError
from mimkit.data.info import DataError
from mimkit.data.sources import ImageSource, same_images_notice
from mimkit.data.sources.base import IGNORE_INDEX
from mimkit.eval.features import encoder_image_size
from mimkit.eval.frozen import FeatureOptions, data_record, eval_device, run_label
from mimkit.eval.linear import LinearProbeSweep
from mimkit.eval.results import replace_atomically
from mimkit.eval.segment import (
    SEGMENT_LRS,
    PatchPixels,
    SegmentationProbeResult,
    TokenMaps,
    extract_token_maps,
    train_segmentation_probes,
)
from mimkit.models.encoder import Encoder
from mimkit.runs import LoadedRun

RAW_PIXELS = "raw pixels"
PROBE_FILE = "segment_probe.pt"
"""The pretrained encoder's selected head, in RUN/eval: what `mimkit viz --what segmentation` draws with."""


@dataclass(frozen=True)
class SegmentConfig:
    """Linear segmentation probes, one per lr, trained in one pass: lrs, SGD epochs over the token maps, the fixed
    standardisation of the tokens (the BN before DINOv2's linear head; off: a plain linear layer), and the
    baselines (the run's random init, and each patch's own pixels on the same grid)."""

    lrs: tuple[float, ...] = SEGMENT_LRS
    epochs: int = 10
    standardise: bool = True
    baselines: bool = False
    features: FeatureOptions = field(default_factory=lambda: FeatureOptions(batch_size=64))


@dataclass
class SegmentResult:
    rows: dict[str, SegmentationProbeResult]
    """Its probes' scores per row: "pretrained" and, with baselines, "random init" and "raw pixels"."""
    classes: tuple[str, ...]
    grid: tuple[int, int]
    """Tokens per side of the encoder's grid at `image_size`."""
    image_size: int
    data: dict[str, Any]
    notices: list[str]


def segment_probe(run: LoadedRun, cfg: SegmentConfig, random_init: LoadedRun | None = None) -> SegmentResult:
    """Linear segmentation probes of the run's encoder on its split / eval_split label maps; with `cfg.baselines`
    also of `random_init` (the run opened with `random_init=True`) and of the raw patch pixels. Every label map is
    checked (headers first, then each as it is read) before any probe trains."""
    splits = [run.source(split, limit=cfg.features.limit) for split in (run.cfg.data.split, run.cfg.data.eval_split)]
    for source in splits:
        source.check_label_maps()
    classes = splits[0].segmentation_classes()
    if splits[1].segmentation_classes() != classes:
        raise ConfigError(
            f"the splits {run.cfg.data.split} and {run.cfg.data.eval_split} name different segmentation classes"
        )
    if len(classes) >= IGNORE_INDEX:
        raise ConfigError(f"{len(classes)} segmentation classes; ids must stay below {IGNORE_INDEX} (not scored)")
    encoder = run.encoder()
    encoders: dict[str, Encoder] = {run_label(run): encoder}
    if cfg.baselines:
        if random_init is None:
            raise ValueError("segment_probe: baselines need the run opened with random_init=True")
        pixels = PatchPixels(encoder.patch_size, encoder_image_size(encoder, splits[0]))
        encoders |= {"random init": random_init.encoder(), RAW_PIXELS: pixels}
    rows = {}
    for label, model in encoders.items():
        train, test = _token_maps(model, splits, cfg.features, len(classes), label)
        if model is encoder:  # the baselines use the same grid and maps
            grid, size = (train.tokens.shape[1], train.tokens.shape[2]), train.targets.shape[-1]
        if not (test.targets != IGNORE_INDEX).any():
            raise DataError(f"the {run.cfg.data.eval_split} split's label maps have no scored pixel (all 255)")
        rows[label] = train_segmentation_probes(
            *(train, test, len(classes), cfg.lrs, cfg.epochs, cfg.features.batch_size),
            standardise=cfg.standardise,
            description=f"{label}: probes",
            device=eval_device(),
        )
    notice = same_images_notice(run.cfg.data)
    record = data_record(
        run, list(zip((run.cfg.data.split, run.cfg.data.eval_split), splits, strict=True)), cfg.features.limit
    )
    return SegmentResult(rows, classes, grid, size, record, [] if notice is None else [notice])


def _token_maps(
    encoder: Encoder, splits: list[ImageSource], options: FeatureOptions, num_classes: int, label: str
) -> tuple[TokenMaps, TokenMaps]:
    device = eval_device()
    size = encoder_image_size(encoder, splits[0])
    found = [
        extract_token_maps(
            encoder.to(device),
            source,
            size,
            num_classes,
            options.batch_size,
            options.num_workers,
            device,
            description=f"{label}: {name} tokens",
        )
        for name, source in zip(("train", "eval"), splits, strict=True)
    ]
    return found[0], found[1]


def result_record(result: SegmentResult, label: str) -> dict[str, Any]:
    """What `segment.json` keeps of one row: the sweep's table, the selected lr's scores and per-class IoU (None for a
    class absent from the eval split's targets and predictions)."""
    probes = result.rows[label]

    def number(value: float) -> float | None:
        return None if math.isnan(value) else value

    return {
        "features_of": label,
        "classes": list(result.classes),
        "grid": list(result.grid),
        "image_size": result.image_size,
        "table": [
            {"lr": lr, "miou": number(s.miou), "pixel_accuracy": number(s.pixel_accuracy)}
            for lr, s in zip(probes.lrs, probes.scores, strict=True)
        ],
        "best_lr": probes.best_lr,
        "miou": number(probes.best.miou),
        "pixel_accuracy": number(probes.best.pixel_accuracy),
        "per_class_iou": {
            name: number(iou) for name, iou in zip(result.classes, probes.best.per_class_iou, strict=True)
        },
    }


def save_probe(path: Path, result: SegmentResult, label: str, checkpoint: Path) -> None:
    """The selected head of row `label` as a one-head probe (weights, standardisation, classes), replaced atomically."""
    probes = result.rows[label]
    assert probes.probe is not None
    head = probes.lrs.index(probes.best_lr)
    state = {
        "weight": probes.probe.weight[head].detach().cpu(),
        "bias": probes.probe.bias[head].detach().cpu(),
        "mean": probes.probe.mean.cpu(),
        "std": probes.probe.std.cpu(),
        "classes": list(result.classes),
        "lr": probes.best_lr,
        "checkpoint": str(checkpoint),
        "modified": checkpoint.stat().st_mtime_ns,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: torch.save(state, tmp))


def load_probe(path: Path) -> tuple[LinearProbeSweep, tuple[str, ...], dict[str, Any]]:
    """A probe saved by `save_probe`, its class names and what it was trained on (checkpoint, lr)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    dim, classes = state["weight"].shape
    probe = LinearProbeSweep(dim, classes, 1)
    probe.load_state_dict(
        {"weight": state["weight"][None], "bias": state["bias"][None], "mean": state["mean"], "std": state["std"]}
    )
    about = {key: state[key] for key in ("lr", "checkpoint", "modified")}
    return probe, tuple(state["classes"]), about
