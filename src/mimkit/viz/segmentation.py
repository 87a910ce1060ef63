"""The linear segmentation probe at work: image, ground truth and prediction side by side, one colour per class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mimkit.viz.masks import figure_grid, show, to_display

IGNORED_COLOUR = (0.0, 0.0, 0.0)
"""Pixels that are not scored (id 255) are black."""


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 3) RGB in [0, 1]: tab20's ten strong colours, then its ten light ones (neighbouring ids
    differ clearly), then evenly spaced hues for more classes."""
    if num_classes <= 20:
        tab20 = np.array(colormaps["tab20"].colors)
        return np.concatenate([tab20[0::2], tab20[1::2]])[:num_classes]
    return colormaps["hsv"](np.linspace(0, 1, num_classes, endpoint=False))[:, :3]


def paint(labels: torch.Tensor, colours: np.ndarray) -> np.ndarray:
    """An (H, W) map of class ids as an (H, W, 3) image; ids without a colour (255: not scored) are black."""
    ids = labels.cpu().numpy().astype(np.int64)
    image = np.tile(np.array(IGNORED_COLOUR), (*ids.shape, 1))
    known = ids < len(colours)
    image[known] = colours[ids[known]]
    return image


def segmentation_figure(
    images: torch.Tensor,
    truth: torch.Tensor,
    predicted: torch.Tensor,
    classes: Sequence[str],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Figure:
    """One row per image: the image, its ground-truth label map and the probe's prediction; a legend of the classes
    that appear."""
    colours = class_colours(len(classes))
    shown = to_display(images, mean, std)
    truth, predicted = truth.cpu(), predicted.cpu()
    figure, axes = figure_grid(len(shown), 3)
    for row, image in enumerate(shown):
        show(axes[row, 0], image, "image" if row == 0 else None)
        show(axes[row, 1], paint(truth[row], colours), "ground truth" if row == 0 else None)
        show(axes[row, 2], paint(predicted[row], colours), "prediction" if row == 0 else None)
    present = sorted({int(i) for i in torch.cat([truth.flatten(), predicted.flatten()]).unique() if i < len(classes)})
    handles = [Patch(color=colours[i], label=classes[i]) for i in present]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=7)
    return figure
