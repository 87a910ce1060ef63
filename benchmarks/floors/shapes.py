"""Override lists the methods' benchmark cases share: data of one batch, and backbone shapes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str
    """Path under configs/."""
    overrides: tuple[str, ...]


def data(size: int, batch: int, channels: int) -> tuple[str, ...]:
    """Synthetic images of the tier's size, exactly one batch of them."""
    return (
        "data.source=synthetic",
        f"data.synthetic.size={size}",
        f"data.synthetic.images={batch}",
        f"data.batch_size={batch}",
        f"data.channels={channels}",
        "data.num_workers=0",
    )


def vit(dim: int, depth: int, heads: int) -> tuple[str, ...]:
    """A ViT of the given shape on 28x28 images with 4-pixel patches (7x7 tokens)."""
    return (
        "method.backbone.name=vit_tiny_patch16_224",
        "method.backbone.img_size=28",
        "method.backbone.patch_size=4",
        f"method.backbone.embed_dim={dim}",
        f"method.backbone.depth={depth}",
        f"method.backbone.num_heads={heads}",
    )
