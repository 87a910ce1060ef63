"""iBOT method: the fast path (heads only where used) equals the straightforward computation; update rules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mimkit.config import ConfigError
from mimkit.data.info import DataInfo
from mimkit.data.loader import ViewDataset, collate
from mimkit.data.sources import SyntheticShapes
from mimkit.methods.ibot import IBOT
from mimkit.methods.saved import restore_method
from mimkit.morphing import MorphSchedule
from mimkit.runs import load_run_config
from mimkit.schedules import Progress
from support import IBOT_RECIPE, SYNTHETIC_28, TINY_IBOT_HEADS

TINY = [
    "method.backbone.embed_dim=32",
    "method.backbone.depth=2",
    "method.backbone.num_heads=2",
    *TINY_IBOT_HEADS,
    "method.mask.ratios=[[0.4,0.1]]",
    *SYNTHETIC_28,
]


def tiny_ibot(*overrides: str) -> tuple[IBOT, DataInfo]:
    cfg = load_run_config(IBOT_RECIPE, [*TINY, *overrides])
    source = SyntheticShapes(cfg.data, "train")
    torch.manual_seed(0)
    return IBOT(cfg.method, source.info), source


def make_batch(method: IBOT, source: SyntheticShapes, size: int = 6, epoch: int = 1) -> dict:
    dataset = ViewDataset(source, method.views(), seed=0)
    return collate([dataset[(epoch, i)] for i in range(size)])


def straightforward_loss(method: IBOT, batch: dict, epoch: int) -> torch.Tensor:
    """iBOT as the paper writes it: heads on every token, loops over crop pairs, masks applied afterwards."""
    views = batch["views"]
    globals_, locals_, masks = views["global"], views["local"], views["masks"]
    cfg = method.cfg
    teacher_t = method.teacher_temp.at_epoch(epoch)
    patch_t = method.teacher_patch_temp.at_epoch(epoch)
    with torch.no_grad():
        teacher = [method.teacher(crop) for crop in globals_]
        t_cls = [method.teacher_head.cls_logits(method.teacher_head.embed(t[:, 0])) for t in teacher]
        t_patch = [method.teacher_head.patch_logits(method.teacher_head.embed(t[:, 1:])) for t in teacher]
    student = [method.student(crop, mask=m) for crop, m in zip(globals_, masks, strict=True)]
    student += [method.student(crop) for crop in locals_]
    s_cls = [method.student_head.cls_logits(method.student_head.embed(s[:, 0])) for s in student]
    s_patch = [method.student_head.patch_logits(method.student_head.embed(s[:, 1:])) for s in student[: len(globals_)]]
    cls_terms, patch_terms = [], []
    for q in range(len(globals_)):
        target = F.softmax((t_cls[q] - method.cls_center.value) / teacher_t, dim=-1)
        for v in range(len(student)):
            if v == q:
                patch_target = F.softmax((t_patch[q] - method.patch_center.value) / patch_t, dim=-1)
                ce = -(patch_target * F.log_softmax(s_patch[v] / cfg.student_temp, dim=-1)).sum(-1)
                mask = masks[q].flatten(1).to(ce.dtype)
                patch_terms.append(((ce * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean())
            else:
                ce = -(target * F.log_softmax(s_cls[v] / cfg.student_temp, dim=-1)).sum(-1)
                cls_terms.append(ce.mean())
    cls = torch.stack(cls_terms).mean() * cfg.lambda_cls
    patch = torch.stack(patch_terms).mean() * cfg.lambda_patch
    return cls + patch


def test_fast_step_equals_straightforward_loss_and_gradients() -> None:
    method, source = tiny_ibot()
    method = method.double()
    batch = make_batch(method, source)
    batch["views"] = {k: [t.double() if t.is_floating_point() else t for t in v] for k, v in batch["views"].items()}
    method.eval()  # no drop path: both computations see the same network
    reference = copy.deepcopy(method)
    progress = Progress(epoch=1, step=3, steps_per_epoch=10, epochs=4)

    fast = method.training_step(batch, progress).loss
    fast.backward()
    slow = straightforward_loss(reference, batch, epoch=1)
    slow.backward()

    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == reference_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, reference_grads[name], rtol=1e-7, atol=1e-8, msg=name
        )  # timm resamples pos_embed in float32


def test_centers_follow_teacher_outputs_of_all_tokens() -> None:
    method, source = tiny_ibot()
    batch = make_batch(method, source)
    method.training_step(batch, Progress(1, 0, 10, 4))
    with torch.no_grad():
        tokens = method.teacher(torch.cat(batch["views"]["global"]))
        cls = method.teacher_head.cls_logits(method.teacher_head.embed(tokens[:, 0]))
        patch = method.teacher_head.patch_logits(method.teacher_head.embed(tokens[:, 1:]))
    torch.testing.assert_close(method.cls_center.value, 0.1 * cls.mean(0, keepdim=True), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(method.patch_center.value, 0.1 * patch.mean((0, 1)).view(1, 1, -1), rtol=1e-4, atol=1e-6)


def test_checkpoints_with_the_loss_modules_center_keys_still_load() -> None:
    """Before the loss was split into parts its centers were `loss.center` and `loss.center_patch`."""
    trained, source = tiny_ibot()
    trained.training_step(make_batch(trained, source), Progress(1, 0, 10, 4))
    old = trained.state_dict()
    old["loss.center"], old["loss.center_patch"] = old.pop("cls_center.value"), old.pop("patch_center.value")
    assert old["loss.center"].abs().sum() > 0 and old["loss.center_patch"].abs().sum() > 0

    fresh, _ = tiny_ibot()
    fresh.load_state_dict(old)  # strict: every key must find its place
    torch.testing.assert_close(fresh.cls_center.value, trained.cls_center.value, rtol=0, atol=0)
    torch.testing.assert_close(fresh.patch_center.value, trained.patch_center.value, rtol=0, atol=0)
    restored = restore_method(
        {"method": old}, fresh.cfg, source.info, seed=0
    )  # what DTM's mimkit teacher and eval open
    torch.testing.assert_close(restored.patch_center.value, trained.patch_center.value, rtol=0, atol=0)


def test_last_layer_is_frozen_during_the_first_epochs() -> None:
    method, source = tiny_ibot("method.freeze_last_layer_epochs=1")
    batch = make_batch(method, source)
    last = method.student_head.prototypes.direction
    for epoch, frozen in ((0, True), (1, False)):
        progress = Progress(epoch, 0, 10, 4)
        method.training_step(batch, progress).loss.backward()
        method.before_optimizer_step(progress)
        assert (last.grad is None) == frozen
        assert method.student.vit.blocks[0].attn.qkv.weight.grad is not None
        method.zero_grad()


def test_teacher_is_the_ema_of_the_student_and_lacks_the_mask_token() -> None:
    method, _ = tiny_ibot("method.momentum_teacher=0.9")
    assert method.teacher.mask_token is None and method.student.mask_token is not None
    assert not any(p.requires_grad for p in method.teacher.parameters())
    student_before = method.student.vit.pos_embed.detach().clone()
    teacher_before = method.teacher.vit.pos_embed.detach().clone()
    with torch.no_grad():
        method.student.vit.pos_embed.add_(1.0)
    method.after_step(Progress(0, 0, 10, 4))  # cosine schedule at step 0: momentum 0.9
    expected = 0.9 * teacher_before + 0.1 * (student_before + 1.0)
    torch.testing.assert_close(method.teacher.vit.pos_embed, expected)
    assert method.encoder() is method.teacher


def test_teacher_runs_without_drop_path() -> None:
    method, _ = tiny_ibot("method.backbone.drop_path_rate=0.5")
    images = torch.randn(2, 1, 28, 28)
    method.train()
    torch.testing.assert_close(method.teacher(images), method.teacher(images))
    assert not torch.allclose(method.student(images), method.student(images))


def test_separate_patch_prototypes_are_trained() -> None:
    method, source = tiny_ibot("method.shared_head=false", "method.patch_out_dim=32")
    batch = make_batch(method, source)
    method.training_step(batch, Progress(1, 0, 10, 4)).loss.backward()
    assert method.student_head.patch_prototypes is not None
    assert method.student_head.patch_prototypes.direction.grad.abs().sum() > 0


def test_crop_not_divisible_by_patch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not divisible by the patch size"):
        tiny_ibot("method.views.local_size=10")


def test_shared_head_needs_equal_prototype_counts() -> None:
    with pytest.raises(ConfigError, match=r"method\.patch_out_dim"):
        load_run_config(IBOT_RECIPE, [*TINY, "method.patch_out_dim=32"])


def test_morphing_with_identity_schedules_equals_plain_ibot(monkeypatch: pytest.MonkeyPatch) -> None:
    plain, source = tiny_ibot()
    morphed, _ = tiny_ibot("method.morph.enabled=true")
    morphed.load_state_dict(plain.state_dict())
    monkeypatch.setattr(morphed.morph_sampler, "sample", lambda *_: [MorphSchedule(0, 1, 0), MorphSchedule(0, 1, 0)])
    batch = make_batch(plain, source)
    plain.eval(), morphed.eval()
    progress = Progress(1, 0, 10, 4)
    torch.testing.assert_close(
        morphed.training_step(batch, progress).loss, plain.training_step(batch, progress).loss, rtol=1e-5, atol=1e-6
    )


def test_morphing_changes_the_patch_loss_and_keeps_gradients() -> None:
    method, source = tiny_ibot("method.morph.enabled=true")
    batch = make_batch(method, source)
    torch.manual_seed(1)
    out = method.training_step(batch, Progress(1, 0, 10, 4))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.metrics["loss_patch"] > 0
    assert method.student.mask_token.grad is not None and method.student.mask_token.grad.abs().sum() > 0
