"""What the ViT and BEiT encoders share: a mask token, attention maps and the features of the last blocks.

Both wrap a timm transformer (`blocks` of timm blocks with an `attn` module each, a final `norm`). timm runs
attention through fused SDPA, which never forms the probabilities; `last_attention` switches the last block to
timm's own explicit path for one call and reads the probabilities where that path applies attention dropout,
so timm is left untouched and the maps are exactly the weights the block used.

Under bf16 autocast on a CPU the blocks take timm's explicit path too (`attention_path`): torch's CPU
flash-attention kernel runs its bf16 backward several times slower than bf16 matrix products at ViT sequence
lengths (ViT-Ti on 50 tokens, forward + backward of 128 images: 775 ms fused, 458 ms explicit; in fp32 both 1.4 s).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimkit.config import ConfigError
from mimkit.models.backbone_config import TRANSFORMER_SHAPE, BackboneConfig
from mimkit.models.encoder import Encoder


@contextmanager
def explicit_attention(modules: list[nn.Module]) -> Iterator[None]:
    """timm attention modules on their explicit path (`fused_attn` off) for the block, restored after."""
    fused = [attn.fused_attn for attn in modules]
    for attn in modules:
        attn.fused_attn = False
    try:
        yield
    finally:
        for attn, was in zip(modules, fused, strict=True):
            attn.fused_attn = was


class TransformerEncoder(Encoder):
    has_attention = True
    takes_mask = True
    shape_fields = TRANSFORMER_SHAPE

    @classmethod
    def timm_arguments(cls, cfg: BackboneConfig) -> dict[str, Any]:
        """The recipe's image size and shape overrides (a tiny transformer for small images)."""
        return {"img_size": cfg.img_size, **cfg.shape_overrides()}

    @classmethod
    def wrap(cls, model: nn.Module, cfg: BackboneConfig, timm_args: dict[str, Any], *, mask_token: bool) -> Encoder:
        """A subclass is built as `cls(timm_model, mask_token=..., timm_name=..., timm_args=...)`."""
        return cls(model, mask_token=mask_token, timm_name=cfg.name, timm_args=timm_args)  # type: ignore[call-arg]

    def __init__(self, mask_token: nn.Parameter | None) -> None:
        super().__init__()
        self.mask_token = mask_token
        self.activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.activation_checkpointing = enabled

    def run_blocks(self, blocks: nn.ModuleList, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The blocks in order; with activation checkpointing each block's activations are recomputed in backward."""
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in blocks:
            tokens = checkpoint(block, tokens, use_reentrant=False, **kwargs) if recompute else block(tokens, **kwargs)
        return tokens

    @contextmanager
    def attention_path(self, tokens: torch.Tensor) -> Iterator[None]:
        """Run the blocks' attention through timm's explicit path for this call when `tokens` are on a CPU under
        bf16 autocast (faster there, same math); fused SDPA everywhere else."""
        explicit = (
            tokens.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        modules = [block.attn for block in self.transformer_blocks() if getattr(block.attn, "fused_attn", False)]
        with explicit_attention(modules if explicit else []):
            yield

    @property
    def supports_mask(self) -> bool:  # type: ignore[override]
        return self.mask_token is not None

    def transformer_blocks(self) -> nn.ModuleList:
        return self.timm_model().blocks

    def final_norm(self) -> nn.Module:
        return self.timm_model().norm

    def apply_mask(self, tokens: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, ...]) -> torch.Tensor:
        """Patch embeddings (B, h, w, D) or (B, h * w, D) with the masked ones replaced by the mask token."""
        if mask is None:
            return tokens
        if self.mask_token is None:
            raise ValueError("this network has no mask token (teachers see unmasked images)")
        if mask.shape[1:] != tuple(grid):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the patch grid {tuple(grid)}")
        mask = mask.reshape(tokens.shape[:-1])
        shape = (1,) * (tokens.dim() - 1) + (-1,)
        return torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype).view(shape), tokens)

    @torch.no_grad()
    def last_attention(self, images: torch.Tensor) -> torch.Tensor:
        attn = self.transformer_blocks()[-1].attn
        if not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
            raise TypeError(f"last block uses {type(attn).__name__}; attention maps need a timm attention module")
        captured: list[torch.Tensor] = []
        handle = attn.attn_drop.register_forward_hook(lambda _module, args, _output: captured.append(args[0]))
        try:
            with explicit_attention([attn]):
                self(images)
        finally:
            handle.remove()
        return captured[0]

    def check_block_features(self, blocks: int) -> None:
        if self.num_prefix_tokens < 1:
            raise ConfigError("last-blocks [CLS] features need a transformer with a [CLS] token")
        depth = len(self.transformer_blocks())
        if depth < blocks:
            raise ConfigError(f"last-{blocks} features need at least {blocks} blocks; this one has {depth}")

    def block_features(self, images: torch.Tensor, blocks: int) -> torch.Tensor:
        """[CLS] after each of the last `blocks` blocks through the final norm (DINO/iBOT's linear probe of ViT-S)."""
        self.check_block_features(blocks)
        timm_blocks = self.transformer_blocks()
        captured: list[torch.Tensor] = []
        hooks = [
            block.register_forward_hook(lambda _module, _inputs, output: captured.append(output[:, 0]))
            for block in timm_blocks[-blocks:]
        ]
        try:
            self(images)
        finally:
            for hook in hooks:
                hook.remove()
        norm = self.final_norm()
        return torch.cat([norm(cls) for cls in captured], dim=-1)
