"""Dense evaluation's parts: mIoU, pixel accuracy and per-class IoU against a brute-force count on hand-made maps,
and the label maps of the sources that have them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from mimkit.data.info import DataError
from mimkit.data.sources import SyntheticShapes, build_source
from mimkit.data.sources.base import Subset
from mimkit.data.sources.fashion_mnist import FOREGROUND
from mimkit.eval.segmentation_scores import IGNORE_INDEX, SegmentationScores, confusion_matrix
from mimkit.runs import load_run_config
from support import ROOT


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


def test_synthetic_label_maps_mark_the_shape_with_its_class() -> None:
    cfg = load_run_config(ROOT / "tests" / "recipes" / "toy.yaml", ["data.synthetic.classes=3"])
    source = SyntheticShapes(cfg.data, "test")
    for index in range(6):
        image, label = source.load(index)
        label_map = source.label_map(index)
        assert label_map.shape == image.shape[1:] and set(label_map.unique().tolist()) == {0, label + 1}
        assert image[0][label_map > 0].float().mean() > image[0][label_map == 0].float().mean() + 100  # the tint
    assert source.segmentation_classes() == ("background", "square", "disk", "bars")
    assert torch.equal(Subset(source, 3).label_map(2), source.label_map(2))


def test_fashion_mnist_label_maps_are_the_items_pixels_above_the_threshold() -> None:
    source = build_source(
        load_run_config(
            ROOT / "tests" / "recipes" / "toy.yaml", ["data.source=fashion-mnist", "data.synthetic=null"]
        ).data,
        "test",
    )
    image, label = source.load(0)
    label_map = source.label_map(0)
    assert torch.equal(label_map, (image[0] > FOREGROUND).long() * (label + 1))
    assert 0.1 < (label_map > 0).float().mean() < 0.9 and len(source.segmentation_classes()) == 11


def test_a_source_without_label_maps_says_which_have_them(tmp_path: Path) -> None:
    folder = tmp_path / "photos" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    cfg = load_run_config(
        ROOT / "tests" / "recipes" / "toy.yaml",
        ["data.source=imagefolder", "data.synthetic=null", f"data.root={tmp_path / 'photos'}", "data.eval_split=train"],
    ).data
    with pytest.raises(DataError, match=r"imagefolder:.* has no label maps; .*\(synthetic, fashion-mnist"):
        build_source(cfg, "train").label_map(0)
