"""Any folder of images (`data.root`), with `train/`, `val/`, ... split sub-folders or as one unsplit folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from mimkit.config import check
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError, DataInfo, UnreadableImage
from mimkit.data.sources.base import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, ImageSource, pil_to_tensor
from mimkit.data.sources.registry import register_source

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


@register_source("imagefolder")
class ImageFolderSource(ImageSource):
    """Any folder of images. Labels come from first-level sub-folders when every image sits in one."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        root = Path(cfg.root or "").expanduser()
        if not root.is_dir():
            raise DataError(f"data.root {root} is not a folder; point it at a folder of images")
        root = split_folder(root, split, {cfg.split, cfg.eval_split, "train", "val", "test"})
        self.root = root
        self.files, self.targets, classes = _scan_folder(root)
        if not self.files:
            raise DataError(f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.mode_channels = cfg.channels or self._guess_channels()
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.mode_channels == 3 else (GRAY_MEAN, GRAY_STD)
        self.info = DataInfo(
            f"imagefolder:{root}",
            self.mode_channels,
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
        names = {data.split, data.eval_split, "train", "val", "test"}
        try:
            return split_folder(root, data.split, names) == split_folder(root, data.eval_split, names)
        except DataError:
            return False

    def _guess_channels(self) -> int:
        for path in self.files[:16]:
            try:
                with Image.open(path) as image:
                    return 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
            except (OSError, UnidentifiedImageError):
                continue
        return 3

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("L" if self.mode_channels == 1 else "RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            raise UnreadableImage(str(path), f"{type(error).__name__}: {error}") from None
        return pil_to_tensor(image), self.targets[index]

    def labels(self) -> torch.Tensor | None:
        return torch.tensor(self.targets) if self.info.num_classes else None


def split_folder(root: Path, split: str, split_names: set[str]) -> Path:
    """`root/split` when it exists; `root` itself when it has no split folders at all (one unsplit folder)."""
    if (root / split).is_dir():
        return root / split
    present = sorted(name for name in split_names if (root / name).is_dir())
    if present:
        raise DataError(
            f"{root} has split folders ({', '.join(present)}) but no '{split}'; "
            "set data.split / data.eval_split to one of them"
        )
    return root


def _scan_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    top_images = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [(d.name, _images_below(d)) for d in class_dirs]
    per_class = [(name, files) for name, files in per_class if files]
    if top_images or not per_class:
        files = top_images + [f for _, class_files in per_class for f in class_files]
        return files, [-1] * len(files), []
    files, targets = [], []
    for label, (_, class_files) in enumerate(per_class):
        files += class_files
        targets += [label] * len(class_files)
    return files, targets, [name for name, _ in per_class]


def _images_below(folder: Path) -> list[Path]:
    found = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs.sort()
        found += [Path(directory) / n for n in sorted(names) if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return found
