"""Training progress and the schedules computed from it (per iteration, or per epoch where the papers say so).

On the ground floor: losses, methods, the engine and fine-tuning all read schedules; none of them owns one."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """Where training stands; every schedule (lr, wd, momentum, temperatures) is a function of it."""

    epoch: int
    step: int
    """Optimizer steps completed before this one (0-based index of the current step)."""
    steps_per_epoch: int
    epochs: int
    logged: bool = True
    """Whether the engine logs this step's metrics: measures that only feed the logs (training health, whose
    linear algebra waits for the GPU) are computed on these steps alone."""

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def fraction(self) -> float:
        return self.step / max(self.total_steps, 1)


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up from `warmup_start` to `start`, then cosine from `start` to `end`, per iteration.

    Matches the DINO/iBOT `cosine_scheduler`: warm-up values are `linspace(warmup_start, start, W)` over the
    first W iterations, then `end + (start - end) * (1 + cos(pi * i / (T - W))) / 2`.
    """

    start: float
    end: float
    warmup_epochs: float = 0.0
    warmup_start: float = 0.0

    def __call__(self, progress: Progress) -> float:
        warmup = int(self.warmup_epochs * progress.steps_per_epoch)
        step = min(progress.step, progress.total_steps - 1)
        if step < warmup:
            return self.warmup_start + (self.start - self.warmup_start) * step / max(warmup - 1, 1)
        decay_steps = max(progress.total_steps - warmup, 1)
        return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * (step - warmup) / decay_steps))


@dataclass(frozen=True)
class EpochWarmup:
    """Per-epoch linear warm-up `linspace(start, end, warmup_epochs)`, then `end`; optionally held at `start`
    for the first `delay_epochs` (iBOT's patch temperature waits until masking starts)."""

    start: float
    end: float
    warmup_epochs: int
    delay_epochs: int = 0

    def at_epoch(self, epoch: int) -> float:
        e = epoch - self.delay_epochs
        if e < 0:
            return self.start
        if e >= self.warmup_epochs:
            return self.end
        return self.start + (self.end - self.start) * e / max(self.warmup_epochs - 1, 1)

    def __call__(self, progress: Progress) -> float:
        return self.at_epoch(progress.epoch)


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """Learning-rate scaling with the global batch: linear (Goyal et al.), square root, or none."""
    ratio = global_batch / reference_batch
    return base_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]
