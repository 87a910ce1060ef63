"""A shard folder that `mimkit data shard` wrote (`mimkit.data.shards`): each image read with one positioned read."""

from __future__ import annotations

import io
import itertools
import json
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
from mimkit.data.sources.registry import register_source

SHARD_INDEX = "index.json"
SHARD_FORMAT = "mimkit-shards/1"
REWRITE = "`mimkit data shard IMAGE_FOLDER OUT`"


@register_source("shards")
class ShardSource(ImageSource):
    """The images of a shard folder (`root/<split>/index.json` when split folders exist, else `root/index.json`)."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        folder = shard_folder(Path(cfg.root or "").expanduser(), split, cfg)
        if not (folder / SHARD_INDEX).is_file():
            raise DataError(
                f"data.root {folder} holds no {SHARD_INDEX}: it is not a shard folder; write one with "
                f"{REWRITE} and set data.root=OUT"
            )
        index = read_index(folder / SHARD_INDEX)
        self.folder = folder
        self.files = [folder / shard["file"] for shard in index["shards"]]
        self.members = [(s, m[1], m[2], m[3]) for s, shard in enumerate(index["shards"]) for m in shard["members"]]
        self.shard_sizes = [len(shard["members"]) for shard in index["shards"]]
        self.keys = [m[0] for shard in index["shards"] for m in shard["members"]]
        self.channels = cfg.channels or index["channels"]
        classes = tuple(index["classes"])
        mean, std = photo_stats(self.channels)
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
        try:
            return shard_folder(root, data.split, data) == shard_folder(root, data.eval_split, data)
        except DataError:
            return False

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        shard, offset, size, label = self.members[index]

        def read() -> Image.Image:
            data = os.pread(self._handle(shard), size, offset)
            if len(data) != size:
                raise OSError(f"read {len(data)} of {size} bytes (truncated shard?)")
            return Image.open(io.BytesIO(data))

        return decode_file(f"{self.files[shard]}:{self.keys[index]}", read, self.channels), label

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


def shard_folder(root: Path, split: str, data: Any) -> Path:
    """`root/split` when it holds shards (a sharded folder with split folders); else `root`, unless other split
    folders hold shards: then an error naming them. `data` is the DataConfig (which split field to set)."""
    if (root / split / SHARD_INDEX).is_file():
        return root / split
    names = {data.split, data.eval_split, "train", "val", "test"}
    present = sorted(name for name in names if (root / name / SHARD_INDEX).is_file())
    if present and not (root / SHARD_INDEX).is_file():
        raise missing_split_error(root, split, present, data, "shard folders")
    return root


def read_index(path: Path) -> dict:
    """A shard folder's index, checked: not JSON, not the mimkit-shards format or not its shape is a DataError
    naming the file and the fix (a damaged index would otherwise fail later, with a traceback or wrong images)."""
    try:
        index = json.loads(path.read_bytes())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(
            f"{path} is not JSON ({error}), so not a shard index that `mimkit data shard` wrote (or one cut short); "
            f"write the shards again with {REWRITE}"
        ) from None
    found = index.get("format") if isinstance(index, dict) else type(index).__name__
    if found != SHARD_FORMAT:
        raise DataError(
            f"{path} is not a mimkit shard index (format {found!r}, expected {SHARD_FORMAT!r}); write the shards "
            f"again with {REWRITE}"
        )
    problem = _index_problem(index, path.parent)
    if problem is not None:
        raise DataError(f"{path} is damaged: {problem}; write the shards again with {REWRITE}")
    return index


def _index_problem(index: dict, folder: Path) -> str | None:
    """What in an index of the right format is not as `mimkit data shard` writes it, or None."""
    classes, shards = index.get("classes"), index.get("shards")
    if index.get("channels") not in (1, 3):
        return f"channels is {index.get('channels')!r}, not 1 or 3"
    if not (isinstance(classes, list) and all(isinstance(name, str) for name in classes)):
        return "classes is not a list of class names"
    if not isinstance(shards, list):
        return "shards is not a list"
    for position, shard in enumerate(shards):
        named = isinstance(shard, dict) and isinstance(shard.get("file"), str)
        if not (named and isinstance(shard.get("members"), list)):
            return f"shard {position} has no file name or no member list"
        if not (folder / shard["file"]).is_file():
            return f"it lists {shard['file']}, which is missing"
        for member in shard["members"]:
            if not _is_member(member, len(classes)):
                return f"{shard['file']}: member {member!r} is not [key, offset, size, label]"
    return None


def _is_member(member: object, num_classes: int) -> bool:
    """[key, offset, size, label], the label -1 (no labels) or a class index."""
    if not (isinstance(member, list) and len(member) == 4 and isinstance(member[0], str)):
        return False
    offset, size, label = member[1:]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (offset, size, label)):
        return False
    return offset >= 0 and size >= 0 and (label == -1 or 0 <= label < num_classes)
