"""A backbone by timm name: what a recipe's `method.backbone` (and a CIM generator, a DTM teacher) holds.

Its own module so that the encoder families, which read it to know their timm arguments, and the builder in
`mimkit.models.backbones`, which looks the families up, both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mimkit.config import check

TRANSFORMER_SHAPE = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
"""BackboneConfig fields that override a timm transformer's shape."""


@dataclass
class BackboneConfig:
    """A timm model by name (any model of a registered encoder family); the optional fields override a
    transformer's shape (tiny models for small images)."""

    name: str = "vit_small_patch16_224"
    img_size: int = 224
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float = 0.1
    weights: str | None = None
    """A local file (safetensors or torch) of timm weights to start from; never downloaded."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: same gradients, less memory, about a third more
    compute (large models on small GPUs)."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Further timm model arguments, e.g. layers/channels of a ResNet, depths/dims of a ConvNeXt, init_values of
    a BEiT."""

    def validate(self, prefix: str) -> None:
        check(self.img_size > 0, f"{prefix}.img_size", f"must be positive; got {self.img_size}")
        check(
            0 <= self.drop_path_rate < 1, f"{prefix}.drop_path_rate", f"must lie in [0, 1); got {self.drop_path_rate}"
        )
        if self.patch_size is not None:
            check(
                self.patch_size > 0 and self.img_size % self.patch_size == 0,
                f"{prefix}.img_size",
                f"image size {self.img_size} is not divisible by patch size {self.patch_size}; "
                f"use a multiple of {self.patch_size}",
            )

    def shape_overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in TRANSFORMER_SHAPE if getattr(self, k) is not None}
