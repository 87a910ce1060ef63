"""DTM token morphing: schedules, the sampler, grouping properties and the morph operator."""

from __future__ import annotations

import pytest
import torch

from mimkit.losses.regression import normalize_targets, regression_loss
from mimkit.morphing import (
    MorphSchedule,
    ScheduleSampler,
    TokenGrouping,
    group_tokens,
    merges_per_iteration,
    morph_loss,
)


def _tokens(batch: int, num_tokens: int, channels: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, num_tokens, channels, generator=torch.Generator().manual_seed(seed))


def _applied_merges(schedule: MorphSchedule, num_tokens: int, protect_first_token: bool) -> int:
    """Merges actually made: each round is capped at (t - protected) // 2 on the t tokens left."""
    tokens = num_tokens
    for _ in range(schedule.iterations):
        tokens -= min(schedule.merges_per_iteration, (tokens - int(protect_first_token)) // 2)
    return num_tokens - tokens


@pytest.mark.parametrize(
    ("num_removed", "iterations", "num_tokens", "expected"),
    [
        (16, 3, 16, 5),
        (16, 1, 16, 16),
        (0, 7, 16, 0),
        (49, 14, 49, 3),
        (196, 14, 196, 14),
        (10, 3, 100, 4),
        (1, 14, 9, 0),  # 14 rounds of ceil(1/14) = 1 exceed the 9 tokens, so floor(1/14) = 0: no merging
    ],
)
def test_merges_per_iteration(num_removed: int, iterations: int, num_tokens: int, expected: int) -> None:
    assert merges_per_iteration(num_removed, iterations, num_tokens) == expected


def test_invalid_schedules_are_refused() -> None:
    with pytest.raises(ValueError):
        merges_per_iteration(4, 0, 16)
    with pytest.raises(ValueError):
        MorphSchedule(num_removed=-1, iterations=1, merges_per_iteration=0)
    with pytest.raises(ValueError):
        ScheduleSampler(num_tokens=16, max_iterations=0)


def test_sampler_covers_its_ranges() -> None:
    sampler = ScheduleSampler(num_tokens=16, num_schedules=3, max_iterations=5)
    generator = torch.Generator().manual_seed(0)
    draws = [schedule for _ in range(500) for schedule in sampler.sample(generator)]
    assert len(draws) == 1500
    assert {s.num_removed for s in draws} == set(range(17))
    assert {s.iterations for s in draws} == set(range(1, 6))
    assert all(s.merges_per_iteration == merges_per_iteration(s.num_removed, s.iterations, 16) for s in draws)


def test_sampler_is_reproducible_from_its_generator_or_the_global_rng() -> None:
    sampler = ScheduleSampler(num_tokens=196)

    def draw(seed: int) -> list[list[MorphSchedule]]:
        generator = torch.Generator().manual_seed(seed)
        return [sampler.sample(generator) for _ in range(5)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    torch.manual_seed(3)
    first = [sampler.sample() for _ in range(5)]
    torch.manual_seed(3)
    assert [sampler.sample() for _ in range(5)] == first


def test_zero_removed_is_the_identity() -> None:
    x = _tokens(2, 16)
    grouping = group_tokens(x, MorphSchedule.from_counts(0, 5, 16))
    assert torch.equal(grouping.groups, torch.arange(16).expand(2, -1))
    assert torch.equal(grouping.morph(x), x)


@pytest.mark.parametrize("protect_first_token", [True, False])
@pytest.mark.parametrize(
    ("num_tokens", "num_removed", "iterations"), [(16, 16, 1), (16, 16, 3), (49, 30, 4), (49, 49, 2), (10, 10, 14)]
)
def test_group_count_is_tokens_minus_applied_merges(
    num_tokens: int, num_removed: int, iterations: int, protect_first_token: bool
) -> None:
    schedule = MorphSchedule.from_counts(num_removed, iterations, num_tokens)
    grouping = group_tokens(_tokens(3, num_tokens), schedule, protect_first_token)
    expected = num_tokens - _applied_merges(schedule, num_tokens, protect_first_token)
    assert grouping.num_groups.tolist() == [expected] * 3
    assert all(len(row.unique()) == expected for row in grouping.groups)


def test_labels_are_the_smallest_member() -> None:
    groups = group_tokens(_tokens(4, 49), MorphSchedule.from_counts(40, 3, 49)).groups
    positions = torch.arange(49)
    assert bool((groups <= positions).all())
    assert torch.equal(groups.gather(1, groups), groups)


def test_first_token_never_merges_when_protected() -> None:
    x = _tokens(4, 16)
    x[:, 1] = x[:, 0]  # token 0 (A) and token 1 (B) are the best possible pair
    schedule = MorphSchedule.from_counts(16, 14, 16)
    protected = group_tokens(x, schedule, protect_first_token=True).groups
    assert bool((protected[:, 0] == 0).all()) and bool(((protected == 0).sum(dim=1) == 1).all())
    first_round_only = MorphSchedule(num_removed=1, iterations=1, merges_per_iteration=1)
    unprotected = group_tokens(x, first_round_only, protect_first_token=False).groups
    assert bool((unprotected[:, 1] == 0).all())


def _grouping(batch: int = 3, num_tokens: int = 25, seed: int = 0) -> TokenGrouping:
    return group_tokens(_tokens(batch, num_tokens, seed=seed), MorphSchedule.from_counts(15, 2, num_tokens))


def test_morph_writes_group_means_and_preserves_sums() -> None:
    grouping = _grouping()
    x = _tokens(3, 25, channels=5, seed=1)
    morphed = grouping.morph(x)
    torch.testing.assert_close(morphed.sum(dim=1), x.sum(dim=1))
    for b in range(3):
        for label in grouping.groups[b].unique():
            members = grouping.groups[b] == label
            mean = x[b, members].mean(dim=0)
            torch.testing.assert_close(morphed[b, members], mean.expand(int(members.sum()), -1))


def test_morph_is_idempotent_and_keeps_distributions_normalised() -> None:
    grouping = _grouping()
    probabilities = torch.softmax(_tokens(3, 25, channels=11, seed=2), dim=-1)
    morphed = grouping.morph(probabilities)
    torch.testing.assert_close(grouping.morph(morphed), morphed)
    torch.testing.assert_close(morphed.sum(dim=-1), torch.ones(3, 25))
    assert grouping.morph(probabilities[..., 0]).shape == (3, 25)


def test_gradient_reaches_the_student_and_not_the_teacher() -> None:
    teacher = _tokens(2, 16).requires_grad_()
    grouping = group_tokens(teacher, MorphSchedule.from_counts(10, 2, 16))
    assert grouping.groups.grad_fn is None
    student = _tokens(2, 16, seed=1).requires_grad_()
    weights = _tokens(2, 16, seed=2)
    (grouping.morph(student) * weights).sum().backward()
    torch.testing.assert_close(student.grad, grouping.morph(weights))  # the averaging operator is symmetric
    student.grad = None
    morph_loss(student, teacher, [grouping], "smooth_l1").backward()
    assert student.grad is not None and bool(student.grad.abs().sum() > 0)
    assert teacher.grad is None


def test_batched_grouping_equals_per_image_grouping() -> None:
    x = _tokens(4, 49, seed=3)
    schedule = MorphSchedule.from_counts(33, 4, 49)
    batched = group_tokens(x, schedule)
    single = [group_tokens(x[b : b + 1], schedule) for b in range(4)]
    assert torch.equal(batched.groups, torch.cat([g.groups for g in single]))
    values = _tokens(4, 49, seed=4)
    torch.testing.assert_close(
        batched.morph(values), torch.cat([g.morph(values[b : b + 1]) for b, g in enumerate(single)])
    )


def test_bfloat16_tokens_work() -> None:
    teacher = _tokens(2, 49).bfloat16()
    grouping = group_tokens(teacher, MorphSchedule.from_counts(30, 3, 49))
    assert torch.equal(grouping.groups, group_tokens(teacher.float(), MorphSchedule.from_counts(30, 3, 49)).groups)
    morphed = grouping.morph(teacher)
    assert morphed.dtype == torch.bfloat16
    torch.testing.assert_close(morphed.float(), grouping.morph(teacher.float()), atol=1e-2, rtol=1e-2)
    head = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = head(_tokens(2, 49, seed=1))
        assert student.dtype == torch.bfloat16
        loss = morph_loss(student, teacher, [grouping], "smooth_l1")
    loss.backward()
    assert loss.dtype == torch.float32 and head.weight.grad is not None


def test_morph_loss_averages_over_groupings_and_can_normalise_targets() -> None:
    teacher, student = _tokens(2, 25), _tokens(2, 25, seed=1)
    groupings = [group_tokens(teacher, MorphSchedule.from_counts(m, k, 25)) for m, k in [(0, 1), (20, 3)]]
    for kind in ("smooth_l1", "l2", "cosine"):
        expected = sum(regression_loss(g.morph(student), g.morph(teacher), kind) for g in groupings) / 2
        torch.testing.assert_close(morph_loss(student, teacher, groupings, kind), expected)
    g = groupings[1]
    expected = regression_loss(g.morph(student), normalize_targets(g.morph(teacher)), "l1")
    torch.testing.assert_close(morph_loss(student, teacher, [g], "l1", normalize_target=True), expected)


def test_morph_refuses_other_token_counts() -> None:
    with pytest.raises(ValueError, match="do not match"):
        _grouping().morph(torch.zeros(3, 24, 4))


def test_grouping_ignores_autocast() -> None:
    """Token 0's two candidates differ in cosine by 1e-3, below bf16's resolution at 0.5: bf16 would pick token 1."""
    teacher = torch.zeros(1, 4, 4)
    teacher[0, 0, 0] = 1.0
    teacher[0, 1, :2] = torch.tensor([0.5, 0.75**0.5])
    teacher[0, 2, 3] = 1.0
    teacher[0, 3, 0], teacher[0, 3, 2] = 0.501, (1 - 0.501**2) ** 0.5
    schedule = MorphSchedule(num_removed=1, iterations=1, merges_per_iteration=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouping = group_tokens(teacher, schedule, protect_first_token=False)
    assert grouping.groups.tolist() == [[0, 1, 2, 0]]
