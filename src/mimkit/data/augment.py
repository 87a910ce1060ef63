"""One crop's augmentation split in two: `CropAugment.draw` (in a DataLoader worker: every random draw, the crop, the
flip) and `finish` (colour jitter, grayscale, blur, solarization, normalisation on a batch, each image with its own
drawn parameters).

The worker path runs `finish` on a batch of one image; `data.augment_on=device` runs it once per batch on the
accelerator. Both use this one function, so the two modes differ only by float rounding.

The draws consume torch's generator in exactly the order torchvision's v2 pipeline (RandomResizedCrop,
RandomHorizontalFlip, RandomApply(ColorJitter), RandomGrayscale, RandomApply(GaussianBlur), RandomSolarize) does,
so a seed gives the same crop boxes, flips and parameters as that pipeline. The operations run in float on [0, 1]
instead of rounding to uint8 after each one, so the pixels differ from torchvision's by that rounding only
(tests/test_augment.py measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
"""ITU-R 601 luma, as torchvision and PIL."""
SOLARIZE_THRESHOLD = 128 / 255

JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER, GRAY, SIGMA, KERNEL, SOLARIZE = 0, 1, 2, 3, 4, 5, 9, 10, 11, 12
NUM_PARAMS = 13
"""Layout of one crop's parameter vector: jitter applied (0/1), its four factors (neutral when not drawn), the order
of the four jitter operations (4 slots), grayscale (0/1), blur sigma (0: no blur) and kernel size, solarize (0/1)."""
NOTHING_APPLIED = (0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0)
"""The parameter vector of a crop that no photometric step touches (neutral factors, torchvision's default order)."""


@dataclass(frozen=True)
class CropAugment:
    """A random-resized crop with a flip, then the DINO/BYOL photometric augmentations, each optional.

    `None` leaves a step out of the pipeline (no random number is drawn for it); a probability of 0 keeps it in
    (its coin is still tossed), as in torchvision. Colour steps apply to 3-channel images only."""

    size: int
    scale: tuple[float, float]
    flip_p: float
    color_jitter: tuple[float, float, float, float] | None = None
    """Brightness, contrast, saturation, hue strengths (ColorJitter's arguments)."""
    color_jitter_p: float = 1.0
    grayscale_p: float | None = None
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float | None = None
    solarize_p: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_crop", v2.RandomResizedCrop(self.size, scale=self.scale, antialias=True))
        ranges = None
        if self.color_jitter is not None:
            jitter = v2.ColorJitter(*self.color_jitter)  # its checks and its (low, high) ranges, None when 0
            ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        object.__setattr__(self, "_jitter_ranges", ranges)

    @property
    def kernel_size(self) -> int:
        """torchvision's kernel for the largest sigma, capped by the crop (an odd size below it)."""
        return min(2 * math.ceil(3 * self.blur_sigma[1]) + 1, self.size - 1 + self.size % 2)

    def draw(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 crop (C, size, size) of `image` (C, H, W uint8) and its parameter vector (NUM_PARAMS,)."""
        box = self._crop.make_params([image])  # type: ignore[attr-defined]
        top, left, height, width = box["top"], box["left"], box["height"], box["width"]
        region = image[None, :, top : top + height, left : left + width]
        # torchvision's resized_crop on uint8 (its native bicubic path), without its dispatch: 15 us a crop
        if (height, width) == (self.size, self.size):
            crop = region[0]  # as torchvision: no resampling at the same size
        else:
            crop = F.interpolate(region, size=[self.size] * 2, mode="bicubic", align_corners=False, antialias=True)[0]
        if torch.rand(1) < self.flip_p:
            crop = crop.flip(-1)
        params = list(NOTHING_APPLIED)
        rgb = image.shape[-3] == 3
        ranges = self._jitter_ranges  # type: ignore[attr-defined]
        if rgb and ranges is not None and torch.rand(1) < self.color_jitter_p:
            params[JITTER] = 1.0
            params[ORDER : ORDER + 4] = torch.randperm(4).tolist()
            for slot, bounds in zip((BRIGHTNESS, CONTRAST, SATURATION, HUE), ranges, strict=True):
                if bounds is not None:
                    params[slot] = float(torch.empty(1).uniform_(bounds[0], bounds[1]).item())
        if rgb and self.grayscale_p is not None and torch.rand(1) < self.grayscale_p:
            params[GRAY] = 1.0
        if self.blur_p is not None and torch.rand(1) < self.blur_p:
            params[SIGMA] = torch.empty(1).uniform_(self.blur_sigma[0], self.blur_sigma[1]).item()
            params[KERNEL] = self.kernel_size
        if self.solarize_p is not None and torch.rand(1) < self.solarize_p:
            params[SOLARIZE] = 1.0
        return crop, torch.tensor(params)


def finish(crops: torch.Tensor, params: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Photometric augmentation and normalisation of uint8 crops (B, C, H, W), image i with `params[i]`: float32
    on the crops' device."""
    x = crops.contiguous().float().div_(255)  # a resized uint8 crop may come channels-last: slow convolutions
    params = params.to(x.device, torch.float32)
    x = _finish_one(x, params[0].tolist()) if len(x) == 1 else _finish_batch(x, params)
    scale = torch.tensor([1 / s for s in std], device=x.device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=x.device).view(1, -1, 1, 1)
    return torch.addcmul(shift, x, scale)  # (x - mean) / std in one pass


def _finish_one(x: torch.Tensor, p: list[float]) -> torch.Tensor:
    """One image (the worker path): the same operations as `_finish_batch`, chosen in Python instead of by masks,
    which costs more than the operations on a small crop."""
    if x.shape[1] == 3:
        if p[JITTER]:
            for op in p[ORDER : ORDER + 4]:
                slot, fn = _JITTER_OPS[int(op)]
                if slot != HUE or p[HUE] != 0:  # hue 0: not drawn, left out as torchvision does
                    x = fn(x, torch.tensor(p[slot], device=x.device).view(1, 1, 1, 1))
        if p[GRAY]:
            x = grayscale(x).expand(-1, 3, -1, -1).contiguous()
    if p[SIGMA]:
        x = gaussian_blur(x, torch.tensor([p[SIGMA]], device=x.device), torch.tensor([p[KERNEL]], device=x.device))
    return solarize(x) if p[SOLARIZE] else x


def _finish_batch(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        x = _jitter(x, params)
        gray = params[:, GRAY] > 0
        if gray.any():
            x[gray] = grayscale(x[gray]).expand(-1, 3, -1, -1)
    blurred = params[:, SIGMA] > 0
    if blurred.any():
        x[blurred] = gaussian_blur(x[blurred], params[blurred, SIGMA], params[blurred, KERNEL])
    solarized = params[:, SOLARIZE] > 0
    if solarized.any():
        x[solarized] = solarize(x[solarized])
    return x


def _jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ColorJitter with each image's own factors and order of operations."""
    jittered = params[:, JITTER] > 0
    if not jittered.any():
        return x
    for position in range(4):
        operation = params[:, ORDER + position]
        for op, (slot, fn) in enumerate(_JITTER_OPS):
            chosen = jittered & (operation == op)
            if slot == HUE:
                chosen &= params[:, HUE] != 0  # not drawn (hue 0): left out, as torchvision does
            if chosen.any():
                x[chosen] = fn(x[chosen], params[chosen, slot].view(-1, 1, 1, 1))
    return x


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of RGB images (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend towards the mean luma (the luma of the channel means: one reduction, no luma image)."""
    mean = grayscale(x.mean(dim=(2, 3), keepdim=True))
    return torch.lerp(mean, x, factor).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return torch.lerp(grayscale(x), x, factor).clamp_(0, 1)


_HUE_CHANNEL_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` (a fraction of the circle) keeping saturation and value.

    Value (max) and chroma (max - min) do not change with the hue, so the output is each channel's
    `max - chroma * clamp(min(k, 4 - k), 0, 1)` with `k = (n + 6 * hue) mod 6` (n = 5, 3, 1 for R, G, B): the
    closed form of HSV -> RGB, without building the HSV image."""
    r, g, b = x.unbind(1)
    high = torch.maximum(torch.maximum(r, g), b)  # elementwise: a reduction over dim 1 is 30x slower on a CPU
    chroma = high - torch.minimum(torch.minimum(r, g), b)
    safe = chroma.clamp(min=1e-12)  # gray pixels: every difference below is 0, and so is their sector
    sector = torch.where(
        high == r, (g - b) / safe, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )  # 6 * hue, in [-1, 5)
    k = _HUE_CHANNEL_OFFSETS.to(x.device) + (sector + 6 * shift.view(-1, 1, 1)).unsqueeze(1)
    k = k - 6 * torch.floor(k / 6)  # mod 6 (torch.remainder is several times slower)
    return high.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


_JITTER_OPS = (
    (BRIGHTNESS, adjust_brightness),
    (CONTRAST, adjust_contrast),
    (SATURATION, adjust_saturation),
    (HUE, adjust_hue),
)
"""ColorJitter's operations by their index in its order (`fn_idx`): the parameter slot of each one's factor."""


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders, image i with its own sigma and (odd) kernel size: the same
    kernel as torchvision's GaussianBlur, applied as a row pass and a column pass of shifted multiply-adds (on a
    CPU, oneDNN's depthwise convolution is 5-15x slower for these one-row kernels)."""
    size = int(kernel_size.max().item())
    half = size // 2
    taps = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype).view(1, -1)
    weights = torch.exp(-0.5 * (taps / sigma.view(-1, 1).to(x.dtype)) ** 2)
    weights = weights * (taps.abs() <= (kernel_size.view(-1, 1) // 2))  # a smaller kernel: zeros beyond its half
    weights = (weights / weights.sum(dim=1, keepdim=True)).view(-1, size, 1, 1, 1).unbind(1)
    rows = _shifted_sum(F.pad(x, [half, half, 0, 0], mode="reflect"), weights, dim=3)
    return _shifted_sum(F.pad(rows, [0, 0, half, half], mode="reflect"), weights, dim=2)


def _shifted_sum(padded: torch.Tensor, weights: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
    """sum_i weights[i] * padded shifted by i along `dim` (the padding trimmed)."""
    length = padded.shape[dim] - len(weights) + 1
    out = padded.narrow(dim, 0, length) * weights[0]
    for shift, weight in enumerate(weights[1:], start=1):
        out.addcmul_(padded.narrow(dim, shift, length), weight)
    return out


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)
