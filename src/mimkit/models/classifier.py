"""An encoder with a linear classification head: what fine-tuning and augmented linear probing train.

The head reads the encoder's tokens through the Encoder contract, never a family's internals: `pool="timm"` is
the model's own pooled feature (a ViT's [CLS], a CNN's average pool), `pool="patch_mean"` averages the patch
tokens (MAE's and BEiT's fine-tuning of ViTs), `blocks > 1` concatenates the [CLS] features of the last blocks
(iBOT's and DINO's linear protocol for ViT-S). `norm` adds a LayerNorm before the linear layer (MAE's `fc_norm`,
BEiT's mean-pooling norm). The linear layer starts as MAE's: weights N(0, 2e-5) scaled by `init_scale`, bias 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mimkit.models.encoder import Encoder

Pool = Literal["timm", "patch_mean"]


class Classifier(nn.Module):
    def __init__(
        self,
        encoder: Encoder,
        num_classes: int,
        *,
        pool: Pool = "timm",
        norm: bool = False,
        blocks: int = 1,
        init_std: float = 2e-5,
    ) -> None:
        super().__init__()
        if blocks > 1:
            encoder.check_block_features(blocks)
        self.encoder, self.pool, self.blocks = encoder, pool, blocks
        width = encoder.embed_dim * blocks
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=init_std)
        nn.init.zeros_(self.head.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The (B, width) features the head classifies."""
        if self.blocks > 1:
            return self.encoder.block_features(images, self.blocks)
        tokens = self.encoder(images)
        if self.pool == "patch_mean":
            return tokens[:, self.encoder.num_prefix_tokens :].mean(dim=1)
        return self.encoder.pooled(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(images)))
