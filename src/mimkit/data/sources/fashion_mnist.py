"""Fashion-MNIST from its IDX files (`mimkit.data.fashion_mnist` finds, reads and, as a fallback, downloads them)."""

from __future__ import annotations

import torch

from mimkit.data import fashion_mnist
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError, DataInfo
from mimkit.data.sources.base import ImageSource, channel_stats, convert_channels
from mimkit.data.sources.registry import register_source


@register_source("fashion-mnist")
class FashionMNISTSource(ImageSource):
    MEAN, STD = (0.2860,), (0.3530,)
    CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def __init__(self, cfg: DataConfig, split: str) -> None:
        if split not in ("train", "test"):
            raise DataError(f"Fashion-MNIST has splits 'train' and 'test'; got split={split!r}")
        self.images, self.targets = fashion_mnist.load(split, cfg.root, cfg.download)
        self.channels = cfg.channels or 1
        mean, std = channel_stats(self.channels, 1, self.MEAN, self.STD)
        self.info = DataInfo("fashion-mnist", self.channels, len(self.images), (28, 28), 10, mean, std, self.CLASSES)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return convert_channels(self.images[index][None], self.channels), int(self.targets[index])

    def labels(self) -> torch.Tensor:
        return self.targets
