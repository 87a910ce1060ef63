"""View pipelines: iBOT's multi-crop with masks, and the deterministic view used by evaluation.

Images arrive as uint8 tensors (C, H, W); views leave as normalised float tensors. Colour operations only
apply to RGB data: on 1-channel data they are skipped (never a crash).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torchvision.transforms import v2

from mimkit.config import check
from mimkit.data.info import DataInfo
from mimkit.data.masking import MaskGenerator

BICUBIC = v2.InterpolationMode.BICUBIC


@dataclass
class ViewContents:
    """What one image's views carry, so figures can show any method's inputs without knowing the method."""

    crops: list[torch.Tensor]
    """Every crop a network sees, (C, H, W), normalised."""
    masks: list[torch.Tensor | None]
    """Per crop, its patch mask on the encoder's token grid (True = masked), or None when it is not masked."""
    names: list[str] = field(default_factory=list)
    """Per crop, what it is ("online 1": view 1 with the online mask); empty: crops are numbered."""


class Views(Protocol):
    """A method's view transform: one image (C, H, W uint8) and the epoch -> the views its training_step reads."""

    def __call__(self, image: torch.Tensor, epoch: int) -> Any: ...

    def contents(self, views: Any) -> ViewContents:
        """The crops and masks inside what `__call__` returned for one image."""
        ...


@dataclass
class MultiCropConfig:
    """Global and local crops with the DINO/iBOT augmentations (defaults: iBOT ViT-S/16 on ImageNet)."""

    global_size: int = 224
    local_size: int = 96
    num_local: int = 10
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    """Brightness, contrast, saturation, hue (RGB data only)."""
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range in pixels of the crop."""
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    """Blur probability of global view 1, global view 2 and local views."""
    solarize_p: float = 0.2
    """Solarization probability of global view 2."""

    def validate(self, prefix: str = "method.views") -> None:
        check(self.global_size > 0 and self.local_size > 0, f"{prefix}.global_size", "crop sizes must be positive")
        check(self.num_local >= 0, f"{prefix}.num_local", f"must be >= 0; got {self.num_local}")
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            check(0 < low <= high <= 1, f"{prefix}.{name}", f"needs 0 < min <= max <= 1; got {(low, high)}")
        check(0 < self.blur_sigma[0] <= self.blur_sigma[1], f"{prefix}.blur_sigma", "needs 0 < min <= max")
        probabilities = (self.flip_p, self.color_jitter_p, self.grayscale_p, self.solarize_p, *self.blur_p)
        check(all(0 <= p <= 1 for p in probabilities), f"{prefix}", "probabilities must lie in [0, 1]")


def _crop_pipeline(
    cfg: MultiCropConfig, data: DataInfo, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float
) -> v2.Compose:
    steps: list[Any] = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(cfg.flip_p),
    ]
    if data.channels == 3:
        steps += [
            v2.RandomApply([v2.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p),
            v2.RandomGrayscale(cfg.grayscale_p),
        ]
    if blur_p > 0:
        kernel = min(2 * math.ceil(3 * cfg.blur_sigma[1]) + 1, size - 1 + size % 2)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=cfg.blur_sigma)], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)]
    return v2.Compose(steps)


class MultiCropViews:
    """Two masked global crops and `num_local` local crops of one image (iBOT's data pipeline)."""

    def __init__(self, cfg: MultiCropConfig, data: DataInfo, grid: tuple[int, int], masks: MaskGenerator) -> None:
        self.global_views = [
            _crop_pipeline(cfg, data, cfg.global_size, cfg.global_scale, cfg.blur_p[0], 0.0),
            _crop_pipeline(cfg, data, cfg.global_size, cfg.global_scale, cfg.blur_p[1], cfg.solarize_p),
        ]
        self.local_view = _crop_pipeline(cfg, data, cfg.local_size, cfg.local_scale, cfg.blur_p[2], 0.0)
        self.num_local = cfg.num_local
        self.grid = grid
        """The encoder's token grid of a global crop: masks are drawn on it."""
        self.masks = masks

    def __call__(self, image: torch.Tensor, epoch: int) -> dict[str, list[torch.Tensor]]:
        return {
            "global": [view(image) for view in self.global_views],
            "masks": [self.masks(*self.grid, epoch) for _ in self.global_views],
            "local": [self.local_view(image) for _ in range(self.num_local)],
        }

    def contents(self, views: dict[str, list[torch.Tensor]]) -> ViewContents:
        local = views["local"]
        return ViewContents([*views["global"], *local], [*views["masks"], *[None] * len(local)])


class PairedMaskedViews:
    """Two augmented crops of one image (the global views of `MultiCropConfig`: MoCo v3 / BYOL augmentations),
    each with a mask for the online network and one for the momentum network (SymMIM's fine and coarse boards)."""

    def __init__(
        self,
        cfg: MultiCropConfig,
        data: DataInfo,
        grid: tuple[int, int],
        online: MaskGenerator,
        momentum: MaskGenerator,
    ) -> None:
        self.views = [
            _crop_pipeline(cfg, data, cfg.global_size, cfg.global_scale, cfg.blur_p[0], 0.0),
            _crop_pipeline(cfg, data, cfg.global_size, cfg.global_scale, cfg.blur_p[1], cfg.solarize_p),
        ]
        self.grid, self.online, self.momentum = grid, online, momentum

    def __call__(self, image: torch.Tensor, epoch: int) -> dict[str, list[torch.Tensor]]:
        return {
            "views": [view(image) for view in self.views],
            "online_masks": [self.online(*self.grid, epoch) for _ in self.views],
            "momentum_masks": [self.momentum(*self.grid, epoch) for _ in self.views],
        }

    def contents(self, views: dict[str, list[torch.Tensor]]) -> ViewContents:
        """Each crop twice: with the online network's mask, then with the momentum network's."""
        crops = views["views"]
        names = [f"{branch} {i + 1}" for branch in ("online", "momentum") for i in range(len(crops))]
        return ViewContents([*crops, *crops], [*views["online_masks"], *views["momentum_masks"]], names)


@dataclass
class MaskedViewConfig:
    """One random-resized crop with a flip, colour jitter and a patch mask (BEiT-style inputs, as DTM uses them).

    Defaults: DTM's reference code (RandomResizedCrop at torchvision's default scale, flip, ColorJitter(0.4, 0.4,
    0.4) on every image)."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    """Crop area range."""
    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.0)
    """Brightness, contrast, saturation, hue (RGB data only; skipped on 1-channel data)."""
    color_jitter_p: float = 1.0

    def validate(self, prefix: str = "method.views") -> None:
        check(self.size > 0, f"{prefix}.size", f"must be positive; got {self.size}")
        low, high = self.scale
        check(0 < low <= high <= 1, f"{prefix}.scale", f"needs 0 < min <= max <= 1; got {self.scale}")
        check(0 <= self.flip_p <= 1, f"{prefix}.flip_p", "must lie in [0, 1]")
        check(0 <= self.color_jitter_p <= 1, f"{prefix}.color_jitter_p", "must lie in [0, 1]")
        check(min(self.color_jitter) >= 0, f"{prefix}.color_jitter", f"must be >= 0; got {self.color_jitter}")


class MaskedView:
    """`{"image": crop, "mask": (h, w) bool}` for one image."""

    def __init__(self, cfg: MaskedViewConfig, data: DataInfo, grid: tuple[int, int], masks: MaskGenerator) -> None:
        steps: list[Any] = [
            v2.RandomResizedCrop(cfg.size, scale=cfg.scale, interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(cfg.flip_p),
        ]
        if data.channels == 3 and cfg.color_jitter_p > 0 and any(cfg.color_jitter):
            steps.append(v2.RandomApply([v2.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)]
        self.pipeline = v2.Compose(steps)
        self.grid = grid
        self.masks = masks

    def __call__(self, image: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        return {"image": self.pipeline(image), "mask": self.masks(*self.grid, epoch)}

    def contents(self, views: dict[str, torch.Tensor]) -> ViewContents:
        return ViewContents([views["image"]], [views["mask"]])


class SeededViews:
    """Another transform's views plus one random integer per image (`"seed"`), drawn under the image's own seed: a
    method's random draws inside its step (CIM's token samples) then depend on the image, not on the process or
    the batch it lands in."""

    def __init__(self, views: Views) -> None:
        self.views = views

    def __call__(self, image: torch.Tensor, epoch: int) -> dict[str, Any]:
        return {**self.views(image, epoch), "seed": torch.randint(0, 2**62, ())}

    def contents(self, views: dict[str, Any]) -> ViewContents:
        return self.views.contents(views)


class EvalView:
    """Deterministic view for features: resize (shorter side to size / 0.875) and centre-crop larger images,
    resize smaller ones, then normalise (or, with `pixels`, keep values in [0, 1]: what tokenizers read)."""

    def __init__(self, data: DataInfo, size: int, crop_ratio: float = 0.875, pixels: bool = False) -> None:
        self.size = size
        self.resize_large = v2.Resize(round(size / crop_ratio), interpolation=BICUBIC, antialias=True)
        self.resize_small = v2.Resize(size, interpolation=BICUBIC, antialias=True)
        self.crop = v2.CenterCrop(size)
        scale = v2.ToDtype(torch.float32, scale=True)
        self.normalize = scale if pixels else v2.Compose([scale, v2.Normalize(data.mean, data.std)])

    def __call__(self, image: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        height, width = image.shape[-2:]
        if (height, width) != (self.size, self.size):
            resize = self.resize_large if min(height, width) > self.size else self.resize_small
            image = self.crop(resize(image))
        return self.normalize(image)
