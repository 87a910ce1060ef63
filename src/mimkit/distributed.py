"""Collective helpers that are no-ops in a single process, for parts that need batch-wide statistics."""

from __future__ import annotations

import os

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


def join_launched_processes() -> int:
    """Join the process group a launcher (torchrun) describes in the environment, so that work outside the training
    engine (frozen-feature evaluation) shares out over the processes; this process's rank (0 when alone). NCCL
    with this process's GPU (LOCAL_RANK) on CUDA, gloo otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank()


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
