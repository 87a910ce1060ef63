"""[CLS] attention of an encoder's last block, per head, and DINO-style "kept-mass" thresholded maps.

The probabilities come from the encoder contract (`Encoder.last_attention`: ViT and BEiT encoders have them),
so this module knows no backbone family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from mimkit.models.encoder import Encoder
from mimkit.viz.masks import figure_grid, overlay, show, to_display

KEPT_MASS = 0.6
"""Fraction of a head's patch attention the thresholded maps keep (DINO's figures use 0.6)."""


@dataclass
class AttentionMaps:
    attention: torch.Tensor
    """(B, heads, T, T) probabilities of the last block over all T = prefix + patch tokens; rows sum to 1."""
    maps: torch.Tensor
    """(B, heads, h, w) attention of [CLS] on each patch."""
    kept: torch.Tensor
    """(B, heads, h, w) bool: the fewest patches holding `fraction` of each map's mass."""
    fraction: float


def kept_mass(maps: torch.Tensor, fraction: float = KEPT_MASS) -> torch.Tensor:
    """Per (h, w) map, the smallest set of patches whose attention adds up to >= `fraction` of the map's total.

    The total is the mass on patches (not on [CLS] itself), so the threshold reads the same for every head.
    """
    flat = maps.flatten(-2)
    values, order = flat.sort(dim=-1, descending=True)
    before = values.cumsum(-1) - values  # mass of the patches ranked above each one
    keep = before < fraction * flat.sum(-1, keepdim=True)
    return torch.zeros_like(keep).scatter(-1, order, keep).view_as(maps)


def attention_maps(encoder: Encoder, images: torch.Tensor, fraction: float = KEPT_MASS) -> AttentionMaps:
    """[CLS]->patch attention of the last block per head, reshaped to the patch grid, and its kept-mass masks."""
    attention = encoder.last_attention(images)
    grid = encoder.grid(*images.shape[-2:])
    maps = attention[:, :, 0, encoder.num_prefix_tokens :].reshape(*attention.shape[:2], *grid)
    return AttentionMaps(attention, maps, kept_mass(maps, fraction), fraction)


def attention_figure(
    images: torch.Tensor, maps: AttentionMaps, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Figure:
    """Two rows per image: the image and each head's map; the head-mean map and each head's kept patches shaded."""
    shown = to_display(images, mean, std)
    height, width = shown.shape[1:3]
    batch, heads = maps.maps.shape[:2]
    figure, axes = figure_grid(2 * batch, heads + 1)
    for b in range(batch):
        top, bottom = axes[2 * b], axes[2 * b + 1]
        show(top[0], shown[b], "image" if b == 0 else None)
        bottom[0].imshow(maps.maps[b].mean(0).cpu().numpy(), cmap="inferno", interpolation="nearest")
        for h in range(heads):
            top[h + 1].imshow(maps.maps[b, h].cpu().numpy(), cmap="inferno", interpolation="nearest")
            show(bottom[h + 1], shown[b])
            overlay(bottom[h + 1], maps.kept[b, h].cpu().numpy(), height, width)
    axes[1, 0].set_title("mean of heads", fontsize=8)
    for h in range(heads):
        axes[0, h + 1].set_title(f"head {h + 1}", fontsize=8)
        axes[1, h + 1].set_title(f"kept {100 * maps.fraction:.0f}% mass", fontsize=8)
    return figure
