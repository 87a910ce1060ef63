"""View pipelines: iBOT's multi-crop with masks, and the deterministic view used by evaluation.

Images arrive as uint8 tensors (C, H, W); views leave as normalised float tensors. Colour operations only
apply to RGB data: on 1-channel data they are skipped (never a crash).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torchvision.transforms import v2

from mimkit.config import check
from mimkit.data.augment import NOTHING_APPLIED, CropAugment, finish
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

    def on_device(self, views: Any) -> Any:
        """What the engine runs on a collated batch of views once it is on the accelerator (the batched part of
        `data.augment_on=device`; the views unchanged when the worker did everything)."""
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


AugmentOn = Literal["worker", "device"]


def resolve_augment_on(setting: str, device_type: str) -> tuple[AugmentOn, str | None]:
    """`data.augment_on` for a run on `device_type` ("cuda", "cpu", ...), and a notice when the choice is odd."""
    if setting == "auto":
        return ("device" if device_type == "cuda" else "worker"), None
    if setting == "device" and device_type != "cuda":
        return "device", (
            f"data.augment_on=device on a {device_type} run: the colour, blur and solarization of the views run "
            "batched in the training process on the CPU, not in the DataLoader workers (data.augment_on=worker "
            "spreads them over the workers)"
        )
    if setting not in ("worker", "device"):
        raise ValueError(f"data.augment_on: {setting!r} is not one of auto, worker, device")
    return setting, None  # type: ignore[return-value]


def multi_crop_augment(
    cfg: MultiCropConfig, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float
) -> CropAugment:
    """One crop of the DINO/iBOT pipeline: crop, flip, jitter and grayscale (RGB only), blur and solarization when
    their probability is not 0."""
    return CropAugment(
        size,
        scale,
        cfg.flip_p,
        color_jitter=cfg.color_jitter,
        color_jitter_p=cfg.color_jitter_p,
        grayscale_p=cfg.grayscale_p,
        blur_sigma=cfg.blur_sigma,
        blur_p=blur_p if blur_p > 0 else None,
        solarize_p=solarize_p if solarize_p > 0 else None,
    )


def global_augments(cfg: MultiCropConfig) -> list[CropAugment]:
    """The two global views of DINO/iBOT/BYOL: view 1 blurred with `blur_p[0]`, view 2 with `blur_p[1]` and solarized
    with `solarize_p` (the asymmetric pair)."""
    return [
        multi_crop_augment(cfg, cfg.global_size, cfg.global_scale, cfg.blur_p[0], 0.0),
        multi_crop_augment(cfg, cfg.global_size, cfg.global_scale, cfg.blur_p[1], cfg.solarize_p),
    ]


class AugmentedViews:
    """Views built of augmented crops, in either mode of `data.augment_on`.

    worker: each crop is finished (photometric augmentation, normalisation) in the worker. device: the views carry
    the uint8 crops and, under `<key>_params`, their drawn parameters; `on_device` finishes them batched once the
    batch is on the accelerator. The random draws are the same in both modes."""

    augmented_keys: tuple[str, ...] = ()
    """Keys of the views whose values are crops (a list of them, or one)."""
    plain_keys: tuple[str, ...] = ()
    """Keys among them whose crops are also delivered without photometric steps, only normalised, under
    `<key>_plain` (pixel targets of the crops before colour, blur and solarization)."""

    def __init__(self, data: DataInfo, augment_on: AugmentOn) -> None:
        if augment_on not in ("worker", "device"):
            raise ValueError(f"augment_on: {augment_on!r} is not one of worker, device")
        self.mean, self.std, self.augment_on = data.mean, data.std, augment_on

    def _plain(self, crops: torch.Tensor) -> torch.Tensor:
        """Normalised uint8 crops (B, C, H, W), no photometric step."""
        return finish(crops, torch.tensor([NOTHING_APPLIED] * len(crops)), self.mean, self.std)

    def _crops(self, image: torch.Tensor, augments: list[CropAugment], key: str, views: dict[str, Any]) -> None:
        """Draw each crop of `augments` from `image` into `views[key]` (in order: the draws consume the seed's
        stream crop by crop)."""
        drawn = [augment.draw(image) for augment in augments]
        if self.augment_on == "worker":
            views[key] = [finish(crop[None], params[None], self.mean, self.std)[0] for crop, params in drawn]
            if key in self.plain_keys:
                views[f"{key}_plain"] = [self._plain(crop[None])[0] for crop, _ in drawn]
        else:
            views[key] = [crop for crop, _ in drawn]
            views[f"{key}_params"] = [params for _, params in drawn]

    def on_device(self, views: dict[str, Any]) -> dict[str, Any]:
        """Finish the crops of a collated batch of views (device mode; the worker mode's views pass unchanged)."""
        if self.augment_on == "worker":
            return views
        views = dict(views)
        for key in self.augmented_keys:
            crops, params = views[key], views.pop(f"{key}_params")
            if isinstance(crops, torch.Tensor):
                views[key] = finish(crops, params, self.mean, self.std)
                if key in self.plain_keys:
                    views[f"{key}_plain"] = self._plain(crops)
            else:  # every crop of one key has one size: one call for all of them
                finished = finish(torch.cat(crops), torch.cat(params), self.mean, self.std)
                views[key] = list(finished.split(len(crops[0])))
                if key in self.plain_keys:
                    views[f"{key}_plain"] = list(self._plain(torch.cat(crops)).split(len(crops[0])))
        return views


class MultiCropViews(AugmentedViews):
    """Two masked global crops and `num_local` local crops of one image (iBOT's data pipeline)."""

    augmented_keys = ("global", "local")

    def __init__(
        self,
        cfg: MultiCropConfig,
        data: DataInfo,
        grid: tuple[int, int],
        masks: MaskGenerator,
        augment_on: AugmentOn = "worker",
    ) -> None:
        super().__init__(data, augment_on)
        self.global_views = global_augments(cfg)
        self.local_view = multi_crop_augment(cfg, cfg.local_size, cfg.local_scale, cfg.blur_p[2], 0.0)
        self.num_local = cfg.num_local
        self.grid = grid
        """The encoder's token grid of a global crop: masks are drawn on it."""
        self.masks = masks

    def __call__(self, image: torch.Tensor, epoch: int) -> dict[str, list[torch.Tensor]]:
        views: dict[str, Any] = {}
        self._crops(image, self.global_views, "global", views)
        views["masks"] = [self.masks(*self.grid, epoch) for _ in self.global_views]
        self._crops(image, [self.local_view] * self.num_local, "local", views)
        return views

    def contents(self, views: dict[str, list[torch.Tensor]]) -> ViewContents:
        local = views["local"]
        return ViewContents([*views["global"], *local], [*views["masks"], *[None] * len(local)])


class PairedMaskedViews(AugmentedViews):
    """Two augmented crops of one image (the global views of `MultiCropConfig`: MoCo v3 / BYOL augmentations),
    each with a mask for the online network and one for the momentum network (SymMIM's fine and coarse boards)."""

    augmented_keys = ("views",)

    def __init__(
        self,
        cfg: MultiCropConfig,
        data: DataInfo,
        grid: tuple[int, int],
        online: MaskGenerator,
        momentum: MaskGenerator,
        augment_on: AugmentOn = "worker",
        plain: bool = False,
    ) -> None:
        """`plain`: also deliver each crop without its photometric steps (`views_plain`)."""
        super().__init__(data, augment_on)
        self.views = global_augments(cfg)
        self.grid, self.online, self.momentum = grid, online, momentum
        self.plain_keys = ("views",) if plain else ()

    def __call__(self, image: torch.Tensor, epoch: int) -> dict[str, list[torch.Tensor]]:
        views: dict[str, Any] = {}
        self._crops(image, self.views, "views", views)
        views["online_masks"] = [self.online(*self.grid, epoch) for _ in self.views]
        views["momentum_masks"] = [self.momentum(*self.grid, epoch) for _ in self.views]
        return views

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


class MaskedView(AugmentedViews):
    """`{"image": crop, "mask": (h, w) bool}` for one image."""

    augmented_keys = ("image",)

    def __init__(
        self,
        cfg: MaskedViewConfig,
        data: DataInfo,
        grid: tuple[int, int],
        masks: MaskGenerator,
        augment_on: AugmentOn = "worker",
    ) -> None:
        super().__init__(data, augment_on)
        jitter = cfg.color_jitter_p > 0 and any(cfg.color_jitter)
        self.augment = CropAugment(
            cfg.size,
            cfg.scale,
            cfg.flip_p,
            color_jitter=cfg.color_jitter if jitter else None,
            color_jitter_p=cfg.color_jitter_p,
        )
        self.grid = grid
        self.masks = masks

    def __call__(self, image: torch.Tensor, epoch: int) -> dict[str, Any]:
        views: dict[str, Any] = {}
        self._crops(image, [self.augment], "image", views)
        views = {key: value[0] for key, value in views.items()}
        views["mask"] = self.masks(*self.grid, epoch)
        return views

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

    def on_device(self, views: dict[str, Any]) -> dict[str, Any]:
        return self.views.on_device(views)

    def contents(self, views: dict[str, Any]) -> ViewContents:
        return self.views.contents(views)


class EvalView:
    """Deterministic view for features: resize (shorter side to size / 0.875) and centre-crop larger images,
    resize smaller ones, then normalise (or, with `pixels`, keep values in [0, 1]: what tokenizers read)."""

    def __init__(self, data: DataInfo, size: int, crop_ratio: float = 0.875, pixels: bool = False) -> None:
        self.size, self.crop_ratio = size, crop_ratio
        self.crop = v2.CenterCrop(size)
        scale = v2.ToDtype(torch.float32, scale=True)
        self.normalize = scale if pixels else v2.Compose([scale, v2.Normalize(data.mean, data.std)])

    def __call__(self, image: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        return self.normalize(self._geometry(image, BICUBIC))

    def label_map(self, labels: torch.Tensor) -> torch.Tensor:
        """An image's (H, W) label map through the same resize and crop as the image, by nearest neighbour (a
        bicubic one would invent ids between classes): the targets of its view's pixels."""
        resized = self._geometry(labels[None].float(), v2.InterpolationMode.NEAREST_EXACT)
        return resized[0].to(labels.dtype)

    def _geometry(self, image: torch.Tensor, interpolation: v2.InterpolationMode) -> torch.Tensor:
        height, width = image.shape[-2:]
        if (height, width) == (self.size, self.size):
            return image
        side = round(self.size / self.crop_ratio) if min(height, width) > self.size else self.size
        resized = v2.functional.resize(image, side, interpolation=interpolation, antialias=interpolation == BICUBIC)
        return self.crop(resized)
