"""What every image source is: uint8 images (C, H, W) with the configured channel count and an integer label (-1
when the data has none), decoded per image so that one corrupt file never stops an epoch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from PIL import Image

from mimkit.data.info import DataInfo

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)


class ImageSource(ABC):
    """An image source. One that `data.source` can name is registered with `register_source` and built as
    `Source(data_config, split)`."""

    info: DataInfo
    Config: ClassVar[type | None] = None
    """The dataclass of the source's own settings, its section `data.<source>`; None: it has none."""

    def __len__(self) -> int:
        return self.info.num_images

    def groups(self) -> list[list[int]] | None:
        """Indices stored together (the images of one tar shard), for samplers that read by group; None: any
        order is as cheap as any other."""
        return None

    @abstractmethod
    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """Image `index` as a uint8 (C, H, W) tensor and its label; raises UnreadableImage."""

    def labels(self) -> torch.Tensor | None:
        """Every image's label, when known without decoding (for k-NN banks and class balance)."""
        return None

    @classmethod
    def check_config(cls, data: Any, prefix: str) -> None:
        """Raise a ConfigError naming the field when the shared data fields do not suit this source (its section
        checks itself). `data` is the DataConfig, typed loosely here: the data config reads the registry, which
        reads this module, so this module cannot import the data config."""
        return None

    @classmethod
    def same_images(cls, data: Any) -> bool:
        """Whether the DataConfig `data`'s split and eval_split are the same images (evaluation would then score the
        training images themselves)."""
        return data.split == data.eval_split


class Subset(ImageSource):
    """`limit` images of a source: the first ones (quick runs and tests) or, with `spread`, evenly spaced over it
    (figures: sorted folders would otherwise show one class); or the images at `indices`."""

    def __init__(
        self, source: ImageSource, limit: int | None = None, *, spread: bool = False, indices: list[int] | None = None
    ) -> None:
        if indices is None:
            if limit is None:
                raise ValueError("Subset needs a limit or indices")
            indices = [i * len(source) // limit for i in range(limit)] if spread else list(range(limit))
        self.source, self.indices = source, indices
        self.info = DataInfo(**{**source.info.__dict__, "num_images": len(indices)})

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return self.source.load(self.indices[index])

    def labels(self) -> torch.Tensor | None:
        labels = self.source.labels()
        return None if labels is None else labels[self.indices]

    def groups(self) -> list[list[int]] | None:
        base = self.source.groups()
        if base is None:
            return None
        position = {index: i for i, index in enumerate(self.indices)}
        mapped = [[position[i] for i in group if i in position] for group in base]
        return [group for group in mapped if group]


def convert_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (C, H, W) to 1 or 3 channels: luma for RGB -> gray, repetition for gray -> RGB."""
    if image.shape[0] == channels:
        return image
    if channels == 3:
        return image[:1].expand(3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    return (image[:3].float() * weights).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def channel_stats(
    channels: int, source_channels: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A source's normalisation statistics for `channels` when its images have `source_channels`."""
    if channels == source_channels:
        return mean, std
    if channels == 3:
        return mean * 3, std * 3
    return GRAY_MEAN, GRAY_STD


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A decoded PIL image as a uint8 (C, H, W) tensor."""
    tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return tensor.view(image.height, image.width, len(image.getbands())).permute(2, 0, 1).contiguous()


def describe(source: ImageSource) -> str:
    """One line about a source: its name, size, channels, image size and labels."""
    info = source.info
    size = "x".join(map(str, info.image_size)) if info.image_size else "various sizes"
    labels = f"{info.num_classes} classes" if info.num_classes else "no labels"
    return f"{info.name}: {info.num_images:,} images, {info.channels} channel(s), {size}, {labels}"
