"""Patch masks for masked image modeling: iBOT's ratio policy with BEiT-style block or uniform random masks, and
SymMIM's symmetric checkerboards (fine: every other patch; coarse: every other k x k cell).

Masks are drawn in the data workers, once per global crop. Randomness comes from Python's `random` module,
which the data pipeline seeds per (seed, epoch, image), so a mask depends neither on the number of workers
nor on where a resumed run restarted. A `random.Random` can be passed instead for isolated use (tests).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch

from mimkit.config import check

MAX_ATTEMPTS = 10
"""Block draws per step that may add nothing before the block masker gives up (BEiT's value)."""


class RandomLike(Protocol):
    """What the maskers need from a generator: a `random.Random`, or the `random` module itself."""

    def uniform(self, a: float, b: float) -> float: ...

    def randint(self, a: int, b: int) -> int: ...

    def choice(self, seq: Sequence[Any]) -> Any: ...

    def sample(self, population: Sequence[Any], k: int) -> list[Any]: ...


@dataclass
class MaskConfig:
    """Which patches of a global crop the student sees masked, and how many."""

    shape: Literal["block", "rand", "symmetric"] = "block"
    """block: BEiT-style rectangles (iBOT); rand: uniformly random patches; symmetric: a checkerboard (SymMIM),
    half of the patches, every masked one surrounded by visible ones (`ratios` do not apply)."""
    symmetric_block: int = 1
    """symmetric: patches per checker cell side, 1 (fine) or k > 1 (coarse)."""
    symmetric_random: bool = True
    """symmetric: a random phase (which colour is masked) and offset of the cell grid per crop; false: always the
    same board (phase 0: the top-left cell visible)."""
    ratios: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 0.0), (0.3, 0.2)])
    """(mean, var) pairs; per crop one is picked at random and the ratio drawn from U(mean - var, mean + var)."""
    aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    """Range of block height/width ratios, sampled log-uniformly."""
    min_block_patches: int | None = None
    """Smallest block area in patches; None: (min(height, width) // 3) ** 2 as in BEiT/iBOT."""
    start_epoch: int = 0
    """Crops are not masked before this epoch."""
    exact: bool = False
    """Block masks: top up with random unmasked patches to exactly round(ratio x patches) (DTM's reference: 75
    of 196); false keeps BEiT/iBOT's blocks, which often fall slightly short."""

    @property
    def masks_patches(self) -> bool:
        """False when every ratio is 0: no crop is ever masked (the network needs no mask token)."""
        return any(mean + var > 0 for mean, var in self.ratios)

    def validate(self, prefix: str = "method.mask") -> None:
        check(self.symmetric_block >= 1, f"{prefix}.symmetric_block", f"must be >= 1; got {self.symmetric_block}")
        check(len(self.ratios) > 0, f"{prefix}.ratios", "needs at least one (mean, var) pair, e.g. [[0.3, 0.2]]")
        for i, (mean, var) in enumerate(self.ratios):
            check(
                var >= 0 and mean - var >= 0 and mean + var <= 1,
                f"{prefix}.ratios[{i}]",
                f"(mean, var) needs var >= 0 and 0 <= mean - var <= mean + var <= 1; got ({mean}, {var})",
            )
        low, high = self.aspect_ratio
        check(
            0 < low <= high,
            f"{prefix}.aspect_ratio",
            f"must be two positive numbers (min, max) with min <= max; got {self.aspect_ratio}",
        )
        check(
            self.min_block_patches is None or self.min_block_patches >= 0,
            f"{prefix}.min_block_patches",
            f"must be >= 0 or null; got {self.min_block_patches}",
        )
        check(self.start_epoch >= 0, f"{prefix}.start_epoch", f"must be >= 0; got {self.start_epoch}")


def block_mask(
    height: int,
    width: int,
    num_patches: float,
    min_area: float,
    aspect_ratio: tuple[float, float],
    rng: RandomLike = random,
) -> torch.Tensor:
    """Mask up to `num_patches` patches with random rectangles (never more, often slightly fewer).

    Each step adds one block of area ~ U(min_area, remaining) that brings 1..remaining new patches; a step
    whose `MAX_ATTEMPTS` draws all fail ends the masking, which is why the count can fall short.
    """
    mask = np.zeros((height, width), dtype=bool)
    log_low, log_high = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
    masked = 0
    while masked < num_patches:
        added = _add_block(mask, num_patches - masked, min_area, log_low, log_high, rng)
        if added == 0:
            break
        masked += added
    return torch.from_numpy(mask)


def _add_block(
    mask: np.ndarray, remaining: float, min_area: float, log_low: float, log_high: float, rng: RandomLike
) -> int:
    """Place the first drawn block that adds 1..remaining new patches; return how many it added (0: none)."""
    height, width = mask.shape
    for _ in range(MAX_ATTEMPTS):
        area = rng.uniform(min_area, remaining)  # min_area > remaining is allowed: uniform swaps the bounds
        aspect = math.exp(rng.uniform(log_low, log_high))
        block_h = round(math.sqrt(area * aspect))
        block_w = round(math.sqrt(area / aspect))
        if not (0 < block_h < height and 0 < block_w < width):
            continue
        top = rng.randint(0, height - block_h)
        left = rng.randint(0, width - block_w)
        block = mask[top : top + block_h, left : left + block_w]
        added = block_h * block_w - int(block.sum())
        if 0 < added <= remaining:
            block[...] = True
            return added
    return 0


def random_mask(height: int, width: int, num_patches: int, rng: RandomLike = random) -> torch.Tensor:
    """Mask exactly `num_patches` patches chosen uniformly at random."""
    mask = torch.zeros(height * width, dtype=torch.bool)
    mask[rng.sample(range(height * width), num_patches)] = True
    return mask.view(height, width)


def checkerboard(
    height: int, width: int, block: int = 1, phase: int = 0, offset: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """A (height, width) checkerboard of `block` x `block` cells, True = masked:
    M(i, j) = (floor((i + offset_i) / block) + floor((j + offset_j) / block) + phase) mod 2 == 1 (METHODS.md
    section 4), so the cell at the origin is visible for `phase` 0 and masked for 1. Half of the patches on an
    even board (the nearest whole number otherwise for block 1); any grid size."""
    if block < 1 or phase not in (0, 1):
        raise ValueError(f"need block >= 1 and phase 0 or 1; got block {block}, phase {phase}")
    rows = (torch.arange(height) + offset[0]) // block
    cols = (torch.arange(width) + offset[1]) // block
    return (rows[:, None] + cols[None, :] + phase) % 2 == 1


def top_up(mask: torch.Tensor, count: int, rng: RandomLike = random) -> torch.Tensor:
    """`mask` with random unmasked patches added until exactly `count` are masked (never removes any)."""
    flat = mask.flatten().clone()
    visible = [i for i, masked in enumerate(flat.tolist()) if not masked]
    missing = count - (len(flat) - len(visible))
    if missing > 0:
        flat[rng.sample(visible, min(missing, len(visible)))] = True
    return flat.view_as(mask)


class MaskGenerator:
    """Draws one (height, width) boolean mask per crop (True = masked) following a `MaskConfig`."""

    def __init__(self, cfg: MaskConfig, rng: RandomLike | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.rng = rng  # None (the global `random`) keeps the generator picklable for spawned data workers

    @property
    def _random(self) -> RandomLike:
        return self.rng if self.rng is not None else random

    def ratio(self, epoch: int) -> float:
        """The masking ratio of one crop: 0 before `start_epoch`, else drawn from a random (mean, var) pair."""
        if epoch < self.cfg.start_epoch:
            return 0.0
        mean, var = self._random.choice(self.cfg.ratios)
        return self._random.uniform(mean - var, mean + var) if var > 0 else float(mean)

    def __call__(self, height: int, width: int, epoch: int) -> torch.Tensor:
        target = self.ratio(epoch) * height * width
        if self.cfg.shape == "symmetric":
            if epoch < self.cfg.start_epoch:
                return torch.zeros(height, width, dtype=torch.bool)
            block = self.cfg.symmetric_block
            if not self.cfg.symmetric_random:
                return checkerboard(height, width, block)
            rng = self._random
            offset = (rng.randint(0, block - 1), rng.randint(0, block - 1))
            return checkerboard(height, width, block, phase=rng.randint(0, 1), offset=offset)
        if self.cfg.shape == "rand":
            return random_mask(height, width, int(target), self._random)
        min_area = self.cfg.min_block_patches
        if min_area is None:
            min_area = (min(height, width) // 3) ** 2
        mask = block_mask(height, width, target, min_area, self.cfg.aspect_ratio, self._random)
        return top_up(mask, round(target), self._random) if self.cfg.exact else mask
