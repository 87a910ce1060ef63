"""Collective helpers that are no-ops in a single process, for parts that need batch-wide statistics."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all processes (returns a new tensor; the input is left unchanged)."""
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total / world_size()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (same shape on every process) along dim 0 across processes, without gradient."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` along dim 0 across processes, with gradients flowing back to every process's part
    (contrastive keys that require grad)."""
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()))


def all_reduce_sum_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes, differentiable (batch statistics that gradients flow through)."""
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor)
