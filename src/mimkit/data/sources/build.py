"""A data config's source for a split: the registered source, with the held-out part (`data.val_fraction`) and the
first `data.limit` images taken out of it; and the notice when evaluation would score the training images."""

from __future__ import annotations

import torch

from mimkit.data.config import DataConfig
from mimkit.data.info import DataError
from mimkit.data.sources.base import ImageSource, Subset
from mimkit.data.sources.registry import source_class


def build_source(cfg: DataConfig, split: str | None = None) -> ImageSource:
    """The source a data config names, for its training split or for `split` (e.g. cfg.eval_split); with
    `cfg.val_fraction`, the training split's held-out images stand for the evaluation split. The config is
    validated first, so one built in Python is checked as one read from a file is."""
    cfg.validate()
    split = split or cfg.split
    held_out = cfg.val_fraction > 0 and split == cfg.eval_split != cfg.split
    source = source_class(cfg.source)(cfg, cfg.split if held_out else split)
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
    if cfg.val_fraction > 0 or not source_class(cfg.source).same_images(cfg):
        return None
    return (
        f"evaluation scores the training images themselves (data.split {cfg.split!r} and data.eval_split "
        f"{cfg.eval_split!r} are the same images{' of ' + str(cfg.root) if cfg.root else ''}), so its accuracy is "
        "optimistic (raw-pixel k-NN would be 100%); set data.val_fraction=0.1 to hold out 10% of the images, or give "
        "the folder train/ and val/ sub-folders"
    )
