"""Centering of teacher outputs (DINO, iBOT): subtract a running mean of them before the teacher's softmax.

Centering keeps one prototype from dominating every target (collapse onto one dimension); the teacher's low
temperature works the other way, against uniform targets. The center is an EMA of the batch mean, averaged over
processes so that every rank holds the same center.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mimkit.distributed import all_reduce_mean


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32, also under bf16/fp16 autocast: softmax, cross-entropy and centering need the range."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Center(nn.Module):
    """EMA of the batch mean of teacher outputs over their last dimension, starting at zero.

    `shape` is the stored shape (its last entry the output dimension K; iBOT keeps (1, K) for [CLS] and
    (1, 1, K) for patches, the reference's shapes, which its checkpoints carry).
    """

    value: torch.Tensor

    def __init__(self, shape: Sequence[int], momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("value", torch.zeros(*shape))

    def subtract(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (..., K) minus the center, in at least float32."""
        return upcast(x) - self.value.view(-1)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Move the center towards the mean of `x` (..., K) over all its leading dimensions and processes."""
        batch_mean = all_reduce_mean(upcast(x).flatten(0, -2).mean(0).view_as(self.value))
        self.value.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)
