"""InfoNCE in the MoCo v3 form: each query's positive is the key of the same image, every other image's key in the
global batch is a negative.

Queries and keys are L2-normalised; logits q·kᵀ / τ against the keys of every process (all-gathered, gradients
flowing back when keys require them); each process's positives sit at its offset in the global batch; the
cross-entropy is scaled by 2τ, as MoCo v3 does, so its size does not depend on the temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimkit.distributed import all_gather_grad, rank


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """2τ · CE(q kᵀ / τ, positives on the diagonal of this process's block); query and key are (B, D) per process."""
    if query.shape != key.shape or query.ndim != 2:
        raise ValueError(f"query and key must both be (B, D); got {tuple(query.shape)} and {tuple(key.shape)}")
    query = F.normalize(query.float(), dim=1)
    keys = F.normalize(all_gather_grad(key.float()), dim=1)
    logits = query @ keys.T / temperature
    labels = torch.arange(len(query), device=query.device) + rank() * len(query)
    return F.cross_entropy(logits, labels) * (2 * temperature)
