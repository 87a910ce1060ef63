"""A folder of images with semantic label maps, laid out as ADE20K (and VOC, once arranged so; docs/data.md):

    ROOT/classes.txt                       one class name per line: line k names id k
    ROOT/images/<split>/<name>.jpg         any image format; sub-folders allowed
    ROOT/annotations/<split>/<name>.png    one single-channel PNG per image, same relative name, same size

A label PNG holds class ids: gray values, or a palette PNG's indices (VOC's files, read as indices, never as
colours); 255 marks pixels that are not scored. An RGB label image (colours standing for classes) is refused with
the way to convert it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mimkit.config import check
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError, DataInfo
from mimkit.data.sources.base import (
    DECODE_ERRORS,
    IGNORE_INDEX,
    ImageSource,
    decode_file,
    label_size_problem,
    missing_split_error,
    photo_stats,
)
from mimkit.data.sources.image_modes import folder_channels
from mimkit.data.sources.imagefolder import IMAGE_EXTENSIONS
from mimkit.data.sources.registry import register_source

ID_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")
"""PIL modes whose pixel values are class ids (a palette image: its indices)."""


@dataclass
class SegFolderConfig:
    """The section `data.segfolder`."""

    images: str = "images"
    """Sub-folder of data.root holding one folder of images per split (ADE20K: images/training)."""
    labels: str = "annotations"
    """Sub-folder holding the label PNGs per split, named as their images (ADE20K: annotations/training)."""
    classes: str = "classes.txt"
    """File in data.root naming the classes, one per line: line k names id k (after reduce_zero_label)."""
    reduce_zero_label: bool = False
    """ADE20K's convention: id 0 is 'other' and not scored, ids 1..150 are classes 0..149."""

    def validate(self, prefix: str) -> None:
        for name in ("images", "labels", "classes"):
            check(bool(getattr(self, name)), f"{prefix}.{name}", "must name a path inside data.root")


@register_source("segfolder")
class SegFolderSource(ImageSource):
    """Images with label maps from a folder laid out as the module docstring says; images have no image label."""

    Config = SegFolderConfig

    def __init__(self, cfg: DataConfig, split: str) -> None:
        options: SegFolderConfig = cfg.options
        root = Path(cfg.root or "").expanduser()
        self.options = options
        self.classes = _read_classes(root / options.classes)
        image_root = _split_folder(root / options.images, split, cfg)
        label_root = root / options.labels / image_root.name
        self.files = sorted(p for p in image_root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise DataError(f"no images found under {image_root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.label_files = [(label_root / p.relative_to(image_root)).with_suffix(".png") for p in self.files]
        missing = [str(p) for p in self.label_files if not p.is_file()]
        if missing:
            raise DataError(
                f"{len(missing):,} of {len(self.files):,} images under {image_root} have no label map, e.g. "
                f"{', '.join(missing[:3])}; every image needs its PNG at the same relative path under {label_root}"
            )
        self.channels = cfg.channels or folder_channels(image_root, self.files, strict=cfg.strict)
        mean, std = photo_stats(self.channels)
        self.info = DataInfo(f"segfolder:{image_root}", self.channels, len(self.files), None, None, mean, std)

    @classmethod
    def check_config(cls, data: Any, prefix: str) -> None:
        check(
            bool(data.root),
            f"{prefix}.root",
            "source=segfolder needs the folder of images and label maps, e.g. data.root=/data/ADEChallengeData2016",
        )

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        return decode_file(str(path), lambda: Image.open(path), self.channels), -1

    def label_map(self, index: int) -> torch.Tensor:
        path = self.label_files[index]
        try:
            with Image.open(path) as image:
                _check_mode(image, path)
                ids = np.asarray(image).astype(np.int64)
        except DECODE_ERRORS as error:
            raise DataError(f"{path}: the label map cannot be read ({type(error).__name__}: {error})") from None
        if self.options.reduce_zero_label:  # 0 and 255 are not scored; 256 (16-bit maps) stays out of range
            ids = np.where((ids == 0) | (ids == IGNORE_INDEX), IGNORE_INDEX, np.where(ids == 256, ids, ids - 1))
        return torch.from_numpy(ids)

    def label_map_where(self, index: int) -> str:
        return str(self.label_files[index])

    def segmentation_classes(self) -> tuple[str, ...]:
        return self.classes

    def check_label_maps(self) -> None:
        """Every label PNG's header: single-channel, and the size of its image."""
        for image_path, label_path in zip(self.files, self.label_files, strict=True):
            try:
                with Image.open(label_path) as label, Image.open(image_path) as image:
                    _check_mode(label, label_path)
                    if label.size != image.size:
                        sizes = (label.height, label.width), (image.height, image.width)
                        raise DataError(f"{label_path}: {label_size_problem(*sizes, f'its image {image_path}')}")
            except DECODE_ERRORS as error:
                raise DataError(f"{label_path} or its image cannot be read ({type(error).__name__}: {error})") from None


def _check_mode(label: Image.Image, path: Path) -> None:
    if label.mode not in ID_MODES:
        raise DataError(
            f"{path}: the label map is a {label.mode} image; label maps hold one class id per pixel (a gray or "
            "palette PNG). Colour-coded maps must be converted: map each colour to its id and save the ids as a "
            "mode-L PNG (docs/data.md, 'Segmentation folders')"
        )


def _read_classes(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise DataError(
            f"{path} not found: a segmentation folder names its classes there, one per line (line k names id k; "
            "ADE20K's 150 with data.segfolder.reduce_zero_label=true, VOC's 21 with background first)"
        )
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not 0 < len(names) < IGNORE_INDEX:
        raise DataError(f"{path}: names {len(names)} classes; a segmentation needs 1 to {IGNORE_INDEX - 1}")
    return names


def _split_folder(images: Path, split: str, data: Any) -> Path:
    if (images / split).is_dir():
        return images / split
    present = sorted(p.name for p in images.iterdir() if p.is_dir()) if images.is_dir() else []
    if not present:
        raise DataError(f"{images} has no split folders; put the images in {images / split} (docs/data.md)")
    raise missing_split_error(images, split, present, data, "sub-folders")
