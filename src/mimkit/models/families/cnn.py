"""CNN encoders: a timm CNN's last feature map as tokens, no prefix, no mask; one registered family per timm module.

The map (B, C, h, w) leaves as (B, h * w, C) tokens in row-major order; the image feature is timm's own
pre-logits output on that map (global average pool, plus ConvNeXt's head norm), so k-NN and linear probes
see what a timm classifier head would. A CNN's shape is set through timm's own arguments (`model_args`).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.convnext import ConvNeXtBlock
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from mimkit.models.backbone_config import BackboneConfig
from mimkit.models.encoder import Encoder
from mimkit.models.families import register_family


class CNNEncoder(Encoder):
    """What every CNN family shares; a family subclass names its timm module and block types."""

    kind = "CNN"
    shape_hint = (
        "a CNN's shape goes in method.backbone.model_args (e.g. layers, channels for a ResNet; depths, dims for a "
        "ConvNeXt)"
    )

    def __init__(self, model: nn.Module, *, timm_name: str, timm_args: dict[str, Any], image_size: int) -> None:
        super().__init__()
        self.model = model
        self.embed_dim: int = model.num_features
        self.patch_size: int = model.feature_info[-1]["reduction"]
        self.image_size = image_size
        self.num_prefix_tokens = 0
        self.timm_name, self.timm_args = timm_name, dict(timm_args)
        self._grids: dict[tuple[int, int], tuple[int, int]] = {}

    @classmethod
    def wrap(cls, model: nn.Module, cfg: BackboneConfig, timm_args: dict[str, Any], *, mask_token: bool) -> Encoder:
        return cls(model, timm_name=cfg.name, timm_args=timm_args, image_size=cfg.img_size)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise ValueError(f"{self.timm_name} is a CNN encoder: it takes no patch mask")
        return self.model.forward_features(images).flatten(2).transpose(1, 2)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """timm's head on the tokens laid out as an (N x 1) map: the average pool sees the same values."""
        return self.model.forward_head(tokens.transpose(1, 2).unsqueeze(-1), pre_logits=True)

    @torch.no_grad()
    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Measured once per size on a blank image in eval mode (padding rules differ between CNNs)."""
        if (height, width) not in self._grids:
            was_training = self.model.training
            parameter = next(self.model.parameters())
            probe = torch.zeros(1, self.timm_args.get("in_chans", 3), height, width, device=parameter.device)
            self.model.eval()
            try:
                self._grids[height, width] = tuple(self.model.forward_features(probe).shape[-2:])  # type: ignore[assignment]
            finally:
                self.model.train(was_training)
        return self._grids[height, width]

    def timm_model(self) -> nn.Module:
        return self.model

    def timm_spec(self, image_size: int | None = None) -> tuple[str, dict[str, Any]]:
        """A CNN takes any size: `image_size` only changes what export records as the input size."""
        return self.timm_name, dict(self.timm_args)


@register_family
class ResNetEncoder(CNNEncoder):
    family = "resnet"
    timm_modules = ("resnet",)
    example = "resnet50"
    block_types = (BasicBlock, Bottleneck)


@register_family
class ConvNeXtEncoder(CNNEncoder):
    family = "convnext"
    timm_modules = ("convnext",)
    example = "convnext_tiny"
    block_types = (ConvNeXtBlock,)
