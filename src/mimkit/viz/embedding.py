"""Image features in two dimensions: the first two principal components of [CLS] features, coloured by class.

A linear projection rather than t-SNE: it needs no extra dependency, it is deterministic, and what it shows is
honest about the features (classes apart here are linearly apart in the full space too; t-SNE can draw clusters
that a linear probe cannot find).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure


def embedding_figure(points: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str] = ()) -> Figure:
    """Scatter of (N, 2) `points`, one colour and legend entry per label (-1: "unlabelled", in grey)."""
    figure = Figure(figsize=(6.5, 4.5))
    ax = figure.subplots()
    xy = points.detach().float().cpu().numpy()
    labels = labels.cpu()
    for label in sorted(set(labels.tolist())):
        chosen = (labels == label).numpy()
        name = "unlabelled" if label < 0 else (class_names[label] if label < len(class_names) else str(label))
        style = {"color": "grey"} if label < 0 else {}
        ax.scatter(xy[chosen, 0], xy[chosen, 1], s=6, alpha=0.7, label=name, **style)
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(f"[CLS] features of {len(xy)} images, PCA", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small", markerscale=2)
    figure.tight_layout()
    return figure
