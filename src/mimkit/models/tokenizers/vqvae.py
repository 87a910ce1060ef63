"""A small convolutional VQ-VAE that mimkit trains itself: one token per patch, an EMA codebook with dead-code
restarts (van den Oord et al., 2017; Razavi et al., 2019), frozen once trained.

Any patch size works: the encoder starts with a patch-sized strided convolution and the decoder ends with a
pixel shuffle, so the token grid is exactly the enhancer's patch grid; 3 x 3 convolutions in between let each
token see its neighbours.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from mimkit.config import check
from mimkit.models.tokenizers.base import CodeUsage, Status, Tokenizer, TokenizerConfig, nearest_codes, random_rows
from mimkit.models.tokenizers.registry import register_tokenizer


@dataclass
class VQVAEConfig(TokenizerConfig):
    """The VQ-VAE's widths and training (`epochs` = training epochs)."""

    kind: str = "vqvae"
    hidden_dim: int = 64
    """Width of its convolutions."""
    code_dim: int = 32
    """Size of a code vector."""
    decay: float = 0.99
    """EMA decay of the codebook."""
    commitment: float = 0.25
    """Weight of the commitment loss."""
    loss: Literal["l1", "l2"] = "l2"
    """Reconstruction loss."""
    lr: float = 1e-3
    """Adam learning rate."""

    def validate(self, prefix: str = "tokenizer") -> None:
        super().validate(prefix)
        check(0 < self.decay < 1, f"{prefix}.decay", f"must lie in (0, 1); got {self.decay}")


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@register_tokenizer
class VQVAETokenizer(Tokenizer):
    kind = "vqvae"
    Config = VQVAEConfig

    def __init__(
        self,
        vocab_size: int,
        patch_size: int,
        channels: int,
        hidden_dim: int = 64,
        code_dim: int = 32,
        decay: float = 0.99,
        commitment: float = 0.25,
    ) -> None:
        super().__init__()
        self.vocab_size, self.patch_size, self.channels = vocab_size, patch_size, channels
        self.hidden_dim, self.code_dim, self.decay, self.commitment = hidden_dim, code_dim, decay, commitment
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, hidden_dim, patch_size, stride=patch_size),
            ResidualBlock(hidden_dim),
            ResidualBlock(hidden_dim),
            nn.GELU(),
            nn.Conv2d(hidden_dim, code_dim, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, hidden_dim, 1),
            ResidualBlock(hidden_dim),
            ResidualBlock(hidden_dim),
            nn.GELU(),
            nn.Conv2d(hidden_dim, channels * patch_size * patch_size, 1),
            nn.PixelShuffle(patch_size),
        )
        self.register_buffer("codebook", torch.zeros(vocab_size, code_dim))
        self.register_buffer("ema_count", torch.zeros(vocab_size))
        self.register_buffer("ema_sum", torch.zeros(vocab_size, code_dim))

    @classmethod
    def build(cls, cfg: TokenizerConfig, channels: int) -> VQVAETokenizer:
        assert isinstance(cfg, VQVAEConfig)
        return cls(cfg.vocab_size, cfg.patch_size, channels, cfg.hidden_dim, cfg.code_dim, cfg.decay, cfg.commitment)

    def config(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "patch_size": self.patch_size,
            "channels": self.channels,
            "hidden_dim": self.hidden_dim,
            "code_dim": self.code_dim,
            "decay": self.decay,
            "commitment": self.commitment,
        }

    def fit(
        self, cfg: TokenizerConfig, batches: Iterable[torch.Tensor], generator: torch.Generator, status: Status
    ) -> None:
        """Adam on reconstruction + commitment; the codebook follows the encoder by EMA; codes no encoder output
        chose while RESTART_PATCHES_PER_CODE x vocab_size tokens were assigned restart on random encoder outputs."""
        assert isinstance(cfg, VQVAEConfig)
        optimizer = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=cfg.lr)
        reconstruction_loss = F.l1_loss if cfg.loss == "l1" else F.mse_loss
        window = CodeUsage(self.vocab_size, self.codebook.device)
        self.train()
        started = False
        for images in batches:
            if not started:
                with torch.no_grad():
                    self.initialize(self.latents(images).permute(0, 2, 3, 1).flatten(0, 2), generator)
                started = True
            reconstructions, commitment, latents, ids = self(images)
            loss = reconstruction_loss(reconstructions, images) + commitment
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.update_codebook(latents.detach(), ids)
            if window.add(ids):
                flat = latents.detach().permute(0, 2, 3, 1).flatten(0, 2)
                window.restarted(self.restart_dead(flat, window.used, generator))
            status(f"loss {loss.item():.4f}, {window.restarts} unused codes restarted")
        self.eval()

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, code_dim, h, w) encoder outputs before quantisation; images in [0, 1] (centred for the convs)."""
        return self.encoder(images * 2 - 1)

    def nearest(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h, w) ids of the nearest codes."""
        batch, _, h, w = latents.shape
        return nearest_codes(latents.permute(0, 2, 3, 1).reshape(-1, self.code_dim), self.codebook).reshape(batch, h, w)

    def render(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) code vectors -> (B, C, h * p, w * p) images in [0, 1]."""
        return torch.sigmoid(self.decoder(codes))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.nearest(self.latents(images))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.render(self.codebook[tokens].permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstructions, commitment loss, latents, ids); the decoder gets the quantised codes
        with a straight-through gradient to the encoder."""
        latents = self.latents(images)
        ids = self.nearest(latents)
        quantized = self.codebook[ids].permute(0, 3, 1, 2)
        commitment = self.commitment * F.mse_loss(latents, quantized.detach())
        straight_through = latents + (quantized - latents).detach()
        return self.render(straight_through), commitment, latents, ids

    @torch.no_grad()
    def initialize(self, latents: torch.Tensor, generator: torch.Generator) -> None:
        """Codes drawn from random encoder outputs (N, D), so none starts far from the data."""
        self.codebook.copy_(random_rows(latents, self.vocab_size, generator))
        self.ema_sum.copy_(self.codebook)
        self.ema_count.fill_(1.0)

    @torch.no_grad()
    def update_codebook(self, latents: torch.Tensor, ids: torch.Tensor) -> None:
        """EMA of the encoder outputs assigned to each code (Laplace-smoothed counts); latents (B, D, h, w)."""
        flat = latents.permute(0, 2, 3, 1).reshape(-1, self.code_dim).float()
        ids = ids.flatten()
        counts = torch.bincount(ids, minlength=self.vocab_size).to(flat)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, flat)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (total + self.vocab_size * 1e-5) * total
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def restart_dead(self, latents: torch.Tensor, used: torch.Tensor, generator: torch.Generator) -> int:
        """Codes no encoder output chose lately (`used` False) restart on random encoder outputs (N, D), with a
        fresh EMA; returns how many."""
        dead = (~used).nonzero().flatten()
        if len(dead):
            self.codebook[dead] = random_rows(latents, len(dead), generator).float()
            self.ema_sum[dead] = self.codebook[dead]
            self.ema_count[dead] = 1.0
        return len(dead)
