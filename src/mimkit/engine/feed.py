"""How batches reach the training loop: the run's views and loader, and the share of time the loop waits for them.

A GPU that idles for want of images (too few workers, augmentations too heavy for the CPUs) trains no faster on a
larger GPU, and the loss curve does not show it. The loop therefore times its wait for data per logged window
(`data_wait_fraction` in metrics.csv and the progress line) and warns once, with the settings that fix it, when
the run is data-bound.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lightning.fabric import Fabric
from torch.utils.data import DataLoader

from mimkit.data.config import DataConfig
from mimkit.data.loader import ViewDataset, train_loader
from mimkit.data.sources import ImageSource
from mimkit.data.views import AugmentOn, Views, resolve_augment_on
from mimkit.engine.logs import log
from mimkit.methods.base import Method

DATA_BOUND_FRACTION = 0.2
"""A logged window in which the loop waited for data more than this share of its time makes the run warn (once)."""


@dataclass
class Feed:
    """The run's view transform (the loop runs its `on_device` on each batch) and this rank's training loader."""

    views: Views
    loader: DataLoader
    augment_on: AugmentOn


def build_feed(
    data: DataConfig, seed: int, fabric: Fabric, source: ImageSource, method: Method, batch_size: int
) -> Feed:
    """The method's views with their augmentations where `data.augment_on` puts them, and the loader of this rank:
    pinned on CUDA, so that each batch reaches the GPU by an asynchronous copy; `batch_size` images per batch."""
    augment_on, notice = resolve_augment_on(data.augment_on, fabric.device.type)
    views = method.views(augment_on)
    if notice is not None:
        log.warning("data  %s", notice)
    loader = train_loader(
        ViewDataset(source, views, seed=seed, strict=data.strict),
        batch_size=batch_size,
        num_workers=data.num_workers,
        prefetch_factor=data.prefetch_factor,
        seed=seed,
        num_replicas=fabric.world_size,
        rank=fabric.global_rank,
        pin_memory=fabric.device.type == "cuda",
    )
    return Feed(views, loader, augment_on)


class Window:
    """The steps since the last logged one: images trained, wall time, and the part of it spent waiting for data
    (`start_up`: the part of that wait spent on the first batch of an epoch, while the workers start or refill)."""

    def __init__(self, first_step: int) -> None:
        self.first_step, self.start = first_step, time.perf_counter()
        self.images, self.waited, self.start_up = 0, 0.0, 0.0

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


class FeedMeter:
    """Per logged window of steps: the images trained per second, and the share of the time the loop waited for
    data (`data_wait_fraction`), which makes the run warn once when it is data-bound.

    The wait is the time inside `next(batches)` and the host-to-device copy (`fabric.to_device`), not the views'
    `on_device`, which is augmentation work on the device. It is measured on the host, and nothing is synchronised
    for it: on CUDA a step only queues kernels, so the host may wait for the next batch while the GPU still works
    through the step before (that wait cost the GPU nothing), and a step that reads a value back waits inside the
    step while the workers go on loading (that time is not counted). `data_wait_fraction` is thus the share of the
    time the host was blocked on data: an upper bound on the time the device idled for want of images. Near 0, the
    loader keeps up, and more workers would not speed the run up.

    The warning leaves out the first window of the run (start-up) and the wait for the first batch of each epoch
    (the workers start or refill); the metric counts both. Each rank times its own loader: metrics.csv holds the
    mean over the ranks, the progress line and the warning rank 0's own.
    """

    def __init__(self, data: DataConfig, augment_on: AugmentOn, *, warn: bool) -> None:
        self.data, self.augment_on = data, augment_on
        self.warned = not warn  # only rank 0 warns
        self.window, self.windows_ended, self.epoch_start = Window(1), 0, True

    def start_epoch(self, next_step: int) -> None:
        """A new window from here (epoch-end evaluations and checkpoints are not training time)."""
        self.window, self.epoch_start = Window(next_step), True

    def fetch(self, batches: Iterator[dict[str, Any]], fabric: Fabric) -> dict[str, Any]:
        """The next batch on the device, its wait counted in the window."""
        start = time.perf_counter()
        batch = fabric.to_device(next(batches))
        waited = time.perf_counter() - start
        self.window.waited += waited
        if self.epoch_start:
            self.window.start_up += waited
            self.epoch_start = False
        return batch

    def count(self, images: int) -> None:
        self.window.images += images

    def rates(self) -> tuple[float, float]:
        """Images per second and `data_wait_fraction` of the window so far."""
        elapsed = self.window.elapsed()
        return self.window.images / elapsed, min(self.window.waited / elapsed, 1.0)

    def end_window(self, step: int) -> None:
        """The window ends with the logged step `step`: warn if it was data-bound, then start the next one."""
        window, self.windows_ended = self.window, self.windows_ended + 1
        self.window = Window(step + 1)
        if self.warned or self.windows_ended == 1:
            return
        fraction = (window.waited - window.start_up) / max(window.elapsed() - window.start_up, 1e-9)
        if fraction > DATA_BOUND_FRACTION:
            self.warned = True
            log.warning(
                "the run waited for data %.0f%% of the time over steps %d-%d: %s",
                100 * fraction,
                window.first_step,
                step,
                self.fixes(),
            )

    def fixes(self) -> str:
        """The settings that shorten the wait, with their values in this run (augment_on only where it is worker)."""
        workers = self.data.num_workers
        fixes = [f"raise data.num_workers (now {workers}; this machine has {_cores()} cores)"]
        if self.augment_on == "worker":
            fixes.append("set data.augment_on=device on a GPU")
        if workers > 0:
            fixes.append(f"raise data.prefetch_factor (now {self.data.prefetch_factor}) if loading comes in bursts")
        return fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])} or {fixes[-1]}"


def _cores() -> int:
    """The cores this process may run on (a SLURM job's share, not the whole node)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
