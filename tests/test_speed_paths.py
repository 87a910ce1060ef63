"""The step's speed paths compute what the plain path computes: fused AdamW, timm's explicit attention under CPU bf16
autocast, bf16 autocast itself (close to fp32, losses in fp32), health measures only on logged steps, and
`torch.compile` of a backbone."""

from __future__ import annotations

import copy

import pytest
import torch

from mimkit.engine.optim import build_optimizer
from mimkit.models.backbones import build_backbone
from mimkit.runs import load_run_config
from mimkit.schedules import Progress
from support import IBOT_RECIPE, SYNTHETIC_28
from test_ibot import make_batch, tiny_ibot

PROGRESS = Progress(epoch=1, step=3, steps_per_epoch=10, epochs=4)


def tiny_vit(depth: int = 2) -> torch.nn.Module:
    overrides = [f"method.backbone.depth={depth}", "method.backbone.embed_dim=32", "method.backbone.num_heads=2"]
    cfg = load_run_config(IBOT_RECIPE, [*overrides, *SYNTHETIC_28])
    torch.manual_seed(0)
    return build_backbone(cfg.method.backbone, in_chans=1, mask_token=True, drop_path_rate=0.0)


def test_fused_adamw_makes_the_update_of_the_per_tensor_loop() -> None:
    method, _ = tiny_ibot()
    cfg = load_run_config(IBOT_RECIPE, SYNTHETIC_28).optim
    fused = build_optimizer(method, cfg)
    assert fused.defaults["fused"]
    twin = copy.deepcopy(method)
    loop_groups = [
        {"params": g.params, "lr_scale": g.lr_scale, "wd_scale": g.weight_decay_scale} for g in twin.param_groups()
    ]
    loop = torch.optim.AdamW(loop_groups, betas=cfg.betas, eps=cfg.eps, foreach=False)
    for optimizer in (fused, loop):
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = 1e-2 * group["lr_scale"], 0.05 * group["wd_scale"]
    torch.manual_seed(1)
    for _ in range(3):
        for (_, p), (_, q) in zip(method.named_parameters(), twin.named_parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for (name, p), (_, q) in zip(method.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, p0) for p, p0 in zip(method.parameters(), tiny_ibot()[0].parameters(), strict=True))


def _attention_paths(vit: torch.nn.Module, images: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, list[bool]]:
    seen: list[bool] = []
    hooks = [
        block.attn.register_forward_pre_hook(lambda module, _args: seen.append(module.fused_attn))
        for block in vit.transformer_blocks()
    ]
    try:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            tokens = vit(images)
    finally:
        for hook in hooks:
            hook.remove()
    return tokens, seen


def test_cpu_bf16_autocast_takes_timms_explicit_attention_and_restores_sdpa() -> None:
    vit, images = tiny_vit(), torch.randn(3, 1, 28, 28)
    fp32, paths = _attention_paths(vit, images, bf16=False)
    assert paths == [True, True]  # fused SDPA in fp32
    bf16, paths = _attention_paths(vit, images, bf16=True)
    assert paths == [False, False] and all(block.attn.fused_attn for block in vit.transformer_blocks())
    with torch.autocast("cpu", torch.bfloat16):  # the fused kernel on the same bf16 inputs: the same math
        for block in vit.transformer_blocks():
            block.attn.fused_attn = True
        fused = vit.vit.norm(vit.vit.blocks(vit.vit.norm_pre(vit.vit._pos_embed(vit.vit.patch_embed(images)))))
    torch.testing.assert_close(bf16.float(), fused.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.05, atol=0.05)


def test_bf16_autocast_step_is_close_to_fp32_in_loss_and_gradients() -> None:
    method, source = tiny_ibot()
    method.eval()  # no drop path: both passes see one network
    batch = make_batch(method, source)
    twin = copy.deepcopy(method)
    loss = method.training_step(batch, PROGRESS).loss
    loss.backward()
    with torch.autocast("cpu", torch.bfloat16):
        mixed = twin.training_step(batch, PROGRESS).loss
    mixed.backward()
    assert mixed.dtype == torch.float32  # softmax, centering and the cross-entropies run in fp32
    assert abs(mixed.item() - loss.item()) < 0.01 * abs(loss.item())
    grads = torch.cat([p.grad.flatten() for p in method.parameters() if p.grad is not None])
    mixed_grads = torch.cat([p.grad.flatten() for p in twin.parameters() if p.grad is not None])
    assert torch.nn.functional.cosine_similarity(grads, mixed_grads, dim=0) > 0.98


def test_health_is_measured_on_logged_steps_only_and_changes_nothing_else() -> None:
    method, source = tiny_ibot()
    method.eval()
    batch = make_batch(method, source)
    twin = copy.deepcopy(method)
    logged = method.training_step(batch, PROGRESS)
    quiet = twin.training_step(batch, Progress(1, 3, 10, 4, logged=False))
    assert {k for k in logged.metrics if k.startswith("health_")} >= {"health_teacher_entropy", "health_feature_rank"}
    assert not any(k.startswith("health_") for k in quiet.metrics)
    assert logged.loss.item() == quiet.loss.item()
    torch.testing.assert_close(method.cls_center.value, twin.cls_center.value, rtol=0, atol=0)
    torch.testing.assert_close(method.patch_center.value, twin.patch_center.value, rtol=0, atol=0)
    assert logged.metrics.keys() - quiet.metrics.keys() == {k for k in logged.metrics if k.startswith("health_")}


@pytest.mark.slow
def test_compiled_backbone_gives_the_eager_tokens_and_gradients() -> None:
    eager, images = tiny_vit(depth=1), torch.randn(2, 1, 28, 28)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    compiled = copy.deepcopy(eager)
    compiled.compile()
    for network in (eager, compiled):
        network(images, mask=mask).square().mean().backward()
    torch.testing.assert_close(compiled(images, mask=mask), eager(images, mask=mask), rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
