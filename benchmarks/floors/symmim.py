"""SymMIM in the step benchmark: its cases per tier and its network floor."""

from __future__ import annotations

from typing import Any

import torch

from floors.shapes import Case, data, vit

SMALL_HEADS = ("method.projector_hidden_dim=256", "method.projector_dim=64", "method.predictor_hidden_dim=256")

CASES = {
    "test": [
        Case(
            "vit_micro",
            "symmim/vit_tiny_fmnist.yaml",
            (*vit(32, 1, 2), "method.views.global_size=28", *SMALL_HEADS, *data(28, 4, 1)),
        )
    ],
    "cpu-small": [
        Case(
            "vit_tiny",
            "symmim/vit_tiny_fmnist.yaml",
            (*vit(192, 12, 3), "method.views.global_size=28", *SMALL_HEADS, *data(28, 64, 1)),
        )
    ],
    "gpu-base": [
        Case(name, f"symmim/{recipe}.yaml", data(224, 64, 3))
        for name, recipe in (("vit_base", "vit_base_imagenet"), ("vit_large", "vit_large_imagenet"))
    ],
}


def floor(bench: Any, heads: bool) -> Any:
    """Online encoder on both masked views (forward + backward) and the momentum encoder on both (forward, no
    grad); with heads: the pixel head on the patch tokens, projector and predictor on the [CLS] features, the
    momentum projector on the keys."""
    method = bench.method
    views = bench.batch["views"]
    images = torch.cat(views["views"])
    online_masks, momentum_masks = torch.cat(views["online_masks"]), torch.cat(views["momentum_masks"])
    prefix = method.online.num_prefix_tokens

    def run() -> None:
        with bench.fabric.autocast():
            with torch.no_grad():
                keys = method.momentum_encoder(images, momentum_masks)
                if heads:
                    method.momentum_projector(method.momentum_encoder.pooled(keys))
            tokens = method.online(images, mask=online_masks)
            outputs = [tokens]
            if heads:
                pixels = method.pixel_head(tokens[:, prefix:])
                outputs = [pixels, method.predictor(method.projector(method.online.pooled(tokens)))]
        bench.backward(outputs)

    return run
