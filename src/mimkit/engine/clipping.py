"""Gradient clipping policies: one global norm, each parameter tensor on its own (DINO/iBOT), or each module.

Gradients must already be unscaled (16-mixed); the engine unscales them once before calling `clip`.
"""

from __future__ import annotations

import torch
from torch import nn

from mimkit.methods.base import ClipPolicy


def clip_per_tensor(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale each gradient tensor whose norm exceeds `max_norm` down to it; returns the pre-clip total norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(grads))
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(factors.unbind()))
    return norms.norm()


def clip_global(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)


def clip(policy: ClipPolicy, model: nn.Module) -> dict[str, torch.Tensor]:
    """Apply `policy`; returns the gradient norm(s) before clipping, for the logs."""
    if policy.mode == "none":
        return {}
    if policy.mode == "per_module":
        return {
            f"grad_norm/{name}": clip_global(_trainable(module), policy.max_norm)
            for name, module in policy.modules.items()
        }
    params = _trainable(model)
    fn = clip_per_tensor if policy.mode == "per_tensor" else clip_global
    return {"grad_norm": fn(params, policy.max_norm)}


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad and p.grad is not None]
