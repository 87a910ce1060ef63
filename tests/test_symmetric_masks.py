"""Symmetric (checkerboard) masks, SymMIM's masking, as a part every method can use."""

from __future__ import annotations

import random

import pytest
import torch

from mimkit.config import ConfigError
from mimkit.data.masking import MaskConfig, MaskGenerator, checkerboard


@pytest.mark.parametrize(("height", "width"), [(4, 4), (14, 14), (6, 10), (7, 7), (5, 8), (3, 1)])
@pytest.mark.parametrize("phase", [0, 1])
def test_fine_boards_mask_half_or_the_nearest_count(height: int, width: int, phase: int) -> None:
    count = int(checkerboard(height, width, phase=phase).sum())
    assert abs(count - height * width / 2) <= 0.5


@pytest.mark.parametrize(("height", "width", "block"), [(8, 8, 2), (12, 12, 3), (14, 14, 7), (8, 12, 2)])
def test_coarse_boards_on_whole_cells_mask_exactly_half(height: int, width: int, block: int) -> None:
    assert int(checkerboard(height, width, block).sum()) * 2 == height * width


@pytest.mark.parametrize(("height", "width"), [(7, 7), (4, 6), (1, 5)])
def test_every_masked_patch_of_a_fine_board_has_only_visible_neighbours(height: int, width: int) -> None:
    mask = checkerboard(height, width, phase=1)
    for i, j in mask.nonzero().tolist():
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if 0 <= i + di < height and 0 <= j + dj < width:
                assert not mask[i + di, j + dj]


def test_on_coarse_boards_only_corner_cells_of_phase_1_at_offset_0_leave_a_patch_unseen() -> None:
    """What docs/methods/symmim.md says of the coarse board: of its 8 draws (2 phases x 4 offsets) on a 14 x 14
    grid, one leaves masked patches without a visible neighbour, the 4 corner patches."""
    unseen = {}
    for phase in (0, 1):
        for offset in ((0, 0), (0, 1), (1, 0), (1, 1)):
            mask = checkerboard(14, 14, block=2, phase=phase, offset=offset)
            unseen[phase, offset] = [
                (i, j)
                for i, j in map(tuple, mask.nonzero().tolist())
                if all(
                    mask[i + di, j + dj]
                    for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))
                    if 0 <= i + di < 14 and 0 <= j + dj < 14
                )
            ]
    assert unseen.pop((1, (0, 0))) == [(0, 0), (0, 13), (13, 0), (13, 13)]
    assert not any(unseen.values())


@pytest.mark.parametrize("offset", [(0, 0), (1, 2), (2, 1)])
def test_a_coarse_board_is_constant_on_each_cell(offset: tuple[int, int]) -> None:
    block, size = 3, 11
    mask = checkerboard(size, size, block, offset=offset)
    rows = (torch.arange(size) + offset[0]) // block
    cols = (torch.arange(size) + offset[1]) // block
    for r in rows.unique():
        for c in cols.unique():
            cell = mask[rows == r][:, cols == c]
            assert cell.all() or not cell.any()
    assert mask.any() and not mask.all()


def test_phase_swaps_masked_and_visible() -> None:
    assert torch.equal(checkerboard(5, 6, 2, phase=1), ~checkerboard(5, 6, 2, phase=0))


@pytest.mark.parametrize("block", [1, 2])
def test_random_phase_and_offset_mask_every_position_in_some_crops_only(block: int) -> None:
    generator = MaskGenerator(MaskConfig(shape="symmetric", symmetric_block=block), random.Random(0))
    masks = torch.stack([generator(7, 7, 0) for _ in range(64)]).float()
    frequency = masks.mean(0)
    assert (frequency > 0).all() and (frequency < 1).all()
    fixed = MaskGenerator(MaskConfig(shape="symmetric", symmetric_random=False), random.Random(0))
    assert torch.equal(fixed(7, 7, 0), checkerboard(7, 7)) and torch.equal(fixed(7, 7, 0), fixed(7, 7, 0))


def test_symmetric_masks_wait_for_the_start_epoch_and_check_the_block() -> None:
    generator = MaskGenerator(MaskConfig(shape="symmetric", start_epoch=2), random.Random(0))
    assert not generator(4, 4, 1).any() and generator(4, 4, 2).sum() == 8
    with pytest.raises(ConfigError, match=r"method\.mask\.symmetric_block: must be >= 1"):
        MaskConfig(shape="symmetric", symmetric_block=0).validate()
