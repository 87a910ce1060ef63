"""Center: an EMA of the batch mean of teacher outputs, all-reduced over processes, subtracted before the softmax."""

from __future__ import annotations

import pytest
import torch

import mimkit.losses.center as center_module
from mimkit.losses.center import Center


def test_starts_at_zero_in_its_shape_and_is_saved() -> None:
    center = Center((1, 1, 5))
    assert center.value.shape == (1, 1, 5) and center.value.dtype == torch.float32
    assert torch.equal(center.value, torch.zeros(1, 1, 5))
    assert list(center.state_dict()) == ["value"]
    x = torch.randn(3, 5)
    assert torch.equal(center.subtract(x), x)


def test_update_is_the_ema_of_batch_means() -> None:
    center = Center((1, 2), momentum=0.75)
    first = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # mean (2, 4)
    center.update(first)
    torch.testing.assert_close(center.value, torch.tensor([[0.5, 1.0]]), rtol=0, atol=0)  # 0.25 * (2, 4)
    second = torch.tensor([[[4.0, 0.0]], [[8.0, 8.0]]])  # (2, 1, 2): mean (6, 4)
    center.update(second)
    torch.testing.assert_close(center.value, torch.tensor([[1.875, 1.75]]), rtol=0, atol=0)  # 0.75 c + 0.25 m
    torch.testing.assert_close(center.subtract(first), first - torch.tensor([1.875, 1.75]), rtol=0, atol=0)


def test_update_leaves_its_input_alone_and_has_no_gradient() -> None:
    center = Center((1, 3))
    x = torch.randn(4, 3, requires_grad=True)
    before = x.detach().clone()
    center.update(x)
    assert torch.equal(x.detach(), before) and not center.value.requires_grad


def test_batch_mean_is_taken_over_every_leading_dimension_in_the_stored_shape() -> None:
    x = torch.randn(2, 3, 4, 5)
    flat, nested = Center((1, 5), momentum=0.0), Center((1, 1, 5), momentum=0.0)
    flat.update(x.flatten(0, 2))
    nested.update(x)
    assert flat.value.shape == (1, 5) and nested.value.shape == (1, 1, 5)
    torch.testing.assert_close(flat.value, x.mean((0, 1, 2)).view(1, 5))
    torch.testing.assert_close(nested.value.view(-1), flat.value.view(-1), rtol=0, atol=0)
    assert nested.subtract(x).shape == x.shape and nested.subtract(x[0, 0]).shape == (4, 5)


def test_wrong_output_dimension_is_refused() -> None:
    with pytest.raises(RuntimeError):
        Center((1, 4)).update(torch.randn(3, 5))


def test_low_precision_inputs_are_centred_and_averaged_in_float32() -> None:
    center = Center((1, 4), momentum=0.5)
    x = torch.randn(6, 4).bfloat16()
    center.update(x)
    assert center.value.dtype == torch.float32
    torch.testing.assert_close(center.value, 0.5 * x.float().mean(0, keepdim=True), rtol=0, atol=0)
    assert center.subtract(x).dtype == torch.float32
    assert Center((1, 4)).double().subtract(x).dtype == torch.float64


def test_batch_mean_is_averaged_across_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    other_rank_mean = torch.tensor([[3.0, -1.0]])
    monkeypatch.setattr(center_module, "all_reduce_mean", lambda mean: (mean + other_rank_mean) / 2)
    center = Center((1, 2), momentum=0.5)
    center.update(torch.tensor([[1.0, 1.0], [1.0, 3.0]]))  # this rank's mean (1, 2)
    torch.testing.assert_close(center.value, torch.tensor([[1.0, 0.25]]), rtol=0, atol=0)  # 0.5 * (2, 0.5)
