"""Image sources that need no files of their own: torchvision sets by name (`data.torchvision.name`) and synthetic
shapes (`data.synthetic`), and the subsets that `data.limit` takes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from mimkit.config import ConfigError
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError, UnreadableImage
from mimkit.data.sources import (
    Subset,
    SyntheticConfig,
    SyntheticShapes,
    TorchvisionConfig,
    build_source,
    describe,
)

# ---------------------------------------------------------------------------------------------------
# torchvision datasets by name


class TinySet(tvd.VisionDataset):
    """A torchvision-style dataset with (root, train, download), like CIFAR10, that records how it was built."""

    classes: ClassVar[list[str]] = ["a", "b", "c"]
    built: ClassVar[list[dict]] = []

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        super().__init__(root)
        TinySet.built.append({"root": root, "train": train, "download": download})
        self.offset = 0 if train else 100

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        pixels = np.full((8, 9, 3), self.offset + index, dtype=np.uint8)
        return Image.fromarray(pixels, "RGB"), index % 3


class DeepGray(TinySet):
    """16-bit gray images, as a set of scans or depth maps might hold."""

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(np.full((8, 9), 257 * (self.offset + index), dtype=np.uint16)), index % 3


class BrokenFirstImage(TinySet):
    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        raise OSError("image file is truncated")


@pytest.fixture
def tiny_set(monkeypatch: pytest.MonkeyPatch) -> type[TinySet]:
    TinySet.built = []
    monkeypatch.setattr(tvd, "TinySet", TinySet, raising=False)
    monkeypatch.setattr(tvd, "BrokenFirstImage", BrokenFirstImage, raising=False)
    monkeypatch.setattr(tvd, "DeepGray", DeepGray, raising=False)
    return TinySet


def test_torchvision_dataset_by_name(tmp_path: Path, tiny_set: type[TinySet]) -> None:
    cfg = DataConfig(
        source="torchvision", options=TorchvisionConfig(name="TinySet"), root=str(tmp_path), download=False
    )
    train, test = build_source(cfg), build_source(cfg, "test")
    assert tiny_set.built == [
        {"root": str(tmp_path), "train": True, "download": False},
        {"root": str(tmp_path), "train": False, "download": False},
    ]
    assert train.info.name == "torchvision:TinySet" and train.info.channels == 3
    assert train.info.image_size == (8, 9) and train.info.num_classes == 3 and train.info.class_names == ("a", "b", "c")
    image, label = test.load(4)
    assert image.shape == (3, 8, 9) and image.dtype == torch.uint8
    assert image.unique().tolist() == [104] and label == 1


def test_torchvision_dataset_with_forced_gray(tmp_path: Path, tiny_set: type[TinySet]) -> None:
    cfg = DataConfig(source="torchvision", options=TorchvisionConfig(name="TinySet"), root=str(tmp_path), channels=1)
    source = build_source(cfg)
    assert source.info.channels == 1 and source.load(2)[0].shape == (1, 8, 9)


def test_torchvision_16_bit_images_are_scaled_not_clipped(tmp_path: Path, tiny_set: type[TinySet]) -> None:
    cfg = DataConfig(source="torchvision", options=TorchvisionConfig(name="DeepGray"), root=str(tmp_path))
    source = build_source(cfg)
    assert source.info.channels == 1 and source.load(5)[0].unique().tolist() == [5]


def test_torchvision_fake_data_by_name(tmp_path: Path) -> None:
    cfg = DataConfig(
        source="torchvision", options=TorchvisionConfig(name="FakeData"), root=str(tmp_path), download=False
    )
    source = build_source(cfg)
    assert source.info.channels == 3 and len(source) > 0
    assert source.load(0)[0].dtype == torch.uint8


def test_unreadable_first_torchvision_image_is_a_data_error(tmp_path: Path, tiny_set: type[TinySet]) -> None:
    cfg = DataConfig(
        source="torchvision", options=TorchvisionConfig(name="BrokenFirstImage"), root=str(tmp_path), download=False
    )
    with pytest.raises((DataError, UnreadableImage), match="truncated"):
        build_source(cfg)


def test_unknown_torchvision_name_lists_alternatives() -> None:
    with pytest.raises(DataError) as info:
        build_source(DataConfig(source="torchvision", options=TorchvisionConfig(name="CIFAR11"), download=False))
    message = str(info.value)
    assert message.startswith("data.torchvision.name: unknown torchvision dataset 'CIFAR11'; available: ")
    assert "CIFAR10" in message and "FakeData" in message and "MNIST" in message


def test_torchvision_dataset_missing_without_download(tmp_path: Path) -> None:
    cfg = DataConfig(
        source="torchvision", options=TorchvisionConfig(name="CIFAR10"), root=str(tmp_path), download=False
    )
    with pytest.raises(DataError, match=r"torchvision CIFAR10 \(split 'train'\) could not be opened from .*download"):
        build_source(cfg)


# ---------------------------------------------------------------------------------------------------
# Synthetic shapes and subsets


def synthetic(classes: int = 4, **kwargs) -> DataConfig:
    return DataConfig(source="synthetic", options=SyntheticConfig(images=20, size=16, classes=classes), **kwargs)


def test_synthetic_images_are_deterministic_per_index() -> None:
    a, b = build_source(synthetic()), build_source(synthetic())
    for index in (0, 7, 19):
        image, label = a.load(index)
        again, label_again = b.load(index)
        assert torch.equal(image, again) and label == label_again == index % 4
    assert not torch.equal(a.load(0)[0], a.load(4)[0])  # same class, different image


def test_synthetic_images_are_the_ones_every_earlier_run_trained_on() -> None:
    digest = hashlib.sha256()
    source = build_source(DataConfig(source="synthetic", channels=3))
    for index in range(16):
        digest.update(source.load(index)[0].numpy().tobytes())
    assert digest.hexdigest()[:24] == "5ff151d07da1e6bdb287fbbc"  # a change of decoding or seeding would move it


def test_synthetic_splits_differ() -> None:
    cfg = synthetic()
    train, test = build_source(cfg), build_source(cfg, "test")
    assert all(not torch.equal(train.load(i)[0], test.load(i)[0]) for i in range(5))
    assert train.load(3)[1] == test.load(3)[1]


def test_synthetic_info_and_labels() -> None:
    source = build_source(synthetic(classes=3, channels=3))
    assert isinstance(source, SyntheticShapes)
    assert source.info.num_images == 20 and source.info.image_size == (16, 16) and source.info.channels == 3
    assert source.info.class_names == ("square", "disk", "bars")
    assert source.labels().tolist() == [i % 3 for i in range(20)]
    image, _ = source.load(5)
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8


def test_too_many_synthetic_classes_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"data\.synthetic\.classes: at most 6 shape classes, at least 1; got 7"):
        build_source(synthetic(classes=7))


def test_limit_keeps_the_first_images() -> None:
    full = build_source(synthetic())
    limited = build_source(synthetic(limit=6))
    assert isinstance(limited, Subset) and len(limited) == 6 and limited.info.num_images == 6
    assert limited.labels().tolist() == full.labels()[:6].tolist()
    assert all(torch.equal(limited.load(i)[0], full.load(i)[0]) for i in range(6))
    assert limited.info.class_names == full.info.class_names
    assert "6 images" in describe(limited)


def test_spread_subset_takes_evenly_spaced_images() -> None:
    full = build_source(synthetic())
    spread = Subset(full, 6, spread=True)
    assert spread.indices == [0, 3, 6, 10, 13, 16] and len(spread) == 6
    assert spread.labels().tolist() == full.labels()[spread.indices].tolist()
    assert all(torch.equal(spread.load(i)[0], full.load(j)[0]) for i, j in enumerate(spread.indices))


def test_limit_larger_than_the_data_changes_nothing() -> None:
    source = build_source(synthetic(limit=1000))
    assert not isinstance(source, Subset) and len(source) == 20


def test_describe_summarises_the_source() -> None:
    assert describe(build_source(synthetic())) == "synthetic: 20 images, 1 channel(s), 16x16, 4 classes"
