"""Making a tokenizer file from a tokenizer recipe: build the recipe's kind, fit it to the data (k-means, VQ-VAE
training; nothing for the imported DALL-E dVAE), measure it (reconstruction PSNR, codebook perplexity and dead
codes) on held-out images, save it.

The procedure is the same for every kind: the kind's class (`mimkit.models.tokenizers.registry`) builds the
tokenizer and does its own fitting math on the batches given here. `mimkit tokenizer fit -c tokenizers/<name>`
runs it and draws its figure; a CIM run whose tokenizer file is missing runs it too when its recipe names a
tokenizer recipe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from mimkit.config import ConfigError, check, from_dict, read_yaml, to_dict
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError
from mimkit.data.loader import ViewDataset, eval_loader, train_loader
from mimkit.data.output_folder import check_output_folder
from mimkit.data.sources import ImageSource, Subset, build_source, same_images_notice
from mimkit.data.views import EvalView
from mimkit.models.tokenizers.base import Tokenizer, TokenizerConfig, codebook_usage, psnr
from mimkit.models.tokenizers.files import read_tokenizer_file, save_tokenizer
from mimkit.models.tokenizers.registry import tokenizer_class, tokenizer_config
from mimkit.recipes import find_recipe

log = logging.getLogger("mimkit")


@dataclass
class TokenizerRecipe:
    """One tokenizer file: how to make it, from which images, and where it goes."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The kind's own config class, chosen by `tokenizer.kind`."""
    data: DataConfig = field(default_factory=DataConfig)
    output: str = "tokenizers/tokenizer.pt"
    seed: int = 0
    eval_images: int = 1000
    """Held-out images (data.eval_split, else the training images) on which PSNR and codebook usage are measured."""

    def validate(self) -> None:
        self.tokenizer.validate()
        self.data.validate()
        check(self.eval_images >= 1, "eval_images", f"must be >= 1; got {self.eval_images}")


def load_tokenizer_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TokenizerRecipe:
    """Read a tokenizer recipe (a shipped name or a YAML path) with overrides; its `tokenizer:` section becomes the
    config of the kind it names."""
    data = read_yaml(find_recipe(path), overrides)
    recipe = from_dict(TokenizerRecipe, {**data, "tokenizer": None}, "")
    recipe.tokenizer = tokenizer_config(data.get("tokenizer"), "tokenizer")
    recipe.validate()
    return recipe


@dataclass
class FitResult:
    tokenizer: Tokenizer
    """Frozen, on the CPU."""
    metrics: dict[str, float]
    images: torch.Tensor
    """A few held-out images in [0, 1] (for the originals-vs-reconstructions figure)."""
    path: Path


def fit_tokenizer(recipe: TokenizerRecipe, console: Console | None = None) -> FitResult:
    """Make, measure and save the tokenizer of `recipe` (a progress bar on `console`, stderr by default); its folder
    is checked first (no folder of images, nothing inside data.root)."""
    check_output_folder(
        Path(recipe.output).expanduser().parent,
        "output",
        "give the tokenizer file a folder of its own, e.g. output=tokenizers/<name>.pt",
        {"data.root": recipe.data.root},
    )
    cfg = recipe.tokenizer
    torch.manual_seed(recipe.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = build_source(recipe.data)
    check(
        source.info.channels in (1, 3), "data.channels", f"tokenizers take 1 or 3 channels; got {source.info.channels}"
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    tokenizer = tokenizer_class(cfg.kind).build(cfg, source.info.channels).to(device)
    progress = FitProgress(recipe, source, console or Console(stderr=True), device)
    tokenizer.fit(cfg, progress.batches(), generator, progress.status)
    tokenizer = tokenizer.requires_grad_(False).eval()
    images, held_out = _held_out(recipe, source)
    metrics = measure(tokenizer, images.to(device), recipe.data.batch_size) | {"held_out": float(held_out)}
    fitted_on = fitting_data(recipe.data, len(source))
    if (notice := replaced_notice(recipe.output, fitted_on)) is not None:
        log.warning("%s", notice)
    path = save_tokenizer(tokenizer.cpu(), recipe.output, metrics, fitted_on)
    return FitResult(tokenizer, metrics, images[:8], path)


def fitting_data(data: DataConfig, images: int) -> dict[str, Any]:
    """What a tokenizer is fitted on, as its file records it."""
    root = None if data.root is None else str(Path(data.root).expanduser().resolve())
    return {
        "source": data.source,
        "options": to_dict(data.options),
        "root": root,
        "split": data.split,
        "channels": data.channels,
        "images": images,
        "val_fraction": data.val_fraction,
    }


def replaced_notice(output: str | Path, fitted_on: dict[str, Any]) -> str | None:
    """A warning when `output` already holds a tokenizer fitted on other data (a run that reads the file by name
    would silently get the new one), else None."""
    try:
        earlier = read_tokenizer_file(output, "output").get("fitted_on") or {}
    except ConfigError:
        return None
    if not earlier or earlier == fitted_on:
        return None
    return (
        f"output: {output} held a tokenizer fitted on {describe_fitting(earlier)}; it is replaced by one fitted on "
        f"{describe_fitting(fitted_on)} (runs that read this file get the new one; name another output to keep both)"
    )


def describe_fitting(fitted_on: dict[str, Any]) -> str:
    where = f" at {fitted_on['root']}" if fitted_on.get("root") else ""
    options = "".join(f" {key}={value}" for key, value in (fitted_on.get("options") or {}).items())
    return f"{fitted_on.get('source')}{options}{where} ({fitted_on.get('split')}, {fitted_on.get('images')} images)"


class FitProgress:
    """The fitting data: shuffled batches in [0, 1] on the device for `tokenizer.epochs` passes, behind a progress
    bar that opens with the first batch (a kind that reads none shows none), and a status line beside it."""

    def __init__(self, recipe: TokenizerRecipe, source: ImageSource, console: Console, device: torch.device) -> None:
        self.recipe, self.source, self.console, self.device = recipe, source, console, device
        self.bar: tuple[Progress, TaskID] | None = None

    def batches(self) -> Iterator[torch.Tensor]:
        cfg = self.recipe.tokenizer
        dataset = ViewDataset(
            self.source, EvalView(self.source.info, cfg.image_size, pixels=True), seed=self.recipe.seed
        )
        loader = train_loader(
            dataset,
            batch_size=min(self.recipe.data.batch_size, len(dataset)),
            num_workers=self.recipe.data.num_workers,
            prefetch_factor=self.recipe.data.prefetch_factor,
            seed=self.recipe.seed,
        )
        columns = (
            TextColumn(f"fitting {cfg.kind}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        )
        with Progress(*columns, console=self.console) as bar:
            task = bar.add_task(cfg.kind, total=cfg.epochs * len(loader), status="")
            self.bar = (bar, task)
            for epoch in range(cfg.epochs):
                loader.sampler.set_position(epoch)
                for batch in loader:
                    if batch["views"] is not None:
                        yield batch["views"].to(self.device)
                    bar.advance(task)
        self.bar = None

    def status(self, text: str) -> None:
        """Show `text` (the loss, restarted codes) beside the bar."""
        if self.bar is not None:
            self.bar[0].update(self.bar[1], status=text)


def _held_out(recipe: TokenizerRecipe, source: ImageSource) -> tuple[torch.Tensor, bool]:
    """`eval_images` images spread over the eval split (else over the training images), in [0, 1], and whether they
    are held out (not among the images the tokenizer was fitted on)."""
    try:
        held = build_source(recipe.data, recipe.data.eval_split)
        held_out = same_images_notice(recipe.data) is None
    except DataError:
        held, held_out = source, False
    spread = Subset(held, min(recipe.eval_images, len(held)), spread=True)
    dataset = ViewDataset(spread, EvalView(held.info, recipe.tokenizer.image_size, pixels=True), seed=recipe.seed)
    loader = eval_loader(dataset, batch_size=recipe.data.batch_size, num_workers=0)
    return torch.cat([b["views"] for b in loader if b["views"] is not None]), held_out


@torch.no_grad()
def measure(tokenizer: Tokenizer, images: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """Reconstruction PSNR (dB), against a constant image at the images' mean for scale; perplexity and dead
    codes of the tokens of these images."""
    tokens, reconstructions = [], []
    for chunk in images.split(batch_size):
        ids = tokenizer.encode(chunk)
        tokens.append(ids)
        reconstructions.append(tokenizer.decode(ids))
    constant = images.mean().expand_as(images)
    usage = codebook_usage(torch.cat(tokens), tokenizer.vocab_size)
    return {
        "psnr": psnr(images, torch.cat(reconstructions)),
        "psnr_constant": psnr(images, constant),
        "perplexity": usage["perplexity"],
        "dead_codes": usage["dead_codes"],
        "vocab_size": float(tokenizer.vocab_size),
        "images": float(len(images)),
    }


def describe_metrics(metrics: dict[str, float]) -> str:
    """One line of what `measure` found, as `mimkit tokenizer fit` and a CIM run print it."""
    return (
        f"PSNR {metrics['psnr']:.2f} dB (constant image {metrics['psnr_constant']:.2f} dB), perplexity "
        f"{metrics['perplexity']:.1f} of {int(metrics['vocab_size'])} codes, {int(metrics['dead_codes'])} unused, "
        f"on {int(metrics['images'])} "
        + (
            "held-out images"
            if metrics.get("held_out", 1.0)
            else "of the images it was fitted on (no held-out split: data.val_fraction=0.1 holds some out)"
        )
    )
