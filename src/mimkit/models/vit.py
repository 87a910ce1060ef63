"""MaskableViT: any timm VisionTransformer plus a learned mask token, with weights that stay timm-loadable.

The mask token replaces the patch embedding of masked patches *before* positional embeddings are added, so
masked positions keep their position. The wrapper reuses timm's own modules (patch embedding, `_pos_embed`,
blocks, final norm); `self.vit` is a plain timm model whose state dict is what export writes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimkit.config import ConfigError, check


@dataclass
class BackboneConfig:
    """A timm ViT by name; the optional fields override its shape (tiny models for small images)."""

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


def create_vit(
    cfg: BackboneConfig, in_chans: int, drop_path_rate: float | None = None, *, prefix: str = "method.backbone"
) -> VisionTransformer:
    """A randomly initialised timm ViT (no download ever) accepting any image size, optionally loaded from a file."""
    overrides = {
        k: getattr(cfg, k)
        for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
        if getattr(cfg, k) is not None
    }
    if cfg.name not in timm.list_models():
        close = difflib.get_close_matches(cfg.name, timm.list_models("vit_*"), n=3)
        raise ConfigError(
            f"{prefix}.name: unknown timm model {cfg.name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit_*')")
        )
    if not timm.models.is_model_in_modules(cfg.name, ["vision_transformer"]):
        family = timm.models.model_entrypoint(cfg.name).__module__.rsplit(".", 1)[-1]
        raise ConfigError(
            f"{prefix}.name: {cfg.name!r} is a {family} model, not a timm VisionTransformer; "
            "masked-token methods need a ViT (e.g. vit_small_patch16_224)"
        )
    model = timm.create_model(
        cfg.name,
        pretrained=False,
        num_classes=0,
        in_chans=in_chans,
        img_size=cfg.img_size,
        dynamic_img_size=True,
        drop_path_rate=cfg.drop_path_rate if drop_path_rate is None else drop_path_rate,
        **overrides,
    )
    patch = model.patch_embed.patch_size[0]
    check(
        cfg.img_size % patch == 0,
        f"{prefix}.img_size",
        f"image size {cfg.img_size} is not divisible by patch size {patch}; use a multiple of {patch}",
    )
    if cfg.weights:
        load_weights(model, cfg.weights, f"{prefix}.weights")
    return model


def load_weights(model: nn.Module, path: str, field_name: str = "method.backbone.weights") -> None:
    """Load a timm state dict from a local file; a missing file or mismatched keys is a clear error."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"{field_name}: weights file {file} does not exist (mimkit never downloads weights; "
            "give the path of a .safetensors or .pth file)"
        )
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
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


class MaskableViT(nn.Module):
    """A timm ViT whose forward takes an optional boolean patch mask (B, h, w); returns all tokens, normed."""

    def __init__(self, vit: VisionTransformer, mask_token: bool = True) -> None:
        super().__init__()
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]
        self.image_size: int = vit.patch_embed.img_size[0]
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if mask_token else None

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        vit = self.vit
        tokens = vit.patch_embed(images)  # (B, h, w, D): timm defers flattening with dynamic_img_size
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this network has no mask token (teachers see unmasked images)")
            if mask.shape != tokens.shape[:3]:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not match the patch grid {tuple(tokens.shape[:3])}"
                )
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype).view(1, 1, 1, -1), tokens)
        tokens = vit._pos_embed(tokens)
        tokens = vit.patch_drop(tokens)
        tokens = vit.norm_pre(tokens)
        tokens = vit.blocks(tokens)
        return vit.norm(tokens)

    def forward_crops(self, crops: list[torch.Tensor], masks: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run a list of crops, concatenating consecutive crops of equal size into one call each."""
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            images = torch.cat(crops[start:end])
            mask = torch.cat(masks[start:end]) if masks is not None else None
            outputs += list(self(images, mask).chunk(end - start))
            start = end
        return outputs

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size


def build_backbone(
    cfg: BackboneConfig, in_chans: int, *, mask_token: bool, drop_path_rate: float | None = None
) -> MaskableViT:
    return MaskableViT(create_vit(cfg, in_chans, drop_path_rate), mask_token=mask_token)
