"""Image sources, one registered module each: Fashion-MNIST (IDX files), folders of images, shard folders,
torchvision sets, synthetic shapes and folders of images with label maps.
A new source is one new module that registers itself (docs/data.md)."""

from mimkit.data.sources.base import (
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSource,
    Subset,
    convert_channels,
    describe,
    label_size_problem,
    photo_stats,
)
from mimkit.data.sources.build import build_source, held_out_split, same_images_notice
from mimkit.data.sources.fashion_mnist import FashionMNISTSource
from mimkit.data.sources.imagefolder import IMAGE_EXTENSIONS, ImageFolderSource
from mimkit.data.sources.registry import register_source, source_class, source_names
from mimkit.data.sources.segfolder import SegFolderConfig, SegFolderSource
from mimkit.data.sources.shards import SHARD_FORMAT, SHARD_INDEX, ShardSource
from mimkit.data.sources.synthetic import SyntheticConfig, SyntheticShapes
from mimkit.data.sources.torchvision_sets import TorchvisionConfig, TorchvisionSource

__all__ = [
    "GRAY_MEAN",
    "GRAY_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "SHARD_FORMAT",
    "SHARD_INDEX",
    "FashionMNISTSource",
    "ImageFolderSource",
    "ImageSource",
    "SegFolderConfig",
    "SegFolderSource",
    "ShardSource",
    "Subset",
    "SyntheticConfig",
    "SyntheticShapes",
    "TorchvisionConfig",
    "TorchvisionSource",
    "build_source",
    "convert_channels",
    "describe",
    "held_out_split",
    "label_size_problem",
    "photo_stats",
    "register_source",
    "same_images_notice",
    "source_class",
    "source_names",
]
