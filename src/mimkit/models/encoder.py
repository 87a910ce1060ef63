"""The Encoder contract: what evaluation, export, viz, compile and FSDP may rely on, whatever the backbone.

An encoder maps images (B, C, H, W) to tokens (B, prefix + N, D): a ViT's [CLS] then its patch tokens, a CNN's
last feature map as N tokens (no prefix). It wraps a plain timm module whose state dict is what export writes,
so every trained backbone stays loadable by `timm.create_model` without mimkit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mimkit.config import ConfigError
from mimkit.models.backbone_config import BackboneConfig


class Encoder(nn.Module):
    """Base class of every backbone mimkit trains, evaluates or exports (see the module docstring)."""

    num_prefix_tokens: int
    """Tokens before the patch/feature tokens: 1 for a ViT's [CLS], 0 for a CNN."""
    embed_dim: int
    patch_size: int
    """Pixels per token side: a ViT's patch size, a CNN's total stride."""
    image_size: int
    """The resolution it trains at (evaluation feeds it images of this size)."""
    has_attention: bool = False
    """Attention maps can be drawn (`last_attention`)."""
    supports_mask: bool = False
    """`forward` takes a patch mask (a mask token replaces the masked patches)."""
    block_types: tuple[type[nn.Module], ...] = ()
    """The repeated blocks: FSDP wrap units and compile targets."""

    # What a family registers (`mimkit.models.families`): the timm models it wraps and how it builds them.
    family: ClassVar[str] = ""
    """The family's registry name (vit, beit, resnet, ...)."""
    timm_modules: ClassVar[tuple[str, ...]] = ()
    """timm model modules whose every model this family wraps (e.g. vision_transformer)."""
    name_patterns: ClassVar[tuple[str, ...]] = ()
    """Shell patterns of further timm names it wraps (models of another module built as this family's class)."""
    example: ClassVar[str] = ""
    """One timm name of the family, for error messages."""
    kind: ClassVar[str] = "encoder"
    """What the family is called in messages (ViT, BEiT, CNN)."""
    takes_mask: ClassVar[bool] = False
    """The family can carry a mask token (`supports_mask` then says whether this instance was built with one)."""
    shape_fields: ClassVar[tuple[str, ...]] = ()
    """The BackboneConfig shape fields (patch_size, embed_dim, ...) its timm models take as arguments."""
    shape_hint: ClassVar[str] = "its shape goes in method.backbone.model_args"
    """Where a recipe sets the shape instead, when it gives shape fields the family does not take."""

    @classmethod
    def timm_arguments(cls, cfg: BackboneConfig) -> dict[str, Any]:
        """Arguments of `timm.create_model` this family adds to `in_chans` and `cfg.model_args` (what export
        records to rebuild the model)."""
        return {}

    @classmethod
    def build_arguments(cls) -> dict[str, Any]:
        """Arguments for building only, not recorded by export (a ViT's dynamic image size)."""
        return {}

    @classmethod
    def wrap(cls, model: nn.Module, cfg: BackboneConfig, timm_args: dict[str, Any], *, mask_token: bool) -> Encoder:
        """The encoder around a fresh timm `model` built from `cfg` with `timm_args`; `mask_token` only for a
        family that `supports_mask` (the builder refuses the others first)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, prefix + N, D); `mask` (B, h, w) bool on the token grid, True = masked."""
        raise NotImplementedError

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (same gradients, less
        memory, about a third more compute); timm's own switch by default."""
        self.timm_model().set_grad_checkpointing(enabled)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (h, w) for images of `height` x `width`; a ConfigError for a size it cannot take."""
        raise NotImplementedError

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image-level feature (B, D) of its tokens: what timm's own `forward_head(pre_logits=True)` gives."""
        return self.timm_model().forward_head(tokens, pre_logits=True)

    def timm_model(self) -> nn.Module:
        """The plain timm module (no mask token, no head) whose weights export writes."""
        self.timm_spec()
        raise NotImplementedError

    def timm_spec(self, image_size: int | None = None) -> tuple[str, dict[str, Any]]:
        """timm name and `model_args` that rebuild `timm_model()` with `timm.create_model`, at `image_size`."""
        raise ConfigError(
            f"network: {type(self).__name__} wraps no timm model, so it has no timm export; "
            "export writes timm encoders (ViT, BEiT, CNN)"
        )

    def timm_state_dict(self, image_size: int | None = None) -> dict[str, torch.Tensor]:
        """The weights of `timm_model()` for a model built by `timm_spec(image_size)`."""
        if image_size not in (None, self.image_size):
            raise ConfigError(f"image_size: {type(self).__name__} encoders export at their trained size only")
        return {k: v.detach().cpu().contiguous() for k, v in self.timm_model().state_dict().items()}

    def last_attention(self, images: torch.Tensor) -> torch.Tensor:
        """Attention probabilities (B, heads, T, T) of the last block over all T tokens."""
        raise ConfigError(f"{self.describe()} has no attention maps; attention figures need a ViT or BEiT encoder")

    def block_features(self, images: torch.Tensor, blocks: int) -> torch.Tensor:
        """The image feature after each of the last `blocks` blocks, final-normed, concatenated (B, blocks * D)."""
        self.check_block_features(blocks)
        raise NotImplementedError

    def check_block_features(self, blocks: int) -> None:
        """A ConfigError when `block_features(images, blocks)` cannot be taken (before any image is read)."""
        raise ConfigError(
            f"{self.describe()}: features of the last {blocks} blocks need a transformer encoder (ViT or BEiT); "
            "use the cls or cls+avg variant"
        )

    def describe(self) -> str:
        name = getattr(self, "timm_name", type(self).__name__)
        return f"the {name} encoder ({type(self).__name__})"

    def forward_crops(
        self, crops: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Run a list of crops, concatenating consecutive crops of equal size into one call each."""
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            images = torch.cat(list(crops[start:end]))
            mask = torch.cat(list(masks[start:end])) if masks is not None else None
            outputs += list(self(images, mask).chunk(end - start))
            start = end
        return outputs


def encoders_of(module: nn.Module) -> list[Encoder]:
    """Every encoder inside `module` (a method's student, teacher, enhancer, ...), outermost only."""
    if isinstance(module, Encoder):
        return [module]
    found: list[Encoder] = []
    for child in module.children():
        found += [child] if isinstance(child, Encoder) else encoders_of(child)
    return found


def block_types_of(module: nn.Module) -> tuple[type[nn.Module], ...]:
    """The block types of every encoder inside `module`, each once."""
    return tuple(dict.fromkeys(t for encoder in encoders_of(module) for t in encoder.block_types))
