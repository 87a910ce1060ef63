"""[CLS] attention of a ViT's last block, per head, and DINO-style "kept-mass" thresholded maps.

timm runs attention through fused SDPA, which never forms the probabilities. They are recomputed here from
the last block's own qkv projection applied to that block's attention input, captured by a forward hook for
one call, so timm is left untouched and the maps are exactly the weights the block used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from timm.layers import Attention

from mimkit.models.vit import MaskableViT
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


def attention_probabilities(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) of a timm `Attention` for its input `x` (B, T, D), as its forward computes it."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)


@torch.no_grad()
def last_block_attention(encoder: MaskableViT, images: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (B, heads, T, T) of the encoder's last block on `images`."""
    attn = encoder.vit.blocks[-1].attn
    if not isinstance(attn, Attention):
        raise TypeError(f"last block uses {type(attn).__name__}; attention maps need timm's standard Attention")
    inputs: list[torch.Tensor] = []
    handle = attn.register_forward_hook(lambda _module, args, _output: inputs.append(args[0]))
    try:
        encoder(images)
    finally:
        handle.remove()
    return attention_probabilities(attn, inputs[0])


def kept_mass(maps: torch.Tensor, fraction: float = KEPT_MASS) -> torch.Tensor:
    """Per (h, w) map, the smallest set of patches whose attention adds up to >= `fraction` of the map's total.

    The total is the mass on patches (not on [CLS] itself), so the threshold reads the same for every head.
    """
    flat = maps.flatten(-2)
    values, order = flat.sort(dim=-1, descending=True)
    before = values.cumsum(-1) - values  # mass of the patches ranked above each one
    keep = before < fraction * flat.sum(-1, keepdim=True)
    return torch.zeros_like(keep).scatter(-1, order, keep).view_as(maps)


def attention_maps(encoder: MaskableViT, images: torch.Tensor, fraction: float = KEPT_MASS) -> AttentionMaps:
    """[CLS]->patch attention of the last block per head, reshaped to the patch grid, and its kept-mass masks."""
    attention = last_block_attention(encoder, images)
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
