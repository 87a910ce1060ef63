"""iBOT: masked image modeling with an online tokenizer (Zhou et al., ICLR 2022).

Algorithm, per batch:
  views   two global crops (each with a block mask) and several local crops of every image
  teacher EMA of the student, sees the unmasked global crops -> [CLS] and patch prototype logits
  student sees the masked global crops and the local crops -> [CLS] logits of every crop, patch logits
          at the masked positions only
  targets teacher logits minus their Center ([CLS], patch), sharpened at this epoch's EpochWarmup temperatures
  loss    lambda_cls * [CLS] self-distillation across views (IBOTClsLoss)
          + lambda_patch * masked patch distillation within a view (IBOTPatchLoss)
  centers EMA towards this batch's teacher [CLS] and patch-mean logits, after the loss
  after   EMA update of the teacher (cosine momentum)

With `morph.enabled` (iBOT + DTM) the patch distributions of student and teacher are averaged over token groups
found on the teacher's patch tokens before the patch cross-entropy; the heads then run on every patch token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mimkit.config import ConfigError, check
from mimkit.data.info import DataInfo
from mimkit.data.masking import MaskConfig, MaskGenerator
from mimkit.data.views import AugmentOn, MultiCropConfig, MultiCropViews
from mimkit.health import distribution_health, feature_health, mask_health
from mimkit.losses.center import Center
from mimkit.losses.ibot import IBOTClsLoss, IBOTPatchLoss, masked_cross_entropy, sharpen
from mimkit.methods.base import ClipMode, Method, MethodConfig, Progress, StepOutput, register
from mimkit.models.backbones import BackboneConfig, build_backbone
from mimkit.models.encoder import Encoder
from mimkit.models.heads import PrototypeHead
from mimkit.models.teachers import EMA, frozen_copy
from mimkit.morphing import MorphConfig, ScheduleSampler, TokenGrouping, draw_seed, group_tokens, step_generator
from mimkit.schedules import CosineSchedule, EpochWarmup


@dataclass
class IBOTConfig(MethodConfig):
    """iBOT defaults of the reference ViT-S/16 recipe (METHODS.md section 1)."""

    name: str = "ibot"
    clip_mode: ClipMode = "per_tensor"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    views: MultiCropConfig = field(default_factory=MultiCropConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    out_dim: int = 8192
    """Prototypes K for [CLS]."""
    patch_out_dim: int = 8192
    """Prototypes for patch tokens (must equal out_dim when shared_head)."""
    shared_head: bool = True
    """The student's patch tokens use its [CLS] prototype layer too (every reference recipe)."""
    shared_head_teacher: bool | None = None
    """The same for the teacher (the reference's separate flag); null: as `shared_head`. Student separate and
    teacher shared: the teacher scores patches with its [CLS] prototypes; student shared and teacher separate: the
    teacher's patch prototypes keep their initialisation (no student layer to follow), as in the reference."""

    @property
    def teacher_shares_head(self) -> bool:
        return self.shared_head if self.shared_head_teacher is None else self.shared_head_teacher

    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    norm_last_layer: bool = False
    """Fix the prototype norms to 1 (reference: False for ViT-S, True for ViT-B/L)."""
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    center_momentum_patch: float = 0.9
    lambda_cls: float = 1.0
    lambda_patch: float = 1.0
    momentum_teacher: float = 0.996
    """EMA momentum at the start; it follows a cosine to 1 over training."""
    freeze_last_layer_epochs: int = 1
    """The prototype layer gets no updates during the first epochs (1 for S, 3 for B/L)."""
    morph: MorphConfig = field(default_factory=lambda: MorphConfig(enabled=False))
    """iBOT + DTM: morph the patch distributions over token groups found on the teacher's patch tokens."""

    def validate(self, prefix: str = "method") -> None:
        super().validate(prefix)
        self.backbone.validate(f"{prefix}.backbone")
        self.views.validate(f"{prefix}.views")
        self.mask.validate(f"{prefix}.mask")
        self.morph.validate(f"{prefix}.morph")
        check(
            not (self.shared_head or self.teacher_shares_head) or self.patch_out_dim == self.out_dim,
            f"{prefix}.patch_out_dim",
            f"must equal out_dim ({self.out_dim}) when shared_head or shared_head_teacher is true; "
            f"got {self.patch_out_dim}",
        )
        check(
            self.views.global_size <= self.backbone.img_size,
            f"{prefix}.views.global_size",
            f"{self.views.global_size} is larger than the backbone's img_size ({self.backbone.img_size}), the size "
            f"it is evaluated at; use global_size <= img_size (usually equal)",
        )
        check(
            self.views.num_local == 0 or self.views.local_size <= self.views.global_size,
            f"{prefix}.views.local_size",
            f"local crops ({self.views.local_size}) larger than the global ones ({self.views.global_size}); "
            "local crops are the small views",
        )
        check(0 <= self.momentum_teacher <= 1, f"{prefix}.momentum_teacher", "must lie in [0, 1]")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "teacher_patch_temp"):
            check(getattr(self, name) > 0, f"{prefix}.{name}", "temperatures must be positive")
        check(self.out_dim > 0 and self.patch_out_dim > 0, f"{prefix}.out_dim", "must be positive")


def teacher_temperatures(cfg: IBOTConfig) -> tuple[EpochWarmup, EpochWarmup]:
    """The teacher's [CLS] and patch temperature schedules; the patch one waits until masking starts."""
    cls = EpochWarmup(cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs)
    patch = EpochWarmup(
        cfg.warmup_teacher_patch_temp,
        cfg.teacher_patch_temp,
        cfg.warmup_teacher_temp_epochs,
        delay_epochs=cfg.mask.start_epoch,
    )
    return cls, patch


@register("ibot")
class IBOT(Method):
    Config = IBOTConfig
    cfg: IBOTConfig
    renamed_state: ClassVar[dict[str, str]] = {
        "loss.center": "cls_center.value",
        "loss.center_patch": "patch_center.value",
    }
    """The centers were buffers of the loss module before it was split into parts."""

    def __init__(self, cfg: IBOTConfig, data: DataInfo) -> None:
        super().__init__(cfg, data)
        self.student = build_backbone(cfg.backbone, data.channels, mask_token=cfg.mask.masks_patches)
        self.teacher = build_backbone(cfg.backbone, data.channels, mask_token=False, drop_path_rate=0.0)
        self.teacher.requires_grad_(False)
        sizes = [(cfg.views.global_size, "global_size")] + [(cfg.views.local_size, "local_size")] * (
            cfg.views.num_local > 0
        )
        for size, name in sizes:
            try:
                self.student.grid(size, size)
            except ConfigError as error:
                raise ConfigError(f"method.views.{name}: crop size {size}: {error}") from None

        def head(shared_prototypes: bool) -> PrototypeHead:
            dims = (cfg.out_dim, cfg.patch_out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim)
            return PrototypeHead(
                self.student.embed_dim,
                *dims,
                norm_last_layer=cfg.norm_last_layer,
                shared_prototypes=shared_prototypes,
            )

        self.student_head = head(cfg.shared_head)
        if cfg.teacher_shares_head == cfg.shared_head:
            self.teacher_head = frozen_copy(self.student_head)
        else:
            self.teacher_head = head(cfg.teacher_shares_head).requires_grad_(False)
        self.ema = EMA(
            nn.ModuleList([self.student, self.student_head]),
            nn.ModuleList([self.teacher, self.teacher_head]),
            allow_teacher_only=cfg.shared_head and not cfg.teacher_shares_head,
        )
        self.ema.copy_student()
        self.teacher_temp, self.teacher_patch_temp = teacher_temperatures(cfg)
        self.cls_center = Center((1, cfg.out_dim), cfg.center_momentum)
        self.patch_center = Center((1, 1, cfg.patch_out_dim), cfg.center_momentum_patch)
        self.cls_loss = IBOTClsLoss(cfg.student_temp)
        self.patch_loss = IBOTPatchLoss(cfg.student_temp)
        self.momentum = CosineSchedule(cfg.momentum_teacher, 1.0)
        self.grid = self.student.grid(cfg.views.global_size, cfg.views.global_size)
        self.morph_sampler = ScheduleSampler(
            self.grid[0] * self.grid[1], cfg.morph.num_schedules, cfg.morph.max_iterations
        )
        self.schedule_seed = draw_seed() if cfg.morph.enabled else 0  # last: drawn under the run's seed

    def views(self, augment_on: AugmentOn = "worker") -> MultiCropViews:
        return MultiCropViews(self.cfg.views, self.data, self.grid, MaskGenerator(self.cfg.mask), augment_on)

    def mask_configs(self) -> dict[str, tuple[MaskConfig, tuple[int, int]]]:
        return {"method.mask": (self.cfg.mask, self.grid)}

    def training_step(self, batch: dict[str, Any], progress: Progress) -> StepOutput:
        views = batch["views"]
        global_crops, local_crops = views["global"], views["local"]
        masks = torch.stack(views["masks"])  # (G, B, h, w)
        num_global, batch_size = masks.shape[:2]
        flat_masks = masks.flatten(0, 1).flatten(1)  # (G*B, N)

        morph = self.cfg.morph.enabled
        prefix = self.student.num_prefix_tokens
        with torch.no_grad():
            teacher_tokens = self.teacher(torch.cat(global_crops))
            teacher_cls = self.teacher_head.cls_logits(self.teacher_head.embed(self.teacher.pooled(teacher_tokens)))
            teacher_patch_embed = self.teacher_head.embed(teacher_tokens[:, prefix:])
            # only masked positions enter the loss, unless morphing mixes every token into the groups
            teacher_patch = self.teacher_head.patch_logits(
                teacher_patch_embed if morph else teacher_patch_embed[flat_masks]
            )
            # the prototype layer is linear, so the mean of its outputs is its output at the mean embedding
            teacher_patch_mean = self.teacher_head.patch_logits(teacher_patch_embed.mean(1))

        student_mask = masks.flatten(0, 1) if self.student.supports_mask else None  # else never masked (config)
        student_tokens = self.student(torch.cat(global_crops), mask=student_mask)
        local = self.student.forward_crops(local_crops) if local_crops else []
        cls_tokens = torch.cat([self.student.pooled(student_tokens), *map(self.student.pooled, local)])
        patch_tokens = student_tokens[:, prefix:] if morph else student_tokens[:, prefix:][flat_masks]
        embedded = self.student_head.embed(torch.cat([cls_tokens, patch_tokens.flatten(0, -2)]))
        student_cls = self.student_head.cls_logits(embedded[: len(cls_tokens)])
        student_patch = self.student_head.patch_logits(embedded[len(cls_tokens) :])
        groupings = None
        if morph:
            student_patch = student_patch.view(*patch_tokens.shape[:2], -1)
            protect = self.cfg.morph.protect_first_token
            groupings = [
                group_tokens(teacher_tokens[:, prefix:], s, protect)
                for s in self.cfg.morph.schedules(self.morph_sampler, step_generator(self.schedule_seed, progress.step))
            ]

        teacher_cls = teacher_cls.view(num_global, batch_size, -1)
        teacher_temp = self.teacher_temp.at_epoch(progress.epoch)
        cls_targets = sharpen(self.cls_center.subtract(teacher_cls), teacher_temp)
        patch_targets = sharpen(
            self.patch_center.subtract(teacher_patch), self.teacher_patch_temp.at_epoch(progress.epoch)
        )
        health = {}
        if progress.logged:  # the targets of this step, taken before the centers move
            health = distribution_health(cls_targets)
            health |= feature_health(self.teacher.pooled(teacher_tokens[:batch_size]))
        loss_cls = self.cls_loss(student_cls.view(-1, batch_size, student_cls.shape[-1]), cls_targets)
        loss_cls = loss_cls * self.cfg.lambda_cls
        if groupings is None:
            loss_patch = self.patch_loss(student_patch, patch_targets, masks.flatten(2))
        else:
            loss_patch = self.morphed_patch_loss(student_patch, patch_targets, masks.flatten(2), groupings)
        loss_patch = loss_patch * self.cfg.lambda_patch
        # after the loss, as in the reference: the patch center follows the mean over *all* tokens
        self.cls_center.update(teacher_cls)
        self.patch_center.update(teacher_patch_mean)
        metrics = {
            "loss_cls": loss_cls.detach(),
            "loss_patch": loss_patch.detach(),
            **mask_health(flat_masks, self.cfg.mask.expected_ratio(progress.epoch), logged=progress.logged),
            "teacher_temp": teacher_temp,
            **health,
        }
        return StepOutput(loss_cls + loss_patch, metrics)

    def morphed_patch_loss(
        self,
        student_patch: torch.Tensor,
        targets: torch.Tensor,
        masks: torch.Tensor,
        groupings: list[TokenGrouping],
    ) -> torch.Tensor:
        """iBOT's patch loss on DTM-morphed distributions (iBOT + DTM), averaged over the groupings.

        student_patch (G*B, N, Kp): logits of *every* patch token; targets (G*B, N, Kp): the teacher's centred,
        sharpened distributions there; masks (G, B, N). Both distributions are replaced by their group means
        (mixtures stay distributions), then the per-token cross-entropy is taken at the masked positions as in
        the plain patch loss. ASSUMPTION: probabilities, not logits, are averaged.
        """
        student = sharpen(student_patch, self.patch_loss.student_temp)
        tiny = torch.finfo(student.dtype).tiny
        losses = []
        for grouping in groupings:
            log_student = grouping.morph(student).clamp_min(tiny).log()
            losses.append(masked_cross_entropy(grouping.morph(targets), log_student, masks))
        return torch.stack(losses).mean()

    def before_optimizer_step(self, progress: Progress) -> None:
        if progress.epoch < self.cfg.freeze_last_layer_epochs:
            for layer in self.student_head.last_layers():
                for param in layer.parameters():
                    param.grad = None

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        self.ema.update(self.momentum(progress))

    def encoder(self) -> Encoder:
        return self.teacher

    def networks(self) -> dict[str, nn.Module]:
        return {
            "student": self.student,
            "student_head": self.student_head,
            "teacher": self.teacher,
            "teacher_head": self.teacher_head,
        }
