"""Any folder of images (`data.root`), with `train/`, `val/`, ... split sub-folders or as one unsplit folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mimkit.config import check
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError, DataInfo
from mimkit.data.sources.base import (
    ImageSource,
    decode_file,
    missing_split_error,
    photo_stats,
)
from mimkit.data.sources.image_modes import folder_channels
from mimkit.data.sources.registry import register_source

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


@register_source("imagefolder")
class ImageFolderSource(ImageSource):
    """Any folder of images. Labels come from first-level sub-folders when every image sits in one; the channel count
    is `data.channels` or the majority of the images' modes (docs/data.md)."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        root = Path(cfg.root or "").expanduser()
        if not root.is_dir():
            raise DataError(f"data.root {root} is not a folder; point it at a folder of images")
        root = split_folder(root, split, cfg)
        self.root = root
        self.files, self.targets, classes = _scan_folder(root)
        if not self.files:
            raise DataError(f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.channels = cfg.channels or folder_channels(root, self.files, strict=cfg.strict)
        mean, std = photo_stats(self.channels)
        self.info = DataInfo(
            f"imagefolder:{root}",
            self.channels,
            len(self.files),
            None,
            len(classes) if classes else None,
            mean,
            std,
            tuple(classes),
        )

    @classmethod
    def check_config(cls, data: Any, prefix: str) -> None:
        check(
            bool(data.root),
            f"{prefix}.root",
            "source=imagefolder needs the folder of images, e.g. data.root=/data/imagenet",
        )

    @classmethod
    def same_images(cls, data: Any) -> bool:
        """The same folder serves both splits when the folder has no split sub-folders."""
        root = Path(data.root or "").expanduser()
        if not (data.root and root.is_dir()):
            return super().same_images(data)
        try:
            return split_folder(root, data.split, data) == split_folder(root, data.eval_split, data)
        except DataError:
            return False

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        return decode_file(str(path), lambda: Image.open(path), self.channels), self.targets[index]

    def labels(self) -> torch.Tensor | None:
        return torch.tensor(self.targets) if self.info.num_classes else None


def split_folder(root: Path, split: str, data: Any) -> Path:
    """`root/split` when it exists; `root` itself when it has no split folders at all (one unsplit folder); an
    error naming the splits there are when it has others. `data` is the DataConfig (its split names count)."""
    if (root / split).is_dir():
        return root / split
    present = sorted(name for name in {data.split, data.eval_split, "train", "val", "test"} if (root / name).is_dir())
    if present:
        raise missing_split_error(root, split, present, data, "sub-folders")
    return root


def _scan_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    seen: set[tuple[int, int]] = set()
    _first_visit(root, seen)
    entries = sorted(root.iterdir())
    top_images = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    per_class = [(d.name, _images_below(d, seen)) for d in class_dirs]
    per_class = [(name, files) for name, files in per_class if files]
    if top_images or not per_class:
        files = top_images + [f for _, class_files in per_class for f in class_files]
        return files, [-1] * len(files), []
    files, targets = [], []
    for label, (_, class_files) in enumerate(per_class):
        files += class_files
        targets += [label] * len(class_files)
    return files, targets, [name for name, _ in per_class]


def _images_below(folder: Path, seen: set[tuple[int, int]]) -> list[Path]:
    """The images below `folder`, following symbolic links into every folder once: a folder reached again (a
    link loop, two links to one folder) is not read again, so links never multiply images."""
    found = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        if not _first_visit(Path(directory), seen):
            subdirs.clear()
            continue
        subdirs.sort()
        found += [Path(directory) / n for n in sorted(names) if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def _first_visit(folder: Path, seen: set[tuple[int, int]]) -> bool:
    """Whether `folder` (the folder itself, wherever links make it appear) is seen for the first time."""
    try:
        stat = folder.stat()
    except OSError:
        return False
    key = (stat.st_dev, stat.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True
