"""Pixel-level figures: crops with the patch masks a method trains on, and reconstructions of masked images.

Also the display helpers the other figures share: tensors arrive normalised (as the networks see them) and
are mapped back to [0, 1] with the data's mean and std, so 1-channel and RGB data both show as they look.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

SHADE = (0.15, 0.45, 1.0)
"""Colour laid over masked patches: blue stays visible on both black (Fashion-MNIST) and photo backgrounds."""


def to_display(
    images: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """Normalised (..., C, H, W) images as (..., H, W, C) arrays in [0, 1]; no mean/std: already in [0, 1]."""
    images = images.detach().float().cpu()
    if mean is not None and std is not None:
        shape = (-1, 1, 1)
        images = images * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    return images.clamp(0, 1).movedim(-3, -1).numpy()


def show(ax: Axes, image: np.ndarray, title: str | None = None) -> None:
    """One (H, W, C) image in [0, 1]; a single channel is drawn in gray rather than a colour map."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(image)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


def overlay(
    ax: Axes, grid: np.ndarray, height: int, width: int, alpha: float = 0.55, color: Sequence[float] = SHADE
) -> None:
    """Shade the True cells of a (h, w) patch grid over an image of `height` x `width` pixels."""
    rgba = np.zeros((*grid.shape, 4))
    rgba[grid.astype(bool)] = (*color, alpha)
    ax.imshow(rgba, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")  # pixel edges


def figure_grid(rows: int, cols: int, cell: float = 1.6) -> tuple[Figure, np.ndarray]:
    """A pyplot-free figure (no global state, no display needed) with a (rows, cols) array of axes."""
    figure = Figure(figsize=(cols * cell, rows * cell), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return figure, axes


def mask_overlay_figure(
    crops: torch.Tensor,
    masks: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    names: Sequence[str] = (),
) -> Figure:
    """Crops (R, K, C, H, W) with their masks (R, K, h, w) shaded: one row per image, one column per crop, titled
    by `names` (default "crop 1", "crop 2", ...) and the masked fraction."""
    images = to_display(crops, mean, std)
    rows, cols = masks.shape[:2]
    names = list(names) or [f"crop {c + 1}" for c in range(cols)]
    figure, axes = figure_grid(rows, cols)
    for r in range(rows):
        for c in range(cols):
            ratio = masks[r, c].float().mean().item()
            show(axes[r, c], images[r, c], f"{names[c]}: {100 * ratio:.0f}% masked")
            overlay(axes[r, c], masks[r, c].cpu().numpy(), *images.shape[2:4])
    return figure


def reconstruction_figure(
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    masks: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Figure:
    """Per image (B, C, H, W): original, masked input, reconstruction, and the reconstruction with the visible
    patches restored from the original (what a pixel head actually had to predict stands out)."""
    height, width = originals.shape[-2:]
    pixel_mask = masks.bool().repeat_interleave(height // masks.shape[-2], -2)
    pixel_mask = pixel_mask.repeat_interleave(width // masks.shape[-1], -1).unsqueeze(1).cpu()
    pasted = torch.where(pixel_mask, reconstructions.cpu(), originals.cpu())
    columns = [originals, originals, reconstructions, pasted]
    titles = ["original", "masked", "reconstruction", "visible + reconstruction"]
    shown = [to_display(images, mean, std) for images in columns]
    figure, axes = figure_grid(len(originals), len(columns))
    for r in range(len(originals)):
        for c, images in enumerate(shown):
            show(axes[r, c], images[r], titles[c] if r == 0 else None)
        overlay(axes[r, 1], masks[r].cpu().numpy(), height, width, alpha=0.9)
    return figure


def panels_figure(
    panels: Sequence[tuple[str, torch.Tensor]],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Figure:
    """One row per image, one column per panel: (title, (B, C, H, W) images normalised with mean/std, or in
    [0, 1] without them) or (title, (B, h, w) maps in [0, 1], drawn as heat maps stretched over the image)."""
    count = len(panels[0][1])
    figure, axes = figure_grid(count, len(panels))
    for c, (title, values) in enumerate(panels):
        if values.ndim == 3:
            maps = values.detach().float().cpu().numpy()
            for r in range(count):
                axes[r, c].imshow(maps[r], cmap="magma", vmin=0, vmax=1, interpolation="nearest")
                axes[r, c].set_axis_off()
                if r == 0:
                    axes[r, c].set_title(title, fontsize=8)
            continue
        images = to_display(values, mean, std)
        for r in range(count):
            show(axes[r, c], images[r], title if r == 0 else None)
    return figure
