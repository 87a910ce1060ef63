"""How a run optimises (AdamW and its schedules) and how its loop runs (length, hardware, checkpoints, logs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mimkit.config import check


@dataclass
class OptimConfig:
    """AdamW (or SGD, for linear probing) with per-iteration cosine schedules for learning rate and weight decay."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    """sgd: SGD with `momentum` (DINO's and iBOT's linear probing); `betas` and `eps` are AdamW's."""
    momentum: float = 0.9
    lr: float = 5e-4
    """Base learning rate for `lr_reference_batch` images; scaled by the global batch size."""
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    lr_reference_batch: int = 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    warmup_start_lr: float = 0.0
    weight_decay: float = 0.04
    weight_decay_end: float | None = None
    """Cosine-scheduled weight decay ends here; None keeps it constant."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    accumulate_grad_batches: int = 1

    def validate(self, prefix: str = "optim") -> None:
        check(self.lr > 0, f"{prefix}.lr", f"must be positive; got {self.lr}")
        check(self.min_lr >= 0, f"{prefix}.min_lr", f"must be >= 0; got {self.min_lr}")
        check(self.warmup_epochs >= 0, f"{prefix}.warmup_epochs", f"must be >= 0; got {self.warmup_epochs}")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0; got {self.weight_decay}")
        check(all(0 <= b < 1 for b in self.betas), f"{prefix}.betas", f"must lie in [0, 1); got {self.betas}")
        check(0 <= self.momentum < 1, f"{prefix}.momentum", f"must lie in [0, 1); got {self.momentum}")
        check(self.lr_reference_batch > 0, f"{prefix}.lr_reference_batch", "must be positive")
        check(
            self.accumulate_grad_batches >= 1,
            f"{prefix}.accumulate_grad_batches",
            f"must be >= 1; got {self.accumulate_grad_batches}",
        )


@dataclass
class TrainConfig:
    """How the loop runs: length, hardware, precision, checkpoints and logs."""

    epochs: int = 100
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp"] = "auto"
    checkpoint_every_epochs: int = 1
    """Keep `epoch_NNNN.ckpt` every N epochs (0: only `last.ckpt`)."""
    keep_epoch_checkpoints: int = 3
    """Keep the newest N `epoch_NNNN.ckpt` files, removing older ones once a new one is written (0: keep all)."""
    checkpoint_every_steps: int = 0
    """Also refresh `last.ckpt` every N optimizer steps inside an epoch (0: only at epoch ends)."""
    log_every_steps: int = 10
    health_window_steps: int = 200
    """Warn (log and RUN/health.json) when a `health_*` metric stays in a collapsed range this many steps (0: never)."""
    on_nonfinite: Literal["error", "skip"] = "error"
    """A non-finite loss stops the run with a checkpoint of the last good state, or skips the step."""
    compile: bool = False
    sync_batchnorm: bool = True
    """With more than one process, BatchNorm layers normalise over the batch of all processes (false: each its own)."""
    progress_bar: bool = True
    loggers: list[Literal["csv", "tensorboard", "wandb"]] = field(default_factory=lambda: ["csv", "tensorboard"])
    knn_every_epochs: int = 0
    """Online k-NN of `method.encoder()` every N epochs when the data has labels (0: never)."""
    knn_limit: int | None = 10000
    """Images per split used by the online k-NN (None: all)."""

    def validate(self, prefix: str = "train") -> None:
        check(self.epochs >= 1, f"{prefix}.epochs", f"must be >= 1; got {self.epochs}")
        check(self.devices == "auto" or self.devices >= 1, f"{prefix}.devices", "must be >= 1 or auto")
        check(self.num_nodes >= 1, f"{prefix}.num_nodes", f"must be >= 1; got {self.num_nodes}")
        for name in ("checkpoint_every_epochs", "checkpoint_every_steps", "knn_every_epochs"):
            check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
        check(
            self.keep_epoch_checkpoints >= 0,
            f"{prefix}.keep_epoch_checkpoints",
            f"must be >= 0 (0 keeps every epoch checkpoint); got {self.keep_epoch_checkpoints}",
        )
        check(self.log_every_steps >= 1, f"{prefix}.log_every_steps", "must be >= 1")
        check(self.health_window_steps >= 0, f"{prefix}.health_window_steps", "must be >= 0 (0: no warnings)")
