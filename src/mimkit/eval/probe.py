"""Frozen features for k-NN and linear probes: the poolings of `features.py` plus last-4 blocks' [CLS].

DINO and iBOT probe small ViTs on the [CLS] token of each of the last 4 blocks, each passed through the final
norm, concatenated: intermediate blocks carry information that the last block's [CLS] no longer separates
linearly. Encoders give them through the contract (`Encoder.block_features`); CNNs have none and say so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from mimkit.data.sources import ImageSource
from mimkit.distributed import rank
from mimkit.eval.features import Features, Pooling, extract_features
from mimkit.models.encoder import Encoder

Variant = Pooling | Literal["last4"]
VARIANTS: tuple[Variant, ...] = ("cls", "avg", "cls+avg", "last4")


class LastBlocksCLS(Encoder):
    """An encoder's image feature after each of its last `blocks` blocks, concatenated as one token
    (B, 1, blocks * D), so `extract_features(..., "cls")` takes them; the encoder's forward runs unchanged."""

    num_prefix_tokens = 0

    def __init__(self, encoder: Encoder, blocks: int = 4) -> None:
        super().__init__()
        encoder.check_block_features(blocks)
        self.encoder = encoder
        self.blocks = blocks
        self.image_size = encoder.image_size

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder.block_features(images, self.blocks).unsqueeze(1)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]


def probe_features(
    encoder: Encoder,
    source: ImageSource,
    image_size: int,
    variant: Variant,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    description: str | None = None,
) -> Features:
    """Features of `variant` for every image of `source`, in dataset order (see `extract_features`)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: one of {VARIANTS}; got {variant!r}")
    model = LastBlocksCLS(encoder) if variant == "last4" else encoder
    pooling = "cls" if variant == "last4" else variant
    return extract_features(
        model, source, image_size, pooling, batch_size, num_workers, device, description=description
    )


def cached_features(path: Path | None, key: dict[str, Any], compute: Callable[[], Features]) -> Features:
    """Features saved at `path` when they were computed for the same `key`; otherwise computed and saved there (by
    the first process).

    `key` names everything the features depend on (checkpoint, data, variant, limit), so a stale file is
    recomputed rather than silently reused. No `path`: just compute.
    """
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            return Features(saved["features"], saved["labels"])
    features = compute()
    if path is not None and rank() == 0:  # every process computed the same gathered features
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "features": features.features, "labels": features.labels}, path)
    return features
