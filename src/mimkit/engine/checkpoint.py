"""Checkpoints that never lose work: written to a temporary name, flushed, then renamed over the old one.

A checkpoint holds everything needed to continue exactly: every network, optimizer and scaler state, the
position in the schedules, each rank's random-number generators, the resolved config and package versions.
It loads with `torch.load(weights_only=True)`: only tensors and plain Python values.
"""

from __future__ import annotations

import os
import platform
import random
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mimkit.config import ConfigError
from mimkit.methods.saved import CHECKPOINT_DIR, LAST


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
        raise ConfigError(
            f"{what}: {folder} has {free / 2**20:.0f} MiB free, and this needs about {needed_bytes / 2**20:.0f} MiB; "
            f"{fix}"
        )


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """About what one checkpoint takes: every parameter and buffer, plus AdamW's two moments per trainable one, and
    as much again while the new file is written beside the old."""
    tensors = [*module.parameters(), *module.buffers()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    moments = sum(2 * p.numel() * 4 for p in module.parameters() if p.requires_grad)
    return 2 * (total + moments)


def atomic_save(fabric: Any, path: Path, state: dict[str, Any]) -> None:
    """fabric.save to `<path>.tmp`, fsync, then rename over `path` (all ranks call this)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, state)
    if fabric.global_rank == 0:
        _fsync(tmp)
        _replace(tmp, path)
    fabric.barrier()


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
