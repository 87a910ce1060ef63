"""Gradient clipping policies: per tensor (DINO/iBOT), one global norm, per module, none."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mimkit.engine.clipping import clip, clip_per_tensor
from mimkit.methods.base import ClipPolicy


class TwoParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)


def model_with_grads(norms: dict[str, float], seed: int = 0) -> TwoParts:
    """A model whose gradient tensors have the given norms (by parameter name), random directions."""
    torch.manual_seed(seed)
    model = TwoParts()
    for name, param in model.named_parameters():
        direction = torch.randn_like(param)
        param.grad = direction / direction.norm() * norms[name]
    return model


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


NORMS = {"a.weight": 10.0, "a.bias": 0.5, "b.weight": 3.0, "b.bias": 0.1}


def test_per_tensor_caps_each_tensor_and_leaves_small_ones() -> None:
    model = model_with_grads(NORMS)
    before = grads(model)
    total = clip(ClipPolicy("per_tensor", 1.0), model)["grad_norm"]
    after = grads(model)
    for name, norm in NORMS.items():
        if norm > 1.0:
            assert after[name].norm().item() == pytest.approx(1.0, rel=1e-5)
            cosine = torch.nn.functional.cosine_similarity(after[name].flatten(), before[name].flatten(), dim=0)
            assert cosine.item() == pytest.approx(1.0, abs=1e-6)  # direction kept
        else:
            assert torch.equal(after[name], before[name])
    expected_total = torch.tensor(list(NORMS.values())).norm()
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-5)  # the pre-clip norm


def test_per_tensor_matches_dino_clip_gradients() -> None:
    model, reference = model_with_grads(NORMS), model_with_grads(NORMS)
    clip_per_tensor(list(model.parameters()), 2.0)
    for p in reference.parameters():  # DINO utils.clip_gradients
        clip_coef = 2.0 / (p.grad.norm(2) + 1e-6)
        if clip_coef < 1:
            p.grad.mul_(clip_coef)
    for name, g in grads(reference).items():
        torch.testing.assert_close(grads(model)[name], g)


def test_per_tensor_skips_parameters_without_gradients() -> None:
    model = model_with_grads(NORMS)
    model.b.bias.grad = None
    clip(ClipPolicy("per_tensor", 1.0), model)
    assert model.b.bias.grad is None
    assert clip_per_tensor([nn.Parameter(torch.ones(2))], 1.0).item() == 0.0


def test_global_clipping_equals_torch_clip_grad_norm() -> None:
    model, reference = model_with_grads(NORMS), model_with_grads(NORMS)
    total = clip(ClipPolicy("global", 1.0), model)["grad_norm"]
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    for name, g in grads(reference).items():
        torch.testing.assert_close(grads(model)[name], g)
    all_grads = torch.cat([g.flatten() for g in grads(model).values()])
    assert all_grads.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_global_clipping_below_the_limit_changes_nothing() -> None:
    model = model_with_grads({name: 0.1 for name in NORMS})
    before = grads(model)
    clip(ClipPolicy("global", 1.0), model)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, before[name], rtol=0, atol=1e-7)


def test_per_module_clips_each_module_on_its_own() -> None:
    norms = {"a.weight": 30.0, "a.bias": 40.0, "b.weight": 0.3, "b.bias": 0.4}  # module norms 50 and 0.5
    model = model_with_grads(norms)
    before = grads(model)
    result = clip(ClipPolicy("per_module", 1.0, {"a": model.a, "b": model.b}), model)
    assert set(result) == {"grad_norm/a", "grad_norm/b"}
    assert result["grad_norm/a"].item() == pytest.approx(50.0, rel=1e-5)
    assert result["grad_norm/b"].item() == pytest.approx(0.5, rel=1e-5)
    after = grads(model)
    module_a = torch.cat([after["a.weight"].flatten(), after["a.bias"]])
    assert module_a.norm().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(after["a.weight"], before["a.weight"] / 50, rtol=1e-5, atol=1e-7)
    assert torch.equal(after["b.weight"], before["b.weight"]) and torch.equal(after["b.bias"], before["b.bias"])


def test_none_changes_nothing() -> None:
    model = model_with_grads(NORMS)
    before = grads(model)
    assert clip(ClipPolicy("none", 1.0), model) == {}
    for name, g in grads(model).items():
        assert torch.equal(g, before[name])


def test_frozen_parameters_are_not_clipped() -> None:
    model = model_with_grads(NORMS)
    model.a.weight.requires_grad_(False)
    before = model.a.weight.grad.clone()
    clip(ClipPolicy("per_tensor", 1.0), model)
    assert torch.equal(model.a.weight.grad, before)
