"""The Tokenizer contract: what CIM's generator predicts and what renders its corrupted images.

A tokenizer is frozen once made. It works on pixels in [0, 1] (whatever the data's normalisation) and maps an
image of `patch_size * h` x `patch_size * w` pixels to an (h, w) grid of token ids and back, so one token covers
one patch of the enhancer once the image is resized to `patch_size` pixels per token.

Each kind is one class that owns its recipe config (`Config`, chosen by `tokenizer.kind`), builds itself from it
(`build`) and fits itself to batches of images (`fit`); `mimkit.models.tokenizers.registry` finds it by its kind.
Its file (`mimkit.models.tokenizers.files`) holds plain tensors and values, never code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mimkit.config import check

RESTART_PATCHES_PER_CODE = 20
"""A code that none of RESTART_PATCHES_PER_CODE x vocab_size assignments chose restarts on the data."""

Status = Callable[[str], None]
"""Shows one line about the fit so far (a loss, restarted codes) beside the fitting procedure's progress bar."""


@dataclass
class TokenizerConfig:
    """Fields every tokenizer kind has; a kind's own config extends it (defaults: k-means of 8-pixel patches)."""

    kind: str = "kmeans"
    """The registered kind (`mimkit.models.tokenizers.registry.tokenizer_kinds()`); it chooses the config class."""
    vocab_size: int = 512
    patch_size: int = 8
    """Pixels per token side; the CIM enhancer's images are resized so one token covers one of its patches."""
    image_size: int = 32
    """Images are resized (and centre-cropped) to this size for fitting and measuring."""
    epochs: int = 1
    """Passes over the data while fitting."""

    def validate(self, prefix: str = "tokenizer") -> None:
        check(self.vocab_size >= 2, f"{prefix}.vocab_size", f"must be >= 2; got {self.vocab_size}")
        check(self.patch_size >= 1, f"{prefix}.patch_size", f"must be >= 1; got {self.patch_size}")
        check(
            self.image_size % self.patch_size == 0,
            f"{prefix}.image_size",
            f"{self.image_size} is not divisible by the patch size {self.patch_size}; use a multiple of it",
        )
        check(self.epochs >= 1, f"{prefix}.epochs", f"must be >= 1; got {self.epochs}")


class Tokenizer(nn.Module):
    """Base class of visual tokenizers (see the module docstring)."""

    kind: ClassVar[str]
    """The name recipes and files use (`tokenizer.kind`)."""
    Config: ClassVar[type[TokenizerConfig]] = TokenizerConfig
    """The kind's recipe config (`tokenizer:` of a tokenizer recipe)."""
    vocab_size: int
    patch_size: int
    """Pixels per token side at the tokenizer's input."""
    channels: int

    def __init__(self) -> None:
        super().__init__()
        self._register_load_state_dict_pre_hook(self._fill_spec)

    @classmethod
    def build(cls, cfg: TokenizerConfig, channels: int) -> Tokenizer:
        """A tokenizer of recipe `cfg` for images of `channels` channels, ready for `fit`."""
        raise NotImplementedError

    def fit(
        self, cfg: TokenizerConfig, batches: Iterable[torch.Tensor], generator: torch.Generator, status: Status
    ) -> None:
        """Fit to shuffled `batches` of images in [0, 1] on this tokenizer's device (`cfg.epochs` passes), drawing
        random choices from the CPU `generator`; the fitting procedure freezes and saves it afterwards."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1], H and W multiples of `patch_size` -> (B, H / p, W / p) long token ids."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) token ids -> (B, C, h * p, w * p) images in [0, 1]."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this tokenizer (saved beside its state in its file)."""
        raise NotImplementedError

    def get_extra_state(self) -> dict[str, Any]:
        """Its kind and constructor arguments travel in every state dict (a run's checkpoints): a saved run rebuilds
        the tokenizer it trained with even when the tokenizer file is gone or was refitted since."""
        return {"kind": self.kind, "config": self.config()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"saved state of a {state.get('kind')} tokenizer loaded into a {self.kind} tokenizer")

    def _fill_spec(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        """State dicts written before the spec travelled with them (older files and checkpoints) load as they are."""
        state.setdefault(f"{prefix}_extra_state", self.get_extra_state())

    def check_images(self, images: torch.Tensor) -> None:
        height, width = images.shape[-2:]
        if images.shape[1] != self.channels or height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"{self.kind} tokenizer takes {self.channels}-channel images with sides divisible by "
                f"{self.patch_size}; got {tuple(images.shape[1:])}"
            )


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, D) vectors -> (N,) ids of their nearest rows of `codebook` (K, D) in squared L2, without the (N, K, D)
    difference tensor."""
    distances = vectors.square().sum(1, keepdim=True) - 2 * vectors @ codebook.T + codebook.square().sum(1)
    return distances.argmin(1)


def random_rows(samples: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` rows of `samples` (N, D) drawn uniformly with replacement by a CPU `generator` (codebook
    initialisation and restarts of unused codes)."""
    return samples[torch.randint(len(samples), (count,), generator=generator).to(samples.device)]


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


@torch.no_grad()
def codebook_usage(tokens: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Perplexity of the token histogram (vocab_size when every code is used equally, 1 when one is) and the
    number of codes never used in `tokens`."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"perplexity": math.exp(entropy), "dead_codes": float((counts == 0).sum().item())}


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1], over the whole batch."""
    mse = (images.float() - reconstructions.float().clamp(0, 1)).square().mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))
