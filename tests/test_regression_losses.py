"""Regression losses against hand computations on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from mimkit.losses.regression import normalize_targets, regression_loss


def test_smooth_l1_uses_both_branches_with_beta() -> None:
    pred = torch.tensor([[[0.0, 1.0, 5.0, -3.0]]])
    target = torch.zeros_like(pred)
    # |d| < 2: 0.5 d² / 2 -> 0, 0.25;  |d| >= 2: |d| - 1 -> 4, 2
    expected = (0.0 + 0.25 + 4.0 + 2.0) / 4
    assert regression_loss(pred, target, "smooth_l1", beta=2.0).item() == pytest.approx(expected)
    # beta 1: 0, 0.5, 4.5, 2.5
    assert regression_loss(pred, target, "smooth_l1", beta=1.0).item() == pytest.approx(7.5 / 4)


def test_smooth_l1_is_the_mean_over_channels_tokens_and_batch() -> None:
    pred = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]])  # (B=2, N=2, C=2)
    target = torch.zeros_like(pred)
    assert regression_loss(pred, target, "smooth_l1").item() == pytest.approx((0.25 + 2.0) / 8)


def test_l1_and_l2() -> None:
    pred = torch.tensor([[[1.0, -2.0], [0.5, 0.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    assert regression_loss(pred, target, "l1").item() == pytest.approx((1 + 2 + 0.5 + 1) / 4)
    assert regression_loss(pred, target, "l2").item() == pytest.approx((1 + 4 + 0.25 + 1) / 4)


def test_cosine_is_negative_similarity_averaged_over_tokens() -> None:
    target = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
    assert regression_loss(target * 5, target, "cosine").item() == pytest.approx(-1.0)
    pred = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-3.0, -4.0]]])  # same, orthogonal, opposite
    assert regression_loss(pred, target, "cosine").item() == pytest.approx((-1.0 + 0.0 + 1.0) / 3)
    pred = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [3.0, 4.0]]])
    assert regression_loss(pred, target, "cosine").item() == pytest.approx((-(2**-0.5) - 1.0 - 1.0) / 3)


def test_low_precision_inputs_are_computed_in_float32() -> None:
    pred = torch.randn(2, 3, 4).bfloat16()
    target = torch.randn(2, 3, 4).bfloat16()
    loss = regression_loss(pred, target, "smooth_l1")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(regression_loss(pred.float(), target.float(), "smooth_l1").item())


def test_bad_arguments_are_refused() -> None:
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="shapes differ"):
        regression_loss(x, torch.zeros(1, 2, 4), "l1")
    with pytest.raises(ValueError, match="unknown regression loss"):
        regression_loss(x, x, "huber")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        regression_loss(x, x, "smooth_l1", beta=0.0)


def test_normalize_targets_is_a_per_token_layer_norm_without_affine() -> None:
    x = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [10.0, 10.0, 10.0, 14.0]]])
    out = normalize_targets(x)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (x - mean) / torch.sqrt(var + 1e-6))
    torch.testing.assert_close(normalize_targets(3 * x + 7), out, atol=1e-5, rtol=1e-5)
