"""Checkpoints that never lose work: written to a temporary name, flushed, then renamed over the old one. A full
disk stops the run with a DiskFullError (the temporary file removed, the previous checkpoint kept), and only the
newest `train.keep_epoch_checkpoints` epoch checkpoints are kept.

A checkpoint holds everything needed to continue exactly: every network, optimizer and scaler state, the
position in the schedules, each rank's random-number generators, the resolved config and package versions.
It loads with `torch.load(weights_only=True)`: only tensors and plain Python values.
"""

from __future__ import annotations

import errno
import os
import platform
import random
import re
import shutil
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from mimkit.config import ConfigError, dump_yaml
from mimkit.engine.logs import log
from mimkit.methods.saved import CHECKPOINT_DIR, LAST

if TYPE_CHECKING:
    from mimkit.data.info import DataInfo
    from mimkit.runs import RunConfig

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
"""The errors of a write that found no room: the disk is full, or the user's quota is spent."""
EPOCH_FILE = re.compile(r"epoch_(\d+)\.ckpt")


class DiskFullError(ConfigError):
    """A checkpoint did not fit on its disk. Nothing was lost: the previous checkpoint is whole and the run
    resumes from it; the message says how much room is missing and how to continue."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def last_path(run_dir: str | Path) -> Path:
    return checkpoint_dir(run_dir) / LAST


def last_checkpoint(run_dir: str | Path) -> Path | None:
    path = last_path(run_dir)
    return path if path.exists() else None


def epoch_checkpoint(run_dir: str | Path, epoch: int) -> Path:
    return checkpoint_dir(run_dir) / f"epoch_{epoch:04d}.ckpt"


def ensure_writable(folder: Path, what: str, fix: str, needed_bytes: int = 0) -> None:
    """A ConfigError naming the folder, the reason and `fix` unless a file can be written there and `needed_bytes`
    fit on its disk: read-only, unwritable and full folders fail before any work is done, not after."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".mimkit-write-test-{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{what}: cannot write to {folder} ({error.strerror or error}); {fix}") from None
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ConfigError(f"{what}: {folder} has {_mib(free)} free, and this needs about {_mib(needed_bytes)}; {fix}")


def _mib(size: int) -> str:
    if size >= 10 * 2**30:
        return f"{size / 2**30:.0f} GiB"
    return f"{size / 2**20:.1f} MiB" if size < 10 * 2**20 else f"{size / 2**20:.0f} MiB"


def disk_full_error(
    path: Path, needed_bytes: int, failed: OSError | None = None, writing: str | None = None
) -> DiskFullError:
    """The message for a checkpoint `path` of about `needed_bytes` that did not fit (`failed`: the write's error;
    `writing`: what was written, if not the checkpoint) or would not (checked before writing): the folder, its
    free and needed space, and how to continue."""
    folder = path.parent
    run_dir = folder.parent
    free = shutil.disk_usage(folder).free
    if failed is None:
        what = f"{folder} has {_mib(free)} free, and the next checkpoint ({path.name}) needs about {_mib(needed_bytes)}"
    else:
        undone = "" if writing else "; the unfinished file is removed"
        what = (
            f"the disk is full: writing {writing or path} failed ({failed.strerror or failed}{undone}); "
            f"{folder} has {_mib(free)} free, and a checkpoint needs about {_mib(needed_bytes)}"
        )
    last = last_path(run_dir)
    then = (
        f"The run is saved in {last}: free space (or move the run folder to a larger disk), then continue it with: "
        f"mimkit pretrain --resume {run_dir}"
        if last.exists()
        else "Nothing is saved yet: free space (or choose another output_dir), then start the run again"
    )
    return DiskFullError(f"output_dir: {what}. {then}")


def full_run_folder(error: OSError, run_dir: Path, needed_bytes: int) -> Exception:
    """A write error of the run's logs as the DiskFullError of its run folder when that disk has no room for a
    checkpoint left; `error` itself otherwise (another disk, such as /dev/shm, or another fault)."""
    if error.errno in FULL_DISK and shutil.disk_usage(run_dir).free < needed_bytes:
        return disk_full_error(last_path(run_dir), needed_bytes, error, "the run's logs")
    return error


def state_bytes(value: Any) -> int:
    """About the bytes a checkpoint of `value` takes (its tensors; a module's parameters and buffers; an optimizer's
    state): a little less than the file, so that the check before a write errs towards trying it."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, torch.nn.Module):
        return sum(state_bytes(t) for t in [*value.parameters(), *value.buffers()])
    if isinstance(value, torch.optim.Optimizer):
        return state_bytes(list(value.state.values()))
    if isinstance(value, dict):
        return state_bytes(list(value.values()))
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    return 0


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """About what one checkpoint takes: every parameter and buffer, plus AdamW's two moments per trainable one, and
    as much again while the new file is written beside the old."""
    tensors = [*module.parameters(), *module.buffers()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    moments = sum(2 * p.numel() * 4 for p in module.parameters() if p.requires_grad)
    return 2 * (total + moments)


def atomic_save(fabric: Any, path: Path, state: dict[str, Any]) -> None:
    """fabric.save to `<path>.tmp`, fsync, then rename over `path` (all ranks call this).

    Before writing, rank 0 removes a `.tmp` left by a killed run and checks that the checkpoint's tensors fit in
    the free space. A write that finds the disk full is undone (its `.tmp` removed), and every rank stops with the
    same DiskFullError, instead of one rank failing while the others wait for it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    leader = fabric.global_rank == 0
    needed = state_bytes(state)
    if leader:
        _remove(tmp)
    if _any_rank(fabric, errno.ENOSPC if leader and shutil.disk_usage(path.parent).free < needed else 0):
        raise disk_full_error(path, needed)
    failure: OSError | None = None
    saved = False
    try:
        fabric.save(tmp, state)
        saved = True
        if leader:
            _fsync(tmp)
            _replace(tmp, path)
    except OSError as error:
        failure = error
        if not saved:
            fabric.barrier()  # the one fabric.save ends with, which the other ranks wait in
    fabric.barrier()
    code = _any_rank(fabric, (failure.errno or errno.EIO) if failure is not None else 0)
    if not code:
        return
    if leader:
        _remove(tmp)
    if code in FULL_DISK:
        raise disk_full_error(path, needed, failure or OSError(code, os.strerror(code)))
    raise failure or OSError(code, f"another process could not write {tmp}")


def _any_rank(fabric: Any, code: int) -> int:
    """The largest of every rank's `code` (0: all well), so that all ranks take the same branch."""
    if fabric.world_size == 1:
        return code
    flag = torch.tensor(float(code), device=fabric.device)
    return int(fabric.all_reduce(flag, reduce_op="max").item())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_old_epochs(run_dir: str | Path, newest: int, keep: int) -> list[Path]:
    """Remove the epoch checkpoints older than the `keep` newest up to epoch `newest` (call once that one is
    written; 0 keeps all). Files of later epochs (left by a run resumed from an earlier checkpoint) are kept
    until the run overwrites them."""
    if keep == 0:
        return []
    found = [
        (int(m.group(1)), p)
        for p in checkpoint_dir(run_dir).glob("epoch_*.ckpt")
        if (m := EPOCH_FILE.fullmatch(p.name))
    ]
    old = [p for _, p in sorted(e for e in found if e[0] <= newest)[:-keep]]
    for file in old:
        _remove(file)
    if old:
        log.info(
            "removed %s (keeping the newest %d: train.keep_epoch_checkpoints)", ", ".join(p.name for p in old), keep
        )
    return old


def save_run_state(
    fabric: Any, path: Path, state: dict[str, Any], position: dict[str, Any], cfg: RunConfig, data: DataInfo
) -> None:
    """A checkpoint of a run in progress: `state` (the networks, optimizer and precision plugin Fabric saves), the
    position, every rank's random generators, the config, the data description and the package versions."""
    extra = {
        "position": position,
        "rng": all_rng_states(),
        "config": yaml.safe_load(dump_yaml(cfg)),
        "data_info": data.to_dict(),
        "versions": package_versions(),
        "world_size": fabric.world_size,
    }
    atomic_save(fabric, path, {**state, **extra})


def _fsync(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _replace(tmp: Path, path: Path) -> None:
    if tmp.is_dir() and path.exists():  # sharded (FSDP) checkpoints are folders: swap, then delete the old one
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("mimkit", "torch", "torchvision", "timm", "lightning", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def rng_state() -> dict[str, Any]:
    """This process's generators, as tensors and plain values (weights_only-loadable)."""
    numpy_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(numpy_state["state"]["pos"]),
        "numpy_has_gauss": int(numpy_state["has_gauss"]),
        "numpy_gauss": float(numpy_state["gauss"]),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_key"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states() -> list[dict[str, Any]]:
    """Every rank's generator state (rank order), so each rank resumes its own stream."""
    own = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [own]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return gathered
