"""A torchvision dataset class by name (`data.torchvision.name`: CIFAR10, STL10, ...) with a root folder."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mimkit.cache import cache_dir
from mimkit.config import check
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError, DataInfo, UnreadableImage
from mimkit.data.sources.base import (
    DECODE_ERRORS,
    WIDE_MODES,
    ImageSource,
    convert_channels,
    decode,
    photo_stats,
)
from mimkit.data.sources.registry import register_source


@dataclass
class TorchvisionConfig:
    """The section `data.torchvision`."""

    name: str | None = None
    """torchvision dataset class name, e.g. CIFAR10 (downloads follow the shared data.download)."""

    def validate(self, prefix: str) -> None:
        check(
            bool(self.name),
            f"{prefix}.name",
            f"source=torchvision needs the dataset class name, e.g. {prefix}.name=CIFAR10",
        )


@register_source("torchvision")
class TorchvisionSource(ImageSource):
    """A torchvision dataset class by name (CIFAR10, STL10, ...) with a root folder."""

    Config = TorchvisionConfig

    def __init__(self, cfg: DataConfig, split: str) -> None:
        import torchvision.datasets as tvd

        name = cfg.options.name
        cls = getattr(tvd, name or "", None)
        if not (inspect.isclass(cls) and issubclass(cls, tvd.VisionDataset)):
            known = sorted(n for n, c in vars(tvd).items() if inspect.isclass(c) and issubclass(c, tvd.VisionDataset))
            raise DataError(
                f"data.torchvision.name: unknown torchvision dataset {name!r}; available: {', '.join(known)}"
            )
        params = inspect.signature(cls).parameters
        kwargs: dict[str, object] = {"download": cfg.download} if "download" in params else {}
        if "train" in params:
            kwargs["train"] = split == "train"
        elif "split" in params:
            kwargs["split"] = split
        root = Path(cfg.root or cache_dir() / "torchvision").expanduser()
        if "root" in params:
            kwargs["root"] = str(root)
        self.name = f"torchvision:{name}"
        try:
            self.dataset = cls(**kwargs)
        except (RuntimeError, OSError, ValueError, TypeError) as error:
            raise DataError(
                f"torchvision {name} (split {split!r}) could not be opened from {root}: {error}. "
                "Set data.root to where it is, or data.download=true."
            ) from None
        try:
            first, _ = self._raw(0)
        except UnreadableImage as error:
            raise DataError(f"{self.name}: the first image cannot be read ({error.reason})") from None
        self.channels = cfg.channels or first.shape[0]
        classes = tuple(getattr(self.dataset, "classes", ()) or ())
        mean, std = photo_stats(self.channels)
        self.info = DataInfo(
            self.name,
            self.channels,
            len(self.dataset),
            tuple(first.shape[1:]),
            len(classes) or None,
            mean,
            std,
            classes,
        )  # type: ignore[arg-type]

    def _raw(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            image, label = self.dataset[index]
            if isinstance(image, Image.Image):
                image = decode(image, 1 if image.mode == "L" or image.mode in WIDE_MODES else 3)
        except DECODE_ERRORS as error:
            raise UnreadableImage(f"{self.name}[{index}]", str(error)) from None
        return image, int(label) if label is not None else -1

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self._raw(index)
        return convert_channels(image, self.channels), label
