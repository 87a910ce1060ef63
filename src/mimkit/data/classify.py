"""The training view of supervised fine-tuning and augmented linear probing: timm's ImageNet training transform
(random resized crop, flip, RandAugment, random erasing: what MAE's and BEiT's fine-tuning build with timm's
`create_transform`), then per-image mixup / CutMix with a partner image, and the uniforms of seeded drop path.

Everything random is drawn in the worker under the image's seed, so a batch is the same whatever the number of
processes and workers, and a resumed run sees the batches the uninterrupted one saw. timm's RandAugment draws
from numpy's global generator, which the loader seeds per image too. Images of one channel go through
RandAugment as grey RGB (its fill colours are RGB) and come back as one channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mimkit.config import check
from mimkit.data.info import DataInfo
from mimkit.data.mixing import MixConfig, draw_mix, draw_partner, mix_images
from mimkit.data.views import ViewContents

NO_PARTNER = -1
"""`partner_label` of an image that was not mixed."""


@dataclass
class ClassifyViewConfig:
    """The training augmentation (defaults: MAE's and BEiT's ViT fine-tuning on ImageNet)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    """timm's RandAugment spec ("": none)."""
    erase_prob: float = 0.25
    """Random erasing (timm's, per-pixel random values, one box): chance per image."""
    mix: MixConfig = field(default_factory=MixConfig)

    def validate(self, prefix: str) -> None:
        low, high = self.crop_scale
        check(0 < low <= high <= 1, f"{prefix}.crop_scale", f"needs 0 < min <= max <= 1; got {self.crop_scale}")
        check(0 <= self.flip_p <= 1, f"{prefix}.flip_p", f"must lie in [0, 1]; got {self.flip_p}")
        check(0 <= self.erase_prob <= 1, f"{prefix}.erase_prob", f"must lie in [0, 1]; got {self.erase_prob}")
        check(
            self.rand_augment == "" or self.rand_augment.startswith("rand-"),
            f"{prefix}.rand_augment",
            f"must be a timm RandAugment spec such as rand-m9-mstd0.5-inc1, or empty; got {self.rand_augment!r}",
        )
        self.mix.validate(f"{prefix}.mix")


class ClassifyViews:
    """One training image -> {"image", "partner_label", "lam", "drops"}; a partner image when mixing (the loader's
    paired-views protocol: `partner` names it, `with_partner` mixes it in)."""

    def __init__(self, data: DataInfo, size: int, cfg: ClassifyViewConfig, drops: int) -> None:
        self.channels, self.size, self.cfg, self.drops = data.channels, size, cfg, drops
        mean = data.mean * 3 if len(data.mean) == 1 else data.mean
        steps: list[Any] = [
            RandomResizedCropAndInterpolation(size, scale=cfg.crop_scale, interpolation="bicubic"),
            v2.RandomHorizontalFlip(cfg.flip_p),
        ]
        if cfg.rand_augment:
            hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
            steps.append(rand_augment_transform(cfg.rand_augment, hparams))
        self.pil_steps = v2.Compose(steps)
        self.normalize = v2.Normalize(data.mean, data.std)
        self.erase = RandomErasing(cfg.erase_prob, mode="pixel", max_count=1, device="cpu") if cfg.erase_prob else None

    def _augment(self, image: torch.Tensor) -> torch.Tensor:
        pil = F.to_pil_image(image if image.shape[0] == 3 else image[:1].expand(3, -1, -1))
        out = F.pil_to_tensor(self.pil_steps(pil))[: self.channels].float().div_(255)
        out = self.normalize(out)
        return self.erase(out) if self.erase is not None else out

    def _views(self, image: torch.Tensor, partner_label: int, lam: float) -> dict[str, Any]:
        return {"image": image, "partner_label": partner_label, "lam": lam, "drops": torch.rand(self.drops)}

    def __call__(self, image: torch.Tensor, epoch: int) -> dict[str, Any]:
        return self._views(self._augment(image), NO_PARTNER, 1.0)

    def partner(self, num_images: int) -> int | None:
        """The image this one is mixed with (None: mixing is off), drawn first under the image's seed."""
        return draw_partner(num_images) if self.cfg.mix.enabled else None

    def with_partner(self, image: torch.Tensor, epoch: int, partner: tuple[torch.Tensor, int] | None) -> Any:
        """The views of `image` mixed with the augmented `partner` (image, label); unmixed when the partner could
        not be read (None)."""
        view = self._augment(image)
        if partner is None:
            return self._views(view, NO_PARTNER, 1.0)
        mix = draw_mix(self.cfg.mix, self.size, self.size)
        other = self._augment(partner[0])
        if mix.lam == 1.0 and mix.box is None:
            return self._views(view, NO_PARTNER, 1.0)
        return self._views(mix_images(view, other, mix), partner[1], mix.lam)

    def contents(self, views: dict[str, Any]) -> ViewContents:
        return ViewContents([views["image"]], [None], ["training view"])

    def on_device(self, views: Any) -> Any:
        """Nothing is left for the device: RandAugment works on PIL images, so the workers do all of it."""
        return views
