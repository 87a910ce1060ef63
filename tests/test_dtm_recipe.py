"""The faithful DTM recipe's parts: exact block masks, colour jitter on every image, the BEiT student, no weight
decay on [CLS] and position embeddings, a teacher fed the student's normalised pixels, schedules shared by ranks;
and iBOT's separate teacher-head flag."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from mimkit.data.augment import JITTER
from mimkit.data.info import DataInfo
from mimkit.data.masking import MaskConfig, MaskGenerator, top_up
from mimkit.data.views import MaskedView, MaskedViewConfig
from mimkit.methods.dtm import DTM
from mimkit.methods.ibot import IBOT
from mimkit.models.families.beit import MaskableBEiT
from mimkit.models.teachers import TokenTeacher
from mimkit.morphing import ScheduleSampler, step_generator
from mimkit.runs import load_run_config
from mimkit.schedules import Progress
from support import IBOT_RECIPE, ROOT, TINY_IBOT_HEADS, tiny_overlay

FAITHFUL = ROOT / "configs" / "dtm" / "vit_base_clip_imagenet.yaml"
RGB = DataInfo("rgb", 3, 8, (32, 32), 2, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_exact_block_masks_hold_exactly_75_of_196_patches() -> None:
    cfg = MaskConfig(shape="block", ratios=[(75 / 196, 0.0)], min_block_patches=16, exact=True)
    generator = MaskGenerator(cfg, random.Random(0))
    counts = {int(generator(14, 14, 0).sum()) for _ in range(50)}
    assert counts == {75}
    plain = MaskGenerator(MaskConfig(shape="block", ratios=[(75 / 196, 0.0)], min_block_patches=16), random.Random(0))
    assert min(int(plain(14, 14, 0).sum()) for _ in range(50)) < 75  # what the top-up is for


def test_top_up_keeps_the_blocks_and_only_adds() -> None:
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    topped = top_up(mask, 7, random.Random(1))
    assert int(topped.sum()) == 7 and topped[mask].all()
    assert torch.equal(top_up(mask, 3, random.Random(1)), mask)  # never removes patches


def test_colour_jitter_on_every_rgb_image_and_never_on_grayscale() -> None:
    image = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    masks = MaskGenerator(MaskConfig(ratios=[(0.0, 0.0)]))
    jittered = MaskedView(MaskedViewConfig(size=32), RGB, (2, 2), masks)
    plain = MaskedView(MaskedViewConfig(size=32, color_jitter_p=0.0), RGB, (2, 2), masks)
    for seed in range(5):
        torch.manual_seed(seed)
        a = jittered(image, 0)["image"]
        torch.manual_seed(seed)
        b = plain(image, 0)["image"]
        assert not torch.allclose(a, b)
    gray = DataInfo("gray", 1, 8, (32, 32), 2, (0.5,), (0.25,))
    gray_view = MaskedView(MaskedViewConfig(size=32), gray, (2, 2), masks, "device")
    for seed in range(5):
        torch.manual_seed(seed)
        assert gray_view(image[:1], 0)["image_params"][JITTER] == 0  # no jitter drawn for one channel


def test_faithful_recipe_values() -> None:
    cfg = load_run_config(FAITHFUL, [])
    method = cfg.method
    assert method.backbone.name == "beit_base_patch16_224" and method.teacher.model == "ViT-B-16-quickgelu"
    assert method.teacher.normalization == "student" and method.mask.exact
    assert method.views.color_jitter == (0.4, 0.4, 0.4, 0.0) and method.views.color_jitter_p == 1.0
    assert method.views.scale == (0.08, 1.0) and cfg.train.precision == "16-mixed"
    assert round(method.mask.ratios[0][0] * 196) == 75 and method.no_weight_decay == ["cls_token", "pos_embed"]


def shrunk_faithful(*overrides: str) -> DTM:
    tiny = [
        "method.backbone.img_size=32",
        "method.backbone.patch_size=8",
        "method.backbone.embed_dim=32",
        "method.backbone.depth=2",
        "method.backbone.num_heads=2",
        "method.views.size=32",
        *tiny_overlay("dtm")["overrides"],
        *overrides,
    ]
    cfg = load_run_config(FAITHFUL, tiny)
    torch.manual_seed(0)
    return DTM(cfg.method, RGB)


def test_the_student_is_a_beit_without_decay_on_cls_and_position_tokens() -> None:
    method = shrunk_faithful()
    assert isinstance(method.student, MaskableBEiT)
    assert method.student.beit.blocks[0].gamma_1 is not None  # layer scale
    names = {id(p): n for n, p in method.named_parameters()}
    groups = {g.name: {names[id(p)] for p in g.params} for g in method.param_groups()}
    assert "student.beit.cls_token" in groups["no_decay"]
    assert "student.mask_token" in groups["decay"]  # a 3-D token the reference decays
    vit = shrunk_faithful("method.backbone.name=vit_tiny_patch16_224", "method.no_weight_decay=[cls_token,pos_embed]")
    vit_groups = {
        g.name: {n for n, p in vit.named_parameters() if any(p is q for q in g.params)} for g in vit.param_groups()
    }
    assert {"student.vit.cls_token", "student.vit.pos_embed"} <= vit_groups["no_decay"]
    plain = shrunk_faithful("method.backbone.name=vit_tiny_patch16_224", "method.no_weight_decay=[]")
    plain_groups = {
        g.name: {n for n, p in plain.named_parameters() if any(p is q for q in g.params)} for g in plain.param_groups()
    }
    assert "student.vit.pos_embed" in plain_groups["decay"]


def test_a_teacher_fed_the_students_normalisation_sees_the_inputs_as_they_are() -> None:
    seen: list[torch.Tensor] = []
    network = nn.Identity()
    for renormalize in (False, True):
        teacher = TokenTeacher(
            lambda x: seen.append(x) or x, network, 3, (0.1, 0.2, 0.3), (0.9, 0.8, 0.7), RGB, renormalize
        )
        teacher(torch.ones(1, 3, 2, 2))
    torch.testing.assert_close(seen[0], torch.ones(1, 3, 2, 2))
    expected = ((torch.ones(1, 3, 2, 2) * 0.25 + 0.5) - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.9, 0.8, 0.7]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[1], expected)


def test_schedules_depend_only_on_the_seed_and_the_step() -> None:
    sampler = ScheduleSampler(196, 2, 14)
    torch.manual_seed(1)
    first = sampler.sample(step_generator(7, 3))
    torch.manual_seed(2)  # another process's global RNG
    assert sampler.sample(step_generator(7, 3)) == first
    assert any(sampler.sample(step_generator(7, step)) != first for step in range(4, 8))


@pytest.mark.parametrize(("student", "teacher"), [(False, True), (True, False)])
def test_ibot_teacher_head_sharing_is_its_own_flag(student: bool, teacher: bool) -> None:
    overrides = [
        "method.backbone.embed_dim=32",
        "method.backbone.depth=1",
        "method.backbone.num_heads=2",
        *TINY_IBOT_HEADS,
        f"method.shared_head={str(student).lower()}",
        f"method.shared_head_teacher={str(teacher).lower()}",
        "data.source=synthetic",
        "data.synthetic.size=28",
    ]
    cfg = load_run_config(IBOT_RECIPE, overrides)
    method = IBOT(cfg.method, DataInfo("gray", 1, 8, (28, 28), 2, (0.5,), (0.25,)))
    assert (method.student_head.patch_prototypes is None) == student
    assert (method.teacher_head.patch_prototypes is None) == teacher
    if not teacher:  # the teacher's own patch prototypes have no student layer to follow: they keep their values
        before = method.teacher_head.patch_prototypes.direction.clone()
        method.after_step(Progress(1, 0, 10, 2))
        torch.testing.assert_close(method.teacher_head.patch_prototypes.direction, before)
