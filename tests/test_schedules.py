"""Schedules against numpy re-implementations of the DINO/iBOT schedules, and learning-rate scaling."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from mimkit.schedules import CosineSchedule, EpochWarmup, Progress, scaled_lr


def test_schedules_module_imports_on_its_own() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import mimkit.schedules"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:
    """DINO/iBOT utils.cosine_scheduler (warm-up iterations rounded down for fractional epochs)."""
    warmup_iters = int(warmup_epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def every_step(schedule, epochs: int, steps_per_epoch: int) -> np.ndarray:
    values = [
        schedule(Progress(step // steps_per_epoch, step, steps_per_epoch, epochs))
        for step in range(epochs * steps_per_epoch)
    ]
    return np.array(values)


@pytest.mark.parametrize(
    ("start", "end", "epochs", "steps_per_epoch", "warmup_epochs", "warmup_start"),
    [
        (5e-4, 1e-6, 10, 7, 2, 0.0),  # lr with warm-up
        (0.04, 0.4, 6, 5, 0, 0.0),  # weight decay rising, no warm-up
        (0.996, 1.0, 4, 9, 0, 0.0),  # teacher momentum
        (1e-3, 0.0, 5, 8, 0.5, 1e-5),  # fractional warm-up from a non-zero start
        (1e-3, 1e-5, 3, 4, 0.25, 0.0),  # a single warm-up iteration
        (2e-3, 2e-4, 1, 10, 1, 0.0),  # warm-up as long as the run (then the cosine's one step)
    ],
)
def test_cosine_schedule_matches_reference_at_every_iteration(
    start: float, end: float, epochs: int, steps_per_epoch: int, warmup_epochs: float, warmup_start: float
) -> None:
    ours = every_step(CosineSchedule(start, end, warmup_epochs, warmup_start), epochs, steps_per_epoch)
    reference = cosine_scheduler(start, end, epochs, steps_per_epoch, warmup_epochs, warmup_start)
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-15)


def test_cosine_schedule_warms_up_to_start_then_decays_to_near_end() -> None:
    values = every_step(CosineSchedule(1.0, 0.1, warmup_epochs=1, warmup_start=0.0), epochs=4, steps_per_epoch=5)
    assert values[0] == 0.0 and values[4] == 1.0 and values[5] == 1.0
    assert np.all(np.diff(values[:5]) > 0) and np.all(np.diff(values[5:]) < 0)
    assert 0.1 < values[-1] < 0.12


def test_cosine_schedule_holds_its_last_value_after_the_end() -> None:
    schedule = CosineSchedule(1.0, 0.0, warmup_epochs=1)
    last = schedule(Progress(2, 11, 4, 3))
    assert schedule(Progress(3, 12, 4, 3)) == last and schedule(Progress(9, 40, 4, 3)) == last


def epoch_reference(start: float, end: float, warmup: int, epochs: int, delay: int = 0) -> np.ndarray:
    """DINO's teacher temperature schedule; with a delay, iBOT's patch temperature waiting for masking."""
    return np.concatenate(
        (np.full(delay, start), np.linspace(start, end, warmup), np.full(epochs - warmup - delay, end))
    )


@pytest.mark.parametrize(
    ("start", "end", "warmup", "delay"),
    [(0.04, 0.07, 30, 0), (0.04, 0.07, 5, 0), (0.04, 0.07, 1, 0), (0.04, 0.07, 0, 0), (0.04, 0.07, 5, 3)],
)
def test_epoch_warmup_matches_reference(start: float, end: float, warmup: int, delay: int) -> None:
    epochs = 40
    schedule = EpochWarmup(start, end, warmup, delay_epochs=delay)
    ours = np.array([schedule.at_epoch(e) for e in range(epochs)])
    np.testing.assert_allclose(ours, epoch_reference(start, end, warmup, epochs, delay), rtol=1e-12)


def test_epoch_warmup_with_delay_holds_the_start_value() -> None:
    schedule = EpochWarmup(0.04, 0.07, warmup_epochs=3, delay_epochs=2)
    assert [schedule.at_epoch(e) for e in range(7)] == pytest.approx([0.04, 0.04, 0.04, 0.055, 0.07, 0.07, 0.07])


def test_epoch_warmup_is_constant_within_an_epoch() -> None:
    schedule = EpochWarmup(0.0, 1.0, warmup_epochs=5)
    values = {schedule(Progress(2, step, 10, 8)) for step in range(20, 30)}
    assert values == {0.5}


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("linear", 1e-3 * 1024 / 256), ("sqrt", 1e-3 * math.sqrt(1024 / 256)), ("none", 1e-3)],
)
def test_scaled_lr_rules(rule: str, expected: float) -> None:
    assert scaled_lr(1e-3, 1024, 256, rule) == pytest.approx(expected, rel=1e-12)


def test_scaled_lr_shrinks_for_small_batches() -> None:
    assert scaled_lr(5e-4, 128, 256, "linear") == pytest.approx(2.5e-4)
    assert scaled_lr(5e-4, 64, 256, "sqrt") == pytest.approx(2.5e-4)
    assert scaled_lr(5e-4, 256, 256, "linear") == 5e-4
