"""A tiny test-only method: denoising autoencoder with random views and dropout, so resume tests see every
source of randomness (data-side augmentation, model-side dropout). Recipes name it `toy_method:ToyMethod`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.data.info import DataInfo
from mimkit.methods.base import Method, MethodConfig, Progress, StepOutput
from mimkit.models.encoder import Encoder


@dataclass
class ToyConfig(MethodConfig):
    name: str = "toy_method:ToyMethod"
    hidden: int = 32
    dropout: float = 0.2
    crop: int = 12
    step_delay: float = 0.0
    """Seconds slept per step, so a test can kill a run in the middle of an epoch."""
    fail_at_step: int | None = None
    """Raise at this optimizer step (simulates a crash)."""
    nan_at_step: int | None = None
    """Return a NaN loss at this optimizer step."""

    runtime_fields: ClassVar[tuple[str, ...]] = ("step_delay", "fail_at_step", "nan_at_step")


class ToyViews:
    def __init__(self, crop: int, mean: float, std: float) -> None:
        self.crop, self.mean, self.std = crop, mean, std

    def __call__(self, image: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        _, h, w = image.shape
        top = int(torch.randint(0, h - self.crop + 1, ()))
        left = int(torch.randint(0, w - self.crop + 1, ()))
        clean = (image[:, top : top + self.crop, left : left + self.crop].float() / 255 - self.mean) / self.std
        return {"clean": clean, "noisy": clean + 0.3 * torch.randn_like(clean)}

    def on_device(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return views


class ToyEncoder(Encoder):
    """The hidden layer as one token: enough of the contract for feature extraction (online k-NN)."""

    num_prefix_tokens = 0

    def __init__(self, net: nn.Sequential, image_size: int) -> None:
        super().__init__()
        self.net = net
        self.image_size = image_size
        self.embed_dim = net[1].out_features

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net[:3](images).unsqueeze(1)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(1)


class ToyMethod(Method):
    Config = ToyConfig

    def __init__(self, cfg: ToyConfig, data: DataInfo) -> None:
        super().__init__(cfg, data)
        size = data.channels * cfg.crop * cfg.crop
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(size, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, size)
        )
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def views(self, augment_on: str = "worker") -> ToyViews:
        return ToyViews(self.cfg.crop, self.data.mean[0], self.data.std[0])

    def training_step(self, batch: dict[str, Any], progress: Progress) -> StepOutput:
        cfg: ToyConfig = self.cfg
        if cfg.fail_at_step == progress.step:
            raise RuntimeError(f"simulated crash at step {progress.step}")
        if cfg.step_delay:
            time.sleep(cfg.step_delay)
        clean, noisy = batch["views"]["clean"], batch["views"]["noisy"]
        loss = F.mse_loss(self.net(noisy), clean.flatten(1))
        if cfg.nan_at_step == progress.step:
            loss = loss * float("nan")
        return StepOutput(loss, {"loss_reconstruction": loss.detach(), "noise_mse": F.mse_loss(noisy, clean).detach()})

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        self.steps_seen += 1

    def encoder(self) -> Encoder:
        return ToyEncoder(self.net, self.cfg.crop)

    def networks(self) -> dict[str, nn.Module]:
        return {"net": self.net}
