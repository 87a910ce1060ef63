"""Fashion-MNIST from its IDX files (`mimkit.data.fashion_mnist` finds, reads and, as a fallback, downloads them)."""

from __future__ import annotations

import torch

from mimkit.data import fashion_mnist
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError, DataInfo
from mimkit.data.sources.base import ImageSource, channel_stats, convert_channels
from mimkit.data.sources.registry import register_source

FOREGROUND = 16
"""Fashion-MNIST's backgrounds are black (0): a pixel above 16 of 255 belongs to the item (ASSUMPTION: it keeps the
faint anti-aliased rims out of the item and the darkest parts of dark items in)."""


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

    def label_map(self, index: int) -> torch.Tensor:
        """The item's pixels (brighter than FOREGROUND of 255) labelled with its class + 1, the rest 0."""
        return (self.images[index] > FOREGROUND).long() * (int(self.targets[index]) + 1)
