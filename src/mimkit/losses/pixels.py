"""Pixel targets for masked image modelling: images cut into patch vectors, normalised per patch (MAE's
`norm_pix_loss`), a regression loss on the masked patches alone, and CIM's sliding-window normalised target."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h * w, patch * patch * C), patches in row-major order, each patch's pixels (p, p, C)."""
    batch, channels, height, width = images.shape
    if height % patch or width % patch:
        raise ValueError(f"image {height}x{width} is not divisible by the patch size {patch}")
    h, w = height // patch, width // patch
    patches = images.reshape(batch, channels, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(batch, h * w, patch * patch * channels)


def unpatchify(patches: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """The inverse of `patchify`: (B, h * w, patch * patch * C) -> (B, C, height, width)."""
    batch, _, size = patches.shape
    channels, h, w = size // (patch * patch), height // patch, width // patch
    images = patches.reshape(batch, h, w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return images.reshape(batch, channels, height, width)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch vector minus its mean, over its standard deviation (the target MAE and SimMIM regress)."""
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True, unbiased=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_mse(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches (mask (B, N) bool) of the whole batch."""
    per_patch = (predictions.float() - targets.float()).square().mean(-1)
    weights = mask.flatten(1).float()
    return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)


def sliding_window_stats(images: torch.Tensor, window: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel and channel, the mean and (population) standard deviation of the `window` x `window`
    neighbourhood centred on it; windows are cut at the border (statistics of the pixels inside). An even window
    has one more pixel after the centre than before it. (B, C, H, W) -> two tensors of that shape."""
    before, after = (window - 1) // 2, window // 2
    padding = (before, after, before, after)
    x = images.float()

    def window_sum(values: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(values, padding), window, stride=1) * (window * window)

    count = window_sum(torch.ones_like(x[:, :1]))
    mean = window_sum(x) / count
    variance = (window_sum(x * x) / count - mean * mean).clamp(min=0)
    return mean, (variance + eps).sqrt()


def sliding_window_normalize(images: torch.Tensor, window: int, eps: float = 1e-6) -> torch.Tensor:
    """CIM's ResPix target: each pixel of each channel minus the mean of the `window` x `window` neighbourhood
    centred on it, over that neighbourhood's standard deviation (`sliding_window_stats`); same shape out."""
    mean, std = sliding_window_stats(images, window, eps)
    return (images.float() - mean) / std
