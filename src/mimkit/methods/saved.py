"""A trained method back from its checkpoint file, for everything that opens a saved run.

Where a run keeps its checkpoints is fixed here (`RUN/checkpoints/last.ckpt`), beneath the engine that writes
them and the evaluation that reads them, so a frozen mimkit teacher can be opened by a method too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mimkit.config import ConfigError, from_dict, short_reason
from mimkit.data.info import DataInfo
from mimkit.methods.base import Method, MethodConfig, method_class
from mimkit.models.encoder import Encoder

log = logging.getLogger("mimkit")
CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """A run folder means its `checkpoints/last.ckpt`; a file is taken as is."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_DIR / LAST
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (give a run folder or a .ckpt file)")
    return path


def read_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load a mimkit checkpoint file on the CPU for evaluation, export or inspection (`mmap`: map the tensors
    instead of reading them, to look at the config or the position cheaply)."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"checkpoint {file} does not exist")
    if file.is_dir():
        raise ValueError(
            f"{file} is a sharded (FSDP) checkpoint folder; consolidate it first "
            "(lightning.fabric.utilities.consolidate_checkpoint)"
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # pickle, zip and torch errors all mean the same: unusable file
        raise ConfigError(
            f"{file} is not a readable mimkit checkpoint ({short_reason(error)}); give a run folder or a .ckpt "
            "file written by mimkit pretrain"
        ) from None


def readable_checkpoint(path: Path, *, mmap: bool = False) -> tuple[Path, dict[str, Any]]:
    """`path` and its contents; if it is truncated or corrupted, the newest other checkpoint of its folder that
    reads, with a warning naming both (a run keeps `epoch_NNNN.ckpt` files beside `last.ckpt`)."""
    try:
        return path, read_checkpoint(path, mmap=mmap)
    except ValueError as error:
        if path.is_dir() or path.parent.name != CHECKPOINT_DIR:  # only a run's own checkpoints have siblings
            raise
        reason = error
    others = sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: p.stat().st_mtime, reverse=True)
    for other in others:
        try:
            state = read_checkpoint(other, mmap=mmap)
        except ValueError:
            continue
        position = state.get("position", {})
        log.warning(
            "%s; using %s instead (epoch %s, step %s)", reason, other, position.get("epoch"), position.get("step")
        )
        return other, state
    raise ValueError(f"{reason}; no other checkpoint in {path.parent} is readable either") from None


def check_pretraining_checkpoint(state: dict[str, Any], path: Path) -> None:
    if "config" not in state or "method" not in state:
        raise ConfigError(f"{path} is not a mimkit pretraining checkpoint (no config/method entries)")


def restore_method(
    state: dict[str, Any], method_cfg: MethodConfig, info: DataInfo, *, seed: int, random_init: bool = False
) -> Method:
    """The method of `method_cfg` with the checkpoint's weights (or, with `random_init`, the run's own
    initialisation: the same seed gives the same random weights), in eval mode."""
    torch.manual_seed(seed)
    method = method_class(method_cfg.name).from_saved(method_cfg, info, state["method"])
    if not random_init:
        method.load_state_dict(state["method"])
    return method.eval()


def open_encoder(run_or_checkpoint: str | Path) -> tuple[Encoder, DataInfo]:
    """The trained encoder of a saved run and the data it was trained on (a frozen teacher's view of it)."""
    path, state = readable_checkpoint(resolve_checkpoint(run_or_checkpoint))
    check_pretraining_checkpoint(state, path)
    saved = state["config"]["method"]
    method_cfg = from_dict(method_class(str(saved["name"])).Config, saved, "method")
    info = DataInfo.from_dict(state["data_info"])
    method = restore_method(state, method_cfg, info, seed=int(state["config"].get("seed", 0)))
    return method.encoder(), info
