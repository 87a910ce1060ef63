"""Masks: block-count statistics against the reference generator, the ratio policy, determinism, validation."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from mimkit.config import ConfigError
from mimkit.data.masking import MaskConfig, MaskGenerator, block_mask
from support import REFERENCE_DIR

DRAWS = 3000


def _reference_stats() -> dict[str, dict]:
    path = REFERENCE_DIR / "block_mask_stats.json"
    if not path.is_file():
        pytest.fail(f"no reference statistics at {path}; set MIMKIT_REFERENCE_DIR to the fixtures folder")
    return json.loads(path.read_text())


@pytest.mark.parametrize("key", sorted(_reference_stats()))
def test_block_mask_counts_match_reference(key: str) -> None:
    ref = _reference_stats()[key]
    grid, target = ref["grid"], ref["ratio"] * ref["grid"] ** 2
    rng = random.Random(0)
    masks = [block_mask(grid, grid, target, (grid // 3) ** 2, (0.3, 1 / 0.3), rng) for _ in range(DRAWS)]
    counts = np.array([int(m.sum()) for m in masks])
    assert all(m.shape == (grid, grid) and m.dtype == torch.bool for m in masks[:10])
    assert counts.max() <= ref["target"]
    assert abs(counts.mean() - ref["mean"]) <= 0.5, (counts.mean(), ref["mean"])
    percentiles = np.percentile(counts, [5, 50, 95])
    expected = [ref["p05"], ref["p50"], ref["p95"]]
    assert np.all(np.abs(percentiles - expected) <= 1), (percentiles, expected)


@pytest.mark.parametrize("ratio", [0.1, 0.4, 0.75])
def test_rand_mask_has_exact_count(ratio: float) -> None:
    generator = MaskGenerator(MaskConfig(shape="rand", ratios=[(ratio, 0.0)]), random.Random(1))
    for _ in range(20):
        mask = generator(14, 14, epoch=0)
        assert mask.shape == (14, 14) and mask.dtype == torch.bool
        assert int(mask.sum()) == int(ratio * 14 * 14)


def test_default_ratio_policy_masks_half_the_crops() -> None:
    generator = MaskGenerator(MaskConfig(), random.Random(2))
    ratios = np.array([generator.ratio(epoch=0) for _ in range(4000)])
    assert 0.45 <= np.mean(ratios == 0) <= 0.55
    masked = ratios[ratios > 0]
    assert masked.min() >= 0.1 and masked.max() <= 0.5
    assert masked.min() < 0.15 and masked.max() > 0.45  # the whole range is used


def test_block_masks_follow_the_ratio() -> None:
    generator = MaskGenerator(MaskConfig(ratios=[(0.3, 0.2)]), random.Random(3))
    counts = [int(generator(14, 14, epoch=0).sum()) for _ in range(200)]
    assert min(counts) >= 1 and max(counts) <= 0.5 * 14 * 14


def test_no_mask_before_start_epoch() -> None:
    generator = MaskGenerator(MaskConfig(ratios=[(0.5, 0.0)], start_epoch=5), random.Random(4))
    assert all(not generator(14, 14, epoch=4).any() for _ in range(50))
    assert generator.ratio(epoch=4) == 0.0
    assert generator(14, 14, epoch=5).any()


@pytest.mark.parametrize("shape", ["block", "rand"])
def test_non_square_grid(shape: str) -> None:
    generator = MaskGenerator(MaskConfig(shape=shape, ratios=[(0.4, 0.0)]), random.Random(5))
    masks = [generator(7, 5, epoch=0) for _ in range(100)]
    assert all(m.shape == (7, 5) for m in masks)
    assert all(0 < int(m.sum()) <= 0.4 * 7 * 5 for m in masks)


@pytest.mark.parametrize("shape", ["block", "rand"])
def test_global_seeding_is_deterministic(shape: str) -> None:
    generator = MaskGenerator(MaskConfig(shape=shape))

    def draw(seed: int) -> list[torch.Tensor]:
        random.seed(seed)
        torch.manual_seed(seed)
        return [generator(14, 14, epoch=0) for _ in range(20)]

    first, again, other = draw(7), draw(7), draw(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"ratios": []}, r"method\.mask\.ratios: needs at least one"),
        ({"ratios": [(0.0, 0.0), (0.1, 0.2)]}, r"method\.mask\.ratios\[1\]: .*0 <= mean - var"),
        ({"ratios": [(0.9, 0.2)]}, r"method\.mask\.ratios\[0\]: .*mean \+ var <= 1"),
        ({"ratios": [(0.3, -0.1)]}, r"method\.mask\.ratios\[0\]: .*var >= 0"),
        ({"aspect_ratio": (2.0, 0.5)}, r"method\.mask\.aspect_ratio: .*min <= max"),
        ({"aspect_ratio": (0.0, 1.0)}, r"method\.mask\.aspect_ratio: .*positive"),
        ({"min_block_patches": -1}, r"method\.mask\.min_block_patches: must be >= 0"),
        ({"start_epoch": -1}, r"method\.mask\.start_epoch: must be >= 0"),
    ],
)
def test_validation_names_the_field(changes: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MaskConfig(**changes).validate()
    with pytest.raises(ConfigError, match=match):
        MaskGenerator(MaskConfig(**changes))


def test_validation_uses_the_given_prefix() -> None:
    with pytest.raises(ConfigError, match=r"^masks\.start_epoch"):
        MaskConfig(start_epoch=-1).validate(prefix="masks")


def test_generator_pickles_for_spawned_workers() -> None:
    generator = pickle.loads(pickle.dumps(MaskGenerator(MaskConfig(ratios=[(0.5, 0.0)]))))
    assert 0 < int(generator(4, 4, epoch=0).sum()) <= 8
