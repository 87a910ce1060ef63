"""Token-wise regression losses for feature distillation (DTM's smooth-L1 and its listed alternatives).

All losses are means over every element (channels, tokens, batch), so a morphed group of s tokens weighs s times
one token: DTM writes each group mean back to all its members on purpose. Losses are computed in at least
float32, so bf16 predictions under autocast do not lose the small differences the loss is made of.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

RegressionKind = Literal["smooth_l1", "l1", "l2", "cosine"]
REGRESSION_KINDS: tuple[str, ...] = get_args(RegressionKind)

TARGET_NORM_EPS = 1e-6


def regression_loss(pred: Tensor, target: Tensor, kind: RegressionKind, beta: float = 2.0) -> Tensor:
    """Scalar loss between `pred` and `target` (same shape, channels last).

    smooth_l1: 0.5 d²/beta where |d| < beta, else |d| - beta/2 (beta 2 is DTM's value); l1, l2: mean |d|, mean d².
    cosine: the *negative* cosine similarity of each token's channel vector, averaged over tokens, so it lies in
    [-1, 1] and is -1 when every prediction points along its target (no constant offset, same gradient as 1 - cos).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    pred, target = pred.to(dtype), target.to(dtype)
    if kind == "smooth_l1":
        if beta <= 0:
            raise ValueError(f"smooth_l1 needs beta > 0; got {beta}")
        return F.smooth_l1_loss(pred, target, beta=beta)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "cosine":
        return -F.cosine_similarity(pred, target, dim=-1).mean()
    raise ValueError(f"unknown regression loss {kind!r}; expected one of {REGRESSION_KINDS}")


def normalize_targets(x: Tensor) -> Tensor:
    """Per-token LayerNorm without affine parameters: puts targets of any teacher on one scale (DTM's option)."""
    return F.layer_norm(x, x.shape[-1:], eps=TARGET_NORM_EPS)
