"""CIM's corruption: the frozen visual tokenizer between the networks' images and token grids.

  tokenize  normalised images -> pixels in [0, 1] at the tokenizer's side and channels -> one token per patch
  sample    the generator's logits at the masked positions -> replacement tokens, each image with its own seed
  render    a token grid -> the tokenizer's image, in the networks' size, channels and normalisation
  corrupt   the original tokens outside the mask, the samples inside, the whole grid rendered (so no seam between
            real and decoded pixels gives the replaced patches away), and which tokens changed (RevDet's labels)

Nothing here has a gradient but the generator's logits it is handed, so the enhancer's loss never reaches the
generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from mimkit.models.tokenizers.base import Tokenizer

Sampling = Literal["sample", "argmax"]


@dataclass
class Corruption:
    tokens: torch.Tensor
    """(B, h, w) the tokenizer's tokens of the original images."""
    logits: torch.Tensor
    """(M, vocab) the generator's logits at the M masked positions (row-major, batch first)."""
    corrupted_tokens: torch.Tensor
    """(B, h, w) the tokens the corrupted images were rendered from."""
    images: torch.Tensor
    """(B, C, H, W) corrupted images in the networks' normalisation."""
    replaced: torch.Tensor
    """(B, h, w) bool: masked and sampled differently from the original token (RevDet's labels)."""


def full_precision(like: torch.Tensor) -> AbstractContextManager[None]:
    """Autocast off on `like`'s device: the tokenizer reads and renders in float32 whatever the run's precision. The
    tokens are an argmax over thousands of logits (8192 for DALL-E's dVAE, whose own code keeps them in float32):
    under a bf16 autocast they change at a few percent of the positions, and with them the generator's targets,
    RevDet's labels and the rendered images."""
    return torch.autocast(like.device.type, enabled=False)


class Corrupter(nn.Module):
    """The frozen `tokenizer` for images normalised by `mean` and `std`, one token per cell of `token_grid`;
    replacements drawn from softmax(logits / `temperature`) (`sampling: sample`) or the most likely token."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        token_grid: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        sampling: Sampling = "sample",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer.requires_grad_(False).eval()
        self.sampling, self.temperature = sampling, temperature
        self.tokenizer_size = (token_grid[0] * tokenizer.patch_size, token_grid[1] * tokenizer.patch_size)
        """Height and width of the images the tokenizer reads and renders."""
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Corrupter:
        super().train(mode)
        self.tokenizer.eval()  # frozen: never in training mode
        return self

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) tokens of normalised images, resized to the tokenizer's side and matched to its channels (gray
        images repeated for an RGB tokenizer such as DALL-E's, RGB averaged for a gray one)."""
        with full_precision(images):
            pixels = resize((images.float() * self.std + self.mean).clamp(0, 1), self.tokenizer_size)
            return self.tokenizer.encode(match_channels(pixels, self.tokenizer.channels))

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, masks: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """One token per masked position (row-major, batch first): the argmax, or a draw from
        softmax(logits / temperature) image by image with a generator seeded by that image's seed (`seeds`, (B,)),
        so an image's draws depend neither on the rest of the batch nor on the process it landed on."""
        if self.sampling == "argmax":
            return logits.argmax(-1)
        probabilities = F.softmax(logits.float() / self.temperature, -1)
        counts = masks.flatten(1).sum(1).tolist()
        samples = [torch.empty(0, dtype=torch.long, device=logits.device)]
        for rows, seed in zip(probabilities.split(counts), seeds.tolist(), strict=True):
            if len(rows):
                generator = torch.Generator(device=rows.device).manual_seed(int(seed))
                samples.append(torch.multinomial(rows, 1, generator=generator).squeeze(-1))
        return torch.cat(samples)

    @torch.no_grad()
    def render(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The tokenizer's image of `tokens` as the networks see images like `like` (size, channels, dtype,
        normalisation)."""
        with full_precision(tokens):
            pixels = match_channels(resize(self.tokenizer.decode(tokens).float(), like.shape[-2:]), like.shape[1])
        return (pixels.to(like.dtype) - self.mean) / self.std

    @torch.no_grad()
    def corrupt(
        self, tokens: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor, seeds: torch.Tensor, like: torch.Tensor
    ) -> Corruption:
        """`tokens` (B, h, w) with the positions of `masks` replaced by samples of the generator's `logits` (M,
        vocab), rendered like `like`; the logits are kept as they are (with their gradient) for the generator's
        loss."""
        corrupted_tokens = tokens.clone()
        corrupted_tokens[masks] = self.sample(logits, masks, seeds)
        images = self.render(corrupted_tokens, like)
        return Corruption(tokens, logits, corrupted_tokens, images, masks & (corrupted_tokens != tokens))


def resize(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, H, W) images at (height, width) `size`: antialiased bilinear, or as they are when already there."""
    height, width = size
    if images.shape[-2] == height and images.shape[-1] == width:
        return images
    return F.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def match_channels(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) pixels with `channels` channels: a gray image repeated, or the channel mean of an RGB one."""
    if pixels.shape[1] == channels:
        return pixels
    return pixels.mean(1, keepdim=True).expand(-1, channels, -1, -1)
