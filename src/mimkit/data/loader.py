"""From an image source to batches: seeded per-image views, epoch-aware sharded sampling, skipping collate.

Every image's augmentation is seeded by (seed, epoch, index), so a batch does not depend on the number of
workers or on where a resumed run restarted: a run resumed mid-epoch sees exactly the batches the
uninterrupted run saw. The sampler hands the epoch to the dataset with each index, which also reaches
persistent workers (mask schedules need the epoch).
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from mimkit.data.info import DataError, UnreadableImage
from mimkit.data.sources import ImageSource


class Skipped(NamedTuple):
    where: str
    reason: str


@contextmanager
def seeded(*keys: int) -> Iterator[None]:
    """Seed torch's CPU generator, `random` and numpy's global generator (timm's RandAugment draws from it) from
    `keys` inside the block, then restore them."""
    seed = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)
    torch_state, random_state = torch.random.default_generator.get_state(), random.getstate()
    numpy_state = np.random.get_state()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    try:
        yield
    finally:
        torch.random.default_generator.set_state(torch_state)
        random.setstate(random_state)
        np.random.set_state(numpy_state)


def strict_error(error: UnreadableImage) -> DataError:
    return DataError(
        f"unreadable image {error.where}: {error.reason} (set data.strict=false to skip such files with a warning)"
    )


@runtime_checkable
class PairedViews(Protocol):
    """Views of an image made with a partner image of the same source (mixup / CutMix of fine-tuning)."""

    def partner(self, num_images: int) -> int | None:
        """The partner's index, drawn first under the image's seed; None when this transform needs none."""
        ...

    def with_partner(self, image: torch.Tensor, epoch: int, partner: tuple[torch.Tensor, int] | None) -> Any:
        """The views of `image` made with `partner` (its image and label; None when it could not be read)."""
        ...


class ViewDataset(Dataset):
    """Applies `transform(image, epoch)` to each image of `source` under a per-(epoch, image) seed."""

    def __init__(
        self, source: ImageSource, transform: Callable[[torch.Tensor, int], Any], seed: int, strict: bool = False
    ) -> None:
        self.source, self.transform, self.seed, self.strict = source, transform, seed, strict

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int, int] | Skipped:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        try:
            image, label = self.source.load(index)
        except UnreadableImage as error:
            if self.strict:
                raise strict_error(error) from None
            return Skipped(error.where, error.reason)  # the batch carries it; its consumer reports it, once
        with seeded(self.seed, epoch, index):
            if isinstance(self.transform, PairedViews) and (other := self.transform.partner(len(self))) is not None:
                return self.transform.with_partner(image, epoch, self._partner(other)), label, index
            return self.transform(image, epoch), label, index

    def _partner(self, index: int) -> tuple[torch.Tensor, int] | None:
        """A partner image and its label; None when it cannot be read and data.strict is off (the image is then used
        unpaired; the partner is reported when its own turn comes)."""
        try:
            return self.source.load(index)
        except UnreadableImage as error:
            if self.strict:
                raise strict_error(error) from None
            return None


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index): shuffled and sharded across ranks like DistributedSampler; can resume mid-epoch.

    With `groups` (the images of each tar shard), a shuffled epoch reads by group instead: the group order and
    the order within each group are shuffled, and each rank takes a contiguous run of that order, so it reads a
    few whole groups rather than a little of every one."""

    def __init__(
        self,
        num_images: int,
        *,
        shuffle: bool,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        groups: list[list[int]] | None = None,
    ) -> None:
        self.inner = DistributedSampler(
            range(num_images),
            num_replicas=num_replicas,
            rank=rank,  # type: ignore[arg-type]
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.groups = groups if shuffle and drop_last else None
        self.seed, self.rank, self.num_replicas = seed, rank, num_replicas
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Next iteration covers `epoch`, beginning at its `start`-th sample of this rank.

        (Deliberately not named `set_epoch`: wrappers such as Fabric's call that with their own counters.)"""
        self.epoch, self.start = epoch, start
        self.inner.set_epoch(epoch)

    def _by_group(self) -> list[int]:
        assert self.groups is not None
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = [
            self.groups[g][i]
            for g in torch.randperm(len(self.groups), generator=generator).tolist()
            for i in torch.randperm(len(self.groups[g]), generator=generator).tolist()
        ]
        per_rank = len(order) // self.num_replicas
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self._by_group() if self.groups is not None else self.inner
        for position, index in enumerate(indices):
            if position >= self.start:
                yield self.epoch, index

    def __len__(self) -> int:
        return self.samples_per_epoch - self.start

    @property
    def samples_per_epoch(self) -> int:
        return len(self.inner)


def collate(samples: list[Any]) -> dict[str, Any]:
    """Batch what was decoded; report what was skipped (the engine counts and logs it)."""
    kept = [s for s in samples if not isinstance(s, Skipped)]
    skipped = [f"{s.where} ({s.reason})" for s in samples if isinstance(s, Skipped)]
    if not kept:
        empty = torch.empty(0, dtype=torch.long)
        return {"views": None, "label": empty, "index": empty, "skipped": skipped}
    views, labels, indices = zip(*kept, strict=True)
    return {
        "views": default_collate(list(views)),
        "label": torch.tensor(labels),
        "index": torch.tensor(indices),
        "skipped": skipped,
    }


def train_loader(
    dataset: ViewDataset,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> DataLoader:
    """Shuffled, sharded, full batches only (drop_last), persistent workers; read by tar shard when the source
    stores its images in shards.

    With workers, each keeps `prefetch_factor` batches in flight (torch refuses the setting without workers).
    `pin_memory` pins batches for the current accelerator, which Fabric set to this rank's device before the
    loader is iterated; torch has deprecated `pin_memory_device`, so none is given."""
    if len(dataset) < batch_size * num_replicas:
        raise DataError(
            f"{len(dataset)} images are fewer than one global batch ({batch_size} x {num_replicas} "
            "devices); lower data.batch_size or add images"
        )
    sampler = EpochSampler(
        len(dataset),
        shuffle=True,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
        drop_last=True,
        groups=dataset.source.groups(),
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=ignore_interrupts,
        generator=torch.Generator().manual_seed(seed),
    )  # keeps the global RNG untouched


def ignore_interrupts(_worker_id: int) -> None:
    """`worker_init_fn` of training loaders: a worker ignores Ctrl-C, so the loop can stop cleanly and save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def eval_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int, num_replicas: int = 1, rank: int = 0
) -> DataLoader:
    """Every image once, in order (padded by DistributedSampler across ranks; callers de-duplicate). `dataset` takes
    the sampler's (epoch, index) keys and returns what `collate` batches, as ViewDataset does."""
    sampler = EpochSampler(len(dataset), shuffle=False, seed=0, num_replicas=num_replicas, rank=rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
