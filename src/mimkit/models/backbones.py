"""Backbones by timm name: the builder of encoders (a fresh timm model of a registered family, wrapped) and weights
from local files.

`method.backbone.name` is any timm model of a registered encoder family (`mimkit.models.families`); the optional
shape fields shrink a transformer (tiny models for small images) and `model_args` passes any other timm argument.
Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from mimkit.config import ConfigError, check, short_reason
from mimkit.models.backbone_config import BackboneConfig
from mimkit.models.encoder import Encoder
from mimkit.models.families import family_of, registered_families

__all__ = ["BackboneConfig", "build_backbone", "create_timm_model", "load_weights", "timm_arguments"]


def timm_arguments(
    cfg: BackboneConfig, in_chans: int, prefix: str = "method.backbone", family: type[Encoder] | None = None
) -> dict[str, Any]:
    """What `timm.create_model` gets besides the name (and what export records to rebuild the model); `family`:
    `cfg.name`'s, when the caller has looked it up already."""
    family = family or family_of(cfg.name, prefix)
    foreign = [k for k in cfg.shape_overrides() if k not in family.shape_fields]
    if foreign:
        raise ConfigError(
            f"{prefix}: {', '.join(foreign)} shape a transformer; {cfg.name} is a {family.kind} ({family.family} "
            f"family): {family.shape_hint}"
        )
    return {"in_chans": in_chans, **family.timm_arguments(cfg), **cfg.model_args}


def create_timm_model(
    cfg: BackboneConfig,
    in_chans: int,
    drop_path_rate: float | None = None,
    *,
    prefix: str = "method.backbone",
    family: type[Encoder] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A randomly initialised timm model without head (no download ever), optionally loaded from a file, and the
    arguments that rebuild it; `family` as in `timm_arguments`."""
    family = family or family_of(cfg.name, prefix)
    args = timm_arguments(cfg, in_chans, prefix, family)
    rate = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
    try:
        model = timm.create_model(
            cfg.name, pretrained=False, num_classes=0, drop_path_rate=rate, **args, **family.build_arguments()
        )
    except TypeError as error:
        raise ConfigError(f"{prefix}: timm cannot build {cfg.name} with {args}: {error}") from None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (1,))[0]
    check(
        cfg.img_size % patch == 0,
        f"{prefix}.img_size",
        f"image size {cfg.img_size} is not divisible by patch size {patch}; use a multiple of {patch}",
    )
    if cfg.weights:
        load_weights(model, cfg.weights, f"{prefix}.weights")
    return model, args


def load_weights(model: nn.Module, path: str, field_name: str = "method.backbone.weights") -> None:
    """Load a timm state dict from a local file; a missing file or mismatched keys is a clear error."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"{field_name}: weights file {file} does not exist (mimkit never downloads weights; "
            "give the path of a .safetensors or .pth file)"
        )
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # a file that is not one: safetensors, zip and pickle errors alike
        raise ConfigError(
            f"{field_name}: {file} is not a weights file ({short_reason(error)}); give timm weights as "
            ".safetensors or a torch state dict (.pth)"
        ) from None
    if isinstance(state, dict) and "config" in state and "method" in state:
        raise ConfigError(
            f"{field_name}: {file} is a mimkit checkpoint, not timm weights; export its encoder first "
            "(mimkit export RUN) and give RUN/export/timm/model.safetensors"
        )
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    own = model.state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    if wrong_shape or missing:
        detail = (
            f"{len(missing)} missing keys (e.g. {missing[:3]})"
            if missing
            else f"shape mismatches (e.g. {wrong_shape[0]}: file {tuple(state[wrong_shape[0]].shape)} vs model "
            f"{tuple(own[wrong_shape[0]].shape)})"
        )
        raise ConfigError(f"{field_name}: weights file {file} does not match the model: {detail}")
    model.load_state_dict({k: v for k, v in state.items() if k in own})


def build_backbone(
    cfg: BackboneConfig,
    in_chans: int,
    *,
    mask_token: bool,
    drop_path_rate: float | None = None,
    prefix: str = "method.backbone",
) -> Encoder:
    """The encoder of `cfg.name`'s family around a fresh timm model; `mask_token` for networks that see masks."""
    family = family_of(cfg.name, prefix)
    if mask_token and not family.takes_mask:
        masked = [f"{cls.kind} ({cls.example})" for _, cls in sorted(registered_families().items()) if cls.takes_mask]
        raise ConfigError(
            f"{prefix}.name: {cfg.name} is a {family.kind}, which takes no patch mask, and this network sees masked "
            f"images; use a backbone of a family that does: {', '.join(masked)}"
        )
    model, args = create_timm_model(cfg, in_chans, drop_path_rate, prefix=prefix, family=family)
    encoder = family.wrap(model, cfg, args, mask_token=mask_token)
    encoder.set_activation_checkpointing(cfg.activation_checkpointing)
    return encoder
