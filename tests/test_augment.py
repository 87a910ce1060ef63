"""The split augmentation (`mimkit.data.augment`): draws like torchvision's v2 pipeline, each operation equal to
torchvision's on the same parameters, batched equal to per image, and the two `data.augment_on` modes giving the
same views."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mimkit.data import augment
from mimkit.data.augment import CropAugment, finish
from mimkit.data.info import DataInfo
from mimkit.data.loader import collate, seeded
from mimkit.data.masking import MaskConfig, MaskGenerator
from mimkit.data.views import (
    MaskedView,
    MaskedViewConfig,
    MultiCropConfig,
    MultiCropViews,
    PairedMaskedViews,
    SeededViews,
    resolve_augment_on,
)

RGB = DataInfo("synthetic", 3, 8, (60, 80), 4, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BICUBIC = v2.InterpolationMode.BICUBIC
GRAY = DataInfo("synthetic", 1, 8, (60, 80), 4, (0.5,), (0.25,))


def photo(seed: int, channels: int = 3, size: tuple[int, int] = (60, 80)) -> torch.Tensor:
    """A smooth uint8 image with saturated and gray regions (hue and saturation both matter)."""
    low = torch.rand(1, channels, 6, 8, generator=torch.Generator().manual_seed(seed))
    image = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)[0]
    return (image * 255).round().to(torch.uint8)


def float_image(seed: int, batch: int = 1) -> torch.Tensor:
    return torch.stack([photo(seed + i).float() / 255 for i in range(batch)])


def factor(value: float) -> torch.Tensor:
    return torch.tensor([value]).view(-1, 1, 1, 1)


# each operation against torchvision's on float images and the same parameter
@pytest.mark.parametrize(
    ("ours", "theirs", "value"),
    [
        (augment.adjust_brightness, TF.adjust_brightness, 1.3),
        (augment.adjust_contrast, TF.adjust_contrast, 0.7),
        (augment.adjust_saturation, TF.adjust_saturation, 1.4),
        (augment.adjust_saturation, TF.adjust_saturation, 0.0),
    ],
)
def test_jitter_operations_equal_torchvisions(ours: Any, theirs: Any, value: float) -> None:
    x = float_image(0)
    assert torch.allclose(ours(x.clone(), factor(value)), theirs(x, value), atol=1e-6)


@pytest.mark.parametrize("shift", [-0.5, -0.23, 0.04, 0.1, 0.5])
def test_hue_equals_torchvisions_hsv_round_trip(shift: float) -> None:
    x = float_image(1)
    x[..., :4, :4] = 0.5  # gray pixels: no hue
    assert torch.allclose(augment.adjust_hue(x, torch.tensor([shift])), TF.adjust_hue(x, shift), atol=2e-6)


def test_grayscale_and_solarize_equal_torchvisions() -> None:
    x = float_image(2)
    assert torch.allclose(augment.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6)
    uint8 = photo(2)
    assert torch.equal((augment.solarize(uint8.float() / 255) * 255).round(), TF.solarize(uint8, 128).float())


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
@pytest.mark.parametrize("kernel", [13, 7])
def test_separable_blur_equals_torchvisions_gaussian_blur(sigma: float, kernel: int) -> None:
    x = float_image(3)
    ours = augment.gaussian_blur(x, torch.tensor([sigma]), torch.tensor([float(kernel)]))
    assert torch.allclose(ours, TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma]), atol=1e-6)


# batched equals one image at a time
def drawn_params(augmenter: CropAugment, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    crops, params = [], []
    for i, image in enumerate(images):
        with seeded(7, 0, i):
            crop, p = augmenter.draw(image)
        crops.append(crop)
        params.append(p)
    return torch.stack(crops), torch.stack(params)


IBOT = MultiCropConfig(global_size=32, local_size=16, global_scale=(0.3, 1.0), local_scale=(0.1, 0.3))


@pytest.mark.parametrize("solarize_p", [0.0, 0.5])
@pytest.mark.parametrize("blur_p", [0.0, 0.5, 1.0])
def test_batched_finish_equals_finish_of_each_image(blur_p: float, solarize_p: float) -> None:
    from mimkit.data.views import multi_crop_augment

    augmenter = multi_crop_augment(IBOT, 32, IBOT.global_scale, blur_p, solarize_p)
    crops, params = drawn_params(augmenter, [photo(i) for i in range(12)])
    assert len({tuple(p[augment.ORDER : augment.ORDER + 4].tolist()) for p in params}) > 1  # orders differ
    batched = finish(crops, params, RGB.mean, RGB.std)
    one_by_one = torch.cat([finish(c[None], p[None], RGB.mean, RGB.std) for c, p in zip(crops, params, strict=True)])
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_blur_kernels_of_two_sizes_in_one_batch() -> None:
    x = float_image(4, batch=2)
    out = augment.gaussian_blur(x, torch.tensor([1.0, 1.5]), torch.tensor([7.0, 13.0]))
    assert torch.allclose(out[0], TF.gaussian_blur(x[0], [7, 7], [1.0, 1.0]), atol=1e-6)
    assert torch.allclose(out[1], TF.gaussian_blur(x[1], [13, 13], [1.5, 1.5]), atol=1e-6)


# the draws are torchvision's
def torchvision_pipeline(cfg: MultiCropConfig, blur_p: float, solarize_p: float) -> v2.Compose:
    """What mimkit's multi-crop views were before the split: torchvision v2 transforms on uint8."""
    kernel = min(2 * 6 + 1, cfg.global_size - 1 + cfg.global_size % 2)
    return v2.Compose(
        [
            v2.RandomResizedCrop(cfg.global_size, scale=cfg.global_scale, interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(cfg.flip_p),
            v2.RandomApply([v2.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p),
            v2.RandomGrayscale(cfg.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=cfg.blur_sigma)], p=blur_p),
            v2.RandomSolarize(threshold=128, p=solarize_p),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def test_crops_and_flips_are_torchvisions_bit_for_bit() -> None:
    ours = CropAugment(32, (0.2, 1.0), 0.5)
    theirs = v2.Compose(
        [
            v2.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(0.5),
        ]
    )
    for index in range(20):
        image = photo(index)
        with seeded(1, 0, index):
            crop, _ = ours.draw(image)
        with seeded(1, 0, index):
            assert torch.equal(crop, theirs(image))


def test_pipeline_matches_torchvisions_up_to_uint8_rounding() -> None:
    """Same seed, same parameters: what is left is torchvision rounding to uint8 after every operation. Statistic:
    the mean absolute difference per image, in uint8 levels, stays below 3 (a different draw is tens of levels)."""
    from mimkit.data.views import multi_crop_augment

    for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2)):
        ours = multi_crop_augment(IBOT, 32, IBOT.global_scale, blur_p, solarize_p)
        theirs = torchvision_pipeline(IBOT, blur_p, solarize_p)
        for index in range(30):
            image = photo(index, size=(120, 160))
            with seeded(2, 0, index):
                crop, params = ours.draw(image)
            with seeded(2, 0, index):
                expected = theirs(image)
            got = finish(crop[None], params[None], (0.0,) * 3, (1.0,) * 3)[0]
            assert (got - expected).abs().mean() * 255 < 3, (index, params)


# the two modes of data.augment_on
def views_of_every_kind(augment_on: str) -> dict[str, Any]:
    mask = MaskGenerator(MaskConfig())
    return {
        "multi-crop": MultiCropViews(IBOT, RGB, (4, 4), mask, augment_on),  # type: ignore[arg-type]
        "multi-crop 1 channel": MultiCropViews(IBOT, GRAY, (4, 4), mask, augment_on),  # type: ignore[arg-type]
        "paired": PairedMaskedViews(IBOT, RGB, (4, 4), mask, mask, augment_on),  # type: ignore[arg-type]
        "paired with plain crops": PairedMaskedViews(IBOT, RGB, (4, 4), mask, mask, augment_on, plain=True),  # type: ignore[arg-type]
        "masked": MaskedView(MaskedViewConfig(size=32), RGB, (4, 4), mask, augment_on),  # type: ignore[arg-type]
        "seeded": SeededViews(MaskedView(MaskedViewConfig(size=32), RGB, (4, 4), mask, augment_on)),  # type: ignore[arg-type]
    }


def batch(views: Any, channels: int) -> dict[str, Any]:
    samples = []
    for index in range(6):
        with seeded(3, 1, index):
            samples.append((views(photo(index, channels), 1), 0, index))
    return views.on_device(collate(samples)["views"])


@pytest.mark.parametrize("kind", sorted(views_of_every_kind("worker")))
def test_device_mode_gives_the_worker_modes_views(kind: str) -> None:
    channels = 1 if "1 channel" in kind else 3
    worker = batch(views_of_every_kind("worker")[kind], channels)
    device = batch(views_of_every_kind("device")[kind], channels)
    assert device.keys() == worker.keys()
    for key, value in worker.items():
        values = value if isinstance(value, list) else [value]
        others = device[key] if isinstance(device[key], list) else [device[key]]
        for a, b in zip(values, others, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.allclose(a.float(), b.float(), atol=1e-4), key


def test_plain_crops_are_the_augmented_crops_before_their_photometric_steps() -> None:
    """The same draws with and without plain crops; the plain one is the crop and flip, normalised: equal to the
    augmented view where no photometric step applied (IBOT's first view is always blurred, so it differs)."""
    views = batch(views_of_every_kind("worker")["paired with plain crops"], 3)
    plain_free = batch(views_of_every_kind("worker")["paired"], 3)
    assert all(torch.equal(a, b) for a, b in zip(views["views"], plain_free["views"], strict=True))
    first, first_plain = views["views"][0], views["views_plain"][0]
    assert first.shape == first_plain.shape and not torch.allclose(first, first_plain)
    device = views_of_every_kind("device")["paired with plain crops"]
    samples = []
    for index in range(6):
        with seeded(3, 1, index):
            samples.append((device(photo(index, 3), 1), 0, index))
    crops = collate(samples)["views"]["views"][0]  # uint8, before the device finishes them
    expected = (crops.float() / 255 - torch.tensor(RGB.mean).view(1, 3, 1, 1)) / torch.tensor(RGB.std).view(1, 3, 1, 1)
    assert torch.allclose(first_plain, expected, atol=1e-5)


def test_device_mode_workers_send_uint8_crops_and_parameters() -> None:
    views = views_of_every_kind("device")["multi-crop"]
    with seeded(0, 0, 0):
        out = views(photo(0), 0)
    assert all(crop.dtype == torch.uint8 for crop in out["global"] + out["local"])
    assert [p.shape for p in out["global_params"]] == [(augment.NUM_PARAMS,)] * 2


def test_augment_on_setting() -> None:
    assert resolve_augment_on("auto", "cuda") == ("device", None)
    assert resolve_augment_on("auto", "cpu") == ("worker", None)
    mode, notice = resolve_augment_on("device", "cpu")
    assert mode == "device" and notice is not None and "batched in the training process" in notice
    with pytest.raises(ValueError, match="auto, worker, device"):
        resolve_augment_on("gpu", "cuda")
