"""The Method interface: the only contract the training engine knows.

A method reads like its paper's algorithm box: `views()` makes the inputs from one image,
`training_step()` runs the networks and returns the loss, `after_step()` does the EMA/center updates.
Everything generic (devices, precision, schedules, clipping, checkpoints, logs) lives in the engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mimkit.config import ConfigError, check
from mimkit.data.info import DataInfo
from mimkit.data.masking import MaskConfig, check_mask_fill
from mimkit.data.sources import ImageSource
from mimkit.data.views import AugmentOn, Views
from mimkit.models.encoder import Encoder
from mimkit.registry import import_package
from mimkit.schedules import Progress


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


@dataclass
class Reconstruction:
    """Pixels a method predicts for masked patches, to draw beside the originals (`mimkit viz`)."""

    originals: torch.Tensor
    """(B, C, H, W), normalised as the networks see them."""
    reconstructions: torch.Tensor
    """(B, C, H, W) in the same normalisation."""
    masks: torch.Tensor
    """(B, h, w) bool, True where the network saw the mask token."""


@dataclass
class Panel:
    """One row of a method's figure of its inputs and outputs (`mimkit viz`: panels.png), one column per image."""

    title: str
    values: torch.Tensor
    """(B, C, H, W) images in the networks' normalisation, or (B, h, w) maps in [0, 1] (drawn as heat maps)."""

    @property
    def is_map(self) -> bool:
        return self.values.ndim == 3


@dataclass
class ParamGroup:
    """Optimizer group: the engine sets lr = scheduled_lr * lr_scale, wd = scheduled_wd * weight_decay_scale."""

    name: str
    params: list[nn.Parameter]
    weight_decay_scale: float = 1.0
    lr_scale: float = 1.0


ClipMode = Literal["none", "global", "per_tensor", "per_module"]


@dataclass
class ClipPolicy:
    """How gradients are clipped: one global norm, each parameter tensor on its own, or each module."""

    mode: ClipMode = "none"
    max_norm: float = 0.0
    modules: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """Fields every method has; each method's config extends it."""

    name: str = ""
    clip_mode: ClipMode = "global"
    clip_grad: float = 3.0

    runtime_fields: ClassVar[tuple[str, ...]] = ()
    """Fields that do not shape the run (debugging hooks, say): a resumed run may change them."""

    def validate(self, prefix: str = "method") -> None:
        check(
            self.clip_mode == "none" or self.clip_grad > 0,
            f"{prefix}.clip_grad",
            f"must be positive when clipping ({self.clip_mode}); got {self.clip_grad}",
        )


class Method(nn.Module):
    """Base class of pretraining methods. Subclasses set `Config` and implement the abstract parts."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    renamed_state: ClassVar[dict[str, str]] = {}
    """Old state-dict key -> its new key, for parts that moved inside the method: checkpoints written before the
    move still load (a key that names a module renames every key under it)."""

    def __init__(self, cfg: MethodConfig, data: DataInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.data = data
        if self.renamed_state:
            self._register_load_state_dict_pre_hook(self._rename_old_keys)

    def _rename_old_keys(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state if k.startswith(prefix)]:
            local = key[len(prefix) :]
            for old, new in self.renamed_state.items():
                if local == old or local.startswith(old + "."):
                    state[prefix + new + local[len(old) :]] = state.pop(key)
                    break

    @classmethod
    def from_saved(cls, cfg: MethodConfig, data: DataInfo, saved: Mapping[str, Any]) -> Method:
        """The method a saved state dict (`saved`, a checkpoint's "method") will be loaded into. Built as usual; a
        method whose parts come from files may rebuild them from `saved` instead, so a saved run opens and resumes
        without the files it started from (CIM: its tokenizer)."""
        return cls(cfg, data)

    def views(self, augment_on: AugmentOn = "worker") -> Views:
        """The transform that turns one image into the typed views `training_step` reads: all of it per image in
        a DataLoader worker, or with `augment_on="device"` the random draws, crops and flips there and the rest
        in the views' `on_device`, which the engine runs on each collated batch on the accelerator."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], progress: Progress) -> StepOutput:
        raise NotImplementedError

    def encoder(self) -> Encoder:
        """The backbone that evaluation and export use (iBOT: the teacher; DTM: the student)."""
        raise NotImplementedError

    def networks(self) -> dict[str, nn.Module]:
        """Every network of the method by role (student, teacher, heads, generator, enhancer, ...): what export can
        write (`--network ROLE`) and what `clip_mode: per_module` clips one by one."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any], progress: Progress) -> StepOutput:
        return self.training_step(batch, progress)

    def param_groups(self) -> list[ParamGroup]:
        """Trainable parameters split into decayed weights and undecayed biases / 1-D parameters."""
        return split_weight_decay(self.named_parameters())

    def clip_policy(self) -> ClipPolicy:
        return ClipPolicy(self.cfg.clip_mode, self.cfg.clip_grad, self.clip_modules())

    def clip_modules(self) -> dict[str, nn.Module]:
        """Networks clipped separately under `clip_mode: per_module`: each trainable one of `networks()`."""
        return {
            name: network
            for name, network in self.networks().items()
            if any(p.requires_grad for p in network.parameters())
        }

    def reconstruct(self, views: Any) -> Reconstruction | None:
        """The pixels the method predicts for a collated batch of its views; None for methods without pixel
        predictions (viz then skips the figure)."""
        return None

    def panels(self, views: Any) -> list[Panel]:
        """Rows of a figure of what the method does to a collated batch of its views (CIM: masks, corrupted
        images, predictions); empty for methods whose inputs the masks figure already shows."""
        return []

    @classmethod
    def prepare(cls, cfg: MethodConfig, source: ImageSource) -> None:
        """Before the networks are built (on one rank first): make the files the method reads, or raise a
        ConfigError naming the command that makes them (CIM: its tokenizer)."""

    def before_optimizer_step(self, progress: Progress) -> None:
        """After clipping, before the update (e.g. cancel the gradients of a frozen layer)."""

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        """After the optimizer update (EMA teachers, centers)."""

    def mask_configs(self) -> dict[str, tuple[MaskConfig, tuple[int, int]]]:
        """Every mask config the views draw from, by its config field (`method.mask`), with the token grid its masks
        are drawn on: what the pre-training mask check reads. Methods without masks keep the empty default."""
        return {}

    def check_masks(self) -> None:
        """Before training (the engine calls it once the method is built): draws masks of every mask config at its
        real token grid, refuses one that never masks a patch and warns when one is far off its configured ratio
        (`check_mask_fill`), before any step trains on them."""
        for prefix, (mask, grid) in self.mask_configs().items():
            check_mask_fill(mask, grid, prefix)

    def on_train_start(self) -> None:
        """Once, after the method is on its device and before the first step (e.g. sync teachers)."""


def split_weight_decay(
    named: Iterator[tuple[str, nn.Parameter]], prefix: str = "", exempt: Sequence[str] = ()
) -> list[ParamGroup]:
    """Biases and 1-D parameters (norms, tokens' gains) get no weight decay, as in DINO/iBOT/MAE; nor do
    parameters whose last name is in `exempt` (BEiT/DTM exempt `cls_token` and `pos_embed`)."""
    decay, no_decay = [], []
    for name, param in named:
        if not param.requires_grad:
            continue
        undecayed = name.endswith(".bias") or param.ndim <= 1 or name.rsplit(".", 1)[-1] in exempt
        (no_decay if undecayed else decay).append(param)
    groups = [ParamGroup(f"{prefix}decay", decay), ParamGroup(f"{prefix}no_decay", no_decay, weight_decay_scale=0.0)]
    return [g for g in groups if g.params]


# ---------------------------------------------------------------------------------------------------
# Registry

_METHODS: dict[str, type[Method]] = {}
_TASKS: dict[str, type[Method]] = {}
"""Methods the engine trains that are not pretraining (fine-tuning): found by name, not listed among the methods."""


def _load_builtins() -> None:
    """Import every module of this package once: each method registers itself with `@register`."""
    import_package(__package__, str(Path(__file__).parent))


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available to recipes as `method.name: <name>`."""
    return _registrar(name, _METHODS)


def register_task(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: a supervised task the engine trains (`method.name: <name>`), kept out of `method_names()`:
    pretraining's lists (recipes, benchmarks, contract tests) are of pretraining methods."""
    return _registrar(name, _TASKS)


def _registrar(name: str, table: dict[str, type[Method]]) -> Callable[[type[Method]], type[Method]]:
    def add(cls: type[Method]) -> type[Method]:
        taken = _METHODS.get(name) or _TASKS.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(f"method name {name!r} is already registered by {taken.__qualname__}")
        table[name] = cls
        return cls

    return add


def method_names() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def task_names() -> list[str]:
    _load_builtins()
    return sorted(_TASKS)


def method_class(name: str) -> type[Method]:
    """A registered method or task, or `package.module:Class` for a method defined outside mimkit."""
    _load_builtins()
    if name in _METHODS or name in _TASKS:
        return _METHODS.get(name) or _TASKS[name]
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"method.name: cannot import {name!r} ({error})") from None
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(f"method.name: {name!r} is not a mimkit Method subclass")
        return cls
    raise ConfigError(
        f"method.name: unknown method {name!r}; choose one of {', '.join(method_names())} "
        "(or give package.module:Class for your own)"
    )
