"""Seeded random shapes on noise, one shape kind per class: labelled data for tests and benchmarks, no files."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimkit.config import check
from mimkit.data.config import DataConfig
from mimkit.data.info import DataInfo
from mimkit.data.sources.base import ImageSource
from mimkit.data.sources.registry import register_source

KINDS = ("square", "disk", "bars", "cross", "ring", "triangle")


@dataclass
class SyntheticConfig:
    """The section `data.synthetic`."""

    images: int = 512
    """Images in each split."""
    size: int = 32
    """Height and width in pixels."""
    classes: int = 4
    """Shape kinds, one per class (at most 6: square, disk, bars, cross, ring, triangle, in this order)."""

    def validate(self, prefix: str) -> None:
        check(self.images > 0, f"{prefix}.images", f"must be positive; got {self.images}")
        check(self.size >= 8, f"{prefix}.size", f"must be at least 8 pixels; got {self.size}")
        check(
            0 < self.classes <= len(KINDS),
            f"{prefix}.classes",
            f"at most {len(KINDS)} shape classes, at least 1; got {self.classes}",
        )


@register_source("synthetic")
class SyntheticShapes(ImageSource):
    """Seeded random shapes on noise, one shape kind per class: labelled data for tests, no files needed."""

    Config = SyntheticConfig
    KINDS = KINDS

    def __init__(self, cfg: DataConfig, split: str) -> None:
        options: SyntheticConfig = cfg.options
        self.size, self.num_classes = options.size, options.classes
        self.channels = cfg.channels or 1
        self.split_offset = 0 if split == "train" else 10_000_019
        self.info = DataInfo(
            "synthetic",
            self.channels,
            options.images,
            (self.size, self.size),
            self.num_classes,
            (0.5,) * self.channels,
            (0.25,) * self.channels,
            self.KINDS[: self.num_classes],
        )

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        image, _, label = self._draw(index)
        return image, label

    def label_map(self, index: int) -> torch.Tensor:
        """The shape's pixels labelled with its class + 1, the noise around it 0."""
        _, shape, label = self._draw(index)
        return shape.long() * (label + 1)

    def _draw(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Image `index`, its shape's (H, W) bool mask and its class."""
        label = index % self.num_classes
        g = torch.Generator().manual_seed(self.split_offset + index)
        s = self.size
        y, x = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        cy, cx = (torch.rand(2, generator=g) * 0.4 + 0.3) * s
        r = (torch.rand(1, generator=g).item() * 0.15 + 0.15) * s
        dy, dx = y - cy, x - cx
        kind = self.KINDS[label]
        shape = {
            "square": (dy.abs() < r) & (dx.abs() < r),
            "disk": dy**2 + dx**2 < r**2,
            "bars": ((y // max(int(r / 2), 1)) % 2 == 0) & (dx.abs() < 1.5 * r),
            "cross": ((dy.abs() < r / 3) & (dx.abs() < r)) | ((dx.abs() < r / 3) & (dy.abs() < r)),
            "ring": ((dy**2 + dx**2).sqrt() - r).abs() < max(r / 4, 1.0),
            "triangle": (dy < r) & (dy > -r) & (dx.abs() < (dy + r) / 2),
        }[kind]
        noise = torch.rand(self.channels, s, s, generator=g) * 60
        tint = torch.rand(self.channels, 1, 1, generator=g) * 100 + 155
        image = noise + shape.float() * tint
        return image.clamp(0, 255).to(torch.uint8), shape, label

    def labels(self) -> torch.Tensor:
        return torch.arange(len(self)) % self.num_classes
