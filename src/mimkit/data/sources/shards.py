"""A shard folder that `mimkit data shard` wrote (`mimkit.data.shards`): each image read with one positioned read."""

from __future__ import annotations

import io
import itertools
import json
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

SHARD_INDEX = "index.json"
SHARD_FORMAT = "mimkit-shards/1"


@register_source("shards")
class ShardSource(ImageSource):
    """The images of a shard folder (`root/<split>/index.json` when split folders exist, else `root/index.json`)."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        folder = shard_folder(Path(cfg.root or "").expanduser(), split)
        if not (folder / SHARD_INDEX).is_file():
            raise DataError(
                f"data.root {folder} holds no {SHARD_INDEX}: it is not a shard folder; write one with "
                "`mimkit data shard IMAGE_FOLDER OUT` and set data.root=OUT"
            )
        index = json.loads((folder / SHARD_INDEX).read_text())
        if index.get("format") != SHARD_FORMAT:
            raise DataError(f"{folder / SHARD_INDEX}: format {index.get('format')!r}, expected {SHARD_FORMAT!r}")
        self.folder = folder
        self.files = [folder / shard["file"] for shard in index["shards"]]
        self.members = [(s, m[1], m[2], m[3]) for s, shard in enumerate(index["shards"]) for m in shard["members"]]
        self.shard_sizes = [len(shard["members"]) for shard in index["shards"]]
        self.keys = [m[0] for shard in index["shards"] for m in shard["members"]]
        self.channels = cfg.channels or index["channels"]
        classes = tuple(index["classes"])
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.channels == 3 else (GRAY_MEAN, GRAY_STD)
        self.info = DataInfo(
            f"shards:{folder}", self.channels, len(self.members), None, len(classes) or None, mean, std, classes
        )
        self._handles: dict[tuple[int, int], int] = {}

    @classmethod
    def check_config(cls, data: Any, prefix: str) -> None:
        check(
            bool(data.root),
            f"{prefix}.root",
            "source=shards needs the folder that `mimkit data shard` wrote, e.g. data.root=/data/imagenet_shards",
        )

    @classmethod
    def same_images(cls, data: Any) -> bool:
        """The same shards serve both splits when the folder has no split folders."""
        if not data.root:
            return super().same_images(data)
        root = Path(data.root).expanduser()
        return shard_folder(root, data.split) == shard_folder(root, data.eval_split)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        shard, offset, size, label = self.members[index]
        where = f"{self.files[shard]}:{self.keys[index]}"
        try:
            data = os.pread(self._handle(shard), size, offset)
            if len(data) != size:
                raise OSError(f"read {len(data)} of {size} bytes (truncated shard?)")
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert("L" if self.channels == 1 else "RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            raise UnreadableImage(where, f"{type(error).__name__}: {error}") from None
        return pil_to_tensor(image), label

    def _handle(self, shard: int) -> int:
        """An open descriptor per (process, shard): a forked worker opens its own."""
        key = (os.getpid(), shard)
        if key not in self._handles:
            self._handles[key] = os.open(self.files[shard], os.O_RDONLY)
        return self._handles[key]

    def labels(self) -> torch.Tensor | None:
        return torch.tensor([m[3] for m in self.members]) if self.info.num_classes else None

    def groups(self) -> list[list[int]] | None:
        starts = [0, *itertools.accumulate(self.shard_sizes)]
        return [list(range(a, b)) for a, b in itertools.pairwise(starts) if b > a]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # descriptors do not travel to spawned workers


def shard_folder(root: Path, split: str) -> Path:
    """`root/split` when it holds shards (a sharded folder with split folders), else `root`."""
    return root / split if (root / split / SHARD_INDEX).is_file() else root
