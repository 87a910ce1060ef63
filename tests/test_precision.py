"""Mixed precision: 16-mixed unscales gradients exactly once, so AdamW and clipping see the true gradient.

A CPU GradScaler stands in for CUDA's (same bookkeeping): the bug it guards against showed as an update of
AdamW on g / S, which differs from the 32-bit update once g / S approaches AdamW's eps.
"""

from __future__ import annotations

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import MixedPrecision
from torch import nn

from mimkit.engine.config import OptimConfig
from mimkit.engine.optim import build_optimizer, optimizer_step
from mimkit.methods.base import ClipPolicy, Method, MethodConfig
from mimkit.schedules import Progress

GRADIENT = 1e-3
"""Small enough that g / 65536 (a doubly unscaled gradient) is of the order of AdamW's eps."""


class Linear(Method):
    def __init__(self) -> None:
        super().__init__(MethodConfig(name="linear", clip_mode="global", clip_grad=100.0), None)  # type: ignore[arg-type]
        self.layer = nn.Linear(4, 3)

    def networks(self) -> dict[str, nn.Module]:
        return {"layer": self.layer}

    def clip_policy(self) -> ClipPolicy:
        return ClipPolicy("global", 100.0)


def one_step(fabric: Fabric, precision: str = "32-true") -> tuple[torch.Tensor, torch.Tensor]:
    """The weight after one AdamW step on the gradient GRADIENT everywhere, and the logged gradient norm."""
    torch.manual_seed(0)
    method = Linear()
    optimizer = build_optimizer(method, OptimConfig(weight_decay=0.0), precision)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    _, optimizer = fabric.setup(method, optimizer)
    loss = sum((p * GRADIENT).sum() for p in method.parameters())
    fabric.backward(loss)
    norms = optimizer_step(fabric, method, optimizer, Progress(0, 0, 1, 1))
    return method.layer.weight.detach().clone(), norms["grad_norm"]


def test_16_mixed_steps_exactly_like_32_true() -> None:
    reference, reference_norm = one_step(Fabric(accelerator="cpu", devices=1, precision="32-true"))
    scaler = torch.amp.GradScaler("cpu")
    mixed = Fabric(accelerator="cpu", devices=1, plugins=MixedPrecision("16-mixed", "cpu", scaler))
    weight, norm = one_step(mixed, "16-mixed")  # the engine's AdamW for 16-mixed (foreach: the scaler unscales)
    assert scaler.get_scale() == 65536.0  # the loss really was scaled, and no step was skipped
    torch.testing.assert_close(norm, reference_norm)
    torch.testing.assert_close(weight, reference)
    torch.testing.assert_close(reference_norm, torch.tensor(GRADIENT * 15**0.5))
