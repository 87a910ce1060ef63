"""CIM in the step benchmark: its cases per tier, its network floor, and the tokenizer's own part.

Timing does not depend on weights, so the tokenizers are made on the spot: k-means codebooks fitted on the tier's
synthetic images, and for the GPU tier a DALL-E dVAE of the published shape with random weights (no download).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from floors.shapes import Case, data, vit
from mimkit.models.tokenizers.dall_e import DallETokenizer
from mimkit.models.tokenizers.files import save_tokenizer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOKENIZERS = ROOT / "benchmarks" / "results" / "tokenizers"
DALL_E = TOKENIZERS / "dall_e_random.pt"


def tokenizer(name: str, recipe: Path | None) -> tuple[str, ...]:
    """The tokenizer file of a case; fitted from `recipe` before the case is built when missing."""
    fitted = f"method.tokenizer_recipe={recipe}" if recipe else "method.tokenizer_recipe=null"
    return (f"method.tokenizer={TOKENIZERS / name}", fitted)


def generator(patch: int, dim: int, depth: int, heads: int) -> tuple[str, ...]:
    return (
        "method.generator.name=vit_tiny_patch16_224",
        "method.generator.img_size=28",
        f"method.generator.patch_size={patch}",
        f"method.generator.embed_dim={dim}",
        f"method.generator.depth={depth}",
        f"method.generator.num_heads={heads}",
    )


CASES = {
    "test": [
        Case(
            "vit_micro",
            "cim/vit_tiny_fmnist_respix.yaml",
            (
                *vit(32, 1, 2),
                "method.views.size=28",
                *generator(4, 32, 1, 2),
                *tokenizer("tiny.pt", ROOT / "tests" / "tiny" / "tokenizer.yaml"),
                *data(28, 4, 1),
            ),
        )
    ],
    "cpu-small": [
        Case(
            f"vit_tiny_{objective}",
            f"cim/vit_tiny_fmnist_{objective}.yaml",
            (
                *vit(192, 12, 3),
                "method.views.size=28",
                *generator(4, 192, 4, 3),
                *tokenizer("kmeans_p4.pt", HERE / "cim_tokenizer.yaml"),
                *data(28, 64, 1),
            ),
        )
        for objective in ("respix", "revdet")
    ],
    "gpu-base": [
        Case(
            "vit_base_dall_e", "cim/vit_base_imagenet_respix.yaml", (*tokenizer(DALL_E.name, None), *data(224, 64, 3))
        ),
    ],
}


def prepare(case: Case) -> None:
    """The GPU tier's DALL-E dVAE: the published architecture with random weights, written once."""
    if any(DALL_E.name in override for override in case.overrides) and not DALL_E.is_file():
        torch.manual_seed(0)
        save_tokenizer(DallETokenizer(), DALL_E, {"random_weights": 1.0})


def floor(bench: Any, heads: bool) -> Any:
    """Tokenizer encode of the images and decode of the corrupted grid (no grad), the generator on the masked
    images (forward + backward) and the enhancer on the corrupted images (forward + backward); with heads: the
    generator's vocabulary head on the masked tokens and the enhancer's pixel-shuffle head."""
    method = bench.method
    images, masks = bench.batch["views"]["image"], bench.batch["views"]["mask"]
    prefix = method.generator.num_prefix_tokens

    def run() -> None:
        with bench.fabric.autocast():
            with torch.no_grad():
                corrupted = method.corrupter.render(method.corrupter.tokenize(images), images)
            hidden = method.generator(images, mask=masks)[:, prefix:]
            enhanced = method.enhancer(corrupted)[:, method.enhancer.num_prefix_tokens :]
            outputs = [hidden, enhanced]
            if heads:
                outputs = [
                    method.generator_head(hidden[masks.flatten(1)]),
                    method.enhancer_head(enhanced, method.enhancer_grid),
                ]
        bench.backward(outputs)

    return run


def parts(bench: Any) -> dict[str, Any]:
    """The tokenizer alone: encode the batch, decode a grid (what every step pays for the corruption)."""
    method = bench.method
    images = bench.batch["views"]["image"]

    def run() -> None:
        with torch.no_grad(), bench.fabric.autocast():
            method.corrupter.render(method.corrupter.tokenize(images), images)

    return {"tokenizer": run}
