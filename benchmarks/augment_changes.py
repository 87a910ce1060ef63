"""Each change of the worker's data path (issue 26), before against after in one run, one thread.

Every pair times the torchvision (or older mimkit) way and mimkit's way on the same input, in alternating rounds;
medians over rounds, microseconds per call:

  blur        torchvision's GaussianBlur (2-D depthwise convolution) against the separable shifted sums
  hue         torchvision's adjust_hue (RGB -> HSV -> RGB) against the closed form on the unchanged max and chroma
  jitter      torchvision's ColorJitter on uint8 (rounding after each operation) against mimkit's on float
  to_tensor   the decoded PIL image to a planar tensor (tobytes, bytearray, contiguous) against a channels-last
              view of one numpy copy
  resize      the global crop's antialiased bicubic resize from a planar image against from the channels-last one
  global_view the first global view of the iBOT recipe, whole (crop, flip, jitter, grayscale, blur, normalise):
              torchvision's v2 pipeline against CropAugment.draw + finish

    python benchmarks/augment_changes.py [--rounds 7] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mimkit.data import augment
from mimkit.data.loader import seeded
from mimkit.data.sources.base import pil_to_tensor
from mimkit.data.views import MultiCropConfig, multi_crop_augment
from mimkit.engine.runtime import machine

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(height: int = 375, width: int = 500) -> Image.Image:
    """A smooth RGB image the size of an average ImageNet photo (fixed seed)."""
    low = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    pixels = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic").clamp(0, 1)[0]
    return Image.fromarray((pixels * 255).byte().permute(1, 2, 0).numpy())


def planar(image: Image.Image) -> torch.Tensor:
    """mimkit's decoding before issue 26: three copies, a planar tensor."""
    tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return tensor.view(image.height, image.width, 3).permute(2, 0, 1).contiguous()


def torchvision_view(cfg: MultiCropConfig) -> v2.Compose:
    """The first global view as mimkit built it before issue 26."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(cfg.global_size, scale=cfg.global_scale, interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(cfg.flip_p),
            v2.RandomApply([v2.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p),
            v2.RandomGrayscale(cfg.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(13, sigma=cfg.blur_sigma)], p=cfg.blur_p[0]),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


BICUBIC = v2.InterpolationMode.BICUBIC


def pairs() -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """Each change: (before, after), on the same inputs."""
    image = photo()
    flat, view = planar(image), pil_to_tensor(image)
    crop = TF.resized_crop(view, 40, 60, 300, 320, size=[224, 224], interpolation=BICUBIC, antialias=True)
    x = crop[None].float() / 255
    sigma, kernel = torch.tensor([1.0]), torch.tensor([13.0])
    jitter = v2.ColorJitter(0.4, 0.4, 0.2, 0.1)
    params = torch.tensor([1, 1.2, 0.8, 1.1, 0.05, 3, 1, 0, 2, 0, 0, 0, 0], dtype=torch.float32)[None]
    cfg = MultiCropConfig()
    before_view, after_view = torchvision_view(cfg), multi_crop_augment(cfg, 224, cfg.global_scale, 1.0, 0.0)

    def after_global() -> object:
        with seeded(0, 0, 1):
            cropped, drawn = after_view.draw(view)
            return augment.finish(cropped[None], drawn[None], MEAN, STD)

    def before_global() -> object:
        with seeded(0, 0, 1):
            return before_view(flat)

    def resize(source: torch.Tensor) -> Callable[[], object]:
        return lambda: TF.resized_crop(source, 40, 60, 300, 320, size=[224, 224], interpolation=BICUBIC, antialias=True)

    return {
        "blur": (
            lambda: TF.gaussian_blur(x, [13, 13], [1.0, 1.0]),
            lambda: augment.gaussian_blur(x, sigma, kernel),
        ),
        "hue": (lambda: TF.adjust_hue(x, 0.05), lambda: augment.adjust_hue(x, torch.tensor([0.05]))),
        "jitter": (lambda: jitter(crop), lambda: augment._jitter(x.clone(), params)),
        "to_tensor": (lambda: planar(image), lambda: pil_to_tensor(image)),
        "resize": (resize(flat), resize(view)),
        "global_view": (before_global, after_global),
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="calls per round and side")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = pairs()
        times: dict[str, dict[str, list[float]]] = {name: {"before": [], "after": []} for name in cases}
        for round_index in range(args.rounds):
            for name, (before, after) in cases.items():
                sides = [("before", before), ("after", after)]
                for side, call in sides if round_index % 2 == 0 else sides[::-1]:
                    call()
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        call()
                    times[name][side].append((time.perf_counter() - start) / args.calls * 1e6)
    finally:
        torch.set_num_threads(threads)
    rows = {name: {side: statistics.median(values) for side, values in sides.items()} for name, sides in times.items()}
    lines = ["| change | before µs | after µs | after / before |", "|---|--:|--:|--:|"]
    lines += [
        f"| {n} | {r['before']:.0f} | {r['after']:.0f} | {r['after'] / r['before']:.2f}x |" for n, r in rows.items()
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "augment_changes.json"
    path.write_text(json.dumps({"machine": machine(), "rounds": args.rounds, "us_per_call": rows, "raw": times}))
    print(f"{machine()['cpu']}, one thread, medians of {args.rounds} rounds\n" + "\n".join(lines))
    return path


if __name__ == "__main__":
    main()
