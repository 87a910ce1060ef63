"""A patch codebook fitted by mini-batch k-means: the tokenizer that needs no training run and no download.

encode = the nearest centroid of each patch (squared L2 on its p x p x C pixels), decode = paste the centroids.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from mimkit.data.info import DataError
from mimkit.losses.pixels import patchify, unpatchify
from mimkit.models.tokenizers.base import CodeUsage, Status, Tokenizer, TokenizerConfig, nearest_codes, random_rows
from mimkit.models.tokenizers.registry import register_tokenizer


@dataclass
class KMeansConfig(TokenizerConfig):
    """A k-means codebook: the common fields are all it needs (`epochs` = passes of mini-batch k-means)."""

    kind: str = "kmeans"


@register_tokenizer
class KMeansTokenizer(Tokenizer):
    kind = "kmeans"
    Config = KMeansConfig

    def __init__(self, vocab_size: int, patch_size: int, channels: int) -> None:
        super().__init__()
        self.vocab_size, self.patch_size, self.channels = vocab_size, patch_size, channels
        self.register_buffer("centroids", torch.zeros(vocab_size, patch_size * patch_size * channels))
        self.register_buffer("counts", torch.zeros(vocab_size))
        """Patches assigned to each centroid while fitting (its mini-batch k-means learning rate is 1 / count)."""

    @classmethod
    def build(cls, cfg: TokenizerConfig, channels: int) -> KMeansTokenizer:
        return cls(cfg.vocab_size, cfg.patch_size, channels)

    def config(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "patch_size": self.patch_size, "channels": self.channels}

    def fit(
        self, cfg: TokenizerConfig, batches: Iterable[torch.Tensor], generator: torch.Generator, status: Status
    ) -> None:
        """Mini-batch k-means; centroids that no patch chose while RESTART_PATCHES_PER_CODE x vocab_size patches
        were assigned restart on random patches of the current batch."""
        window = CodeUsage(self.vocab_size, self.centroids.device)
        pool: list[torch.Tensor] = []
        initialized = False
        for images in batches:
            patches = patchify(images, self.patch_size).flatten(0, 1)
            if not initialized:
                pool.append(patches)
                if sum(len(p) for p in pool) < self.vocab_size:
                    continue
                self.initialize(torch.cat(pool), generator)
                initialized, pool = True, []
            if window.add(self.update(patches)):
                window.restarted(self.restart_dead(patches, window.used, generator))
            status(f"{window.restarts} unused codes restarted")
        if not initialized:
            raise DataError(
                f"k-means with {self.vocab_size} codes needs at least as many patches; lower tokenizer.vocab_size"
            )

    def nearest(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., D) patch vectors -> (...) ids of their nearest centroids."""
        flat = patches.reshape(-1, patches.shape[-1]).float()
        return nearest_codes(flat, self.centroids).reshape(patches.shape[:-1])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        return self.nearest(patchify(images, self.patch_size)).reshape(-1, h, w)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, h, w = tokens.shape
        patches = self.centroids[tokens.reshape(batch, h * w)]
        return unpatchify(patches, self.patch_size, h * self.patch_size, w * self.patch_size)

    @torch.no_grad()
    def initialize(self, patches: torch.Tensor, generator: torch.Generator) -> None:
        """Centroids drawn from distinct random patches (N, D), N >= vocab_size."""
        chosen = torch.randperm(len(patches), generator=generator)[: self.vocab_size].to(patches.device)
        self.centroids.copy_(patches[chosen])
        self.counts.zero_()

    @torch.no_grad()
    def update(self, patches: torch.Tensor) -> torch.Tensor:
        """One mini-batch k-means step (Sculley, 2010) on patches (N, D); returns their assignments.

        Each centroid moves to the running mean of every patch ever assigned to it, in one vectorised step per
        batch: c <- c + (sum of its new patches - n * c) / (count + n)."""
        assigned = self.nearest(patches)
        n = torch.bincount(assigned, minlength=self.vocab_size).to(self.counts)
        sums = torch.zeros_like(self.centroids).index_add_(0, assigned, patches.float())
        self.counts += n
        moved = n > 0
        self.centroids[moved] += (sums[moved] - n[moved, None] * self.centroids[moved]) / self.counts[moved, None]
        return assigned

    @torch.no_grad()
    def restart_dead(self, patches: torch.Tensor, used: torch.Tensor, generator: torch.Generator) -> int:
        """Centroids no patch chose in the last pass (`used` False) restart on random patches; returns how many."""
        dead = (~used).nonzero().flatten()
        if len(dead):
            self.centroids[dead] = random_rows(patches, len(dead), generator).float()
            self.counts[dead] = 0
        return len(dead)
