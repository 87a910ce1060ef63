"""Mixup and CutMix drawn per image, so that a batch's mixing does not depend on how it is split over processes.

timm's `Mixup` (what MAE, BEiT and DeiT fine-tune with) draws one coefficient per batch and mixes each image with
the image at the mirrored position of its batch: on N processes each rank draws its own coefficient and pairs
within its own shard, so the run changes with N. Here every image draws, under its own seed, whether it is mixed,
whether by mixup or by CutMix, the coefficient, the box, and its partner: another image of the training set,
drawn uniformly (the distribution of timm's partner, a random image of a shuffled batch). The targets mix the
label-smoothed one-hot labels with the coefficient, corrected to the pasted box's area under CutMix (timm's
`correct_lam`). ASSUMPTION (ours): per-image coefficients, where the papers' code draws one per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mimkit.config import check


@dataclass
class MixConfig:
    """timm's Mixup settings as the MAE / BEiT fine-tuning recipes give them (defaults: theirs)."""

    mixup: float = 0.8
    """Beta(alpha, alpha) of mixup's coefficient (0: no mixup)."""
    cutmix: float = 1.0
    """Beta(alpha, alpha) of CutMix's kept area (0: no CutMix)."""
    prob: float = 1.0
    """Chance that an image is mixed at all."""
    switch_prob: float = 0.5
    """With both on: chance of CutMix rather than mixup."""

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def validate(self, prefix: str) -> None:
        check(self.mixup >= 0 and self.cutmix >= 0, f"{prefix}.mixup", "mixup and cutmix alphas must be >= 0")
        for name in ("prob", "switch_prob"):
            check(0 <= getattr(self, name) <= 1, f"{prefix}.{name}", f"must lie in [0, 1]; got {getattr(self, name)}")


@dataclass(frozen=True)
class Mix:
    """One image's draw: keep `lam` of it; under CutMix the partner's pixels fill `box` (top, left, bottom, right)."""

    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None


def draw_partner(num_images: int) -> int:
    """The partner image, drawn from torch's generator (seeded per image by the loader)."""
    return int(torch.randint(num_images, ()))


def draw_mix(cfg: MixConfig, height: int, width: int) -> Mix:
    """Whether and how one image is mixed, from torch's generator."""
    if not cfg.enabled or float(torch.rand(())) >= cfg.prob:
        return Mix()
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup == 0 or float(torch.rand(())) < cfg.switch_prob)
    alpha = cfg.cutmix if use_cutmix else cfg.mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if not use_cutmix:
        return Mix(lam)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    centre_y, centre_x = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
    return Mix(1.0 - (bottom - top) * (right - left) / (height * width), (top, left, bottom, right))


def mix_images(image: torch.Tensor, partner: torch.Tensor, mix: Mix) -> torch.Tensor:
    """`image` mixed with `partner` (both (C, H, W), already augmented and normalised) as `mix` says."""
    if mix.box is not None:
        top, left, bottom, right = mix.box
        mixed = image.clone()
        mixed[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
        return mixed
    if mix.lam == 1.0:
        return image
    return torch.lerp(partner, image, mix.lam)


def soft_targets(
    labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor, num_classes: int, smoothing: float
) -> torch.Tensor:
    """(B, classes) targets: lam x smoothed one-hot(label) + (1 - lam) x smoothed one-hot(partner's label), with
    timm's smoothing (every class gets smoothing / classes, the true one 1 - smoothing more)."""
    off = smoothing / num_classes

    def smoothed(y: torch.Tensor) -> torch.Tensor:
        return torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y[:, None], 1.0 - smoothing + off)

    lam = lam.to(torch.float32)[:, None]
    return lam * smoothed(labels) + (1.0 - lam) * smoothed(partner_labels)
