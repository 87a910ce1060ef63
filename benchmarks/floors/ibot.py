"""iBOT in the step benchmark: its cases per tier and its network floor."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

from floors.shapes import Case, data, vit
from reference.ibot_official import reference_step


def views(global_size: int, local_size: int, num_local: int, prototypes: int) -> tuple[str, ...]:
    return (
        f"method.views.global_size={global_size}",
        f"method.views.local_size={local_size}",
        f"method.views.num_local={num_local}",
        f"method.out_dim={prototypes}",
        f"method.patch_out_dim={prototypes}",
    )


REFERENCE_HEAD = ("method.head_hidden_dim=2048", "method.head_bottleneck_dim=256")
"""The reference's 3-layer head (2048 hidden, 256 bottleneck) instead of the demo recipe's small one, so the step can
be held against the official code at equal math (`--reference`)."""

CASES = {
    "test": [
        Case(
            "vit_micro",
            "ibot/vit_tiny_fmnist.yaml",
            (
                *vit(32, 1, 2),
                *views(28, 12, 2, 64),
                "method.head_hidden_dim=48",
                "method.head_bottleneck_dim=16",
                "method.mask.ratios=[[0.4,0.1]]",
                *data(28, 4, 1),
            ),
        )
    ],
    "cpu-small": [
        Case(
            "vit_tiny",
            "ibot/vit_tiny_fmnist.yaml",
            (*vit(192, 12, 3), *views(28, 12, 4, 1024), *REFERENCE_HEAD, *data(28, 64, 1)),
        )
    ],
    "gpu-base": [
        Case(name, f"ibot/{recipe}.yaml", (*views(224, 96, 10, 8192), *data(224, 64, 3)))
        for name, recipe in (("vit_small", "vit_small_imagenet"), ("vit_base", "vit_base_imagenet"))
    ],
}


def floor(bench: Any, heads: bool) -> Any:
    """Teacher on the global crops; student on the masked global crops in one call and the local crops grouped by
    size. With heads: the prototype head on the image features and on the patch tokens the loss reads (masked
    ones, or all with morphing), plus the teacher's mean patch logits, as `IBOT.training_step` computes them."""
    method = bench.method
    batch_views = bench.batch["views"]
    images = torch.cat(batch_views["global"])
    masks = torch.stack(batch_views["masks"]).flatten(0, 1)
    flat_masks = masks.flatten(1)
    every_token = method.cfg.morph.enabled
    prefix = method.student.num_prefix_tokens

    def run() -> None:
        with bench.fabric.autocast():
            with torch.no_grad():
                teacher = method.teacher(images)
                if heads:
                    head = method.teacher_head
                    head.cls_logits(head.embed(method.teacher.pooled(teacher)))
                    patch_embed = head.embed(teacher[:, prefix:])
                    head.patch_logits(patch_embed if every_token else patch_embed[flat_masks])
                    head.patch_logits(patch_embed.mean(1))
            student = method.student(images, mask=masks)
            local = method.student.forward_crops(batch_views["local"]) if batch_views["local"] else []
            outputs = [student, *local]
            if heads:
                head = method.student_head
                cls_tokens = torch.cat([method.student.pooled(student), *map(method.student.pooled, local)])
                patches = student[:, prefix:] if every_token else student[:, prefix:][flat_masks]
                embedded = head.embed(torch.cat([cls_tokens, patches.flatten(0, -2)]))
                outputs = [head.cls_logits(embedded[: len(cls_tokens)]), head.patch_logits(embedded[len(cls_tokens) :])]
        bench.backward(outputs)

    return run


def reference(bench: Any, checkout: Any) -> Any:
    """One iteration of the official iBOT code at this case's shapes (benchmarks/reference/ibot_official.py)."""
    return reference_step(bench, checkout)


def packing(bench: Any) -> tuple[Any, Any]:
    """The student's transformer blocks, forward + backward, on tokens of this batch's crop shapes: one call per crop
    size (what `forward_crops` runs) and every crop of an image packed into one sequence with a block-diagonal
    attention mask (DINOv2's packing). Random tokens: only the cost is compared."""
    student = bench.method.student
    blocks = student.transformer_blocks()
    views = bench.batch["views"]
    crops = [*views["global"], *views["local"]]
    lengths = [math.prod(student.grid(*crop.shape[-2:])) + student.num_prefix_tokens for crop in crops]
    batch, dim, device = len(crops[0]), student.embed_dim, bench.fabric.device
    grouped = [torch.randn(count * batch, n, dim, device=device) for n, count in Counter(lengths).items()]
    packed = torch.randn(batch, sum(lengths), dim, device=device)
    mask = torch.block_diag(*(torch.ones(n, n, dtype=torch.bool) for n in lengths)).to(device)

    def run(inputs: list[torch.Tensor], attn_mask: torch.Tensor | None) -> None:
        outputs = []
        with bench.fabric.autocast():
            for tokens in inputs:
                for block in blocks:
                    tokens = block(tokens, attn_mask=attn_mask)
                outputs.append(tokens)
        bench.backward(outputs)

    return (lambda: run(grouped, None)), (lambda: run([packed], mask))
