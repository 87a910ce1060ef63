"""Where a run's images come from and how they are batched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mimkit.config import check


@dataclass
class DataConfig:
    """Where the images come from and how they are batched."""

    source: Literal["fashion-mnist", "imagefolder", "shards", "torchvision", "synthetic"] = "fashion-mnist"
    root: str | None = None
    """Folder of the data. fashion-mnist: IDX files (default: the Debian package, then mimkit's cache)."""
    name: str | None = None
    """torchvision dataset class name (source=torchvision), e.g. CIFAR10."""
    split: str = "train"
    eval_split: str = "test"
    download: bool = True
    """Allow torchvision downloads (fashion-mnist fallback, torchvision sets)."""
    channels: int | None = None
    """Force 1 (grayscale) or 3 (RGB) channels; None keeps the source's own."""
    strict: bool = False
    """Fail on the first unreadable image instead of skipping it with a counted warning."""
    val_fraction: float = 0.0
    """Hold out this fraction of the training split's images as the evaluation split (in place of `eval_split`):
    for a folder without split sub-folders, whose evaluation would otherwise score the training images
    themselves. The held-out images are a fixed draw (seed 0) over the split's image order, the same every run."""
    limit: int | None = None
    """Use only the first `limit` images (quick runs, tests)."""
    batch_size: int = 64
    """Images per device and optimizer micro-step."""
    num_workers: int = 2
    synthetic_images: int = 512
    synthetic_size: int = 32
    synthetic_classes: int = 4

    def validate(self, prefix: str = "data") -> None:
        check(
            self.source != "torchvision" or bool(self.name),
            f"{prefix}.name",
            "source=torchvision needs the dataset class name, e.g. data.name=CIFAR10",
        )
        check(
            self.source != "imagefolder" or bool(self.root),
            f"{prefix}.root",
            "source=imagefolder needs the folder of images, e.g. data.root=/data/imagenet",
        )
        check(
            self.source != "shards" or bool(self.root),
            f"{prefix}.root",
            "source=shards needs the folder that `mimkit data shard` wrote, e.g. data.root=/data/imagenet_shards",
        )
        check(self.channels in (None, 1, 3), f"{prefix}.channels", f"must be 1, 3 or null; got {self.channels}")
        check(
            0 <= self.val_fraction < 1,
            f"{prefix}.val_fraction",
            f"must lie in [0, 1), e.g. 0.1 holds out 10% of the images; got {self.val_fraction}",
        )
        check(self.limit is None or self.limit > 0, f"{prefix}.limit", f"must be positive; got {self.limit}")
        check(self.batch_size > 0, f"{prefix}.batch_size", f"must be positive; got {self.batch_size}")
        check(self.num_workers >= 0, f"{prefix}.num_workers", f"must be >= 0; got {self.num_workers}")
        check(
            self.synthetic_classes > 0 and self.synthetic_images > 0 and self.synthetic_size >= 8,
            f"{prefix}.synthetic_*",
            "need positive counts and a size of at least 8 pixels",
        )
