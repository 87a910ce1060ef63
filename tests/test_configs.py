"""Every shipped recipe loads, validates and trains two steps once shrunk to a tiny backbone on synthetic images.

Shrinking keeps what makes a recipe itself (method, views, masks, losses, schedules, clipping) and replaces what
cannot run here: the backbone's width and depth, the data (synthetic images of the recipe's image size and
channels), GPU precision, and what the recipe family's overlay in tests/tiny/ shrinks (heads; a CLIP teacher
whose weights mimkit never downloads, for which an EMA teacher stands in).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from mimkit.config import read_yaml
from mimkit.engine.train import pretrain
from mimkit.models.families import family_of
from mimkit.runs import load_run_config
from support import QUIET_CPU_RUN, ROOT, tiny_overlay

RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name not in ("tokenizers", "finetune"))
"""Pretraining recipes; the tokenizer recipes of configs/tokenizers and the fine-tuning protocols of configs/finetune
have their own tests (tests/test_tokenizers.py, tests/test_finetune.py)."""
TINY_BACKBONE = ["method.backbone.embed_dim=32", "method.backbone.depth=1", "method.backbone.num_heads=2"]
TINY_CNN = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 32]}
"""model_args that shrink a timm ResNet (a CNN recipe's other model_args, its output stride say, are kept)."""


def shrunk(recipe: Path, output_dir: Path) -> list[str]:
    """The recipe family's tiny overlay (tests/tiny/<family>.yaml) plus a tiny backbone and synthetic data."""
    cfg = load_run_config(recipe, ["data.source=synthetic"])  # an image-folder recipe names no folder
    channels = 1 if read_yaml(recipe)["data"]["source"] == "fashion-mnist" else 3
    shaped_by_model_args = not family_of(cfg.method.backbone.name).shape_fields  # a CNN
    return [
        *(
            [f"method.backbone.model_args={json.dumps(cfg.method.backbone.model_args | TINY_CNN)}"]
            if shaped_by_model_args
            else TINY_BACKBONE
        ),
        *tiny_overlay(recipe.parent.name)["overrides"],
        "data.source=synthetic",
        f"data.synthetic.size={cfg.method.backbone.img_size}",
        "data.synthetic.images=4",
        f"data.channels={channels}",
        "data.limit=null",
        "data.batch_size=2",
        "train.epochs=1",
        "train.precision=32-true",
        "train.log_every_steps=1",
        *QUIET_CPU_RUN,
        "train.knn_every_epochs=0",
        f"output_dir={output_dir}",
    ]


def test_every_method_has_a_recipe() -> None:
    assert {read_yaml(r)["method"]["name"] for r in RECIPES} >= {"ibot", "dtm", "symmim", "cim"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_trains_two_steps_when_shrunk(recipe: Path, tmp_path: Path) -> None:
    run_dir = pretrain(load_run_config(recipe, shrunk(recipe, tmp_path / "run")))
    with open(run_dir / "metrics.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f) if row.get("loss")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert load_run_config(run_dir / "config.yaml", []).method.name == read_yaml(recipe)["method"]["name"]
