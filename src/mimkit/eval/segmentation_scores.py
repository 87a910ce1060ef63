"""Scores of a semantic segmentation: mean IoU, pixel accuracy and per-class IoU from one confusion matrix.

The conventions of mmsegmentation and DINOv2's linear segmentation probe: pixels whose target is `ignore_index`
count nowhere; a class's IoU is |prediction ∩ target| / |prediction ∪ target| over all evaluated pixels of the
split (summed over images, not averaged per image); a class that appears neither in the targets nor in the
predictions has no IoU and is left out of the mean; pixel accuracy is the share of evaluated pixels predicted right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mimkit.data.sources.base import IGNORE_INDEX


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(classes, classes) int64 counts, rows the target class, columns the predicted one, of label maps of one
    shape (any batch layout); target pixels equal to `ignore_index` are skipped. A target id outside
    [0, num_classes) that is not `ignore_index` is an error: a label map from another class list."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    truth = target.long()
    ignored = truth == ignore_index
    wrong = ignored.logical_not() & ((truth < 0) | (truth >= num_classes))
    if wrong.any():
        raise ValueError(
            f"target ids must lie in [0, {num_classes}) or be {ignore_index} (ignored); found {int(truth[wrong][0])}"
        )
    cells = num_classes * num_classes
    flat = (truth * num_classes + prediction.long().clamp(0, num_classes - 1)).masked_fill(ignored, cells)
    return torch.bincount(flat.flatten(), minlength=cells + 1)[:cells].view(num_classes, num_classes)


@dataclass(frozen=True)
class SegmentationScores:
    per_class_iou: tuple[float, ...]
    """IoU of each class, NaN for a class present neither in the targets nor in the predictions."""
    pixel_accuracy: float

    @property
    def miou(self) -> float:
        """Mean IoU over the classes that have one."""
        present = [iou for iou in self.per_class_iou if not math.isnan(iou)]
        return sum(present) / len(present) if present else math.nan

    @classmethod
    def from_confusion(cls, confusion: torch.Tensor) -> SegmentationScores:
        counts = confusion.double()
        hits = counts.diagonal()
        union = counts.sum(0) + counts.sum(1) - hits
        iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, math.nan))
        total = counts.sum()
        accuracy = float(hits.sum() / total) if total > 0 else math.nan
        return cls(tuple(float(x) for x in iou), accuracy)
