"""Making a tokenizer file from a tokenizer recipe: fit k-means, train the VQ-VAE, or import the DALL-E dVAE;
then measure it (reconstruction PSNR, codebook perplexity and dead codes) on held-out images.

`mimkit tokenizer fit -c tokenizers/<name>` runs this and draws its figure; a CIM run whose
tokenizer file is missing runs it too when its recipe names a tokenizer recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn import functional as F

from mimkit.config import ConfigError, check, from_dict, read_yaml
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError
from mimkit.data.loader import ViewDataset, eval_loader, train_loader
from mimkit.data.sources import ImageSource, Subset, build_source
from mimkit.data.views import EvalView
from mimkit.losses.pixels import patchify
from mimkit.models.tokenizers.base import Tokenizer, codebook_usage, psnr
from mimkit.models.tokenizers.dall_e import dall_e_from_files
from mimkit.models.tokenizers.files import save_tokenizer
from mimkit.models.tokenizers.kmeans import KMeansTokenizer
from mimkit.models.tokenizers.vqvae import VQVAETokenizer
from mimkit.recipes import find_recipe

RESTART_PATCHES_PER_CODE = 20


@dataclass
class TokenizerConfig:
    """Which tokenizer and how it is made (defaults: a k-means codebook of 8-pixel patches at 32 px)."""

    kind: Literal["kmeans", "vqvae", "dall-e"] = "kmeans"
    vocab_size: int = 512
    patch_size: int = 8
    """Pixels per token side; the CIM enhancer's images are resized so one token covers one of its patches."""
    image_size: int = 32
    """Images are resized (and centre-cropped) to this size for fitting and measuring."""
    epochs: int = 1
    """Passes over the data: mini-batch k-means passes or VQ-VAE training epochs."""
    hidden_dim: int = 64
    """vqvae: width of its convolutions."""
    code_dim: int = 32
    """vqvae: size of a code vector."""
    decay: float = 0.99
    """vqvae: EMA decay of the codebook."""
    commitment: float = 0.25
    """vqvae: weight of the commitment loss."""
    loss: Literal["l1", "l2"] = "l2"
    """vqvae: reconstruction loss."""
    lr: float = 1e-3
    """vqvae: Adam learning rate."""
    encoder_file: str | None = None
    """dall-e: the dVAE's encoder.pkl (or a state dict of it), downloaded by you; mimkit never downloads."""
    decoder_file: str | None = None
    """dall-e: the dVAE's decoder.pkl."""

    def validate(self, prefix: str = "tokenizer") -> None:
        check(self.vocab_size >= 2, f"{prefix}.vocab_size", f"must be >= 2; got {self.vocab_size}")
        check(self.patch_size >= 1, f"{prefix}.patch_size", f"must be >= 1; got {self.patch_size}")
        check(
            self.image_size % self.patch_size == 0,
            f"{prefix}.image_size",
            f"{self.image_size} is not divisible by the patch size {self.patch_size}; use a multiple of it",
        )
        check(self.epochs >= 1, f"{prefix}.epochs", f"must be >= 1; got {self.epochs}")
        check(0 < self.decay < 1, f"{prefix}.decay", f"must lie in (0, 1); got {self.decay}")
        if self.kind == "dall-e":
            check(
                bool(self.encoder_file and self.decoder_file),
                f"{prefix}.encoder_file",
                "dall-e needs tokenizer.encoder_file and tokenizer.decoder_file: the dVAE's encoder.pkl and "
                "decoder.pkl, downloaded by you (mimkit never downloads weights)",
            )


@dataclass
class TokenizerRecipe:
    """One tokenizer file: how to make it, from which images, and where it goes."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
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
    recipe = from_dict(TokenizerRecipe, read_yaml(find_recipe(path), overrides), "")
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
    """Make, measure and save the tokenizer of `recipe` (a progress bar on `console`, stderr by default)."""
    console = console or Console(stderr=True)
    cfg = recipe.tokenizer
    torch.manual_seed(recipe.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = build_source(recipe.data)
    check(
        source.info.channels in (1, 3), "data.channels", f"tokenizers take 1 or 3 channels; got {source.info.channels}"
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    if cfg.kind == "dall-e":
        tokenizer: Tokenizer = dall_e_from_files(cfg.encoder_file or "", cfg.decoder_file or "", "tokenizer")
        if tokenizer.channels != source.info.channels:
            raise ConfigError(
                f"tokenizer: the dVAE takes {tokenizer.channels}-channel images; the data has "
                f"{source.info.channels} (set data.channels={tokenizer.channels})"
            )
    elif cfg.kind == "kmeans":
        tokenizer = KMeansTokenizer(cfg.vocab_size, cfg.patch_size, source.info.channels).to(device)
        _fit_kmeans(tokenizer, _batches(recipe, source, console, "k-means", device), generator)
    else:
        tokenizer = VQVAETokenizer(
            cfg.vocab_size,
            cfg.patch_size,
            source.info.channels,
            cfg.hidden_dim,
            cfg.code_dim,
            cfg.decay,
            cfg.commitment,
        ).to(device)
        _train_vqvae(tokenizer, cfg, _batches(recipe, source, console, "VQ-VAE", device), generator)
    tokenizer = tokenizer.to(device).requires_grad_(False).eval()
    images = _held_out(recipe, source)
    metrics = measure(tokenizer, images.to(device), recipe.data.batch_size)
    path = save_tokenizer(tokenizer.cpu(), recipe.output, metrics)
    return FitResult(tokenizer, metrics, images[:8], path)


def _batches(
    recipe: TokenizerRecipe, source: ImageSource, console: Console, what: str, device: torch.device
) -> Iterator[tuple[torch.Tensor, Callable[[str], None]]]:
    """Shuffled batches in [0, 1] for `tokenizer.epochs` passes, with a progress bar; each comes with a function
    that shows a status (the loss) beside the bar."""
    cfg = recipe.tokenizer
    dataset = ViewDataset(source, EvalView(source.info, cfg.image_size, pixels=True), seed=recipe.seed)
    loader = train_loader(
        dataset,
        batch_size=min(recipe.data.batch_size, len(dataset)),
        num_workers=recipe.data.num_workers,
        seed=recipe.seed,
    )
    columns = (
        TextColumn(f"fitting {what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(what, total=cfg.epochs * len(loader), status="")
        for epoch in range(cfg.epochs):
            loader.sampler.set_position(epoch)
            for batch in loader:
                if batch["views"] is not None:
                    yield batch["views"].to(device), lambda status: bar.update(task, status=status)
                bar.advance(task)


class CodeUsage:
    """The codes chosen since the last restart of unused ones; a window closes after RESTART_PATCHES_PER_CODE x
    vocab_size assignments."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.used = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.size = RESTART_PATCHES_PER_CODE * vocab_size
        self.seen = 0
        self.restarts = 0
        """Codes restarted so far (what the progress bar shows)."""

    def add(self, ids: torch.Tensor) -> bool:
        """Record assignments; True when the window is full (time to restart the codes not in `used`)."""
        self.used[ids.flatten()] = True
        self.seen += ids.numel()
        return self.seen >= self.size

    def restarted(self, count: int) -> None:
        """`count` codes were restarted: a new window begins."""
        self.restarts += count
        self.used.zero_()
        self.seen = 0


def _fit_kmeans(
    tokenizer: KMeansTokenizer,
    batches: Iterator[tuple[torch.Tensor, Callable[[str], None]]],
    generator: torch.Generator,
) -> None:
    """Mini-batch k-means; centroids that no patch chose while RESTART_PATCHES_PER_CODE x vocab_size patches were
    assigned restart on random patches of the current batch."""
    window = CodeUsage(tokenizer.vocab_size, tokenizer.centroids.device)
    pool: list[torch.Tensor] = []
    initialized = False
    for images, show in batches:
        patches = patchify(images, tokenizer.patch_size).flatten(0, 1)
        if not initialized:
            pool.append(patches)
            if sum(len(p) for p in pool) < tokenizer.vocab_size:
                continue
            tokenizer.initialize(torch.cat(pool), generator)
            initialized, pool = True, []
        if window.add(tokenizer.update(patches)):
            window.restarted(tokenizer.restart_dead(patches, window.used, generator))
        show(f"{window.restarts} unused codes restarted")
    if not initialized:
        raise DataError(
            f"k-means with {tokenizer.vocab_size} codes needs at least as many patches; lower tokenizer.vocab_size"
        )


def _train_vqvae(
    tokenizer: VQVAETokenizer,
    cfg: TokenizerConfig,
    batches: Iterator[tuple[torch.Tensor, Callable[[str], None]]],
    generator: torch.Generator,
) -> None:
    """Adam on reconstruction + commitment; the codebook follows the encoder by EMA; codes no encoder output chose
    while RESTART_PATCHES_PER_CODE x vocab_size tokens were assigned restart on random encoder outputs."""
    optimizer = torch.optim.Adam([p for p in tokenizer.parameters() if p.requires_grad], lr=cfg.lr)
    reconstruction_loss = F.l1_loss if cfg.loss == "l1" else F.mse_loss
    window = CodeUsage(tokenizer.vocab_size, tokenizer.codebook.device)
    tokenizer.train()
    started = False
    for images, show in batches:
        if not started:
            with torch.no_grad():
                tokenizer.initialize(tokenizer.latents(images).permute(0, 2, 3, 1).flatten(0, 2), generator)
            started = True
        reconstructions, commitment, latents, ids = tokenizer(images)
        loss = reconstruction_loss(reconstructions, images) + commitment
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokenizer.update_codebook(latents.detach(), ids)
        if window.add(ids):
            flat = latents.detach().permute(0, 2, 3, 1).flatten(0, 2)
            window.restarted(tokenizer.restart_dead(flat, window.used, generator))
        show(f"loss {loss.item():.4f}, {window.restarts} unused codes restarted")
    tokenizer.eval()


def _held_out(recipe: TokenizerRecipe, source: ImageSource) -> torch.Tensor:
    """`eval_images` images spread over the eval split (else over the training images), in [0, 1]."""
    try:
        held = build_source(recipe.data, recipe.data.eval_split)
    except DataError:
        held = source
    spread = Subset(held, min(recipe.eval_images, len(held)), spread=True)
    dataset = ViewDataset(spread, EvalView(held.info, recipe.tokenizer.image_size, pixels=True), seed=recipe.seed)
    loader = eval_loader(dataset, batch_size=recipe.data.batch_size, num_workers=0)
    return torch.cat([b["views"] for b in loader if b["views"] is not None])


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
    return (
        f"PSNR {metrics['psnr']:.2f} dB (constant image {metrics['psnr_constant']:.2f} dB), perplexity "
        f"{metrics['perplexity']:.1f} of {int(metrics['vocab_size'])} codes, {int(metrics['dead_codes'])} unused, "
        f"on {int(metrics['images'])} held-out images"
    )
