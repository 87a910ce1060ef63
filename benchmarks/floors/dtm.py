"""DTM in the step benchmark: its cases per tier, its network floor, and the share of token morphing."""

from __future__ import annotations

from typing import Any

import torch

from floors.shapes import Case, data, vit
from mimkit.morphing import group_tokens

EMA_TEACHER = ("method.teacher.kind=ema", "method.teacher.model=null", "method.teacher.weights=null")
"""DTM's CLIP teacher needs weights we never download; an EMA teacher of the student's shape stands in."""

CASES = {
    "test": [Case("vit_micro", "dtm/vit_tiny_fmnist_ema.yaml", (*vit(32, 1, 2), *data(28, 4, 1)))],
    "cpu-small": [
        Case("vit_tiny", "dtm/vit_tiny_fmnist_ema.yaml", (*vit(192, 12, 3), "method.views.size=28", *data(28, 64, 1)))
    ],
    "gpu-base": [
        Case(
            name,
            "dtm/vit_base_clip_imagenet.yaml",
            (f"method.backbone.name={timm_name}", *EMA_TEACHER, *data(224, 64, 3)),
        )
        for name, timm_name in (("vit_small", "vit_small_patch16_224"), ("vit_base", "vit_base_patch16_224"))
    ],
}


def floor(bench: Any, heads: bool) -> Any:
    """Teacher (EMA or frozen) on the image without grad; student on the masked image; with heads: the linear head
    on the student's patch tokens."""
    method = bench.method
    images, masks = bench.batch["views"]["image"], bench.batch["views"]["mask"]

    def run() -> None:
        with bench.fabric.autocast():
            with torch.no_grad():
                method.teacher(images)
            tokens = method.student(images, mask=masks)
            output = method.head(tokens[:, method.student.num_prefix_tokens :]) if heads else tokens
        bench.backward([output])

    return run


def parts(bench: Any) -> dict[str, Any]:
    """Morphing: schedules + `group_tokens` on the targets + `morph` of predictions and targets, on this batch's
    real tokens (forward only: the backward of the morph is part of the step, not of this measurement)."""
    method = bench.method
    images, masks = bench.batch["views"]["image"], bench.batch["views"]["mask"]
    with torch.no_grad(), bench.fabric.autocast():
        targets = method.targets(images)
        predictions = method.head(method.student(images, mask=masks)[:, method.student.num_prefix_tokens :])
    morph = method.cfg.morph

    def run() -> None:
        with bench.fabric.autocast():
            for schedule in morph.schedules(method.sampler):
                grouping = group_tokens(targets, schedule, morph.protect_first_token)
                grouping.morph(predictions)
                grouping.morph(targets)

    return {"morphing": run}
