"""Open a finished (or running) pretraining run: its config, its data and its method with trained weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mimkit.config import ConfigError, RunConfig, load_run_config
from mimkit.data.info import DataInfo
from mimkit.data.sources import ImageSource, build_source
from mimkit.engine.checkpoint import LAST, checkpoint_dir, read_checkpoint
from mimkit.methods.base import Method, method_class


@dataclass
class LoadedRun:
    cfg: RunConfig
    method: Method
    checkpoint: Path
    """The checkpoint the run was opened from (its folder is the run's, wherever it lies now)."""
    random_init: bool = False
    """True when the weights were not loaded: the run's own initialisation (a baseline)."""

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent.parent

    def encoder(self) -> nn.Module:
        return self.method.encoder()

    def source(self, split: str | None = None, *, limit: int | None = None) -> ImageSource:
        data = self.cfg.data
        if limit is not None:
            data = type(data)(**{**data.__dict__, "limit": limit})
        return build_source(data, split)


def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """A run folder means its `checkpoints/last.ckpt`; a file is taken as is."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        path = checkpoint_dir(path) / LAST
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (give a run folder or a .ckpt file)")
    return path


def load_run(
    run_or_checkpoint: str | Path, overrides: list[str] | None = None, *, random_init: bool = False
) -> LoadedRun:
    """Rebuild the method of a run from its checkpoint's config; load its weights unless `random_init`.

    `overrides` adjust the data config (e.g. `data.root=...` when evaluating on another machine).
    """
    path = resolve_checkpoint(run_or_checkpoint)
    state = read_checkpoint(path)
    if "config" not in state or "method" not in state:
        raise ConfigError(f"{path} is not a mimkit pretraining checkpoint (no config/method entries)")
    # a pretraining budget (`data.limit`) is not an evaluation protocol: evaluate on whole splits unless told
    base = {**state["config"], "data": {**state["config"]["data"], "limit": None}}
    cfg = load_run_config(None, overrides or [], base=base)
    info = DataInfo.from_dict(state["data_info"]) if "data_info" in state else build_source(cfg.data).info
    torch.manual_seed(cfg.seed)  # the random-init baseline gets the run's own initialisation
    method = method_class(cfg.method.name)(cfg.method, info)
    if not random_init:
        method.load_state_dict(state["method"])
    method.eval()
    return LoadedRun(cfg, method, path, random_init)
