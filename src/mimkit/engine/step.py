"""One optimizer step of the engine: forward and backward over the micro-batches, then the update.

`Trainer` takes every step through `train_step`, and the step-time benchmark times this same function, so the
benchmark can never drift from what training does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.fabric import Fabric

from mimkit.engine.optim import Hyperparameters, optimizer_step
from mimkit.methods.base import Method
from mimkit.schedules import Progress


@dataclass
class StepResult:
    loss: torch.Tensor
    """Mean loss over the micro-batches that had images (NaN when none had)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The method's metrics of the last micro-batch."""
    norms: dict[str, torch.Tensor] | None = None
    """Gradient norms of the update; None when the loss was not finite and no update was made."""
    images: int = 0
    """Readable images of this process in the step (0: every one was unreadable, the loss is NaN)."""


def train_step(
    fabric: Fabric,
    module: Any,
    method: Method,
    optimizer: Any,
    hyperparameters: Hyperparameters,
    batches: Sequence[dict[str, Any]],
    progress: Progress,
) -> StepResult:
    """Schedule lr/wd, accumulate gradients over `batches` (one per micro-step; one whose images were all
    unreadable has `views` None and is skipped), then clip and update unless the loss is not finite on a rank.

    `module` is the Fabric-wrapped `method`; gradients are synchronised across processes on the last micro-step.
    """
    hyperparameters.apply(optimizer, progress)
    losses: list[torch.Tensor] = []
    metrics: dict[str, Any] = {}
    images = 0
    for micro, batch in enumerate(batches):
        if batch["views"] is None:
            continue
        images += len(batch["label"])
        sync = micro == len(batches) - 1 or fabric.world_size == 1
        with fabric.no_backward_sync(module, enabled=not sync), fabric.autocast():
            out = module.training_step(batch, progress)
        fabric.backward(out.loss / len(batches))
        losses.append(out.loss.detach())
        metrics = out.metrics
    loss = torch.stack(losses).mean() if losses else torch.tensor(math.nan)
    if not all_finite(fabric, loss):
        return StepResult(loss, metrics, images=images)
    return StepResult(loss, metrics, optimizer_step(fabric, method, optimizer, progress), images)


def all_finite(fabric: Fabric, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (one host sync)."""
    flag = torch.isfinite(loss).float()
    if fabric.world_size > 1:
        flag = fabric.all_reduce(flag, reduce_op="min")
    return bool(flag.item())
