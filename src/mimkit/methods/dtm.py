"""DTM: Dynamic Token Morphing (Kim, Heo, Han; ICLR 2025, "Morphing Tokens Draw Strong MIM").

Algorithm, per batch:
  views    one crop per image with a BEiT-style block mask
  targets  a teacher's patch tokens of the unmasked crop (frozen CLIP/timm/mimkit network, or the student's EMA)
  student  ViT on the masked crop (mask token), final norm, [CLS] dropped, one Linear to the target width
  morph    L schedules (m tokens removed in k rounds) group the target tokens by bipartite matching; student
           and target tokens are replaced by their group means (same groups for both)
  loss     smooth-L1 (beta 2) between morphed student and morphed targets, averaged over the L schedules
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mimkit.config import ConfigError, check
from mimkit.data.info import DataInfo
from mimkit.data.masking import MaskConfig, MaskGenerator
from mimkit.data.views import AugmentOn, MaskedView, MaskedViewConfig
from mimkit.health import feature_health, mask_health
from mimkit.losses.regression import RegressionKind, normalize_targets, regression_loss
from mimkit.methods.base import (
    ClipMode,
    Method,
    MethodConfig,
    ParamGroup,
    Progress,
    StepOutput,
    register,
    split_weight_decay,
)
from mimkit.methods.saved import open_encoder
from mimkit.models.backbones import BackboneConfig, build_backbone
from mimkit.models.encoder import Encoder
from mimkit.models.teachers import EMA, TeacherConfig, build_token_teacher, encoder_teacher
from mimkit.morphing import MorphConfig, ScheduleSampler, draw_seed, group_tokens, morph_loss, step_generator
from mimkit.schedules import CosineSchedule


@dataclass
class DTMConfig(MethodConfig):
    """DTM defaults of the paper's ViT-B/16 + CLIP-B/16 recipe (METHODS.md section 2)."""

    name: str = "dtm"
    clip_mode: ClipMode = "global"
    clip_grad: float = 3.0
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="vit_base_patch16_224"))
    views: MaskedViewConfig = field(default_factory=MaskedViewConfig)
    mask: MaskConfig = field(
        default_factory=lambda: MaskConfig(shape="block", ratios=[(75 / 196, 0.0)], min_block_patches=16)
    )
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    morph: MorphConfig = field(default_factory=MorphConfig)
    loss: RegressionKind = "smooth_l1"
    beta: float = 2.0
    """Smooth-L1 transition point."""
    normalize_targets: bool = False
    """Per-token LayerNorm (no affine) of the morphed targets."""
    loss_weight: float = 1.0
    """w_dtm."""
    no_weight_decay: list[str] = field(default_factory=lambda: ["cls_token", "pos_embed"])
    """Parameters (by last name) without weight decay besides biases and 1-D ones (the reference's BEiT skip list)."""

    def validate(self, prefix: str = "method") -> None:
        super().validate(prefix)
        self.backbone.validate(f"{prefix}.backbone")
        self.views.validate(f"{prefix}.views")
        self.mask.validate(f"{prefix}.mask")
        self.teacher.validate(f"{prefix}.teacher")
        self.morph.validate(f"{prefix}.morph")
        check(self.beta > 0, f"{prefix}.beta", f"must be positive; got {self.beta}")
        check(
            self.views.size == self.backbone.img_size,
            f"{prefix}.views.size",
            f"must equal the backbone's img_size ({self.backbone.img_size}); got {self.views.size}",
        )


@register("dtm")
class DTM(Method):
    Config = DTMConfig
    cfg: DTMConfig

    def __init__(self, cfg: DTMConfig, data: DataInfo) -> None:
        super().__init__(cfg, data)
        self.student = build_backbone(cfg.backbone, data.channels, mask_token=True)
        self.grid = self.student.grid(cfg.views.size, cfg.views.size)
        self.num_tokens = self.grid[0] * self.grid[1]
        if cfg.teacher.kind == "ema":
            self.teacher: nn.Module = build_backbone(cfg.backbone, data.channels, mask_token=False, drop_path_rate=0.0)
            self.teacher.requires_grad_(False)
            self.ema: EMA | None = EMA(self.student, self.teacher)
            self.ema.copy_student()
            target_dim = self.student.embed_dim
        else:
            if cfg.teacher.kind == "mimkit":
                self.teacher = encoder_teacher(*open_encoder(cfg.teacher.checkpoint or ""), data)
            else:
                self.teacher = build_token_teacher(cfg.teacher, data, cfg.views.size)
            self.ema = None
            target_dim = self._check_teacher_tokens()
        self.head = nn.Linear(self.student.embed_dim, target_dim)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.sampler = ScheduleSampler(self.num_tokens, cfg.morph.num_schedules, cfg.morph.max_iterations)
        self.momentum = CosineSchedule(cfg.teacher.momentum, 1.0)
        self.schedule_seed = draw_seed()  # last: the engine builds methods under the run's seed on every rank

    def _check_teacher_tokens(self) -> int:
        """Run the frozen teacher once: its token grid must match the student's, before any training."""
        probe = torch.zeros(1, self.data.channels, self.cfg.views.size, self.cfg.views.size)
        tokens = self.teacher(probe)
        if tokens.shape[1] != self.num_tokens:
            raise ConfigError(
                f"method.teacher: the teacher gives {tokens.shape[1]} patch tokens for {self.cfg.views.size}px "
                f"images, the student {self.num_tokens}; use a teacher with the same patch grid"
            )
        return tokens.shape[-1]

    def param_groups(self) -> list[ParamGroup]:
        return split_weight_decay(self.named_parameters(), exempt=self.cfg.no_weight_decay)

    def views(self, augment_on: AugmentOn = "worker") -> MaskedView:
        return MaskedView(self.cfg.views, self.data, self.grid, MaskGenerator(self.cfg.mask), augment_on)

    def mask_configs(self) -> dict[str, tuple[MaskConfig, tuple[int, int]]]:
        return {"method.mask": (self.cfg.mask, self.grid)}

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher patch tokens of the unmasked images (B, N, C), without gradient."""
        with torch.no_grad():
            if isinstance(self.teacher, Encoder):
                return self.teacher(images)[:, self.teacher.num_prefix_tokens :]
            return self.teacher(images)

    def training_step(self, batch: dict[str, Any], progress: Progress) -> StepOutput:
        images, masks = batch["views"]["image"], batch["views"]["mask"]
        targets = self.targets(images)
        student_tokens = self.student(images, mask=masks)
        predictions = self.head(student_tokens[:, self.student.num_prefix_tokens :])
        schedules = self.cfg.morph.schedules(self.sampler, step_generator(self.schedule_seed, progress.step))
        groupings = [group_tokens(targets, s, self.cfg.morph.protect_first_token) for s in schedules]
        loss = morph_loss(
            predictions, targets, groupings, self.cfg.loss, self.cfg.beta, normalize_target=self.cfg.normalize_targets
        )
        with torch.no_grad():
            target = normalize_targets(targets) if self.cfg.normalize_targets else targets
            tokenwise = regression_loss(predictions.detach(), target, self.cfg.loss, self.cfg.beta)
        metrics = {
            "loss_tokenwise": tokenwise,
            "morph_removed": sum(s.num_removed for s in schedules) / len(schedules),
            **mask_health(masks, self.cfg.mask.expected_ratio(progress.epoch), logged=progress.logged),
            **(feature_health(self.student.pooled(student_tokens)) if progress.logged else {}),
        }
        return StepOutput(loss * self.cfg.loss_weight, metrics)

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        if self.ema is not None:
            self.ema.update(self.momentum(progress))

    def encoder(self) -> Encoder:
        return self.student

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "head": self.head, "teacher": self.teacher}
