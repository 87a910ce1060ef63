"""mIoU, pixel accuracy and per-class IoU from a confusion matrix, against a brute-force count on hand-made maps."""

from __future__ import annotations

import math

import pytest
import torch

from mimkit.eval.segmentation_scores import IGNORE_INDEX, SegmentationScores, confusion_matrix


def brute_force(prediction: list[list[int]], target: list[list[int]], classes: int) -> tuple[list[float], float]:
    """IoU per class and pixel accuracy by counting pixels one by one."""
    pairs = [(t, p) for trow, prow in zip(target, prediction, strict=True) for t, p in zip(trow, prow, strict=True)]
    pairs = [(t, p) for t, p in pairs if t != IGNORE_INDEX]
    ious = []
    for c in range(classes):
        both = sum(1 for t, p in pairs if t == c and p == c)
        either = sum(1 for t, p in pairs if t == c or p == c)
        ious.append(both / either if either else math.nan)
    return ious, sum(1 for t, p in pairs if t == p) / len(pairs)


MAPS = [
    (  # a perfect map
        [[0, 1], [2, 2]],
        [[0, 1], [2, 2]],
    ),
    (  # confusions, an ignored pixel, and class 3 neither predicted nor present
        [[0, 0, 1, 1], [2, 2, 0, 1], [1, 2, 2, 0]],
        [[0, 1, 1, 1], [2, 0, IGNORE_INDEX, 1], [1, 2, 0, 0]],
    ),
    (  # a class only predicted, never present: IoU 0, counted in the mean
        [[3, 3], [0, 1]],
        [[0, 0], [0, 1]],
    ),
]


@pytest.mark.parametrize(("prediction", "target"), MAPS)
def test_scores_equal_a_brute_force_count(prediction: list[list[int]], target: list[list[int]]) -> None:
    classes = 4
    scores = SegmentationScores.from_confusion(
        confusion_matrix(torch.tensor(prediction), torch.tensor(target), classes)
    )
    ious, accuracy = brute_force(prediction, target, classes)
    assert scores.pixel_accuracy == pytest.approx(accuracy)
    for got, want in zip(scores.per_class_iou, ious, strict=True):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    present = [iou for iou in ious if not math.isnan(iou)]
    assert scores.miou == pytest.approx(sum(present) / len(present))


def test_counts_add_up_over_a_batch_of_maps() -> None:
    torch.manual_seed(0)
    prediction, target = torch.randint(0, 5, (3, 8, 8)), torch.randint(0, 5, (3, 8, 8))
    whole = confusion_matrix(prediction, target, 5)
    assert torch.equal(whole, sum(confusion_matrix(p, t, 5) for p, t in zip(prediction, target, strict=True)))
    assert int(whole.sum()) == 3 * 64


def test_a_target_id_beyond_the_classes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 3\) or be 255 \(ignored\); found 7"):
        confusion_matrix(torch.zeros(2, 2), torch.tensor([[0, 7], [1, 2]]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 3), 3)
