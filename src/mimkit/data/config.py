"""Where a run's images come from and how they are batched.

The fields every source shares live here; a source's own settings are its section, `data.<source>` (e.g.
`data.synthetic: {images: 512, size: 32}`), typed by the config class the source registers (`mimkit.data.sources`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from mimkit.config import SECTIONS, ConfigError, Older, Sections, check, check_sections, fill_sections

DEFAULT_SOURCE = "fashion-mnist"
OLDER_FIELDS: dict[str, tuple[str, str]] = {
    "synthetic_images": ("synthetic", "images"),
    "synthetic_size": ("synthetic", "size"),
    "synthetic_classes": ("synthetic", "classes"),
    "name": ("torchvision", "name"),
}
"""Flat `data` fields of runs saved before each source owned its section -> (that section, its field there)."""


def upgrade_older_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with the flat fields of older runs moved into their source's section.

    Run folders written before sources owned their sections hold `data.synthetic_size`, `data.name`, ... in their
    config.yaml and checkpoints, for every source alike (the old schema dumped them all). Opening, evaluating and
    resuming such a run must keep working, so each one moves into its section when that source is the chosen one
    and is dropped otherwise. Both spellings at once (an older override on a recipe's section) must agree.
    """
    upgraded = {key: value for key, value in data.items() if key not in OLDER_FIELDS}
    source = data.get("source", DEFAULT_SOURCE)
    for old, (section, field_name) in OLDER_FIELDS.items():
        given = upgraded.get(section) or {}
        if old not in data or section != source or not isinstance(given, Mapping):
            continue
        if given.get(field_name, data[old]) != data[old]:
            raise ConfigError(
                f"data.{old}: the older spelling of data.{section}.{field_name}, which says otherwise; keep only "
                f"data.{section}.{field_name}"
            )
        upgraded[section] = {**given, field_name: data[old]}
    return upgraded


def source_sections() -> dict[str, type | None]:
    """Every registered source -> the config class of its section (None: it has no settings of its own)."""
    from mimkit.data.sources.registry import source_classes  # the sources import this module: imported when used

    sections = {name: cls.Config for name, cls in source_classes().items()}
    clash = sorted(set(sections) & {f.name for f in dataclasses.fields(DataConfig)})
    if clash:
        raise ValueError(f"data sources named like shared data fields ({', '.join(clash)}): their sections would clash")
    return sections


@dataclass
class DataConfig:
    """Where the images come from and how they are batched: the fields every source shares, plus the chosen
    source's own section. `download` is shared rather than torchvision's own: it is the machine's one switch for
    fetching data, which Fashion-MNIST's fallback honours as well as torchvision sets."""

    older_fields: ClassVar[Older] = Older(tuple(OLDER_FIELDS), upgrade_older_fields)

    source: str = DEFAULT_SOURCE
    """Where images come from: a registered source (listed as this field's type by `--fields`; docs/data.md)."""
    options: Any = field(default=None, metadata={SECTIONS: Sections("source", source_sections)})
    """The source's own settings, spelled in YAML as its section `data.<source>`; None for a source without any."""
    root: str | None = None
    """Folder of the data. fashion-mnist: IDX files (default: the Debian package, then mimkit's cache)."""
    split: str = "train"
    eval_split: str = "test"
    download: bool = True
    """Allow downloads (Fashion-MNIST's fallback, torchvision sets)."""
    channels: int | None = None
    """Force 1 (grayscale) or 3 (RGB) channels; None keeps the source's own."""
    strict: bool = False
    """Fail on the first unreadable image instead of skipping it with a counted warning."""
    val_fraction: float = 0.0
    """Hold out this fraction of the training split's images as the evaluation split (in place of `eval_split`):
    for a folder without split sub-folders, whose evaluation would otherwise score the training images
    themselves. The held-out images are a fixed draw (seed 0) over the split's image order, the same every run."""
    limit: int | None = None
    """Use only the first `limit` images (quick runs, tests)."""
    batch_size: int = 64
    """Images per device and optimizer micro-step."""
    global_batch: int | None = None
    """Images per optimizer step over all processes, as papers state it; when set, it replaces `batch_size`: each
    process takes global_batch / (processes x optim.accumulate_grad_batches), which must divide."""
    num_workers: int = 2
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (DataLoader's prefetch_factor); raise it when a run waits for data."""
    augment_on: Literal["auto", "worker", "device"] = "auto"
    """Where the colour jitter, grayscale, blur, solarization and normalisation of the views run: in the DataLoader
    workers per image, or batched on the accelerator after the batch arrives (workers then only decode, crop and
    flip). auto: device when training on a GPU, worker otherwise. Same random draws in both (docs/data.md)."""

    def __post_init__(self) -> None:
        fill_sections(self)

    def validate(self, prefix: str = "data") -> None:
        from mimkit.data.sources.registry import source_class

        check_sections(self, prefix)
        source_class(self.source).check_config(self, prefix)
        check(self.channels in (None, 1, 3), f"{prefix}.channels", f"must be 1, 3 or null; got {self.channels}")
        check(
            0 <= self.val_fraction < 1,
            f"{prefix}.val_fraction",
            f"must lie in [0, 1), e.g. 0.1 holds out 10% of the images; got {self.val_fraction}",
        )
        check(self.limit is None or self.limit > 0, f"{prefix}.limit", f"must be positive; got {self.limit}")
        check(self.batch_size > 0, f"{prefix}.batch_size", f"must be positive; got {self.batch_size}")
        check(
            self.global_batch is None or self.global_batch > 0,
            f"{prefix}.global_batch",
            f"must be positive or null; got {self.global_batch}",
        )
        check(self.num_workers >= 0, f"{prefix}.num_workers", f"must be >= 0; got {self.num_workers}")
        check(self.prefetch_factor >= 1, f"{prefix}.prefetch_factor", f"must be >= 1; got {self.prefetch_factor}")

    def process_batch(self, processes: int, accumulate: int) -> int:
        """Images per process and micro-step: `batch_size`, or `global_batch` shared out (a ConfigError when it does
        not divide, before any work)."""
        if self.global_batch is None:
            return self.batch_size
        share = processes * accumulate
        if self.global_batch % share:
            below = self.global_batch // share * share
            raise ConfigError(
                f"data.global_batch: {self.global_batch} images do not divide over {processes} process(es) x "
                f"{accumulate} accumulated micro-batch(es); use a multiple of {share} (e.g. {max(below, share)} or "
                f"{below + share}), or run on a number of processes that divides it"
            )
        return self.global_batch // share
