"""DTM's dynamic token morphing (METHODS.md §2): group related tokens by the targets, then compare group means.

Token-wise distillation targets are spatially inconsistent; DTM groups contextually related tokens with k rounds
of ToMe bipartite soft matching on the (detached) target tokens, and averages the student's and the teacher's
tokens over the *same* groups before the loss. The grouping is a plain partition of the N tokens, so it can morph
any tensor over those tokens: feature predictions, feature targets or iBOT's per-token distributions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mimkit.config import check
from mimkit.losses.regression import RegressionKind, normalize_targets, regression_loss


def merges_per_iteration(num_removed: int, iterations: int, num_tokens: int) -> int:
    """r = ceil(m/k), or floor(m/k) when k rounds of ceil(m/k) merges would remove more than the N tokens."""
    if num_removed < 0 or iterations < 1 or num_tokens < 0:
        raise ValueError(f"need m >= 0, k >= 1, N >= 0; got m={num_removed}, k={iterations}, N={num_tokens}")
    ceil = -(-num_removed // iterations)
    return ceil if ceil * iterations <= num_tokens else num_removed // iterations


@dataclass(frozen=True)
class MorphSchedule:
    """One grouping schedule: remove about m tokens in k rounds of r merges (r is capped per round when grouping)."""

    num_removed: int
    iterations: int
    merges_per_iteration: int

    def __post_init__(self) -> None:
        if self.num_removed < 0 or self.iterations < 1 or self.merges_per_iteration < 0:
            raise ValueError(f"invalid morph schedule {self}")

    @classmethod
    def from_counts(cls, num_removed: int, iterations: int, num_tokens: int) -> MorphSchedule:
        """The schedule DTM uses for m removed tokens in k rounds on N tokens."""
        return cls(num_removed, iterations, merges_per_iteration(num_removed, iterations, num_tokens))


class ScheduleSampler:
    """Draws DTM's L schedules per iteration: m ~ U{0..N}, k ~ U{1..max_iterations}, shared by the whole batch.

    Uses torch's global RNG unless a generator is given. Methods pass `step_generator(seed, step)`: the same
    schedules on every process at a step (so N processes train like one at the same global batch), and again
    when a run resumes.
    """

    def __init__(self, num_tokens: int, num_schedules: int = 2, max_iterations: int = 14) -> None:
        if num_tokens < 1 or num_schedules < 1 or max_iterations < 1:
            raise ValueError(f"need N, L, max_iterations >= 1; got {num_tokens}, {num_schedules}, {max_iterations}")
        self.num_tokens = num_tokens
        self.num_schedules = num_schedules
        self.max_iterations = max_iterations

    def sample(self, generator: torch.Generator | None = None) -> list[MorphSchedule]:
        removed = torch.randint(0, self.num_tokens + 1, (self.num_schedules,), generator=generator)
        iterations = torch.randint(1, self.max_iterations + 1, (self.num_schedules,), generator=generator)
        return [
            MorphSchedule.from_counts(m, k, self.num_tokens)
            for m, k in zip(removed.tolist(), iterations.tolist(), strict=True)
        ]


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator determined by (seed, optimizer step) alone: identical on every rank, and after a resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)


def draw_seed() -> int:
    """A seed from torch's global RNG; drawn while every rank holds the run's seed, it is the same on all."""
    return int(torch.randint(0, 2**62, ()))


@dataclass
class MorphConfig:
    """Dynamic token morphing: how many schedules per iteration and how many rounds at most."""

    enabled: bool = True
    """False: token-wise distillation (the m = 0 special case every step)."""
    num_schedules: int = 2
    """L: schedules drawn per iteration, shared by the batch; the loss averages over them."""
    max_iterations: int = 14
    """k ~ U{1..max_iterations} matching rounds per schedule."""
    protect_first_token: bool = True
    """Token 0 never merges (the reference's behaviour; reproduces its numbers)."""

    def validate(self, prefix: str) -> None:
        check(self.num_schedules >= 1, f"{prefix}.num_schedules", f"must be >= 1; got {self.num_schedules}")
        check(self.max_iterations >= 1, f"{prefix}.max_iterations", f"must be >= 1; got {self.max_iterations}")

    def schedules(self, sampler: ScheduleSampler, generator: torch.Generator | None = None) -> list[MorphSchedule]:
        """This iteration's schedules; the identity schedule (m = 0) when morphing is off."""
        if self.enabled:
            return sampler.sample(generator)
        return [MorphSchedule(0, 1, 0)]


@dataclass(frozen=True)
class TokenGrouping:
    """A partition of each image's N tokens; `groups[b, i]` is the smallest original token index in i's group."""

    groups: Tensor

    @property
    def num_groups(self) -> Tensor:
        """(B,) groups per image: each group has exactly one member whose index is its label."""
        positions = torch.arange(self.groups.shape[1], device=self.groups.device)
        return (self.groups == positions).sum(dim=1)

    def morph(self, x: Tensor) -> Tensor:
        """Replace every token of x (B, N, ...) by the plain mean of its group; differentiable with respect to x.

        Sums are accumulated in at least float32 (bf16 sums of many tokens are coarse); the result has x's dtype.
        """
        if x.shape[:2] != self.groups.shape:
            raise ValueError(f"tokens {tuple(x.shape[:2])} do not match the grouping {tuple(self.groups.shape)}")
        flat = x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)
        accumulate = torch.promote_types(x.dtype, torch.float32)
        groups = self.groups.to(x.device)
        index = groups.unsqueeze(-1).expand(flat.shape)
        sums = torch.zeros(flat.shape, dtype=accumulate, device=x.device).scatter_add(1, index, flat.to(accumulate))
        counts = torch.zeros(groups.shape, dtype=accumulate, device=x.device).scatter_add(
            1, groups, torch.ones(groups.shape, dtype=accumulate, device=x.device)
        )
        means = sums / counts.clamp_min(1).unsqueeze(-1)
        return means.gather(1, index).to(x.dtype).reshape(x.shape)


def group_tokens(target: Tensor, schedule: MorphSchedule, protect_first_token: bool = True) -> TokenGrouping:
    """Group the tokens of `target` (B, N, C) by k rounds of bipartite soft matching, batched over images.

    Works on a detached copy, so the grouping is a constant for the loss, and in at least float32 with autocast off,
    so mixed precision does not turn near-ties of the similarities into different groups. Each round merges
    min(r, (t - protected) // 2) pairs on the current t tokens: never more than the A tokens that may merge.
    """
    if target.dim() != 3:
        raise ValueError(f"target tokens must be (B, N, C); got {tuple(target.shape)}")
    batch, num_tokens, _ = target.shape
    features = target.detach().to(torch.promote_types(target.dtype, torch.float32))
    sizes = features.new_ones(batch, num_tokens, 1)
    assignment = torch.arange(num_tokens, device=target.device).expand(batch, -1)
    protected = int(protect_first_token)
    with torch.autocast(target.device.type, enabled=False):
        for _ in range(schedule.iterations):
            merges = min(schedule.merges_per_iteration, (features.shape[1] - protected) // 2)
            if merges <= 0:
                break
            features, sizes, new_position = _merge_round(features, sizes, merges, protect_first_token)
            assignment = new_position.gather(1, assignment)
    return TokenGrouping(_label_by_smallest_member(assignment))


def morph_loss(
    student: Tensor,
    teacher: Tensor,
    groupings: list[TokenGrouping],
    kind: RegressionKind,
    beta: float = 2.0,
    normalize_target: bool = False,
) -> Tensor:
    """DTM's loss: the regression loss between morphed student and morphed teacher, averaged over the groupings.

    The teacher is a target and gets no gradient. `normalize_target` applies a per-token LayerNorm to the morphed
    targets (DTM's optional target normalisation).
    """
    if not groupings:
        raise ValueError("morph_loss needs at least one grouping")
    teacher = teacher.detach()
    losses = []
    for grouping in groupings:
        target = grouping.morph(teacher)
        if normalize_target:
            target = normalize_targets(target)
        losses.append(regression_loss(grouping.morph(student), target, kind, beta))
    return torch.stack(losses).mean()


def _match(features: Tensor, merges: int, protect_first_token: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Bipartite soft matching: A = even positions, B = odd; the `merges` A tokens most similar to their best B.

    Returns (merged A indices, their B destinations, kept A indices), each (B, ·). Kept A tokens come in score
    order, re-sorted by A index when the first token is protected (the reference's token order).
    """
    unit = F.normalize(features, dim=-1)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
    if protect_first_token:
        scores[:, 0] = -torch.inf
    best_score, best_match = scores.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True)
    merged, kept = order[:, :merges], order[:, merges:]
    if protect_first_token:
        kept = kept.sort(dim=-1).values
    return merged, best_match.gather(1, merged), kept


def _merge_round(
    features: Tensor, sizes: Tensor, merges: int, protect_first_token: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """One round: size-weighted merge of the matched pairs; returns features, sizes and each old token's new slot.

    The new token order is [kept A tokens, B tokens]; merged A tokens move into their B destination.
    """
    merged, destination, kept = _match(features, merges, protect_first_token)
    weighted = torch.cat([features * sizes, sizes], dim=-1)
    side_a, side_b = weighted[:, ::2], weighted[:, 1::2]
    width = weighted.shape[-1]
    moved = side_a.gather(1, merged.unsqueeze(-1).expand(-1, -1, width))
    side_b = side_b.scatter_add(1, destination.unsqueeze(-1).expand(-1, -1, width), moved)
    stays = side_a.gather(1, kept.unsqueeze(-1).expand(-1, -1, width))
    combined = torch.cat([stays, side_b], dim=1)
    new_sizes = combined[..., -1:]
    new_position = _new_positions(merged, destination, kept, features.shape[1])
    return combined[..., :-1] / new_sizes, new_sizes, new_position


def _new_positions(merged: Tensor, destination: Tensor, kept: Tensor, num_current: int) -> Tensor:
    """(B, t) map from each current token to its slot after the round."""
    batch, num_kept = kept.shape
    device = kept.device
    slot_a = torch.empty(batch, (num_current + 1) // 2, dtype=torch.long, device=device)
    slot_a.scatter_(1, kept, torch.arange(num_kept, device=device).expand(batch, -1))
    slot_a.scatter_(1, merged, num_kept + destination)
    slot_b = num_kept + torch.arange(num_current // 2, device=device).expand(batch, -1)
    slots = torch.empty(batch, num_current, dtype=torch.long, device=device)
    slots[:, ::2] = slot_a
    slots[:, 1::2] = slot_b
    return slots


def _label_by_smallest_member(assignment: Tensor) -> Tensor:
    """Relabel (B, N) current-token ids by the smallest original token index each current token holds."""
    batch, num_tokens = assignment.shape
    original = torch.arange(num_tokens, device=assignment.device).expand(batch, -1)
    smallest = torch.full_like(assignment, num_tokens).scatter_reduce(1, assignment, original, reduce="amin")
    return smallest.gather(1, assignment)
