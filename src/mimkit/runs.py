"""One pretraining run: its schema (method recipe + data, optimisation and loop settings), the recipe loader, and
opening a saved run again (config + checkpoint -> method and encoder) for evaluation, export and viz.

The converter in `mimkit.config` knows no schema; this module ties it to the method registry, since a recipe's
`method` section is typed by the config class of the method it names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimkit.config import ConfigError, apply_overrides, field_tree, from_dict, read_yaml
from mimkit.data.config import DataConfig
from mimkit.data.info import DataInfo
from mimkit.data.sources import ImageSource, build_source
from mimkit.engine.config import OptimConfig, TrainConfig
from mimkit.methods.base import Method, method_class, method_names, task_names
from mimkit.methods.saved import check_pretraining_checkpoint, readable_checkpoint, resolve_checkpoint, restore_method
from mimkit.models.encoder import Encoder
from mimkit.recipes import find_recipe, remember_fields, remembered_fields


@dataclass
class RunConfig:
    """One pretraining run: a method recipe plus data, optimisation and loop settings."""

    method: Any
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    output_dir: str = "runs/default"
    resume: str | None = None
    """null: fresh run (refuses a run folder that already has checkpoints); auto: continue if possible;
    or the path of a checkpoint to continue from."""

    def validate(self) -> None:
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        if hasattr(self.method, "validate"):
            self.method.validate()


def load_run_config(
    path: str | Path | None, overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None
) -> RunConfig:
    """Read a recipe (or start from `base`, e.g. a run's saved config), apply overrides, validate."""
    data = read_yaml(find_recipe(path), overrides) if path is not None else apply_overrides(base or {}, overrides)
    method_data = data.get("method")
    if not isinstance(method_data, Mapping) or "name" not in method_data:
        raise ConfigError("method.name: every recipe names its method, e.g. method.name=ibot")
    method_cls = method_class(str(method_data["name"]))
    config = from_dict(RunConfig, {**data, "method": None}, "")
    config.method = from_dict(method_cls.Config, method_data, "method")
    config.validate()
    if remembered_fields() is None:
        remember_fields(config_fields())  # what `mimkit pretrain` checks before torch loads next time
    return config


def config_fields() -> dict[str, Any]:
    """The field names of RunConfig and of each registered method's config: what `mimkit.recipes` remembers so that
    a typo is found without importing torch."""
    run = field_tree(RunConfig)
    names = [*method_names(), *task_names()]
    return {"run": run, "methods": {name: field_tree(method_class(name).Config) for name in names}}


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

    def encoder(self) -> Encoder:
        return self.method.encoder()

    def source(self, split: str | None = None, *, limit: int | None = None) -> ImageSource:
        data = self.cfg.data
        if limit is not None:
            data = type(data)(**{**data.__dict__, "limit": limit})
        return build_source(data, split)


def load_run(
    run_or_checkpoint: str | Path, overrides: list[str] | None = None, *, random_init: bool = False
) -> LoadedRun:
    """Rebuild the method of a run from its checkpoint's config; load its weights unless `random_init`.

    `overrides` adjust the data config (e.g. `data.root=...` when evaluating on another machine).
    """
    path, state = readable_checkpoint(resolve_checkpoint(run_or_checkpoint))
    check_pretraining_checkpoint(state, path)
    # a pretraining budget (`data.limit`) is not an evaluation protocol: evaluate on whole splits unless told
    base = {**state["config"], "data": {**state["config"]["data"], "limit": None}}
    cfg = load_run_config(None, overrides or [], base=base)
    info = DataInfo.from_dict(state["data_info"]) if "data_info" in state else build_source(cfg.data).info
    method = restore_method(state, cfg.method, info, seed=cfg.seed, random_init=random_init)
    return LoadedRun(cfg, method, path, random_init)
