"""Training-health measures: is a teacher's output uniform or one-hot, have the features collapsed, do the masks
cover what their config asks for?

Methods compute them from tensors their step already has and return them as `health_*` metrics; the engine
watches those names (`mimkit.engine.health`) without knowing the method. Every measure is a ratio in [0, 1] so one
threshold fits every model size:

  health_teacher_entropy   mean entropy of the teacher's distributions / log K: 1 uniform, 0 one-hot
  health_teacher_max_prob  mean largest probability: 1 / K uniform, 1 one-hot
  health_prototypes_used   share of the K prototypes that are some sample's most likely one in the batch
  health_feature_std       std per dimension of the L2-normalised features x sqrt(D): about 1 spread out, 0 when
                           every image maps to the same point
  health_feature_rank      effective rank (exp of the entropy of the normalised singular values; Roy & Vetterli,
                           2007) of the centred features / min(B, D): 0 when they lie on a line
  health_mask_fill         realised / configured share of masked patches (`mask_health`): 1 as configured, 0 when
                           nothing is masked

Every mask a method draws is reported in one generic form, with a role prefix when it draws several (SymMIM:
`online_`, `momentum_`): `[ROLE_]mask_ratio` (realised in this batch), `[ROLE_]mask_ratio_configured` (what the mask
config asks for on average) and `health_[ROLE_]mask_fill`, their ratio, which the engine's watch reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def distribution_health(probabilities: torch.Tensor, prefix: str = "health_teacher") -> dict[str, torch.Tensor]:
    """Measures of a batch of distributions (..., K) over K prototypes."""
    p = probabilities.detach().float().flatten(0, -2)
    k = p.shape[-1]
    entropy = -(p * p.clamp(min=1e-12).log()).sum(-1).mean() / math.log(k)
    used = torch.zeros(k, device=p.device).index_fill_(0, p.argmax(-1), 1.0).mean()
    return {f"{prefix}_entropy": entropy, f"{prefix}_max_prob": p.max(-1).values.mean(), "health_prototypes_used": used}


@torch.no_grad()
def feature_health(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Measures of a batch of image features (B, D)."""
    x = F.normalize(features.detach().float(), dim=-1)
    spread = x.std(0).mean() * math.sqrt(x.shape[-1])
    singular = torch.linalg.svdvals(x - x.mean(0))
    weights = singular / singular.sum().clamp(min=1e-12)
    rank = torch.exp(-(weights * weights.clamp(min=1e-12).log()).sum()) / min(x.shape)
    return {"health_feature_std": spread, "health_feature_rank": rank}


@torch.no_grad()
def mask_health(
    masks: torch.Tensor, configured: float, role: str = "", *, logged: bool = True
) -> dict[str, torch.Tensor | float]:
    """The realised share of masked patches of a batch of masks (True = masked), the `configured` share and, on
    logged steps (`logged`, where every health measure is taken), their ratio; no ratio while nothing is asked for
    (before masking starts), where any realised share is as configured."""
    prefix = f"{role}_" if role else ""
    realised = masks.detach().float().mean()
    metrics: dict[str, torch.Tensor | float] = {
        f"{prefix}mask_ratio": realised,
        f"{prefix}mask_ratio_configured": configured,
    }
    if configured > 0 and logged:
        metrics[f"health_{prefix}mask_fill"] = realised / configured
    return metrics
