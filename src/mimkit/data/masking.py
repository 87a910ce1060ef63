"""Patch masks for masked image modeling: iBOT's ratio policy with BEiT-style block or uniform random masks, and
SymMIM's symmetric checkerboards (fine: every other patch; coarse: every other k x k cell).

Masks are drawn in the data workers, once per global crop. Randomness comes from Python's `random` module,
which the data pipeline seeds per (seed, epoch, image), so a mask depends neither on the number of workers
nor on where a resumed run restarted. A `random.Random` can be passed instead for isolated use (tests).

A mask config knows the share of patches it asks for (`MaskConfig.expected_ratio`); `check_mask_fill` draws masks
at a run's real token grid before training and refuses a config that masks nothing there, or warns when the masks
are far off, so a small grid cannot silently train without corruption.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch

from mimkit.config import ConfigError, check

log = logging.getLogger("mimkit")
MAX_ATTEMPTS = 10
"""Block draws per step that may add nothing before the block masker gives up (BEiT's value)."""
FAR_OFF = 2.0
"""Masks are far off when their realised share of masked patches differs from the configured one by more than this
factor (either way): the health watch's and the pre-training check's rule (docs/troubleshooting.md, Masks)."""
CHECK_DRAWS = 200
"""Masks the pre-training check draws per mask config: enough for the mean share to within about 0.01."""


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
    half of the patches (`ratios` do not apply). On the fine board every masked patch has visible neighbours;
    on a coarse one, a masked patch borders a visible cell unless its masked cell sits in a corner of the grid
    (phase 1, offset 0: the 4 corner patches see none)."""
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
    """Smallest block area in patches; None: (min(height, width) // 3) ** 2 as in BEiT/iBOT. A crop that asks for fewer
    patches than this falls back to BEiT's rule for its grid (`smallest_block`)."""
    start_epoch: int = 0
    """Crops are not masked before this epoch."""
    exact: bool = False
    """Block masks: top up with random unmasked patches to exactly round(ratio x patches) (DTM's reference: 75
    of 196); false keeps BEiT/iBOT's blocks, which often fall slightly short."""

    @property
    def masks_patches(self) -> bool:
        """False when every ratio is 0: no crop is ever masked (the network needs no mask token)."""
        return any(mean + var > 0 for mean, var in self.ratios)

    def expected_ratio(self, epoch: int) -> float:
        """The share of a crop's patches this config asks to mask, on average over crops: 0 before `start_epoch`, half
        for a checkerboard, else the mean of the ratio pairs' means (each pair is picked as often, its draw is
        uniform around its mean)."""
        if epoch < self.start_epoch:
            return 0.0
        if self.shape == "symmetric":
            return 0.5
        return sum(mean for mean, _ in self.ratios) / len(self.ratios)

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


def smallest_block(height: int, width: int, num_patches: float, min_block_patches: int | None) -> float:
    """The smallest block area of a crop that asks for `num_patches` masked patches on a (height, width) grid.

    `min_block_patches`, or BEiT's (min(height, width) // 3) ** 2 when None. A smallest block larger than the crop's
    whole budget can hardly be placed (every block would mask more than asked), so the mask stays nearly empty
    (CIM's 16 on a 4 x 4 grid: 0.10 of the 0.45 asked for); such a crop takes BEiT's rule for its grid instead,
    capped at the budget. Where the configured block fits the budget nothing changes, so do the masks drawn.
    """
    grid_rule = (min(height, width) // 3) ** 2
    configured = grid_rule if min_block_patches is None else min_block_patches
    return configured if configured <= num_patches else min(grid_rule, num_patches)


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
    even board (the nearest whole number otherwise for block 1); any grid size. With block 1 every masked patch
    has 4-neighbours that are visible; with block > 1 a masked cell in a corner of the grid leaves its corner patch
    without a visible neighbour (`tests/test_symmetric_masks.py`)."""
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
        min_area = smallest_block(height, width, target, self.cfg.min_block_patches)
        mask = block_mask(height, width, target, min_area, self.cfg.aspect_ratio, self._random)
        return top_up(mask, round(target), self._random) if self.cfg.exact else mask


@dataclass(frozen=True)
class MaskFill:
    """The share of patches a mask config asks for and the share its masks cover on one token grid."""

    grid: tuple[int, int]
    configured: float
    realised: float

    @property
    def fill(self) -> float:
        """realised / configured: 1 as configured, 0 when nothing is masked (1 when nothing is asked for)."""
        return self.realised / self.configured if self.configured > 0 else 1.0

    @property
    def far_off(self) -> bool:
        return not 1 / FAR_OFF <= self.fill <= FAR_OFF


def measure_fill(cfg: MaskConfig, grid: tuple[int, int], draws: int = CHECK_DRAWS, seed: int = 0) -> MaskFill:
    """The mean share of masked patches over `draws` masks on `grid` once masking has started, drawn by a private
    generator so the training's random streams (and hence its masks) stay untouched."""
    generator = MaskGenerator(cfg, random.Random(seed))
    epoch = cfg.start_epoch
    realised = sum(generator(*grid, epoch).float().mean().item() for _ in range(draws)) / draws
    return MaskFill(grid, cfg.expected_ratio(epoch), realised)


def check_mask_fill(cfg: MaskConfig, grid: tuple[int, int], prefix: str = "method.mask") -> MaskFill:
    """Before training: refuse a config whose masks never mask a patch of `grid` although it asks for some (the
    masked objective would train on nothing), and warn when the masks are far off what it asks for."""
    fill = measure_fill(cfg, grid)
    height, width = grid
    where = f"on the {height}x{width} token grid"
    more_tokens = "or give the encoder more tokens (a larger image size or a smaller patch)"
    if fill.configured > 0 and fill.realised == 0:
        raise ConfigError(
            f"{prefix}.ratios: {where} no mask covers a patch ({CHECK_DRAWS} draws), though the config asks for "
            f"{fill.configured:.3f} of the patches: a crop's ratio x {height * width} patches must reach one patch; "
            f"raise the ratios to at least {1 / (height * width):.4f} (one patch), {more_tokens}"
        )
    if fill.far_off:
        log.warning(
            "%s: %s the masks cover %.3f of the patches on average (%d draws), the config asks for %.3f: the masked "
            "objective trains on %s corruption than configured; change the ratios (or min_block_patches), %s",
            prefix,
            where,
            fill.realised,
            CHECK_DRAWS,
            fill.configured,
            "far less" if fill.fill < 1 else "far more",
            more_tokens,
        )
    return fill
