"""Find, read and (as a fallback) download the Fashion-MNIST IDX files.

Search order: the folder the user names, the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist), then mimkit's cache, where torchvision downloads land.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from mimkit.cache import cache_dir
from mimkit.data.info import DataError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def candidate_dirs(root: str | None) -> list[Path]:
    if root:
        return [Path(root).expanduser()]
    cache = cache_dir() / "fashion-mnist"
    return [SYSTEM_DIR, cache, cache / "FashionMNIST" / "raw"]


def find(name: str, folders: list[Path]) -> Path | None:
    for folder in folders:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped); a damaged file gives an error naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path} cannot be read ({error}); delete it and fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); delete it and fetch it again")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(
            f"{path} is truncated or damaged ({len(raw) - offset} data bytes, expected {expected}); "
            "delete it and fetch it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def locate(split: str, root: str | None) -> tuple[Path, Path] | None:
    folders = candidate_dirs(root)
    images, labels = (find(name, folders) for name in FILES[split])
    return (images, labels) if images and labels else None


def download(split: str) -> tuple[Path, Path]:
    """Download through torchvision into mimkit's cache."""
    from torchvision.datasets import FashionMNIST

    target = cache_dir() / "fashion-mnist"
    target.mkdir(parents=True, exist_ok=True)
    try:
        FashionMNIST(str(target), train=split == "train", download=True)
    except Exception as error:  # torchvision raises URLError, RuntimeError, ...: all mean "no files"
        raise DataError(_missing_message(None) + f" The download failed too: {error}") from None
    found = locate(split, None)
    if found is None:
        raise DataError(_missing_message(None))
    return found


def load(split: str, root: str | None, allow_download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 28, 28) uint8 images and (N,) int64 labels of one split."""
    found = locate(split, root)
    if found is None:
        if root or not allow_download:
            raise DataError(_missing_message(root))
        found = download(split)
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{found[0]} and {found[1]} do not hold matching images and labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _missing_message(root: str | None) -> str:
    where = ", ".join(str(p) for p in candidate_dirs(root))
    return (
        f"Fashion-MNIST IDX files not found (looked in {where}). Install the Debian package "
        "dataset-fashion-mnist (`make data` does it as root), run `mimkit data fetch fashion-mnist`, "
        "or set data.root to a folder holding train-images-idx3-ubyte.gz and friends."
    )
