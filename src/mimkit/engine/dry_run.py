"""What a recipe will cost, before renting GPUs for it: `mimkit pretrain -c RECIPE --dry-run`.

The method is built at the recipe's real shapes on the CPU and one training step runs on two synthetic images:
parameters per network, FLOPs per image of that step (forward and backward, counted by torch's FlopCounterMode),
the activations it keeps for the backward pass per image (every tensor saved for backward, counted once, the
parameters left out), the size of a checkpoint, and from the data (when it is readable here) the steps per epoch
and the images the whole run sees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from mimkit.config import ConfigError
from mimkit.data.info import DataError, DataInfo
from mimkit.data.loader import collate, seeded
from mimkit.data.sources import ImageSource, build_source, photo_stats
from mimkit.engine.checkpoint import checkpoint_bytes
from mimkit.methods.base import Method, method_class
from mimkit.runs import RunConfig
from mimkit.schedules import Progress

MEASURED_IMAGES = 2


@dataclass
class DryRun:
    networks: dict[str, tuple[int, int]]
    """Role -> (parameters, trainable parameters)."""
    flops_per_image: float
    activation_bytes_per_image: float
    step_seconds: float
    """Wall-clock of the measured step on this CPU (2 images), for scale only."""
    checkpoint_bytes: int
    global_batch: int
    processes: int
    epochs: int
    images: int | None
    """Images of the training split; None when the data cannot be read here."""
    data_note: str = ""

    @property
    def steps_per_epoch(self) -> int | None:
        return None if self.images is None else self.images // self.global_batch

    def lines(self) -> list[str]:
        rows = [
            f"  {role:<20} {total / 1e6:9.2f}M {trainable / 1e6:9.2f}M"
            for role, (total, trainable) in self.networks.items()
        ]
        per_image = (
            f"{self.flops_per_image / 1e9:.3g} GFLOPs, {self.activation_bytes_per_image / 2**20:.3g} MiB of "
            f"activations kept for backward ({self.step_seconds:.1f} s for {MEASURED_IMAGES} images on this CPU)"
        )
        lines = [
            f"  {'network':<20} {'parameters':>10} {'trainable':>10}",
            *rows,
            f"one training step per image: {per_image}",
        ]
        lines.append(f"checkpoint: about {self.checkpoint_bytes / 2 / 2**30:.3g} GiB (weights and AdamW moments)")
        batch = f"global batch of {self.global_batch} ({self.processes} process{'es' if self.processes > 1 else ''})"
        if self.images is None:
            lines.append(f"data: {self.data_note}; a {batch}, {self.epochs} epochs")
        else:
            seen = self.steps_per_epoch * self.global_batch * self.epochs  # type: ignore[operator]
            lines.append(
                f"data: {self.images:,} images -> {self.steps_per_epoch:,} steps per epoch at a {batch}; "
                f"{self.epochs} epochs see {seen / 1e6:.1f}M images"
            )
        return lines


def dry_run(cfg: RunConfig) -> DryRun:
    """Build `cfg`'s method on the CPU and measure one training step on two synthetic images."""
    source, info, note = _data(cfg)
    method_cls = method_class(cfg.method.name)
    if source is not None:
        method_cls.prepare(cfg.method, source)
    torch.manual_seed(cfg.seed)
    method = method_cls(cfg.method, info)
    networks = {
        role: (sum(p.numel() for p in net.parameters()), sum(p.numel() for p in net.parameters() if p.requires_grad))
        for role, net in method.networks().items()
    }
    flops, activations, seconds = _measure(method, info, cfg.train.epochs)
    devices = cfg.train.devices if isinstance(cfg.train.devices, int) else 1
    processes = devices * cfg.train.num_nodes
    accumulate = cfg.optim.accumulate_grad_batches
    global_batch = cfg.data.process_batch(processes, accumulate) * processes * accumulate
    images = len(source) if source is not None else None
    return DryRun(
        networks,
        flops,
        activations,
        seconds,
        checkpoint_bytes(method),
        global_batch,
        processes,
        cfg.train.epochs,
        images,
        note,
    )


def _data(cfg: RunConfig) -> tuple[ImageSource | None, DataInfo, str]:
    """The training source when it can be read here; else what the recipe says of its images."""
    try:
        source = build_source(cfg.data)
        return source, source.info, ""
    except (DataError, ConfigError, FileNotFoundError, OSError) as error:
        channels = cfg.data.channels or 3
        info = DataInfo(cfg.data.source, channels, 0, None, None, *photo_stats(channels))
        return None, info, f"not readable here ({error}); steps per epoch follow from its image count"


def _measure(method: Method, info: DataInfo, epochs: int) -> tuple[float, float, float]:
    """FLOPs and saved activations per image of one training step, and its seconds, on synthetic images."""
    size = method.encoder().image_size or 224
    views = method.views("worker")
    samples = []
    for index in range(MEASURED_IMAGES):
        with seeded(0, 0, index):
            image = torch.randint(0, 256, (info.channels, size, size), dtype=torch.uint8)
            samples.append((views(image, 0), 0, index))
    batch = collate(samples)
    batch["views"] = views.on_device(batch["views"])
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not (tensor.is_leaf and tensor.requires_grad):  # parameters are the model's, not activations
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    method.train()
    start = time.perf_counter()
    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = method.training_step(batch, Progress(0, 0, 1, epochs)).loss
        loss.backward()
    seconds = time.perf_counter() - start
    return counter.get_total_flops() / MEASURED_IMAGES, sum(saved.values()) / MEASURED_IMAGES, seconds
