"""Checkpoint files: atomic replacement, full disks, retention of epoch checkpoints, random-generator state round
trips, clear errors on bad files."""

from __future__ import annotations

import errno
import random
import re
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mimkit.engine.checkpoint import (
    DiskFullError,
    atomic_save,
    epoch_checkpoint,
    last_checkpoint,
    last_path,
    remove_old_epochs,
    rng_state,
    set_rng_state,
    state_bytes,
)
from mimkit.engine.train import pretrain
from mimkit.methods.saved import read_checkpoint
from mimkit.runs import load_run_config
from support import ROOT


class FakeFabric:
    """What atomic_save needs from Fabric. `fail_after` bytes: write that much of the file, then fail."""

    def __init__(self, fail_after: int | None = None, watch: Path | None = None, error: int = errno.ENOSPC) -> None:
        self.global_rank = 0
        self.world_size = 1
        self.error = error
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
            raise OSError(self.error, "No space left on device" if self.error == errno.ENOSPC else "Input/output error")

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


def test_a_full_disk_keeps_the_previous_checkpoint_and_removes_the_unfinished_one(tmp_path: Path) -> None:
    path = last_path(tmp_path / "run")
    atomic_save(FakeFabric(), path, state(1.0))
    with pytest.raises(DiskFullError) as raised:
        atomic_save(FakeFabric(fail_after=100), path, state(2.0))
    message = str(raised.value)
    assert f"writing {path} failed (No space left on device; the unfinished file is removed)" in message
    assert re.search(
        rf"{re.escape(str(path.parent))} has [\d.]+ [MG]iB free, and a checkpoint needs about 0\.0 MiB", message
    )
    assert f"saved in {path}" in message and f"mimkit pretrain --resume {tmp_path / 'run'}" in message
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    loaded = read_checkpoint(path)
    assert loaded["position"] == {"step": 1} and torch.equal(loaded["weights"], torch.full((64, 64), 1.0))


def test_a_full_disk_before_any_checkpoint_says_nothing_is_saved(tmp_path: Path) -> None:
    path = epoch_checkpoint(tmp_path / "run", 0)
    with pytest.raises(DiskFullError, match=r"Nothing is saved yet: free space .*then start the run again"):
        atomic_save(FakeFabric(fail_after=100), path, state(2.0))
    assert not list(path.parent.iterdir())


def test_other_write_errors_are_raised_and_leave_no_temporary_file(tmp_path: Path) -> None:
    path = last_path(tmp_path)
    with pytest.raises(OSError, match="Input/output error") as raised:
        atomic_save(FakeFabric(fail_after=100, error=errno.EIO), path, state(2.0))
    assert not isinstance(raised.value, DiskFullError) and not list(path.parent.iterdir())


def test_too_little_free_space_stops_before_writing_and_clears_a_stale_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = last_path(tmp_path / "run")
    atomic_save(FakeFabric(), path, state(1.0))
    path.with_name("last.ckpt.tmp").write_bytes(b"left by a killed run")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(2**30, 2**30 - 1000, 1000))
    fabric = FakeFabric()
    with pytest.raises(DiskFullError) as raised:
        atomic_save(fabric, path, state(2.0))
    assert str(raised.value).startswith(
        f"output_dir: {path.parent} has 0.0 MiB free, and the next checkpoint (last.ckpt) needs about 0.0 MiB. "
        f"The run is saved in {path}"
    )
    assert fabric.saved_to == [] and sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_state_bytes_counts_tensors_modules_and_optimizer_state() -> None:
    module = torch.nn.Linear(10, 4)  # 44 floats
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 10)).sum().backward()
    optimizer.step()  # two moments per parameter, and a step count per tensor
    assert state_bytes({"m": module, "o": optimizer, "x": [torch.zeros(3, dtype=torch.float64)], "n": 7}) == (
        44 * 4 + 2 * 44 * 4 + 2 * 4 + 3 * 8
    )


def test_only_the_newest_epoch_checkpoints_are_kept(tmp_path: Path) -> None:
    for epoch in range(6):
        atomic_save(FakeFabric(), epoch_checkpoint(tmp_path, epoch), state(float(epoch)))
    atomic_save(FakeFabric(), last_path(tmp_path), state(3.0))

    def names() -> list[str]:
        return sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    assert remove_old_epochs(tmp_path, 3, 0) == [] and len(names()) == 7  # 0 keeps all
    removed = remove_old_epochs(tmp_path, 3, 2)  # a run resumed at epoch 3: epochs 4 and 5 are not its own yet
    assert [p.name for p in removed] == ["epoch_0000.ckpt", "epoch_0001.ckpt"]
    assert names() == ["epoch_0002.ckpt", "epoch_0003.ckpt", "epoch_0004.ckpt", "epoch_0005.ckpt", "last.ckpt"]
    remove_old_epochs(tmp_path, 5, 1)
    assert names() == ["epoch_0005.ckpt", "last.ckpt"]


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


def test_a_run_keeps_its_newest_epoch_checkpoints(tmp_path: Path) -> None:
    toy = ROOT / "tests" / "recipes" / "toy.yaml"
    overrides = ["train.epochs=4", "train.keep_epoch_checkpoints=2", "data.synthetic.images=16"]
    run = pretrain(load_run_config(toy, [f"output_dir={tmp_path / 'run'}", *overrides]))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch_0002.ckpt",
        "epoch_0003.ckpt",
        "last.ckpt",
    ]
    assert (
        "removed epoch_0001.ckpt (keeping the newest 2: train.keep_epoch_checkpoints)"
        in (run / "train.log").read_text()
    )


def test_a_resume_with_fewer_kept_makes_room_before_it_checks_the_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """troubleshooting.md's way out of a full disk: resuming with a smaller train.keep_epoch_checkpoints removes
    the older epoch files before the free space is checked, not after the next epoch."""
    from mimkit.engine import checkpoint

    toy = ROOT / "tests" / "recipes" / "toy.yaml"
    base = [f"output_dir={tmp_path / 'run'}", "data.synthetic.images=16", "train.keep_epoch_checkpoints=0"]
    run = pretrain(load_run_config(toy, [*base, "train.epochs=3"]))
    seen: list[list[str]] = []
    real = checkpoint.ensure_writable

    def watched(folder: Path, *args: object, **kwargs: object) -> None:
        seen.append(sorted(p.name for p in (run / "checkpoints").glob("epoch_*.ckpt")))
        real(folder, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint, "ensure_writable", watched)
    fewer = [*base[:2], "train.keep_epoch_checkpoints=1", "train.epochs=4", "resume=auto"]
    pretrain(load_run_config(toy, fewer))
    assert seen[-1] == ["epoch_0002.ckpt"]  # at the space check, before epoch 3 trains
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*.ckpt")) == ["epoch_0003.ckpt"]
