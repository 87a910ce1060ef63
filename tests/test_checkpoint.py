"""Checkpoint files: atomic replacement, random-generator state round trips, clear errors on bad files."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mimkit.engine.checkpoint import (
    atomic_save,
    epoch_checkpoint,
    last_checkpoint,
    last_path,
    rng_state,
    set_rng_state,
)
from mimkit.methods.saved import read_checkpoint


class FakeFabric:
    """What atomic_save needs from Fabric. `fail_after` bytes: write that much of the file, then fail."""

    def __init__(self, fail_after: int | None = None, watch: Path | None = None) -> None:
        self.global_rank = 0
        self.fail_after = fail_after
        self.watch = watch
        self.saved_to: list[Path] = []
        self.seen_during_save: Any = None
        self.barriers = 0

    def save(self, path: Path, state: dict[str, Any]) -> None:
        self.saved_to.append(Path(path))
        torch.save(state, path)
        if self.watch is not None:  # what a reader of the final name sees once the new state is written
            self.seen_during_save = torch.load(self.watch, weights_only=True)
        if self.fail_after is not None:
            Path(path).write_bytes(Path(path).read_bytes()[: self.fail_after])
            raise OSError(28, "No space left on device")

    def barrier(self) -> None:
        self.barriers += 1


def state(value: float) -> dict[str, Any]:
    return {"weights": torch.full((64, 64), value), "position": {"step": int(value)}}


def test_atomic_save_writes_a_readable_checkpoint(tmp_path: Path) -> None:
    fabric, path = FakeFabric(), last_path(tmp_path / "run")
    atomic_save(fabric, path, state(1.0))
    assert path == tmp_path / "run" / "checkpoints" / "last.ckpt"
    loaded = read_checkpoint(path)
    assert torch.equal(loaded["weights"], torch.full((64, 64), 1.0)) and loaded["position"] == {"step": 1}
    assert fabric.saved_to == [path.with_name("last.ckpt.tmp")] and fabric.barriers == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_atomic_save_never_writes_over_the_old_file_in_place(tmp_path: Path) -> None:
    path = last_path(tmp_path)
    atomic_save(FakeFabric(), path, state(1.0))
    fabric = FakeFabric(watch=path)
    atomic_save(fabric, path, state(2.0))
    assert fabric.seen_during_save["position"] == {"step": 1}  # the old file stays whole until the rename
    assert read_checkpoint(path)["position"] == {"step": 2}
    assert not path.with_name("last.ckpt.tmp").exists()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = last_path(tmp_path)
    atomic_save(FakeFabric(), path, state(1.0))
    with pytest.raises(OSError, match="No space left"):
        atomic_save(FakeFabric(fail_after=100), path, state(2.0))
    loaded = read_checkpoint(path)
    assert loaded["position"] == {"step": 1} and torch.equal(loaded["weights"], torch.full((64, 64), 1.0))


def test_sharded_checkpoint_folder_is_swapped_whole(tmp_path: Path) -> None:
    class FolderFabric(FakeFabric):
        def save(self, path: Path, state: dict[str, Any]) -> None:  # FSDP sharded checkpoints are folders
            path.mkdir()
            for rank in range(2):
                torch.save({"rank": rank, **state}, path / f"shard_{rank}.pt")

    path = last_path(tmp_path)
    atomic_save(FolderFabric(), path, {"step": 1})
    atomic_save(FolderFabric(), path, {"step": 2})
    assert path.is_dir() and sorted(p.name for p in path.iterdir()) == ["shard_0.pt", "shard_1.pt"]
    assert torch.load(path / "shard_1.pt", weights_only=True) == {"rank": 1, "step": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no .tmp or .old left behind


def test_checkpoint_names(tmp_path: Path) -> None:
    assert epoch_checkpoint(tmp_path, 3) == tmp_path / "checkpoints" / "epoch_0003.ckpt"
    assert last_checkpoint(tmp_path) is None
    atomic_save(FakeFabric(), last_path(tmp_path), state(0.0))
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"


# ---------------------------------------------------------------------------------------------------
# Random-number generator state


def draws() -> tuple[list[float], list[float], list[float]]:
    return (
        torch.rand(5).tolist() + torch.randn(3).tolist(),
        np.random.rand(5).tolist(),
        [random.random() for _ in range(3)] + [random.gauss(0, 1) for _ in range(3)],
    )


def scramble_generators() -> None:
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)


def test_rng_state_round_trip_reproduces_draws() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    random.gauss(0, 1)  # leaves a cached second Gaussian in `random`'s state
    saved = rng_state()
    expected = draws()
    scramble_generators()
    set_rng_state(saved)
    assert draws() == expected


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(4)
    np.random.seed(5)
    random.seed(6)
    torch.save({"rng": [rng_state()]}, tmp_path / "state.ckpt")
    expected = draws()
    scramble_generators()
    set_rng_state(read_checkpoint(tmp_path / "state.ckpt")["rng"][0])
    assert draws() == expected


def test_rng_state_round_trip_keeps_numpy_cached_gaussian() -> None:
    np.random.seed(7)
    np.random.randn()  # the legacy generator draws Gaussians in pairs and caches the second one
    saved = rng_state()
    expected = np.random.randn(4).tolist()
    np.random.seed(99)
    set_rng_state(saved)
    assert np.random.randn(4).tolist() == expected


# ---------------------------------------------------------------------------------------------------
# Reading


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint {tmp_path / 'nope.ckpt'} does not exist")):
        read_checkpoint(tmp_path / "nope.ckpt")


def test_corrupt_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"\x00\x01not a checkpoint" * 10)
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable mimkit checkpoint")):
        read_checkpoint(path)


def test_truncated_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    torch.save(state(1.0), path)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable mimkit checkpoint")):
        read_checkpoint(path)


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.ckpt"
    torch.save({"thing": FakeFabric()}, path)
    with pytest.raises(ValueError, match="is not a readable mimkit checkpoint"):
        read_checkpoint(path)


def test_sharded_folder_asks_for_consolidation(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt").mkdir()
    with pytest.raises(ValueError, match=r"sharded .*consolidate"):
        read_checkpoint(tmp_path / "last.ckpt")
