"""SymMIM: symmetric masking with pixel reconstruction and momentum contrast (Nguyen & Park, ICPR 2024).

No code of SymMIM is public; the masks follow descriptions of the paper, the rest is our documented assumption
(docs/methods/symmim.md), each a config field.

Algorithm, per batch:
  views     two augmented crops of every image; each has a fine checkerboard mask (online) and a coarse one
            (momentum), with a random phase and offset per crop
  online    ViT with a mask token on the fine-masked crop (full sequence) -> a linear pixel head on the patch
            tokens; L_mim = MSE to the per-patch normalised pixels of the masked patches
  momentum  EMA of the online encoder and projector (cosine 0.99 -> 1) on the coarse-masked crop, no gradient
  contrast  [CLS] -> projector (3-layer BN MLP) -> predictor (2-layer) on the online branch, projector alone on the
            momentum branch; L_con = InfoNCE (MoCo v3) of view 1's query against view 2's key and back
  loss      L_mim + lambda * L_con
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from mimkit.config import check
from mimkit.data.info import DataInfo
from mimkit.data.masking import MaskConfig, MaskGenerator
from mimkit.data.views import AugmentOn, MultiCropConfig, PairedMaskedViews
from mimkit.health import feature_health, mask_health
from mimkit.losses.contrastive import info_nce
from mimkit.losses.pixels import masked_mse, normalize_patches, patchify, unpatchify
from mimkit.methods.base import ClipMode, Method, MethodConfig, Reconstruction, StepOutput, register
from mimkit.models.backbones import BackboneConfig, build_backbone
from mimkit.models.encoder import Encoder
from mimkit.models.heads import batch_norm_mlp
from mimkit.models.teachers import EMA, frozen_copy
from mimkit.schedules import CosineSchedule, Progress


@dataclass
class SymMIMConfig(MethodConfig):
    """SymMIM defaults for ViT-B/16 (METHODS.md section 4; every value beyond the masks is an ASSUMPTION)."""

    name: str = "symmim"
    clip_mode: ClipMode = "none"
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="vit_base_patch16_224"))
    views: MultiCropConfig = field(default_factory=lambda: MultiCropConfig(global_scale=(0.08, 1.0), num_local=0))
    """The two global crops of MultiCropConfig (MoCo v3 / BYOL augmentations); local crops are not used."""
    online_mask: MaskConfig = field(default_factory=lambda: MaskConfig(shape="symmetric", symmetric_block=1))
    """Fine checkerboard for the online encoder. Ablations: coarse (symmetric_block 2), random 50%
    (shape rand, ratios [[0.5, 0]])."""
    momentum_mask: MaskConfig = field(default_factory=lambda: MaskConfig(shape="symmetric", symmetric_block=2))
    """Coarse checkerboard (2 x 2 patch cells) for the momentum encoder; swap with online_mask to swap the roles."""
    projector_hidden_dim: int = 4096
    projector_dim: int = 256
    predictor_hidden_dim: int = 4096
    temperature: float = 0.2
    lambda_con: float = 1.0
    """Weight of the contrastive loss (0: pixel reconstruction alone)."""
    momentum: float = 0.99
    """EMA momentum at the start; a cosine to 1 over training."""
    pixel_target: Literal["augmented", "crop"] = "augmented"
    """What the pixel head regresses: the augmented input itself (blurred, maybe solarized), or the same crop and
    flip before the photometric steps (MAE's and SimMIM's targets, whose inputs have no others)."""
    freeze_patch_embed: bool = False
    """Keep the patch projection at its random initialisation (MoCo v3's fix for the instability of contrastive
    ViT training at large lr and batch; the ViT-L recipe sets it)."""

    def validate(self, prefix: str = "method") -> None:
        super().validate(prefix)
        self.backbone.validate(f"{prefix}.backbone")
        self.views.validate(f"{prefix}.views")
        self.online_mask.validate(f"{prefix}.online_mask")
        self.momentum_mask.validate(f"{prefix}.momentum_mask")
        check(self.views.num_local == 0, f"{prefix}.views.num_local", "SymMIM uses the two global crops only; set 0")
        check(
            self.views.global_size == self.backbone.img_size,
            f"{prefix}.views.global_size",
            f"must equal the backbone's img_size ({self.backbone.img_size}); got {self.views.global_size}",
        )
        check(self.temperature > 0, f"{prefix}.temperature", f"must be positive; got {self.temperature}")
        check(self.lambda_con >= 0, f"{prefix}.lambda_con", f"must be >= 0; got {self.lambda_con}")
        check(0 <= self.momentum <= 1, f"{prefix}.momentum", f"must lie in [0, 1]; got {self.momentum}")


@register("symmim")
class SymMIM(Method):
    Config = SymMIMConfig
    cfg: SymMIMConfig

    def __init__(self, cfg: SymMIMConfig, data: DataInfo) -> None:
        super().__init__(cfg, data)
        self.online = build_backbone(cfg.backbone, data.channels, mask_token=True)
        self.grid = self.online.grid(cfg.views.global_size, cfg.views.global_size)
        dim, patch = self.online.embed_dim, self.online.patch_size
        self.pixel_head = nn.Linear(dim, patch * patch * data.channels)
        self.projector = batch_norm_mlp(dim, cfg.projector_hidden_dim, cfg.projector_dim, num_layers=3)
        self.predictor = batch_norm_mlp(cfg.projector_dim, cfg.predictor_hidden_dim, cfg.projector_dim, num_layers=2)
        if cfg.freeze_patch_embed:
            patch_embed = getattr(self.online.timm_model(), "patch_embed", None)
            check(
                patch_embed is not None,
                "method.freeze_patch_embed",
                f"{cfg.backbone.name} has no patch_embed to freeze; set it false",
            )
            patch_embed.requires_grad_(False)
        self.momentum_encoder = build_backbone(cfg.backbone, data.channels, mask_token=True, drop_path_rate=0.0)
        self.momentum_encoder.requires_grad_(False)
        self.momentum_projector = frozen_copy(self.projector)
        self.ema = EMA(
            nn.ModuleList([self.online, self.projector]),
            nn.ModuleList([self.momentum_encoder, self.momentum_projector]),
        )
        self.ema.copy_student()
        self.momentum = CosineSchedule(cfg.momentum, 1.0)

    def views(self, augment_on: AugmentOn = "worker") -> PairedMaskedViews:
        cfg = self.cfg
        masks = MaskGenerator(cfg.online_mask), MaskGenerator(cfg.momentum_mask)
        plain = cfg.pixel_target == "crop"
        return PairedMaskedViews(cfg.views, self.data, self.grid, *masks, augment_on=augment_on, plain=plain)

    def mask_configs(self) -> dict[str, tuple[MaskConfig, tuple[int, int]]]:
        return {
            "method.online_mask": (self.cfg.online_mask, self.grid),
            "method.momentum_mask": (self.cfg.momentum_mask, self.grid),
        }

    def training_step(self, batch: dict[str, Any], progress: Progress) -> StepOutput:
        views = batch["views"]
        images = torch.cat(views["views"])  # (2B, C, H, W): view 1 of every image, then view 2
        online_masks = torch.cat(views["online_masks"])
        momentum_masks = torch.cat(views["momentum_masks"])
        prefix = self.online.num_prefix_tokens

        tokens = self.online(images, mask=online_masks)
        predicted = self.pixel_head(tokens[:, prefix:])
        targets = normalize_patches(patchify(torch.cat(self._targets(views)), self.online.patch_size))
        loss_mim = masked_mse(predicted, targets, online_masks)

        features = self.online.pooled(tokens)
        queries = self.predictor(self.projector(features))
        with torch.no_grad():
            keys = self.momentum_projector(self.momentum_encoder.pooled(self.momentum_encoder(images, momentum_masks)))
        q1, q2 = queries.chunk(2)
        k1, k2 = keys.chunk(2)
        loss_con = info_nce(q1, k2, self.cfg.temperature) + info_nce(q2, k1, self.cfg.temperature)
        logged, epoch = progress.logged, progress.epoch
        metrics = {
            "loss_mim": loss_mim.detach(),
            "loss_con": loss_con.detach(),
            **mask_health(online_masks, self.cfg.online_mask.expected_ratio(epoch), "online", logged=logged),
            **mask_health(momentum_masks, self.cfg.momentum_mask.expected_ratio(epoch), "momentum", logged=logged),
            **(feature_health(features[: len(features) // 2]) if progress.logged else {}),
        }
        return StepOutput(loss_mim + self.cfg.lambda_con * loss_con, metrics)

    def _targets(self, views: dict[str, Any]) -> list[torch.Tensor]:
        """Per view, the images whose patches the pixel head regresses (`pixel_target`)."""
        return views["views_plain"] if self.cfg.pixel_target == "crop" else views["views"]

    @torch.no_grad()
    def reconstruct(self, views: dict[str, Any]) -> Reconstruction:
        """The online encoder's pixels for the first view under its mask, brought back from per-patch normalised
        values with each target patch's mean and standard deviation (as MAE's figures do), beside the target."""
        images, masks = views["views"][0], views["online_masks"][0]
        targets = self._targets(views)[0]
        patch = self.online.patch_size
        predicted = self.pixel_head(self.online(images, mask=masks)[:, self.online.num_prefix_tokens :])
        patches = patchify(targets, patch)
        scale = (patches.var(-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
        pixels = unpatchify(predicted * scale + patches.mean(-1, keepdim=True), patch, *images.shape[-2:])
        return Reconstruction(targets, pixels, masks)

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        self.ema.update(self.momentum(progress))

    def encoder(self) -> Encoder:
        return self.online

    def networks(self) -> dict[str, nn.Module]:
        return {
            "online": self.online,
            "pixel_head": self.pixel_head,
            "projector": self.projector,
            "predictor": self.predictor,
            "momentum": self.momentum_encoder,
            "momentum_projector": self.momentum_projector,
        }
