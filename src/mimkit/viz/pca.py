"""Patch features as colours: the first three principal components of patch tokens, shown as RGB.

The components are fitted over all patches of a batch of images at once, so one colour means the same
feature direction in every image (parts that the encoder groups together share a colour across images).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure

from mimkit.viz.masks import figure_grid, show, to_display


def principal_components(features: torch.Tensor, count: int) -> torch.Tensor:
    """Rows (N, D) -> their coordinates (N, count) on the first `count` principal directions, largest first.

    Coordinates beyond the data's rank (fewer than `count` features or rows) are 0.
    """
    centred = features.float() - features.float().mean(0)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)
    found = centred @ directions[:count].T
    coordinates = torch.zeros(len(features), count, device=features.device)
    coordinates[:, : found.shape[1]] = found
    return coordinates


def patch_pca_rgb(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens (B, N, D) -> (B, h, w, 3) in [0, 1]: PCA components 1-3, each min-max scaled over the batch.

    Components beyond the data's rank (fewer than 3 features or patches) stay 0.
    """
    batch, count, dim = patches.shape
    components = principal_components(patches.reshape(batch * count, dim), 3)
    low, high = components.amin(0), components.amax(0)
    rgb = (components - low) / (high - low).clamp_min(1e-12)
    return rgb.view(batch, *grid, 3)


def pca_figure(
    images: torch.Tensor, rgb: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Figure:
    """One column per image: the image above its patch-PCA colours."""
    shown = to_display(images, mean, std)
    figure, axes = figure_grid(2, len(shown))
    for b, image in enumerate(shown):
        show(axes[0, b], image)
        axes[1, b].imshow(rgb[b].cpu().numpy(), interpolation="nearest")
    axes[0, 0].set_title("image", fontsize=8)
    axes[1, 0].set_title("patch PCA (RGB)", fontsize=8)
    return figure
