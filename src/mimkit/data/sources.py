"""Image sources: Fashion-MNIST (IDX files), folders of images, torchvision sets and synthetic shapes.

Every source returns images as uint8 tensors (C, H, W) with the configured channel count, and an integer
label (-1 when the data has none). Decoding happens per image, so one corrupt file never stops an epoch.
"""

from __future__ import annotations

import inspect
import io
import itertools
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from mimkit.data import fashion_mnist
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError, DataInfo, UnreadableImage

SHARD_INDEX = "index.json"
SHARD_FORMAT = "mimkit-shards/1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)


class ImageSource(ABC):
    info: DataInfo

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


def build_source(cfg: DataConfig, split: str | None = None) -> ImageSource:
    """The source a data config names, for its training split or for `split` (e.g. cfg.eval_split); with
    `cfg.val_fraction`, the training split's held-out images stand for the evaluation split."""
    split = split or cfg.split
    held_out = cfg.val_fraction > 0 and split == cfg.eval_split != cfg.split
    builders = {
        "fashion-mnist": lambda name: FashionMNISTSource(cfg, name),
        "imagefolder": lambda name: ImageFolderSource(cfg, name),
        "torchvision": lambda name: TorchvisionSource(cfg, name),
        "synthetic": lambda name: SyntheticShapes(cfg, name),
        "shards": lambda name: ShardSource(cfg.root, name, cfg.channels),
    }
    source = builders[cfg.source](cfg.split if held_out else split)
    if cfg.val_fraction > 0 and split in (cfg.split, cfg.eval_split):
        source = held_out_split(source, cfg.val_fraction, held_out=held_out)
    if cfg.limit is not None and cfg.limit < len(source):
        source = Subset(source, cfg.limit)
    return source


def held_out_split(source: ImageSource, fraction: float, *, held_out: bool) -> ImageSource:
    """The images a fixed draw (seed 0) holds out of `source` (`held_out`), or the others, both in source order."""
    count = round(fraction * len(source))
    if not 0 < count < len(source):
        raise DataError(
            f"data.val_fraction {fraction} of {len(source)} images leaves a split empty; use more images or "
            "another fraction"
        )
    chosen = torch.zeros(len(source), dtype=torch.bool)
    chosen[torch.randperm(len(source), generator=torch.Generator().manual_seed(0))[:count]] = True
    return Subset(source, indices=torch.nonzero(chosen == held_out).flatten().tolist())


def same_images_notice(cfg: DataConfig) -> str | None:
    """A warning when the evaluation split is the training images themselves (an image folder without split
    sub-folders, or eval_split equal to split), else None."""
    if cfg.val_fraction > 0:
        return None
    same = cfg.split == cfg.eval_split
    if cfg.source == "imagefolder" and cfg.root and Path(cfg.root).expanduser().is_dir():
        root = Path(cfg.root).expanduser()
        names = {cfg.split, cfg.eval_split, "train", "val", "test"}
        try:
            same = _split_folder(root, cfg.split, names) == _split_folder(root, cfg.eval_split, names)
        except DataError:
            return None
    if cfg.source == "shards" and cfg.root:
        same = _shard_folder(Path(cfg.root).expanduser(), cfg.split) == _shard_folder(
            Path(cfg.root).expanduser(), cfg.eval_split
        )
    if not same:
        return None
    return (
        f"evaluation scores the training images themselves (data.split {cfg.split!r} and data.eval_split "
        f"{cfg.eval_split!r} are the same images{' of ' + str(cfg.root) if cfg.root else ''}), so its accuracy is "
        "optimistic (raw-pixel k-NN would be 100%); set data.val_fraction=0.1 to hold out 10% of the images, or give "
        "the folder train/ and val/ sub-folders"
    )


def convert_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (C, H, W) to 1 or 3 channels: luma for RGB -> gray, repetition for gray -> RGB."""
    if image.shape[0] == channels:
        return image
    if channels == 3:
        return image[:1].expand(3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    return (image[:3].float() * weights).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def _stats(
    channels: int, source_channels: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == source_channels:
        return mean, std
    if channels == 3:
        return mean * 3, std * 3
    return GRAY_MEAN, GRAY_STD


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


class FashionMNISTSource(ImageSource):
    MEAN, STD = (0.2860,), (0.3530,)
    CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def __init__(self, cfg: DataConfig, split: str) -> None:
        if split not in ("train", "test"):
            raise DataError(f"Fashion-MNIST has splits 'train' and 'test'; got split={split!r}")
        self.images, self.targets = fashion_mnist.load(split, cfg.root, cfg.download)
        self.channels = cfg.channels or 1
        mean, std = _stats(self.channels, 1, self.MEAN, self.STD)
        self.info = DataInfo("fashion-mnist", self.channels, len(self.images), (28, 28), 10, mean, std, self.CLASSES)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return convert_channels(self.images[index][None], self.channels), int(self.targets[index])

    def labels(self) -> torch.Tensor:
        return self.targets


class ImageFolderSource(ImageSource):
    """Any folder of images. Labels come from first-level sub-folders when every image sits in one."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        root = Path(cfg.root or "").expanduser()
        if not root.is_dir():
            raise DataError(f"data.root {root} is not a folder; point it at a folder of images")
        root = _split_folder(root, split, {cfg.split, cfg.eval_split, "train", "val", "test"})
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
        return _pil_to_tensor(image), self.targets[index]

    def labels(self) -> torch.Tensor | None:
        return torch.tensor(self.targets) if self.info.num_classes else None


def _split_folder(root: Path, split: str, split_names: set[str]) -> Path:
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


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return tensor.view(image.height, image.width, len(image.getbands())).permute(2, 0, 1).contiguous()


class TorchvisionSource(ImageSource):
    """A torchvision dataset class by name (CIFAR10, STL10, ...) with a root folder."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cfg.name or "", None)
        if not (inspect.isclass(cls) and issubclass(cls, tvd.VisionDataset)):
            known = sorted(n for n, c in vars(tvd).items() if inspect.isclass(c) and issubclass(c, tvd.VisionDataset))
            raise DataError(f"data.name: unknown torchvision dataset {cfg.name!r}; available: {', '.join(known)}")
        params = inspect.signature(cls).parameters
        kwargs: dict[str, object] = {"download": cfg.download} if "download" in params else {}
        if "train" in params:
            kwargs["train"] = split == "train"
        elif "split" in params:
            kwargs["split"] = split
        root = Path(cfg.root or fashion_mnist.cache_dir() / "torchvision").expanduser()
        if "root" in params:
            kwargs["root"] = str(root)
        self.name = f"torchvision:{cfg.name}"
        try:
            self.dataset = cls(**kwargs)
        except (RuntimeError, OSError, ValueError, TypeError) as error:
            raise DataError(
                f"torchvision {cfg.name} (split {split!r}) could not be opened from {root}: {error}. "
                "Set data.root to where it is, or data.download=true."
            ) from None
        try:
            first, _ = self._raw(0)
        except UnreadableImage as error:
            raise DataError(f"{self.name}: the first image cannot be read ({error.reason})") from None
        self.channels = cfg.channels or first.shape[0]
        classes = tuple(getattr(self.dataset, "classes", ()) or ())
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.channels == 3 else (GRAY_MEAN, GRAY_STD)
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
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise UnreadableImage(f"{self.name}[{index}]", str(error)) from None
        if isinstance(image, Image.Image):
            image = _pil_to_tensor(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
        return image, int(label) if label is not None else -1

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self._raw(index)
        return convert_channels(image, self.channels), label


class SyntheticShapes(ImageSource):
    """Seeded random shapes on noise, one shape kind per class: labelled data for tests, no files needed."""

    KINDS = ("square", "disk", "bars", "cross", "ring", "triangle")

    def __init__(self, cfg: DataConfig, split: str) -> None:
        if cfg.synthetic_classes > len(self.KINDS):
            raise DataError(
                f"data.synthetic_classes: at most {len(self.KINDS)} shape classes; got {cfg.synthetic_classes}"
            )
        self.size, self.num_classes = cfg.synthetic_size, cfg.synthetic_classes
        self.channels = cfg.channels or 1
        self.split_offset = 0 if split == "train" else 10_000_019
        self.info = DataInfo(
            "synthetic",
            self.channels,
            cfg.synthetic_images,
            (self.size, self.size),
            self.num_classes,
            (0.5,) * self.channels,
            (0.25,) * self.channels,
            self.KINDS[: self.num_classes],
        )

    def load(self, index: int) -> tuple[torch.Tensor, int]:
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
        return image.clamp(0, 255).to(torch.uint8), label

    def labels(self) -> torch.Tensor:
        return torch.arange(len(self)) % self.num_classes


def describe(source: ImageSource) -> str:
    info = source.info
    size = "x".join(map(str, info.image_size)) if info.image_size else "various sizes"
    labels = f"{info.num_classes} classes" if info.num_classes else "no labels"
    return f"{info.name}: {info.num_images:,} images, {info.channels} channel(s), {size}, {labels}"


class ShardSource(ImageSource):
    """The images of a shard folder (`root/<split>/index.json` when split folders exist, else `root/index.json`)."""

    def __init__(self, root: str | None, split: str, channels: int | None) -> None:
        folder = _shard_folder(Path(root or "").expanduser(), split)
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
        self.channels = channels or index["channels"]
        classes = tuple(index["classes"])
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.channels == 3 else (GRAY_MEAN, GRAY_STD)
        self.info = DataInfo(
            f"shards:{folder}", self.channels, len(self.members), None, len(classes) or None, mean, std, classes
        )
        self._handles: dict[tuple[int, int], int] = {}

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
        return _pil_to_tensor(image), label

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


def _shard_folder(root: Path, split: str) -> Path:
    """`root/split` when it holds shards (a sharded folder with split folders), else `root`."""
    return root / split if (root / split / SHARD_INDEX).is_file() else root
