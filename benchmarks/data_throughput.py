"""CPU cost of the data path of every ImageNet and image-folder recipe: per image in one worker, through the
DataLoader, and as CPU cores per GPU (issue 26).

For each shipped recipe (`src/mimkit/configs/<method>/*imagenet*.yaml` and `*imagefolder*.yaml`) the method is built
from the recipe, with a stand-in where the recipe needs files a user may not have (`STAND_INS`: they replace a
teacher or tokenizer and keep the views and the token grid). On a folder of ImageNet-like JPEGs (generated with a
fixed seed, or `--folder`), and on tar shards of the same files (`mimkit data shard`'s writer), one thread times:

  decode        the source's `load` of each image (file or shard member -> uint8 tensor)
  worker        what a DataLoader worker does per image, `ViewDataset[(epoch, index)]`: decode, the method's views
                and masks, with `augment_on="worker"` (the whole augmentation in the worker)
  device        the same with `augment_on="device"`: the worker decodes, crops, flips and draws the parameters
  device part   `views.on_device` of a collated batch of device-mode views (colour, blur, solarization,
                normalisation, batched), on `--device` (default this CPU; on a GPU, `--device cuda`: the batch is
                copied there first and the clock stops after a `torch.cuda.synchronize`)
  official      with --reference PATH (iBOT recipes): the official code's `ImageFolderMask` + `DataAugmentationiBOT`
                at the recipe's settings on the same files (benchmarks/reference/ibot_official_data.py)

Rounds alternate all of these (the order reversed every other round), so the machine's drift hits them alike; a
round's figure is its mean ms per image over all images, the reported one the median over rounds. Then mimkit's
`train_loader` on the image folder gives end-to-end images/s with each --workers count in both modes (each batch is
copied to `--device` and `on_device` runs there, in the main process, as in training; an epoch has at least two
batches per worker, so that every worker is busy), and each worker-side cost becomes the cores one GPU needs to be
fed at a few published per-GPU throughputs (`PUBLISHED`): a per-core extrapolation.

    python benchmarks/data_throughput.py
    python benchmarks/data_throughput.py --reference ~/src/ibot --rounds 3
    python benchmarks/data_throughput.py --folder /data/imagenet/train --images 256 --workers 1,2,8
    python benchmarks/data_throughput.py --device cuda --workers 1,4,8,16 --recipes ibot/vit_small_imagenet
    python benchmarks/data_throughput.py --device cuda --workers 1,4,8,16 --recipes dtm/vit_small_imagefolder --append
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image, ImageDraw, ImageFilter

from mimkit.config import to_dict
from mimkit.data.config import DataConfig
from mimkit.data.loader import ViewDataset, collate, train_loader
from mimkit.data.shards import write_shards
from mimkit.data.sources import ImageSource, build_source
from mimkit.data.sources.base import Subset
from mimkit.data.sources.imagefolder import ImageFolderSource
from mimkit.engine.checkpoint import package_versions
from mimkit.engine.runtime import machine
from mimkit.methods.base import Method, method_class
from mimkit.models.tokenizers.files import save_tokenizer
from mimkit.models.tokenizers.kmeans import KMeansTokenizer
from mimkit.runs import RunConfig, load_run_config

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/reference, also when this file is imported by path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "mimkit" / "configs"  # the shipped recipes (configs/ links here)
RECIPE_PATTERNS = ("*imagenet*.yaml", "*imagefolder*.yaml")
SOURCES = ("imagefolder", "shards")
MODES = ("worker", "device")
JPEG_QUALITY = 90
IMAGE_SEED = 0

STAND_INS: dict[str, tuple[str, ...]] = {
    # DTM's CLIP teacher needs OpenAI's weights file: an EMA teacher of the student's shape stands in (the targets'
    # network changes; the views and the token grid, the student's, do not)
    "dtm/vit_base_clip_imagenet": (
        "method.teacher.kind=ema",
        "method.teacher.model=null",
        "method.teacher.weights=null",
        "method.teacher.checkpoint=null",
        "method.teacher.model_args={}",
    ),
    # CIM reads its tokenizer from a file (DALL-E's, or one fitted on ImageNet / the folder before training): an
    # unfitted 16-code k-means tokenizer file written here stands in. The token grid is the enhancer's image size
    # over `method.token_patch` (or its patch size), not the tokenizer's, so the views and masks are unchanged.
    "cim/vit_base_imagenet_respix": ("method.tokenizer={tokenizer}", "method.tokenizer_recipe=null"),
    "cim/resnet50_imagenet_respix": ("method.tokenizer={tokenizer}", "method.tokenizer_recipe=null"),
    "cim/resnet_imagefolder_respix": (
        "method.tokenizer={tokenizer}",
        "method.tokenizer_recipe=null",
        "method.tokenizer_overrides=[]",
    ),
}
"""Recipe -> the overrides that let it build without files the user has to provide; `{tokenizer}` is the stand-in
tokenizer file. Only the views are timed, so these change nothing that is measured."""
STAND_IN_TOKENIZER = "STAND_IN_TOKENIZER"
"""How the report names the stand-in tokenizer file (an unfitted 16-code k-means tokenizer, 8-px patches, RGB,
written to the benchmark's temporary folder; the JSON's `overrides` hold its real path)."""

REFERENCES = {"ibot": "reference.ibot_official_data"}
"""Method -> the adapter that builds its official data path from a checkout (`--reference`)."""

PUBLISHED: list[tuple[str, float, str]] = [
    # stable-pretraining (github.com/galilai-group/stable-pretraining), as quoted in issue 26: ViT-S, two views,
    # one H200, the augmentation in CPU DataLoader workers
    ("ViT-S 2 views, CPU aug., H200", 342.0, "stable-pretraining, CPU-side augmentation (issue 26)"),
    # the same setting with the augmentation on the GPU
    ("ViT-S 2 views, GPU aug., H200", 871.0, "stable-pretraining, GPU-side augmentation (issue 26)"),
    # a round figure for a fast per-GPU step
    ("round figure", 1000.0, "a round 1000 images/s per GPU"),
]
"""(label, images/s per GPU, where the figure comes from): the throughputs the cores-per-GPU table is computed for."""


# ---------------------------------------------------------------------------------------------------
# Images: ImageNet-like JPEGs, generated with a fixed seed, or a sample of the user's folder


def image_size(rng: np.random.Generator, side: int) -> tuple[int, int]:
    """(width, height) around ImageNet's typical 500 x 375: mostly landscape 4:3 or 3:2, some portrait and square."""
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3], p=[0.5, 0.15, 0.1, 0.15, 0.1])
    long_side = round(side * rng.uniform(0.85, 1.15))
    short_side = round(long_side / max(aspect, 1 / aspect))
    return (long_side, short_side) if aspect >= 1 else (short_side, long_side)


def _upsampled(rng: np.random.Generator, cells: tuple[int, int], size: tuple[int, int], channels: int) -> np.ndarray:
    """Uniform noise on a coarse grid of `cells` (rows, columns), resized bicubically to `size` (width, height)."""
    coarse = rng.uniform(0, 255, (*cells, channels)).astype(np.uint8).squeeze(-1 if channels == 1 else ())
    return np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), np.float32)


def imagenet_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: smooth colour fields at several scales, a colour gradient, a few shapes with edges,
    and grain whose strength varies over the image (textured and flat regions), so that its JPEG size (about 100 KB
    at 500 x 375, quality 90) and decoding cost are those of a photograph rather than of flat noise or a flat field."""
    canvas = np.zeros((height, width, 3), np.float32)
    weights = ((3, 1.0), (12, 0.6), (48, 0.4), (160, 0.3))
    for columns, weight in weights:
        rows = max(2, round(columns * height / width))
        canvas += weight * _upsampled(rng, (rows, columns), (width, height), 3)
    canvas /= sum(weight for _, weight in weights)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = (math.cos(angle) * xs / width + math.sin(angle) * ys / height)[..., None]
    canvas += ramp * rng.uniform(-80, 80, 3)
    image = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        box = [x0, y0, x0 + rng.uniform(10, width / 2), y0 + rng.uniform(10, height / 2)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    texture = _upsampled(rng, (3, 4), (width, height), 1)[..., None] / 255
    grain = rng.uniform(20, 55) * texture * rng.normal(0, 1, (height, width, 1)) + rng.normal(0, 3, (height, width, 3))
    return Image.fromarray((np.asarray(image, np.float32) + grain).clip(0, 255).astype(np.uint8))


def generate_images(folder: Path, count: int, side: int, seed: int = IMAGE_SEED, classes: int = 4) -> list[Path]:
    """`count` ImageNet-like JPEGs (quality 90) in `classes` class folders under `folder`; the same bytes for the
    same arguments."""
    rng = np.random.default_rng(seed)
    files = []
    for index in range(count):
        width, height = image_size(rng, side)
        path = folder / f"class_{index % classes}" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        imagenet_like(rng, width, height).save(path, "JPEG", quality=JPEG_QUALITY)
        files.append(path)
    return files


def link_images(user_folder: Path, folder: Path, count: int) -> list[Path]:
    """`count` images spread evenly over the user's image folder (its training split, as mimkit reads it), linked
    into one class folder under `folder`, so that mimkit and the reference read the same files in the same order."""
    source = ImageFolderSource(DataConfig(source="imagefolder", root=str(user_folder)), "train")
    chosen = [source.files[i * len(source.files) // count] for i in range(min(count, len(source.files)))]
    (folder / "all").mkdir(parents=True, exist_ok=True)
    links = []
    for index, path in enumerate(chosen):
        link = folder / "all" / f"{index:06d}{path.suffix.lower()}"
        link.symlink_to(path.resolve())
        links.append(link)
    return links


def describe_images(files: Sequence[Path]) -> dict[str, Any]:
    sizes = []
    for path in files:
        with Image.open(path) as image:
            sizes.append(list(image.size))
    kib = [path.stat().st_size / 1024 for path in files]
    return {
        "count": len(files),
        "sizes": sizes,
        "median_width": statistics.median(w for w, _ in sizes),
        "median_height": statistics.median(h for _, h in sizes),
        "mean_kib": statistics.fmean(kib),
    }


# ---------------------------------------------------------------------------------------------------
# Recipes: the method's views in each mode, on each source


def shipped_recipes() -> list[str]:
    """Every ImageNet and image-folder recipe of a method (tokenizer recipes are not methods)."""
    found = {
        f"{path.parent.name}/{path.stem}"
        for pattern in RECIPE_PATTERNS
        for path in CONFIGS.glob(f"*/{pattern}")
        if path.parent.name != "tokenizers"
    }
    return sorted(found)


def views_of(method: Method, mode: str) -> Any | None:
    """The method's views with the augmentation in `mode`; None when this mimkit has no such mode (before
    `Method.views(augment_on=...)` existed every view was made whole in the worker)."""
    if "augment_on" in inspect.signature(method.views).parameters:
        return method.views(augment_on=mode)
    return method.views() if mode == "worker" else None


def finish_batch(views: Any) -> Callable[[Any], Any]:
    """What the engine runs on a collated batch's views once on its device: `on_device`, or nothing."""
    return getattr(views, "on_device", lambda batch: batch)


@dataclass
class Recipe:
    name: str
    method: str
    cfg: RunConfig
    overrides: dict[str, list[str]]
    """Per source, every override applied to the recipe."""
    stand_ins: list[str]
    sources: dict[str, ImageSource]
    views: dict[str, Any]
    """Per mode, the method's views."""
    epoch: int
    reference: Any = None
    reference_settings: dict[str, Any] | None = None
    reference_note: str | None = None
    device_batch: Any = None
    """Collated device-mode views of one batch, for the device part."""
    results: dict[str, Any] = field(default_factory=dict)


def build_recipe(
    name: str, folders: dict[str, Path], tokenizer: Path, extra: Sequence[str], reference: Path | None
) -> Recipe:
    """The recipe's config and sources, and its method's views in each mode (the method itself is dropped once its
    views are made; the views do not need it)."""
    stand_ins = [override.replace("{tokenizer}", str(tokenizer)) for override in STAND_INS.get(name, ())]
    described = [override.replace("{tokenizer}", STAND_IN_TOKENIZER) for override in STAND_INS.get(name, ())]
    overrides = {
        source: [f"data.source={source}", f"data.root={folder}", *stand_ins, *extra]
        for source, folder in folders.items()
    }
    cfgs = {source: load_run_config(CONFIGS / f"{name}.yaml", values) for source, values in overrides.items()}
    sources = {source: build_source(cfg.data) for source, cfg in cfgs.items()}
    cfg = cfgs["imagefolder"] if "imagefolder" in cfgs else next(iter(cfgs.values()))
    first = sources["imagefolder"] if "imagefolder" in sources else next(iter(sources.values()))
    method_cls = method_class(cfg.method.name)
    method_cls.prepare(cfg.method, first)  # what the method reads from files (here: the stand-ins exist already)
    torch.manual_seed(cfg.seed)
    method = method_cls(cfg.method, first.info)
    views = {mode: made for mode in MODES if (made := views_of(method, mode)) is not None}
    recipe = Recipe(name, cfg.method.name, cfg, overrides, described, sources, views, cfg.train.epochs // 2)
    if reference is not None and cfg.method.name in REFERENCES:
        adapter = importlib.import_module(REFERENCES[cfg.method.name])
        try:
            recipe.reference = adapter.reference_dataset(reference, folders["imagefolder"], cfg, method, recipe.epoch)
            recipe.reference_settings = adapter.settings(cfg, method)
        except adapter.NotComparable as error:
            recipe.reference_note = f"not compared: {error}"
    del method
    gc.collect()
    return recipe


# ---------------------------------------------------------------------------------------------------
# Timing: passes over the images, alternated in rounds


@dataclass
class Timed:
    key: tuple[str, str, str]
    """(recipe, source, part)."""
    run: Callable[[int], None]
    """Processes the first n images (the device part: its whole batch, whatever n)."""
    images: int


def view_pass(dataset: ViewDataset, epoch: int) -> Callable[[int], None]:
    def run(count: int) -> None:
        for index in range(count):
            dataset[(epoch, index)]

    return run


def decode_pass(source: ImageSource) -> Callable[[int], None]:
    def run(count: int) -> None:
        for index in range(count):
            source.load(index)

    return run


def reference_pass(dataset: Any) -> Callable[[int], None]:
    def run(count: int) -> None:
        for index in range(count):
            dataset[index]

    return run


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA kernel launch returns before the kernel ran)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_pass(views: Any, batch: Any, device: torch.device) -> Callable[[int], None]:
    """`on_device` of a batch already on `device`; the clock stops once the device finished it."""
    finish = finish_batch(views)

    def run(_count: int) -> None:
        finish(dict(batch))
        synchronize(device)

    return run


def device_batch(recipe: Recipe, size: int) -> Any:
    """The collated views of `size` images made in device mode (the images repeat when there are fewer)."""
    source = recipe.sources["imagefolder"] if "imagefolder" in recipe.sources else next(iter(recipe.sources.values()))
    dataset = ViewDataset(source, recipe.views["device"], recipe.cfg.seed, strict=True)
    return collate([dataset[(recipe.epoch, index % len(source))] for index in range(size)])["views"]


def timed_parts(recipes: list[Recipe], batch: int, device: torch.device) -> list[Timed]:
    """Every pass, in the order a round runs them: per recipe and source the decode, the views in each mode, the
    official code right after mimkit's (same source, same files), and the device part (its batch on `device`)."""
    parts = []
    decoded: set[str] = set()
    for recipe in recipes:
        for source_name, source in recipe.sources.items():
            count = len(source)
            if source_name not in decoded:  # decoding does not depend on the recipe: timed once per source
                parts.append(Timed(("", source_name, "decode"), decode_pass(source), count))
                decoded.add(source_name)
            for mode, views in recipe.views.items():
                dataset = ViewDataset(source, views, recipe.cfg.seed, strict=True)
                parts.append(Timed((recipe.name, source_name, mode), view_pass(dataset, recipe.epoch), count))
            if recipe.reference is not None and source_name == "imagefolder":
                parts.append(Timed((recipe.name, source_name, "official"), reference_pass(recipe.reference), count))
        if "device" in recipe.views:
            recipe.device_batch = move_data_to_device(device_batch(recipe, batch), device)
            part = device_pass(recipe.views["device"], recipe.device_batch, device)
            parts.append(Timed((recipe.name, "batch", "device_part"), part, batch))
    return parts


def run_rounds(parts: list[Timed], rounds: int, log: Callable[[str], None]) -> dict[tuple[str, str, str], list[float]]:
    """ms per image of every part in every round; each part runs once untimed on two images first."""
    for part in parts:
        part.run(min(2, part.images))
    times: dict[tuple[str, str, str], list[float]] = {part.key: [] for part in parts}
    for number in range(rounds):
        start = time.perf_counter()
        for part in parts if number % 2 == 0 else parts[::-1]:
            begin = time.perf_counter()
            part.run(part.images)
            times[part.key].append(1e3 * (time.perf_counter() - begin) / part.images)
        log(f"round {number + 1}/{rounds}: {time.perf_counter() - start:.0f} s")
    return times


# ---------------------------------------------------------------------------------------------------
# The DataLoader, end to end


def loader_batches(batches: int, workers: int) -> int:
    """Batches per timed loader epoch: `--loader-batches`, or two per worker when that is more (with fewer batches
    than workers some workers would idle, and more workers could not look faster)."""
    return max(batches, 2 * workers)


def loader_rates(
    recipe: Recipe, mode: str, workers: int, batch: int, batches: int, epochs: int, device: torch.device
) -> list[float]:
    """Images/s of mimkit's `train_loader` on the image folder (its images repeated to `loader_batches` full
    batches per epoch), each batch copied to `device` (pinned first on CUDA) and finished there by `on_device` in
    this process, as the engine does: one figure per timed epoch, after a first epoch that started the persistent
    workers and let each make a batch."""
    source = recipe.sources["imagefolder"]
    size = batch * loader_batches(batches, workers)
    repeated = Subset(source, indices=[index % len(source) for index in range(size)])
    views = recipe.views[mode]
    dataset = ViewDataset(repeated, views, recipe.cfg.seed, strict=True)
    options: dict[str, Any] = {"pin_memory": device.type == "cuda"}
    if workers > 0 and "prefetch_factor" in inspect.signature(train_loader).parameters:
        options["prefetch_factor"] = recipe.cfg.data.prefetch_factor
    loader = train_loader(dataset, batch_size=batch, num_workers=workers, seed=recipe.cfg.seed, **options)
    finish = finish_batch(views)
    loader.sampler.set_position(recipe.epoch)
    batches_iter = iter(loader)
    for _ in range(max(1, workers)):
        batch_data = next(batches_iter, None)
        if batch_data is not None:
            finish(move_data_to_device(batch_data["views"], device))
    synchronize(device)
    rates = []
    for epoch in range(recipe.epoch + 1, recipe.epoch + 1 + epochs):
        loader.sampler.set_position(epoch)
        batches_iter = iter(loader)  # persistent workers: an unfinished epoch is drained here, before the clock
        images = 0
        start = time.perf_counter()
        for batch_data in batches_iter:
            finish(move_data_to_device(batch_data["views"], device))
            images += len(batch_data["index"])
        synchronize(device)
        rates.append(images / (time.perf_counter() - start))
    del batches_iter, loader
    gc.collect()
    return rates


# ---------------------------------------------------------------------------------------------------
# Summary and report


def median_or_none(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def summarize(recipe: Recipe, times: dict[tuple[str, str, str], list[float]]) -> dict[str, Any]:
    per_source: dict[str, dict[str, float | None]] = {}
    rounds: dict[str, dict[str, list[float]]] = {}
    for source in recipe.sources:
        parts = {"decode": times.get(("", source, "decode"))}
        parts |= {mode: times.get((recipe.name, source, mode)) for mode in recipe.views}
        if recipe.reference is not None and source == "imagefolder":
            parts["official"] = times.get((recipe.name, source, "official"))
        rounds[source] = {part: values for part, values in parts.items() if values}
        per_source[source] = {part: median_or_none(values) for part, values in parts.items()}
    device_part = median_or_none(times.get((recipe.name, "batch", "device_part")))
    official = times.get((recipe.name, "imagefolder", "official"))
    return {
        "ms_per_image": per_source,
        "rounds_ms_per_image": rounds,
        "device_part_ms_per_image": device_part,
        "device_part_rounds_ms": times.get((recipe.name, "batch", "device_part"), []),
        "official_ms_per_image": median_or_none(official),
        "worker_vs_official": round_ratio(times.get((recipe.name, "imagefolder", "worker")), official),
        "device_vs_official": round_ratio(times.get((recipe.name, "imagefolder", "device")), official),
    }


def round_ratio(mine: list[float] | None, official: list[float] | None) -> float | None:
    """The median over rounds of mimkit's ms per image over the official code's in the same round (run one right
    after the other, so a busy spell of the machine mostly hits both)."""
    if not mine or not official:
        return None
    return statistics.median(a / b for a, b in zip(mine, official, strict=True))


def cores_needed(ms_per_image: float | None) -> dict[str, float | None]:
    """Cores per GPU for each published throughput: images/s per GPU over the images/s one core makes."""
    if ms_per_image is None:
        return {label: None for label, _, _ in PUBLISHED}
    per_core = 1e3 / ms_per_image
    return {label: rate / per_core for label, rate, _ in PUBLISHED}


def _cell(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def device_label(settings: dict[str, Any]) -> str:
    """Where the device part ran, for the report: `cpu`, or e.g. `cuda (NVIDIA H100 80GB HBM3)`."""
    device = settings.get("device", "cpu")  # results written before --device existed ran it on the CPU
    name = settings.get("device_name")
    return f"{device} ({name})" if name and not device.startswith("cpu") else device


def markdown(result: dict[str, Any]) -> str:
    info, settings, images = result["machine"], result["settings"], result["images"]
    where = f"generated (seed {IMAGE_SEED})" if images["generated"] else f"from {images['folder']}"
    device = settings.get("device", "cpu")
    on_device = "this CPU" if device == "cpu" else device_label(settings)
    lines = [
        "### Data path throughput (one worker, one thread)",
        "",
        f"{info['cpu']} ({info['cpu_count']} logical CPUs); torch {result['versions']['torch']}, torchvision "
        f"{result['versions']['torchvision']}; {images['count']} JPEGs {where}, median "
        f"{images['median_width']:.0f} x {images['median_height']:.0f}, mean {images['mean_kib']:.0f} KiB; medians "
        f"over {settings['rounds']} round(s) of each round's mean ms per image; device part on a batch of "
        f"{settings['batch']}, on {on_device}.",
        "",
    ]
    if not result["device_mode"]:
        lines += ["This mimkit's `Method.views` has no `augment_on`: only the worker mode is timed.", ""]
    lines += [
        "| recipe | source | decode ms/img | worker mode ms/img | device mode: worker ms/img "
        f"| device part ms/img ({device}) | official ms/img | worker mode / official | device mode / official |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for recipe in result["recipes"]:
        for source, parts in recipe["ms_per_image"].items():
            official = parts.get("official")
            keys = ("worker_vs_official", "device_vs_official")
            ratios = [recipe[key] if official is not None else None for key in keys]
            cells = [
                recipe["recipe"],
                source,
                _cell(parts.get("decode"), ".2f"),
                _cell(parts.get("worker"), ".2f"),
                _cell(parts.get("device"), ".2f"),
                _cell(recipe["device_part_ms_per_image"], ".2f") if source == "imagefolder" else "",
                _cell(official, ".2f"),
                *(_cell(ratio, ".2f", "x") for ratio in ratios),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    notes = [(r["recipe"], r["reference_note"]) for r in result["recipes"] if r.get("reference_note")]
    stand_ins = [(r["recipe"], r["stand_ins"]) for r in result["recipes"] if r["stand_ins"]]
    lines += [""]
    if any(r["official_ms_per_image"] is not None for r in result["recipes"]):
        lines += [
            "Ratios: the median over rounds of mimkit's ms per image (the worker's share in device mode) over the "
            "official code's in the same round; below 1 mimkit is faster."
        ]
    lines += [f"Official code for {name}: {note}." for name, note in notes]
    lines += [f"Stand-ins for {name}: `{' '.join(values)}`." for name, values in stand_ins]
    workers = settings["workers"]
    lines += [
        "",
        f"DataLoader end to end (mimkit's `train_loader`, image folder, batch {settings['batch']}, "
        f"{settings['loader_batches']} batches per epoch or 2 per worker when more, median of "
        f"{settings['loader_epochs']} timed epoch(s); "
        + (
            "device mode finishes each batch by `on_device` in the main process, on this CPU"
            if device == "cpu"
            else f"each batch copied to {on_device} and, in device mode, finished there by `on_device`"
        )
        + "), images/s:",
        "",
        "| recipe | mode | " + " | ".join(f"{w} worker{'s' if w != 1 else ''}" for w in workers) + " |",
        "|---|---|" + "--:|" * len(workers),
    ]
    for recipe in result["recipes"]:
        for mode, rates in recipe["loader_images_per_s"].items():
            cells = [_cell(rates.get(str(w)), ".1f") for w in workers]
            lines.append(f"| {recipe['recipe']} | {mode} | " + " | ".join(cells) + " |")
    labels = [(label, rate) for label, rate, _ in PUBLISHED]
    lines += [
        "",
        "CPU cores one GPU needs to be fed, per-core extrapolation: images/s per GPU over the images/s of one core "
        "(1000 / the worker's ms per image on the image folder, one thread). It assumes workers scale linearly with "
        "cores; in device mode the batched part runs on the GPU and is not counted.",
        "",
        "| recipe | mode | worker ms/img | img/s per core | "
        + " | ".join(f"{rate:.0f} img/s" for _, rate in labels)
        + " |",
        "|---|---|--:|--:|" + "--:|" * len(labels),
    ]
    for recipe in result["recipes"]:
        for mode, cores in recipe["cores_needed"].items():
            ms = recipe["ms_per_image"].get("imagefolder", {}).get(mode)
            cells = [_cell(ms, ".2f"), _cell(None if ms is None else 1e3 / ms, ".1f")]
            cells += [_cell(cores[label], ".1f") for label, _ in labels]
            lines.append(f"| {recipe['recipe']} | {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Throughputs: " + "; ".join(f"{rate:.0f} img/s: {label} ({cite})" for label, rate, cite in PUBLISHED)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Command line


DEFAULTS = {"images": 48, "rounds": 5, "batch": 32, "loader_batches": 4, "loader_epochs": 3, "image_side": 500}
QUICK = {"images": 8, "rounds": 1, "batch": 4, "loader_batches": 2, "loader_epochs": 1, "image_side": 128}


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, help=f"images timed (default {DEFAULTS['images']})")
    parser.add_argument("--folder", type=Path, help="your own folder of images (default: generated JPEGs)")
    parser.add_argument("--image-side", type=int, help="generated images' typical long side (default 500)")
    parser.add_argument("--recipes", type=_names, help="comma-separated, e.g. ibot/vit_small_imagenet (default: all)")
    parser.add_argument("--sources", type=_names, default=list(SOURCES), help="imagefolder,shards (default: both)")
    parser.add_argument("--rounds", type=int, help=f"rounds of all passes, alternated (default {DEFAULTS['rounds']})")
    parser.add_argument(
        "--batch", type=int, help=f"batch of the device part and the loader (default {DEFAULTS['batch']})"
    )
    parser.add_argument("--loader-batches", type=int, help="batches per timed DataLoader epoch (default 4)")
    parser.add_argument("--loader-epochs", type=int, help="timed DataLoader epochs, the median quoted (default 3)")
    parser.add_argument("--workers", type=lambda text: [int(w) for w in _names(text)], default=[1, 2])
    parser.add_argument("--reference", type=Path, help="a checkout of github.com/bytedance/ibot: time its data path")
    parser.add_argument(
        "--device", default="cpu", help="where the batched device part and the loader's batches run: cpu, cuda, ..."
    )
    parser.add_argument("--quick", action="store_true", help="few small images, one round (tests)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one more config override")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add the recipes to the result already in --out when it ran with the same settings (one run per recipe, "
        "each kept if a later one is stopped)",
    )
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    known = shipped_recipes()
    args.recipes = args.recipes or known
    unknown = [name for name in args.recipes if name not in known]
    if unknown:
        parser.error(f"--recipes: no shipped recipe {', '.join(unknown)}; choose from {', '.join(known)}")
    if not args.sources or any(source not in SOURCES for source in args.sources):
        parser.error(f"--sources: one or both of {', '.join(SOURCES)}")
    if min(args.images, args.rounds, args.batch, args.loader_batches, args.loader_epochs, args.image_side) < 1:
        parser.error("--images, --rounds, --batch, --loader-batches, --loader-epochs and --image-side must be >= 1")
    if not args.workers or min(args.workers) < 0:
        parser.error("--workers: a comma-separated list of worker counts >= 0, e.g. 1,2,8")
    if args.folder is not None and not args.folder.is_dir():
        parser.error(f"--folder {args.folder}: not a folder")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the benchmark; returns the JSON file (the markdown table lies next to it)."""
    args = parse_args(argv)
    args.argv = [str(part) for part in (sys.argv[1:] if argv is None else argv)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        with tempfile.TemporaryDirectory(prefix="mimkit_data_throughput_") as scratch:
            result = run(args, Path(scratch))
    finally:
        torch.set_num_threads(threads)
    path = args.out / "data_throughput.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.append and path.is_file():
        result = appended(json.loads(path.read_text()), result)
    path.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    path.with_suffix(".md").write_text(table)
    print(table)
    return path


def log(message: str) -> None:
    print(f"[data_throughput] {message}", file=sys.stderr, flush=True)


APPEND_KEYS = ("settings", "images", "device_mode")
"""What an earlier result must share with this run's for --append to add this run's recipes to it."""


def appended(earlier: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """`result` with the recipes of the `earlier` result in --out before its own (a recipe in both: this run's),
    when both ran with the same settings on the same images; otherwise `result` alone."""
    differ = [key for key in APPEND_KEYS if earlier.get(key) != result[key]]
    if differ:
        log(f"--append: the earlier result differs in {', '.join(differ)}; it is replaced, not extended")
        return result
    names = {recipe["recipe"] for recipe in result["recipes"]}
    kept = [recipe for recipe in earlier["recipes"] if recipe["recipe"] not in names]
    commands = [*earlier.get("earlier_commands", []), earlier["command"]]
    return {**result, "earlier_commands": commands, "recipes": kept + result["recipes"]}


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    folder = scratch / "images"
    if args.folder is None:
        files = generate_images(folder, args.images, args.image_side)
    else:
        files = link_images(args.folder, folder, args.images)
    images = {"generated": args.folder is None, "folder": None if args.folder is None else str(args.folder)}
    images |= describe_images(files)
    log(f"{len(files)} images in {folder}, mean {images['mean_kib']:.0f} KiB")
    folders = {"imagefolder": folder}
    if "shards" in args.sources:
        folders["shards"] = scratch / "shards"
        write_shards(ImageFolderSource(DataConfig(source="imagefolder", root=str(folder)), "train"), folders["shards"])
    folders = {source: path for source, path in folders.items() if source in args.sources or source == "imagefolder"}
    tokenizer = save_tokenizer(KMeansTokenizer(16, 8, 3), scratch / "stand_in_tokenizer.pt")
    recipes = []
    for name in args.recipes:
        start = time.perf_counter()
        recipes.append(build_recipe(name, folders, tokenizer, args.set, args.reference))
        log(f"built {name} ({time.perf_counter() - start:.1f} s)")
    device_mode = all("device" in recipe.views for recipe in recipes)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the current device, for which the loader pins its batches (cuda: cuda:0)
    times = run_rounds(timed_parts(recipes, args.batch, device), args.rounds, log)
    for recipe in recipes:
        recipe.results = summarize(recipe, times)
        recipe.results["loader_images_per_s"], recipe.results["loader_epochs_images_per_s"] = {}, {}
        for mode in recipe.views:
            epochs = {
                str(workers): loader_rates(
                    recipe, mode, workers, args.batch, args.loader_batches, args.loader_epochs, device
                )
                for workers in args.workers
            }
            rates = {workers: statistics.median(values) for workers, values in epochs.items()}
            recipe.results["loader_images_per_s"][mode] = rates
            recipe.results["loader_epochs_images_per_s"][mode] = epochs
            log(f"loader {recipe.name} {mode}: " + ", ".join(f"{w} -> {r:.1f} img/s" for w, r in rates.items()))
        per_image = recipe.results["ms_per_image"].get("imagefolder", {})
        recipe.results["cores_needed"] = {mode: cores_needed(per_image.get(mode)) for mode in recipe.views}
    return {
        "benchmark": "data_throughput",
        "command": ["benchmarks/data_throughput.py", *args.argv],
        "machine": machine(),
        "versions": package_versions(),
        "settings": {
            "rounds": args.rounds,
            "batch": args.batch,
            "loader_batches": args.loader_batches,
            "loader_epochs": args.loader_epochs,
            "loader_batches_per_epoch": {str(w): loader_batches(args.loader_batches, w) for w in args.workers},
            "workers": args.workers,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "sources": list(folders),
            "torch_threads": 1,
            "jpeg_quality": JPEG_QUALITY if args.folder is None else None,
            "image_seed": IMAGE_SEED if args.folder is None else None,
            "reference": None if args.reference is None else str(args.reference),
            "extra_overrides": list(args.set),
        },
        "images": images,
        "device_mode": device_mode,
        "published_throughputs": [
            {"label": label, "images_per_s": rate, "source": cite} for label, rate, cite in PUBLISHED
        ],
        "recipes": [
            {
                "recipe": recipe.name,
                "method": recipe.method,
                "epoch": recipe.epoch,
                "overrides": recipe.overrides,
                "stand_ins": recipe.stand_ins,
                "modes": list(recipe.views),
                "reference_settings": recipe.reference_settings,
                "reference_note": recipe.reference_note,
                "config": to_dict(recipe.cfg),
                **recipe.results,
            }
            for recipe in recipes
        ],
    }


if __name__ == "__main__":
    main()
