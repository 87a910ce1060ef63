"""Hardware set-up: the Fabric object for a train config, a method placed on it, and a record of the machine a run
used."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.fabric.plugins import TorchCheckpointIO
from torch import nn

from mimkit.config import ConfigError
from mimkit.distributed import all_reduce_sum_grad, world_size
from mimkit.engine.checkpoint import package_versions
from mimkit.engine.config import TrainConfig
from mimkit.engine.logs import MetricsCSV, log
from mimkit.models.encoder import block_types_of, encoders_of

if TYPE_CHECKING:
    from mimkit.methods.base import Method


def make_fabric(cfg: TrainConfig, run_dir: Path) -> Fabric:
    """Fabric for the configured accelerator, devices, nodes, strategy and precision, with the run's loggers."""
    accelerator = cfg.accelerator
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.accelerator: {accelerator}, but torch sees no CUDA device (torch.cuda.is_available() is "
            "False); use --accelerator cpu (or auto), or a machine with a GPU and a CUDA build of torch"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.accelerator: mps, but this machine has no Apple GPU; use --accelerator cpu")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    cores = os.cpu_count() or 1
    if on_cpu and isinstance(cfg.devices, int) and cfg.devices > cores:
        raise ConfigError(
            f"train.devices: {cfg.devices} processes on a CPU with {cores} cores; each needs a core of its own, "
            f"so use --devices {cores} or fewer"
        )
    if cfg.strategy == "fsdp" and on_cpu:
        raise ConfigError(
            "train.strategy: fsdp shards the model across GPUs and Lightning runs it on GPUs only; on a CPU use "
            "--strategy ddp (or auto), or run on GPUs"
        )
    if cfg.precision == "16-mixed" and on_cpu:
        raise ConfigError(
            "train.precision: 16-mixed needs a GPU (its gradient scaler is CUDA-only); "
            "use bf16-mixed or 32-true on a CPU"
        )
    return Fabric(
        accelerator=accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=_strategy(cfg.strategy),
        precision=cfg.precision,
        loggers=_loggers(cfg, run_dir),
        plugins=None if cfg.strategy == "fsdp" else [DirectCheckpointIO()],  # FSDP writes its files itself
    )


class DirectCheckpointIO(TorchCheckpointIO):
    """`torch.save` straight into the file it is given. Lightning's own writes the whole checkpoint to memory, then to
    the system's temporary folder, then moves it: twice the memory, and a full /tmp fails a run whose folder has
    room. `mimkit.engine.checkpoint.atomic_save` already writes to a temporary name beside the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with open(path, "wb") as handle:
            torch.save(checkpoint, handle)


@contextmanager
def process_group_released() -> Iterator[None]:
    """Release the process group on every way out of a run: finished, refused (a run folder in use), failed or
    stopped; a refused DDP run aborted at exit as a finished one did."""
    try:
        yield
    finally:
        release_process_group()


def release_process_group() -> None:
    """Tear down the process group of a finished multi-process run on every rank: gloo's threads left to the
    interpreter's exit can abort a process that has finished its run ('terminate called without an active
    exception', exit -6)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def setup_for_training(
    fabric: Fabric,
    method: Method,
    optimizer: torch.optim.Optimizer,
    compile_backbones: bool,
    sync_batchnorm: bool = True,
) -> tuple[Any, Any]:
    """The Fabric-wrapped method (call `training_step` through it) and optimizer; backbones compiled on request;
    BatchNorm layers over the global batch when several processes train (`sync_batchnorm`, see `sync_batch_norms`)."""
    policy = getattr(fabric.strategy, "_fsdp_kwargs", {}).get("auto_wrap_policy")
    if isinstance(policy, EncoderBlocks):
        policy.types = block_types_of(method)  # before setup: FSDP wraps while it sets the method up
    if sync_batchnorm and fabric.world_size > 1 and (count := sync_batch_norms(method, fabric.device)):
        log.info(
            "sync_batchnorm: %d BatchNorm layers normalise over the batch of all %d processes", count, fabric.world_size
        )
    module, optimizer = fabric.setup(method, optimizer)
    module.mark_forward_method("training_step")
    if compile_backbones:
        for encoder in encoders_of(method):
            encoder.compile()
    return module, optimizer


PER_PROCESS_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
"""torch's BatchNorm layers, whose statistics are those of one process's batch. Subclasses with a forward of their
own (mimkit's GlobalBatchNorm1d, already global; timm's BatchNormAct2d) are left as they are."""
SYNC_KERNEL_DEVICES = ("cuda", "hpu", "xpu")
"""Where torch's SyncBatchNorm runs (DDP refuses it elsewhere); other devices get GlobalBatchNorm."""


def sync_batch_norms(module: nn.Module, device: torch.device) -> int:
    """Replace each of torch's BatchNorm layers in `module` by one over the batch of all processes, holding the same
    parameters and buffers (an optimizer built before still updates them); returns how many. With per-process
    statistics, N processes at batch B/N train differently from one process at batch B."""
    kind = nn.SyncBatchNorm if device.type in SYNC_KERNEL_DEVICES else GlobalBatchNorm
    count = 0
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) in PER_PROCESS_NORMS:
                new = kind(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                for key, tensor in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                    setattr(new, key, tensor)
                setattr(parent, name, new.train(child.training))
                count += 1
    return count


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batch of all processes on any device (SyncBatchNorm's kernels are GPU-only): the sums
    are all-reduced, differentiably, and the mean and variance computed from them in two passes, as one process
    computes them. One process, or evaluation: plain BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(input)
        x = input.float()
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        sums = all_reduce_sum_grad(torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.size(1)])]))
        total = sums[-1]
        mean = sums[:-1] / total
        var = all_reduce_sum_grad((x - mean.view(shape)).square().sum(dims)) / total
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * total / (total - 1), momentum)
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


class EncoderBlocks:
    """FSDP auto-wrap policy: one unit per block of the method's encoders (their `block_types`), whatever the
    family. Fabric is made before the method exists, so `setup_for_training` fills in the types."""

    def __init__(self) -> None:
        self.types: tuple[type[torch.nn.Module], ...] = ()

    def __call__(self, module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return recurse or isinstance(module, self.types)


def _strategy(name: str) -> Any:
    if name != "fsdp":
        return name
    from lightning.fabric.strategies import FSDPStrategy

    # Shard per encoder block; full state dicts keep checkpoints single files that eval/export can read.
    return FSDPStrategy(auto_wrap_policy=EncoderBlocks(), state_dict_type="full", use_orig_params=True)


def _loggers(cfg: TrainConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    for name in cfg.loggers:
        if name == "csv":
            loggers.append(MetricsCSV(run_dir))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(root_dir=str(run_dir), name="tensorboard", version=""))
        else:
            try:
                from lightning.pytorch.loggers import WandbLogger
            except ImportError as error:
                raise ConfigError(
                    "train.loggers: wandb needs `pip install wandb` (or drop it from the list)"
                ) from error
            loggers.append(WandbLogger(save_dir=str(run_dir), project="mimkit", name=run_dir.name))
    return loggers


def machine() -> dict[str, Any]:
    """CPU model, threads and GPUs of this process's machine, for run records and benchmark tables."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "platform": platform.platform(),
    }


def environment(fabric: Fabric, precision: str) -> dict[str, Any]:
    """What a run ran on: versions, machine, processes, device and precision (as configured, and Fabric's plugin)."""
    return {
        "versions": package_versions(),
        "machine": machine(),
        "world_size": fabric.world_size,
        "device": str(fabric.device),
        "precision": precision,
        "precision_plugin": type(fabric.strategy.precision).__name__,
    }
