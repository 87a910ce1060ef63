"""The iBOT loss parts, composed as the method composes them, agree with the reference on every fixture case:
losses, both centers after each consecutive call, and the temperature schedules per epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimkit.data.masking import MaskConfig
from mimkit.losses.center import Center
from mimkit.losses.ibot import IBOTClsLoss, IBOTPatchLoss, sharpen
from mimkit.methods.ibot import IBOTConfig, teacher_temperatures
from support import load_case


def method_config(config: dict) -> IBOTConfig:
    """The method's config of a fixture case (the reference's names on the right)."""
    return IBOTConfig(
        out_dim=config["out_dim"],
        patch_out_dim=config["patch_out_dim"],
        warmup_teacher_temp=config["warmup_teacher_temp"],
        teacher_temp=config["teacher_temp"],
        warmup_teacher_patch_temp=config["warmup_teacher_temp2"],
        teacher_patch_temp=config["teacher_temp2"],
        warmup_teacher_temp_epochs=config["warmup_teacher_temp_epochs"],
        student_temp=config["student_temp"],
        center_momentum=config["center_momentum"],
        center_momentum_patch=config["center_momentum2"],
        lambda_cls=config["lambda1"],
        lambda_patch=config["lambda2"],
        mask=MaskConfig(start_epoch=config["mim_start_epoch"]),
    )


def by_crop(batch: int, x: torch.Tensor) -> torch.Tensor:
    """(crops * B, ...) crop-major rows -> (crops, B, ...) in float64."""
    return x.double().view(-1, batch, *x.shape[1:])


def test_temperature_schedules_match_reference(ibot_case: Path) -> None:
    config = load_case(ibot_case)["config"]
    cls_temp, patch_temp = teacher_temperatures(method_config(config))
    for epoch in range(config["nepochs"]):
        assert cls_temp.at_epoch(epoch) == pytest.approx(float(config["teacher_temp_schedule"][epoch]))
        assert patch_temp.at_epoch(epoch) == pytest.approx(float(config["teacher_temp2_schedule"][epoch]))


def test_losses_and_centers_match_reference_over_consecutive_calls(ibot_case: Path) -> None:
    case = load_case(ibot_case)
    config = case["config"]
    cfg = method_config(config)
    cls_temp, patch_temp = teacher_temperatures(cfg)
    cls_center = Center((1, cfg.out_dim), cfg.center_momentum).double()
    patch_center = Center((1, 1, cfg.patch_out_dim), cfg.center_momentum_patch).double()
    cls_loss, patch_loss = IBOTClsLoss(cfg.student_temp), IBOTPatchLoss(cfg.student_temp)
    for i, step in enumerate(case["steps"]):
        masks = step["masks"].flatten(2)  # (G, B, N)
        batch, epoch = masks.shape[1], step["epoch"]
        student_cls = torch.cat([by_crop(batch, step["student_cls"]), by_crop(batch, step["student_local_cls"])])
        assert student_cls.shape[0] == config["ngcrops"] + config["nlcrops"]
        teacher_cls = by_crop(batch, step["teacher_cls"])
        student_patch, teacher_patch = by_crop(batch, step["student_patch"]), by_crop(batch, step["teacher_patch"])

        cls_targets = sharpen(cls_center.subtract(teacher_cls), cls_temp.at_epoch(epoch))
        patch_targets = sharpen(patch_center.subtract(teacher_patch[masks]), patch_temp.at_epoch(epoch))
        cls = cls_loss(student_cls, cls_targets) * cfg.lambda_cls
        patch = patch_loss(student_patch[masks], patch_targets, masks) * cfg.lambda_patch
        cls_center.update(teacher_cls)
        patch_center.update(teacher_patch.mean(2).flatten(0, 1))

        tol = {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(cls, step["expected_loss_cls"].double(), **tol, msg=f"cls loss, call {i}")
        torch.testing.assert_close(patch, step["expected_loss_patch"].double(), **tol, msg=f"patch, call {i}")
        torch.testing.assert_close(cls + patch, step["expected_loss"].double(), **tol, msg=f"total, call {i}")
        torch.testing.assert_close(cls_center.value, step["expected_center_cls"].double(), **tol, msg=f"center {i}")
        torch.testing.assert_close(
            patch_center.value, step["expected_center_patch"].double(), **tol, msg=f"patch center, call {i}"
        )
