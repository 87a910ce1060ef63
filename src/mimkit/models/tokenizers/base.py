"""The Tokenizer contract and its file: what CIM's generator predicts and what renders its corrupted images.

A tokenizer is frozen once made. It works on pixels in [0, 1] (whatever the data's normalisation) and maps an
image of `patch_size * h` x `patch_size * w` pixels to an (h, w) grid of token ids and back, so one token covers
one patch of the enhancer once the image is resized to `patch_size` pixels per token.
Its file (`mimkit.models.tokenizers.files`) holds plain tensors and values, never code.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn


class Tokenizer(nn.Module):
    """Base class of visual tokenizers (see the module docstring)."""

    kind: ClassVar[str]
    """The name recipes and files use (`tokenizer.kind`)."""
    vocab_size: int
    patch_size: int
    """Pixels per token side at the tokenizer's input."""
    channels: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1], H and W multiples of `patch_size` -> (B, H / p, W / p) long token ids."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) token ids -> (B, C, h * p, w * p) images in [0, 1]."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this tokenizer (saved beside its state)."""
        raise NotImplementedError

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
