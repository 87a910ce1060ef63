"""Frozen features for k-NN and linear probes: the poolings of `features.py` plus last-4 blocks' [CLS].

DINO and iBOT probe small ViTs on the [CLS] token of each of the last 4 blocks, each passed through the final
norm, concatenated: intermediate blocks carry information that the last block's [CLS] no longer separates
linearly. `LastBlocksCLS` reads them with forward hooks on the timm blocks, so the encoder's own forward (mask
token, positional embedding, prefix tokens) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimkit.config import ConfigError
from mimkit.data.sources import ImageSource
from mimkit.eval.features import Features, Pooling, extract_features

Variant = Pooling | Literal["last4"]
VARIANTS: tuple[Variant, ...] = ("cls", "avg", "cls+avg", "last4")


class LastBlocksCLS(nn.Module):
    """Wraps an encoder with a timm ViT at `.vit`: [CLS] after each of its last `blocks` blocks, final-normed.

    Returns them concatenated as a single token (B, 1, blocks * D), so `extract_features(..., "cls")` takes them.
    """

    num_prefix_tokens = 1

    def __init__(self, encoder: nn.Module, blocks: int = 4) -> None:
        super().__init__()
        vit = getattr(encoder, "vit", None)
        if not isinstance(vit, VisionTransformer):
            raise ConfigError(f"last-blocks features need an encoder with a timm ViT at .vit; got {type(encoder)}")
        if vit.cls_token is None:
            raise ConfigError("last-blocks [CLS] features need a ViT with a [CLS] token")
        if len(vit.blocks) < blocks:
            raise ConfigError(f"last-{blocks} features need at least {blocks} blocks; this ViT has {len(vit.blocks)}")
        self.encoder = encoder
        self.blocks = blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.encoder.vit
        captured: list[torch.Tensor] = []
        hooks = [
            block.register_forward_hook(lambda _module, _inputs, output: captured.append(output[:, 0]))
            for block in vit.blocks[-self.blocks :]
        ]
        try:
            self.encoder(images)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat([vit.norm(cls) for cls in captured], dim=-1).unsqueeze(1)


def probe_features(
    encoder: nn.Module,
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
    """Features saved at `path` when they were computed for the same `key`; otherwise computed and saved there.

    `key` names everything the features depend on (checkpoint, data, variant, limit), so a stale file is
    recomputed rather than silently reused. No `path`: just compute.
    """
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            return Features(saved["features"], saved["labels"])
    features = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "features": features.features, "labels": features.labels}, path)
    return features
