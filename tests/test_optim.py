"""The optimizer the engine (and the step benchmark) builds: groups, scaled schedules, the step and its hooks."""

from __future__ import annotations

import pytest
import torch

from mimkit.data.info import DataInfo
from mimkit.engine.config import OptimConfig
from mimkit.engine.optim import Hyperparameters, build_optimizer, optimizer_step
from mimkit.methods.base import ParamGroup, Progress
from toy_method import ToyConfig, ToyMethod


class ScaledToy(ToyMethod):
    """The toy method with a half-lr, undecayed group, and records of the hooks around the optimizer step."""

    def __init__(self) -> None:
        super().__init__(
            ToyConfig(clip_mode="global", clip_grad=1e-3), DataInfo("toy", 1, 8, (12, 12), 2, (0.5,), (0.25,))
        )
        self.hooks: list[str] = []

    def param_groups(self) -> list[ParamGroup]:
        first, second = self.net[1], self.net[4]
        return [
            ParamGroup("first", list(first.parameters())),
            ParamGroup("second", list(second.parameters()), weight_decay_scale=0.0, lr_scale=0.5),
        ]

    def before_optimizer_step(self, progress: Progress) -> None:
        self.hooks.append("before")

    def after_step(self, progress: Progress) -> None:
        self.hooks.append("after")


def test_hyperparameters_scale_lr_with_the_batch_and_apply_each_groups_scales() -> None:
    cfg = OptimConfig(lr=1e-3, lr_reference_batch=256, min_lr=0.0, warmup_epochs=0, weight_decay=0.04)
    method = ScaledToy()
    optimizer = build_optimizer(method, cfg)
    hyperparameters = Hyperparameters.from_config(cfg, global_batch=512)
    hyperparameters.apply(optimizer, Progress(epoch=0, step=0, steps_per_epoch=10, epochs=2))
    (first, second) = optimizer.param_groups
    assert [first["name"], second["name"]] == ["first", "second"]
    assert first["lr"] == pytest.approx(2e-3) and second["lr"] == pytest.approx(1e-3)
    assert first["weight_decay"] == pytest.approx(0.04) and second["weight_decay"] == 0.0
    hyperparameters.apply(optimizer, Progress(epoch=1, step=10, steps_per_epoch=10, epochs=2))
    assert first["lr"] == pytest.approx(1e-3)  # half-way down the cosine
    assert first["weight_decay"] == pytest.approx(0.04)  # weight_decay_end None: constant


def test_optimizer_step_clips_runs_the_hooks_in_order_and_clears_gradients() -> None:
    from lightning.fabric import Fabric

    method = ScaledToy()
    optimizer = build_optimizer(method, OptimConfig(weight_decay=0.0))
    optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = 0.1
    before = [p.detach().clone() for p in method.parameters()]
    method.net(torch.randn(4, 1, 12, 12)).pow(2).sum().mul(1e3).backward()
    norms = optimizer_step(Fabric(accelerator="cpu", devices=1), method, optimizer, Progress(0, 0, 10, 1))
    assert float(norms["grad_norm"]) > 1e-3  # the norm before clipping, for the logs
    assert method.hooks == ["before", "after"]
    assert all(p.grad is None for p in method.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, method.parameters(), strict=True))
