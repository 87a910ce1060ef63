"""Stochastic depth whose per-image decisions come with the batch, so they do not depend on the process count.

timm's `DropPath` draws a Bernoulli per sample on the device at every call: on N processes each rank draws its own
stream, so the run changes with N (and an activation-checkpointed block redraws when recomputed). Here each
`DropPath` of a timm model is replaced by a `SeededDropPath` of the same rate, numbered in module order; the
views draw one uniform per image and module in the worker, under the image's seed, and the model reads them from
a shared `DropDraws` before each forward. Same rule as timm's: a sample's branch is kept when its uniform is below
the keep probability and then scaled by 1 / keep.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn


class DropDraws:
    """The uniforms (B, modules) of the batch the model is about to see; set by the caller before each forward."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.uniforms: torch.Tensor | None = None


class SeededDropPath(nn.Module):
    """Drops a residual branch per sample with probability `rate`, by the batch's uniforms in column `index`."""

    def __init__(self, rate: float, index: int, draws: DropDraws) -> None:
        super().__init__()
        self.rate, self.index = rate, index
        self._draws = [draws]  # a list, so the shared holder is not taken for a submodule or state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uniforms = self._draws[0].uniforms
        if not self.training or self.rate == 0.0 or uniforms is None:
            return x
        keep = 1.0 - self.rate
        column = uniforms[:, self.index].to(device=x.device, dtype=torch.float32)
        scale = (column < keep).to(x.dtype).div_(keep)
        return x * scale.view(-1, *([1] * (x.ndim - 1)))

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}, index={self.index}"


def seed_drop_paths(model: nn.Module) -> DropDraws:
    """Replace every timm `DropPath` inside `model` by a `SeededDropPath` of its rate; returns their shared draws
    (`count` columns: what the views draw per image)."""
    draws = DropDraws(0)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DropPath):
                setattr(parent, name, SeededDropPath(child.drop_prob, draws.count, draws))
                draws.count += 1
    return draws
