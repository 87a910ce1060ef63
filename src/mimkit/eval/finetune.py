"""Full fine-tuning of an encoder's timm model for classification (the BEiT/MAE/iBOT recipe, scaled down).

The encoder's plain timm model (ViT, BEiT or CNN) gets a fresh linear head and trains end to end with AdamW;
layer-wise lr decay where timm groups the model's layers (block i of L, 0-based, gets lr x decay^(L - i), the
embeddings lr x decay^(L + 1), the head the full lr: early layers hold the generic features pretraining built
and should move least); stochastic depth rising linearly to `drop_path` in the last of the encoder's blocks;
mixup/cutmix with label smoothing; a per-iteration warm-up + cosine lr; top-1 and top-5 on the eval split after
each epoch.

A plain loop on one device (the first GPU, else the CPU), bf16 autocast on CUDA: fine-tuning evaluates a
backbone; it is not a training product, so it skips the engine's distribution, resume and logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from timm.data import Mixup
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from mimkit.config import ConfigError
from mimkit.data.info import DataInfo
from mimkit.data.loader import ViewDataset, eval_loader, train_loader
from mimkit.data.sources import ImageSource
from mimkit.data.views import BICUBIC, EvalView
from mimkit.engine.logs import log
from mimkit.schedules import CosineSchedule
from mimkit.schedules import Progress as TrainingProgress


@dataclass
class FinetuneConfig:
    """Fine-tuning settings; the defaults are those of `mimkit eval finetune` (a ViT-S-sized recipe)."""

    epochs: int = 100
    lr: float = 1e-3
    """Peak learning rate of the head (absolute, not scaled with the batch size)."""
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    drop_path: float = 0.1
    mixup: float = 0.8
    """Mixup alpha (0: off)."""
    cutmix: float = 1.0
    """CutMix alpha (0: off); with both on, each batch uses one of them at random."""
    label_smoothing: float = 0.1
    batch_size: int = 128
    num_workers: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range of the training augmentation."""
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("finetune: epochs and batch size must be >= 1, workers >= 0")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_epochs < 0 or self.weight_decay < 0:
            raise ConfigError("finetune: lr must be > 0; min lr, warm-up epochs and weight decay >= 0")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"finetune: layer decay must lie in (0, 1]; got {self.layer_decay}")
        if not 0 <= self.drop_path < 1 or not 0 <= self.label_smoothing < 1:
            raise ConfigError("finetune: drop path and label smoothing must lie in [0, 1)")
        if min(self.mixup, self.cutmix) < 0:
            raise ConfigError("finetune: mixup and cutmix alphas must be >= 0")
        if self.uses_mixup and self.batch_size % 2:
            raise ConfigError(
                f"finetune: mixup/cutmix pair images of a batch; use an even batch size, not {self.batch_size}"
            )
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"finetune: crop scale needs 0 < min <= max <= 1; got {self.crop_scale}")

    @property
    def uses_mixup(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass
class FinetuneResult:
    """Per-epoch mean training loss and eval accuracies (fractions in [0, 1])."""

    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def top1(self) -> float:
        """Top-1 after the last epoch: the number to report (no selection on the eval split)."""
        return self.history[-1]["top1"]

    @property
    def top5(self) -> float:
        return self.history[-1]["top5"]

    @property
    def best(self) -> dict[str, float]:
        """The epoch with the highest top-1 (selected on the eval split, so optimistic; MAE reports it)."""
        return max(self.history, key=lambda row: row["top1"])


class TrainView:
    """RandomResizedCrop + horizontal flip of a uint8 image, then normalisation (a picklable transform)."""

    def __init__(self, data: DataInfo, size: int, scale: tuple[float, float]) -> None:
        self.pipeline = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(data.mean, data.std),
            ]
        )

    def __call__(self, image: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.pipeline(image)


def set_drop_path(model: nn.Module, rate: float, block_types: tuple[type[nn.Module], ...]) -> None:
    """Stochastic depth rising linearly from 0 in the first block to `rate` in the last (timm's own rule)."""
    blocks = [module for module in model.modules() if isinstance(module, block_types)]
    depth = len(blocks)
    for i, block in enumerate(blocks):
        block_rate = rate * i / max(depth - 1, 1)
        for name in ("drop_path", "drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(block_rate) if block_rate > 0 else nn.Identity())


def layer_decay_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW with one group per (layer, decayed or not); each group's `lr_scale` multiplies the scheduled lr.

    timm's grouping (its `group_matcher`), for a ViT: patch/position embeddings and [CLS] form layer 0, block i
    (0-based) layer i + 1 (the final norm joins the last block), the head the top layer (scale 1). 1-D parameters
    (biases, norms), the position embedding and [CLS] get no weight decay. A model timm cannot group by layer
    gets plain decayed / undecayed groups.
    """
    decay = cfg.layer_decay if hasattr(model, "group_matcher") else None
    return create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=decay)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Top-1 and top-5 (top-min(5, C)) accuracy of a classifier over a loader."""
    model.eval()
    hits1 = hits5 = total = 0
    for batch in loader:
        if batch["views"] is None:
            continue
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch["views"].to(device, non_blocking=True))
        target = batch["label"].to(device)
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits1 += int((ranked[:, 0] == target).sum())
        hits5 += int((ranked == target[:, None]).any(1).sum())
        total += len(target)
    return hits1 / max(total, 1), hits5 / max(total, 1)


def finetune(
    model: nn.Module,
    block_types: tuple[type[nn.Module], ...],
    train_source: ImageSource,
    eval_source: ImageSource,
    image_size: int,
    cfg: FinetuneConfig,
    device: torch.device,
    report: Callable[[dict[str, float]], None] = lambda row: None,
) -> FinetuneResult:
    """Fine-tune the timm `model` in place (a fresh head for the sources' classes; stochastic depth over its
    blocks of `block_types`) and evaluate it after every epoch.

    `report` receives each epoch's row ({"epoch", "loss", "top1", "top5"}) as soon as it exists.
    """
    cfg.validate()
    num_classes = train_source.info.num_classes
    if not num_classes:
        raise ConfigError(f"fine-tuning needs labelled data; {train_source.info.name} has no labels")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)  # timm's Mixup draws from numpy's global generator
    model.reset_classifier(num_classes)
    set_drop_path(model, cfg.drop_path, block_types)
    model.requires_grad_(True)  # EMA teachers come frozen
    model.to(device)
    optimizer = layer_decay_optimizer(model, cfg)

    train_data = ViewDataset(train_source, TrainView(train_source.info, image_size, cfg.crop_scale), seed=cfg.seed)
    loader = train_loader(train_data, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed)
    eval_data = ViewDataset(eval_source, EvalView(eval_source.info, image_size), seed=0)
    test_loader = eval_loader(eval_data, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    mixup = (
        Mixup(cfg.mixup, cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes)
        if cfg.uses_mixup
        else None
    )
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    schedule = CosineSchedule(cfg.lr, cfg.min_lr, cfg.warmup_epochs)
    steps_per_epoch = len(loader)

    result = FinetuneResult()
    skipped: list[str] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, TextColumn("loss {task.fields[loss]:.4f}"), transient=True) as bar:
        task = bar.add_task("fine-tuning", total=steps_per_epoch * cfg.epochs, loss=math.nan)
        for epoch in range(cfg.epochs):
            model.train()
            loader.sampler.set_position(epoch)
            losses = []
            bar.update(task, description=f"fine-tuning epoch {epoch + 1}/{cfg.epochs}")
            for i, batch in enumerate(loader):
                bar.advance(task)
                if epoch == 0:
                    skipped += batch["skipped"]
                if batch["views"] is None:
                    continue
                lr = schedule(TrainingProgress(epoch, epoch * steps_per_epoch + i, steps_per_epoch, cfg.epochs))
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                images, targets = batch["views"].to(device, non_blocking=True), batch["label"].to(device)
                if mixup:
                    images, targets = mixup(images, targets)
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss = criterion(model(images), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update(task, loss=losses[-1])
            if epoch == 0 and skipped:
                log.warning("fine-tuning: skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0])
            top1, top5 = evaluate(model, test_loader, device)
            row = {"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1), "top1": top1, "top5": top5}
            result.history.append(row)
            report(row)
    return result
