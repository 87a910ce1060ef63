"""MaskableBEiT: a timm BEiT (relative position bias, layer scale, no absolute position embedding) with a mask token.

As in BEiT's pretraining, masked patch embeddings are replaced by a learned mask token before the [CLS] token
is prepended; the blocks run with timm's own (shared or per-block) relative position bias. BEiT's relative
position tables belong to one token grid, so the encoder takes images of its trained size only.

ASSUMPTION: built with `global_pool="token"`, so the final norm applies to every token (BEiT v2's pretraining
encoder) and the image feature is the [CLS] token; export records it, so timm rebuilds the same network.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.beit import Beit, Block
from torch import nn

from mimkit.config import ConfigError
from mimkit.models.backbone_config import BackboneConfig
from mimkit.models.families import register_family
from mimkit.models.families.transformer import TransformerEncoder


@register_family
class MaskableBEiT(TransformerEncoder):
    block_types = (Block,)
    family = "beit"
    timm_modules = ("beit",)
    example = "beit_base_patch16_224"
    kind = "BEiT"

    @classmethod
    def timm_arguments(cls, cfg: BackboneConfig) -> dict[str, Any]:
        return {**super().timm_arguments(cfg), "global_pool": "token"}

    def __init__(self, beit: Beit, mask_token: bool = True, *, timm_name: str, timm_args: dict[str, Any]) -> None:
        token = None
        if mask_token:
            token = nn.Parameter(torch.zeros(1, 1, beit.embed_dim))
            nn.init.trunc_normal_(token, std=0.02)  # BEiT's initialisation of its mask token
        super().__init__(token)
        self.beit = beit
        self.embed_dim: int = beit.embed_dim
        self.patch_size: int = beit.patch_embed.patch_size[0]
        self.image_size: int = beit.patch_embed.img_size[0]
        self.num_prefix_tokens: int = beit.num_prefix_tokens
        self.timm_name, self.timm_args = timm_name, dict(timm_args)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        beit = self.beit
        grid = self.grid(*images.shape[-2:])
        tokens = self.apply_mask(beit.patch_embed(images), mask, grid)
        tokens = torch.cat([beit.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        if beit.pos_embed is not None:
            tokens = tokens + beit.pos_embed
        tokens = beit.pos_drop(tokens)
        shared_bias = beit.rel_pos_bias() if beit.rel_pos_bias is not None else None
        with self.attention_path(tokens):
            tokens = self.run_blocks(beit.blocks, tokens, shared_rel_pos_bias=shared_bias)
        return beit.norm(tokens)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        if (height, width) != (self.image_size, self.image_size):
            raise ConfigError(
                f"{self.timm_name}: a BEiT encoder takes {self.image_size}px images only (its relative position "
                f"bias belongs to one token grid), got {height}x{width}; use crops of {self.image_size}px "
                "(for iBOT: method.views.num_local=0)"
            )
        return height // self.patch_size, width // self.patch_size

    def timm_model(self) -> Beit:
        return self.beit

    def timm_spec(self, image_size: int | None = None) -> tuple[str, dict[str, Any]]:
        if image_size not in (None, self.image_size):
            raise ConfigError(
                f"image_size: a BEiT encoder exports at its trained size ({self.image_size}) only; "
                "timm resizes the relative position tables when it loads them at another size"
            )
        return self.timm_name, {**self.timm_args, "img_size": self.image_size}
