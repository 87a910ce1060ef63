"""The iBOT loss and its centers agree with the reference implementation on every fixture case."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimkit.losses.ibot import IBOTLoss
from mimkit.schedules import EpochWarmup
from support import load_case


def loss_from_config(config: dict) -> IBOTLoss:
    warmup = config["warmup_teacher_temp_epochs"]
    return IBOTLoss(
        config["out_dim"],
        config["patch_out_dim"],
        teacher_temp=EpochWarmup(config["warmup_teacher_temp"], config["teacher_temp"], warmup),
        teacher_patch_temp=EpochWarmup(
            config["warmup_teacher_temp2"], config["teacher_temp2"], warmup, delay_epochs=config["mim_start_epoch"]
        ),
        student_temp=config["student_temp"],
        center_momentum=config["center_momentum"],
        center_momentum_patch=config["center_momentum2"],
        lambda_cls=config["lambda1"],
        lambda_patch=config["lambda2"],
    )


def by_crop(batch: int, x: torch.Tensor) -> torch.Tensor:
    """(crops * B, ...) crop-major rows -> (crops, B, ...) in float64."""
    return x.double().view(-1, batch, *x.shape[1:])


def test_temperature_schedules_match_reference(ibot_case: Path) -> None:
    config = load_case(ibot_case)["config"]
    loss = loss_from_config(config)
    for epoch in range(config["nepochs"]):
        assert loss.teacher_temp.at_epoch(epoch) == pytest.approx(float(config["teacher_temp_schedule"][epoch]))
        assert loss.teacher_patch_temp.at_epoch(epoch) == pytest.approx(float(config["teacher_temp2_schedule"][epoch]))


def test_losses_and_centers_match_reference_over_consecutive_calls(ibot_case: Path) -> None:
    case = load_case(ibot_case)
    config = case["config"]
    loss = loss_from_config(config).double()
    num_global = config["ngcrops"]
    for i, step in enumerate(case["steps"]):
        masks = step["masks"].flatten(2)  # (G, B, N)
        batch = masks.shape[1]

        student_cls = torch.cat([by_crop(batch, step["student_cls"]), by_crop(batch, step["student_local_cls"])])
        student_patch, teacher_patch = by_crop(batch, step["student_patch"]), by_crop(batch, step["teacher_patch"])
        out = loss(
            student_cls,
            by_crop(batch, step["teacher_cls"]),
            student_patch[masks],
            teacher_patch[masks],
            masks,
            teacher_patch.mean(2).flatten(0, 1),
            step["epoch"],
        )
        assert student_cls.shape[0] == num_global + config["nlcrops"]
        tol = {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(out.cls, step["expected_loss_cls"].double(), **tol, msg=f"cls loss, call {i}")
        torch.testing.assert_close(out.patch, step["expected_loss_patch"].double(), **tol, msg=f"patch, call {i}")
        torch.testing.assert_close(out.total, step["expected_loss"].double(), **tol, msg=f"total, call {i}")
        torch.testing.assert_close(loss.center, step["expected_center_cls"].double(), **tol, msg=f"center {i}")
        torch.testing.assert_close(
            loss.center_patch, step["expected_center_patch"].double(), **tol, msg=f"patch center, call {i}"
        )
