"""MaskableViT: any timm VisionTransformer plus a learned mask token, with weights that stay timm-loadable.

The mask token replaces the patch embedding of masked patches *before* positional embeddings are added, so
masked positions keep their position. The wrapper reuses timm's own modules (patch embedding, `_pos_embed`,
blocks, final norm); `self.vit` is a plain timm model whose state dict is what export writes.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mimkit.config import check
from mimkit.models.families import register_family
from mimkit.models.families.transformer import TransformerEncoder


@register_family
class MaskableViT(TransformerEncoder):
    """A timm ViT whose forward takes an optional boolean patch mask (B, h, w); returns all tokens, normed."""

    block_types = (Block,)
    family = "vit"
    timm_modules = ("vision_transformer",)
    name_patterns = ("deit3_*",)
    """DeiT III models are plain timm VisionTransformers (in timm's deit module, beside the distilled ones)."""
    example = "vit_small_patch16_224"
    kind = "ViT"

    @classmethod
    def build_arguments(cls) -> dict[str, Any]:
        return {"dynamic_img_size": True}  # crops of several sizes (iBOT's local crops) through one model

    def __init__(
        self,
        vit: VisionTransformer,
        mask_token: bool = True,
        *,
        timm_name: str = "vit_small_patch16_224",
        timm_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(nn.Parameter(torch.zeros(1, 1, vit.embed_dim)) if mask_token else None)
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]
        self.image_size: int = vit.patch_embed.img_size[0]
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.timm_name = timm_name
        self.timm_args = dict(timm_args or {})

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        vit = self.vit
        tokens = vit.patch_embed(images)  # (B, h, w, D): timm defers flattening with dynamic_img_size
        tokens = self.apply_mask(tokens, mask, tokens.shape[1:3])
        tokens = vit._pos_embed(tokens)
        tokens = vit.patch_drop(tokens)
        tokens = vit.norm_pre(tokens)
        with self.attention_path(tokens):
            tokens = self.run_blocks(vit.blocks, tokens) if self.activation_checkpointing else vit.blocks(tokens)
        return vit.norm(tokens)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        patch = self.patch_size
        check(
            height % patch == 0 and width % patch == 0,
            "image size",
            f"{height}x{width} is not divisible by the patch size {patch}",
        )
        return height // patch, width // patch

    def timm_model(self) -> VisionTransformer:
        return self.vit

    def timm_spec(self, image_size: int | None = None) -> tuple[str, dict[str, Any]]:
        size = image_size or self.image_size
        check(
            size % self.patch_size == 0, "image_size", f"{size} is not a multiple of the patch size {self.patch_size}"
        )
        return self.timm_name, {**self.timm_args, "img_size": size}

    def timm_state_dict(self, image_size: int | None = None) -> dict[str, torch.Tensor]:
        """The ViT's weights; another image size resamples the absolute position embedding (bicubic, as timm does
        when it loads weights at a new size)."""
        self.timm_spec(image_size)
        vit = self.vit
        state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
        size = image_size or self.image_size
        if size != self.image_size and vit.pos_embed is not None:
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"],
                new_size=[size // self.patch_size, size // self.patch_size],
                old_size=list(vit.patch_embed.grid_size),
                num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
            ).contiguous()
        return state
