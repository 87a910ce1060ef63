"""The iBOT loss: self-distillation on [CLS] across views plus masked patch-token distillation within a view.

Teacher targets are centred (`mimkit.losses.center.Center`) and sharpened with a temperature; the student is
sharpened with its own. The caller passes the temperatures and owns the centers and schedules.
[CLS]: cross-entropy of every teacher global crop against every *other* student crop (locals included).
Patches: per-token cross-entropy at the masked positions of the same crop, averaged per image over its masked
tokens, then over the whole batch (unmasked images count as 0), then over the global crops.

Only masked patch positions enter the loss, so callers pass logits at those positions alone (M = number of
masked tokens); the straightforward full-token computation gives the same value and gradients (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.losses.center import upcast


def sharpen(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of `logits / temperature` over the last dimension, in at least float32. The teacher's
    targets are `sharpen(center.subtract(teacher_logits), teacher_temp)`: a low temperature keeps them peaked."""
    return F.softmax(upcast(logits) / temperature, dim=-1)


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


def masked_cross_entropy(targets: torch.Tensor, log_student: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of the student's log-distributions against the targets, reduced by
    `masked_image_mean`: the patch objective of plain iBOT and of iBOT + DTM alike.

    targets, log_student: (M, Kp) at the masked positions of `masks` (G, B, N), or (G*B, N, Kp) at every token,
    of which the masked ones are kept after the cross-entropy.
    """
    per_token = -(targets * log_student).sum(-1)
    if per_token.dim() == 2:
        per_token = per_token[masks.flatten(0, 1)]
    return masked_image_mean(per_token, masks)


class IBOTClsLoss(nn.Module):
    """[CLS] self-distillation: every teacher global crop is the target of every *other* student crop."""

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(self, student_cls: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """student_cls (S, B, K): logits of every student crop, global crops first; targets (G, B, K): the
        teacher's centred, sharpened distributions of the global crops. Mean over the batch, then the pairs."""
        num_global, batch = targets.shape[:2]
        log_probs = F.log_softmax(upcast(student_cls) / self.student_temp, dim=-1)
        cross = -torch.einsum("qbk,vbk->qv", targets, log_probs) / batch  # (G, S): mean over the batch
        other_view = torch.ones_like(cross, dtype=torch.bool)
        other_view[:, :num_global].fill_diagonal_(False)
        return cross[other_view].mean()


class IBOTPatchLoss(nn.Module):
    """Masked patch distillation (the online tokenizer): the student predicts the teacher's distribution at
    the masked positions of the same crop."""

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(self, student_patch: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """student_patch (M, Kp): logits at the masked positions of `masks` (G, B, N), in `masks.nonzero()`
        order; targets (M, Kp): the teacher's centred, sharpened distributions there."""
        log_probs = F.log_softmax(upcast(student_patch) / self.student_temp, dim=-1)
        return masked_cross_entropy(targets, log_probs, masks)
