"""What every image source is: uint8 images (C, H, W) with the configured channel count and an integer label (-1
when the data has none), decoded per image so that one corrupt file never stops an epoch."""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from mimkit.data.info import DataError, DataInfo, UnreadableImage

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
"""PIL modes of one-channel images (palette images count as colour: their palette may hold colours)."""
WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
"""PIL modes with more than 8 bits per pixel, which PIL's own conversion to 8 bits would clip."""
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
"""What PIL raises for a damaged, truncated, unknown or too large (decompression bomb) file."""
IGNORE_INDEX = 255
"""The label-map id of pixels that are not scored (ADE20K's and VOC's convention for 'unlabelled' and borders)."""


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

    def label_map(self, index: int) -> torch.Tensor:
        """Image `index`'s (H, W) int64 map of segmentation class ids (named by `segmentation_classes`; IGNORE_INDEX
        where not scored), for dense evaluation; a DataError for sources that have none. Sources that label their
        images' classes: 0 is the background, k + 1 the image class k."""
        raise DataError(
            f"{self.info.name} has no label maps; dense evaluation needs a source that has them "
            "(synthetic, fashion-mnist, segfolder; docs/data.md)"
        )

    def segmentation_classes(self) -> tuple[str, ...]:
        """The names of the label maps' classes, id 0 first: background, then the image classes."""
        names = self.info.class_names or tuple(str(k) for k in range(self.info.num_classes or 0))
        return ("background", *names)

    def label_map_where(self, index: int) -> str:
        """Where image `index`'s label map comes from (a file, for sources that read them), for error messages."""
        return f"{self.info.name} label map {index}"

    def check_label_maps(self) -> None:
        """Raise a DataError naming the file and the fix when a label map cannot serve (wrong size, colour-coded),
        from what is cheap to read (file headers); before a dense evaluation extracts anything. By default: whether
        the source has label maps at all (its first), as sources that draw their maps have nothing else to check."""
        self.label_map(0)

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

    def label_map(self, index: int) -> torch.Tensor:
        return self.source.label_map(self.indices[index])

    def label_map_where(self, index: int) -> str:
        return self.source.label_map_where(self.indices[index])

    def segmentation_classes(self) -> tuple[str, ...]:
        return self.source.segmentation_classes()

    def check_label_maps(self) -> None:
        self.source.check_label_maps()

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


def photo_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation statistics of photos whose own are unknown: ImageNet's for RGB, their gray level for one
    channel."""
    return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GRAY_MEAN, GRAY_STD)


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
    """A decoded 8-bit PIL image as a uint8 (C, H, W) tensor: a view of its (H, W, C) pixels, one copy out of PIL.
    The crops' antialiased resize reads these channels-last strides faster than a planar copy, which would cost as
    much as the resize of two global crops."""
    pixels = np.array(image).reshape(image.height, image.width, -1)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def decode(image: Image.Image, channels: int) -> torch.Tensor:
    """An opened PIL image as uint8 (channels, H, W). 8-bit modes go through PIL's conversion as they always did;
    16-bit and float pixels are first scaled to 0..255 by `to_8bit`, since PIL would clip them to white or black.
    Raises one of DECODE_ERRORS for a file that cannot be decoded."""
    if image.mode in WIDE_MODES:
        image = Image.fromarray(to_8bit(np.asarray(image), image.mode), "L")
    mode = "L" if channels == 1 else "RGB"
    return pil_to_tensor(image if image.mode == mode else image.convert(mode))  # convert() to its own mode copies


def to_8bit(pixels: np.ndarray, mode: str) -> np.ndarray:
    """16-bit or float pixels as uint8, scaled by their range rather than clipped (docs/data.md):
    16-bit modes (I;16*) and 32-bit integers within 0..65535 (how PIL may open 16-bit PNGs) by the 16-bit range
    (divide by 257), so one value is one grey in every image; floats within [0, 1] by 255; any other integers or
    floats by the image's own min..max (their range is not known). Non-finite floats are refused."""
    values = pixels.astype(np.float32)
    if mode == "F" and not np.isfinite(values).all():
        raise ValueError("float image holds NaN or infinite pixels")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode != "F" and low >= 0 and high <= 65535:
        scaled = values / 257
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    else:
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def decode_file(where: str, open_image: Callable[[], Image.Image], channels: int) -> torch.Tensor:
    """Open and decode one image; any decoding failure becomes UnreadableImage naming `where` (skipped or fatal by
    data.strict), never a traceback."""
    try:
        with open_image() as image:
            return decode(image, channels)
    except DECODE_ERRORS as error:
        raise UnreadableImage(where, f"{type(error).__name__}: {error}") from None


def label_size_problem(label: tuple[int, ...], image: tuple[int, ...], image_name: str = "its image") -> str:
    """What is wrong with a label map of (H, W) `label` for an image of (H, W) `image`, and the fix."""
    return (
        f"the label map is {label[1]}x{label[0]} but {image_name} is {image[1]}x{image[0]}; label maps need their "
        "image's size (resize them with nearest-neighbour interpolation, which keeps ids whole)"
    )


def describe(source: ImageSource) -> str:
    """One line about a source: its name, size, channels, image size and labels."""
    info = source.info
    size = "x".join(map(str, info.image_size)) if info.image_size else "various sizes"
    labels = f"{info.num_classes} classes" if info.num_classes else "no labels"
    return f"{info.name}: {info.num_images:,} images, {info.channels} channel(s), {size}, {labels}"


def missing_split_error(root: Path, split: str, present: list[str], data: Any, kind: str) -> DataError:
    """The error for a folder with split folders (`kind`: sub-folders, shard folders) but none for `split`: it names
    the splits there are and the field to set to one of them. A run's eval_split defaults to 'test', which a folder
    with train/ and val/ lacks, so evaluation is the usual case."""
    evaluation = split == data.eval_split and split != data.split
    field, preferred = ("data.eval_split", ("val", "test")) if evaluation else ("data.split", ("train",))
    candidates = [name for name in present if not evaluation or name != data.split] or present
    choice = next((name for name in preferred if name in candidates), candidates[0])
    return DataError(f"{root} has the splits {', '.join(present)} ({kind}) but no {split!r}; set {field}={choice}")
