"""Backbones by timm name: a config, the families mimkit wraps as encoders, and weights from local files.

`method.backbone.name` is any timm model of a supported family; the optional shape fields shrink it (tiny
models for small images) and `model_args` passes any other timm argument. Nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from mimkit.config import ConfigError, check, short_reason
from mimkit.models.beit import MaskableBEiT
from mimkit.models.cnn import CNNEncoder
from mimkit.models.encoder import Encoder
from mimkit.models.vit import MaskableViT

TRANSFORMER_SHAPE = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
"""BackboneConfig fields that override a timm transformer's shape."""
FAMILIES = {"vision_transformer": "vit", "beit": "beit", "resnet": "cnn", "convnext": "cnn"}
"""timm model module -> encoder family."""
EXAMPLES = "vit_small_patch16_224, beit_base_patch16_224, resnet50, convnext_tiny"


@dataclass
class BackboneConfig:
    """A timm ViT, BEiT or CNN by name; the optional fields override its shape (tiny models for small images)."""

    name: str = "vit_small_patch16_224"
    img_size: int = 224
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float = 0.1
    weights: str | None = None
    """A local file (safetensors or torch) of timm weights to start from; never downloaded."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: same gradients, less memory, about a third more
    compute (large models on small GPUs)."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Further timm model arguments, e.g. layers/channels of a ResNet, depths/dims of a ConvNeXt, init_values of
    a BEiT."""

    def validate(self, prefix: str) -> None:
        check(self.img_size > 0, f"{prefix}.img_size", f"must be positive; got {self.img_size}")
        check(
            0 <= self.drop_path_rate < 1, f"{prefix}.drop_path_rate", f"must lie in [0, 1); got {self.drop_path_rate}"
        )
        if self.patch_size is not None:
            check(
                self.patch_size > 0 and self.img_size % self.patch_size == 0,
                f"{prefix}.img_size",
                f"image size {self.img_size} is not divisible by patch size {self.patch_size}; "
                f"use a multiple of {self.patch_size}",
            )

    def shape_overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in TRANSFORMER_SHAPE if getattr(self, k) is not None}


def family(name: str, prefix: str = "method.backbone") -> str:
    """The encoder family of a timm model name (vit, beit, cnn); a ConfigError naming the ones that work."""
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(
            f"{prefix}.name: unknown timm model {name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else f"; e.g. {EXAMPLES}")
        )
    module = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    if module not in FAMILIES:
        raise ConfigError(
            f"{prefix}.name: {name!r} is a timm {module} model; mimkit encoders wrap the timm families "
            f"{', '.join(sorted(FAMILIES))} (e.g. {EXAMPLES})"
        )
    return FAMILIES[module]


def timm_arguments(cfg: BackboneConfig, in_chans: int) -> dict[str, Any]:
    """What `timm.create_model` gets besides the name (and what export records to rebuild the model)."""
    kind = family(cfg.name)
    args: dict[str, Any] = {"in_chans": in_chans}
    if kind == "cnn":
        if cfg.shape_overrides():
            raise ConfigError(
                f"method.backbone: {', '.join(cfg.shape_overrides())} shape a transformer; a CNN's shape goes in "
                "method.backbone.model_args (e.g. layers, channels for a ResNet; depths, dims for a ConvNeXt)"
            )
        return args | cfg.model_args
    args |= {"img_size": cfg.img_size, **cfg.shape_overrides()}
    if kind == "beit":
        args["global_pool"] = "token"
    return args | cfg.model_args


def create_timm_model(
    cfg: BackboneConfig, in_chans: int, drop_path_rate: float | None = None, *, prefix: str = "method.backbone"
) -> tuple[nn.Module, dict[str, Any]]:
    """A randomly initialised timm model without head (no download ever), optionally loaded from a file, and the
    arguments that rebuild it."""
    family(cfg.name, prefix)
    args = timm_arguments(cfg, in_chans)
    extra = {"dynamic_img_size": True} if family(cfg.name) == "vit" else {}
    rate = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, drop_path_rate=rate, **args, **extra)
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
    model, args = create_timm_model(cfg, in_chans, drop_path_rate, prefix=prefix)
    kind = family(cfg.name)
    encoder: Encoder
    if kind == "vit":
        encoder = MaskableViT(model, mask_token=mask_token, timm_name=cfg.name, timm_args=args)
    elif kind == "beit":
        encoder = MaskableBEiT(model, mask_token=mask_token, timm_name=cfg.name, timm_args=args)
    elif mask_token:
        raise ConfigError(
            f"{prefix}.name: {cfg.name} is a CNN, which takes no patch mask, and this network sees masked images; "
            f"use a ViT or BEiT backbone (e.g. vit_small_patch16_224, beit_base_patch16_224)"
        )
    else:
        encoder = CNNEncoder(model, timm_name=cfg.name, timm_args=args, image_size=cfg.img_size)
    encoder.set_activation_checkpointing(cfg.activation_checkpointing)
    return encoder
