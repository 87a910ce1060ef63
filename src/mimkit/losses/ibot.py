"""The iBOT loss: self-distillation on [CLS] across views plus masked patch-token distillation within a view.

Teacher targets are centred and sharpened with a temperature; the student is sharpened with its own.
[CLS]: cross-entropy of every teacher global crop against every *other* student crop (locals included).
Patches: per-token cross-entropy at the masked positions of the same crop, averaged per image over its masked
tokens, then over the whole batch (unmasked images count as 0), then over the global crops.

Only masked patch positions enter the loss, so callers pass logits at those positions alone (M = number of
masked tokens); the straightforward full-token computation gives the same value and gradients (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.distributed import all_reduce_mean
from mimkit.morphing import TokenGrouping
from mimkit.schedules import EpochWarmup


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Softmax and cross-entropy in at least float32, also under bf16/fp16 autocast."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_image_mean(per_token: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens per image (0 for unmasked images), then over the batch, then over the crops.

    per_token (M,): values at the masked positions of `masks` (G, B, N), in `masks.nonzero()` order.
    """
    num_global, batch = masks.shape[:2]
    positions = masks.flatten(2).nonzero()
    image_of_token = positions[:, 0] * batch + positions[:, 1]
    per_image = per_token.new_zeros(num_global * batch).index_add_(0, image_of_token, per_token)
    counts = masks.flatten(2).sum(-1).flatten().clamp(min=1)
    return (per_image / counts).view(num_global, batch).mean(1).mean()


@dataclass
class IBOTLossOutput:
    total: torch.Tensor
    cls: torch.Tensor
    patch: torch.Tensor


class IBOTLoss(nn.Module):
    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        teacher_temp: EpochWarmup,
        teacher_patch_temp: EpochWarmup,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum_patch: float = 0.9,
        lambda_cls: float = 1.0,
        lambda_patch: float = 1.0,
    ) -> None:
        super().__init__()
        self.teacher_temp, self.teacher_patch_temp = teacher_temp, teacher_patch_temp
        self.student_temp = student_temp
        self.center_momentum, self.center_momentum_patch = center_momentum, center_momentum_patch
        self.lambda_cls, self.lambda_patch = lambda_cls, lambda_patch
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, patch_out_dim))

    def forward(
        self,
        student_cls: torch.Tensor,
        teacher_cls: torch.Tensor,
        student_patch: torch.Tensor,
        teacher_patch: torch.Tensor,
        masks: torch.Tensor,
        teacher_patch_mean: torch.Tensor,
        epoch: int,
        groupings: list[TokenGrouping] | None = None,
    ) -> IBOTLossOutput:
        """Loss of one batch; then the centers move towards this batch's teacher outputs.

        student_cls (S, B, K): every student crop, global crops first. teacher_cls (G, B, K).
        student_patch, teacher_patch (M, Kp): logits at the masked positions of `masks` (G, B, N), in
        `masks.nonzero()` order; with `groupings` (iBOT + DTM) they are (G*B, N, Kp), every token.
        teacher_patch_mean (G*B, Kp): each teacher crop's patch logits averaged over all its tokens (for the
        patch center).
        """
        cls = self.cls_loss(student_cls, teacher_cls, epoch) * self.lambda_cls
        if groupings is None:
            patch = self.patch_loss(student_patch, teacher_patch, masks, epoch)
        else:
            patch = self.morphed_patch_loss(student_patch, teacher_patch, masks, groupings, epoch)
        patch = patch * self.lambda_patch
        self.update_centers(teacher_cls, teacher_patch_mean)
        return IBOTLossOutput(cls + patch, cls, patch)

    def cls_targets(self, teacher_cls: torch.Tensor, epoch: int) -> torch.Tensor:
        """The teacher's centred, sharpened [CLS] distributions (G, B, K) the student's [CLS] is trained on."""
        return F.softmax((_upcast(teacher_cls) - self.center) / self.teacher_temp.at_epoch(epoch), dim=-1)

    def cls_loss(self, student_cls: torch.Tensor, teacher_cls: torch.Tensor, epoch: int) -> torch.Tensor:
        num_global, batch = teacher_cls.shape[:2]
        targets = self.cls_targets(teacher_cls, epoch)
        log_probs = F.log_softmax(_upcast(student_cls) / self.student_temp, dim=-1)
        cross = -torch.einsum("qbk,vbk->qv", targets, log_probs) / batch  # (G, S): mean over the batch
        other_view = torch.ones_like(cross, dtype=torch.bool)
        other_view[:, :num_global].fill_diagonal_(False)
        return cross[other_view].mean()

    def patch_loss(
        self, student_patch: torch.Tensor, teacher_patch: torch.Tensor, masks: torch.Tensor, epoch: int
    ) -> torch.Tensor:
        targets = self.patch_targets(teacher_patch, epoch)
        per_token = -(targets * F.log_softmax(_upcast(student_patch) / self.student_temp, dim=-1)).sum(-1)
        return masked_image_mean(per_token, masks)

    def patch_targets(self, teacher_patch: torch.Tensor, epoch: int) -> torch.Tensor:
        """Centred, sharpened teacher distributions over the patch prototypes."""
        temp = self.teacher_patch_temp.at_epoch(epoch)
        return F.softmax((_upcast(teacher_patch) - self.center_patch[0, 0]) / temp, dim=-1)

    def morphed_patch_loss(
        self,
        student_patch: torch.Tensor,
        teacher_patch: torch.Tensor,
        masks: torch.Tensor,
        groupings: list[TokenGrouping],
        epoch: int,
    ) -> torch.Tensor:
        """iBOT's patch loss on DTM-morphed distributions (iBOT + DTM), averaged over the groupings.

        student_patch, teacher_patch (G*B, N, Kp): logits of *every* patch token. Both distributions are
        replaced by their group means (mixtures stay distributions), then the per-token cross-entropy is taken
        at the masked positions as in `patch_loss`. ASSUMPTION: probabilities, not logits, are averaged.
        """
        targets = self.patch_targets(teacher_patch, epoch)
        student = F.softmax(_upcast(student_patch) / self.student_temp, dim=-1)
        flat_masks = masks.flatten(0, 1)
        losses = []
        for grouping in groupings:
            log_student = grouping.morph(student).clamp_min(torch.finfo(student.dtype).tiny).log()
            per_token = -(grouping.morph(targets) * log_student).sum(-1)
            losses.append(masked_image_mean(per_token[flat_masks], masks))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def update_centers(self, teacher_cls: torch.Tensor, teacher_patch_mean: torch.Tensor) -> None:
        batch_cls = all_reduce_mean(_upcast(teacher_cls).flatten(0, -2).mean(0, keepdim=True))
        batch_patch = all_reduce_mean(_upcast(teacher_patch_mean).mean(0).view(1, 1, -1))
        self.center.mul_(self.center_momentum).add_(batch_cls, alpha=1 - self.center_momentum)
        self.center_patch.mul_(self.center_momentum_patch).add_(batch_patch, alpha=1 - self.center_momentum_patch)
