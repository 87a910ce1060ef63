"""Every shipped recipe loads, validates and trains two steps once shrunk to a tiny backbone on synthetic images.

Shrinking keeps what makes a recipe itself (method, views, masks, losses, schedules, clipping) and replaces what
cannot run here: the backbone's width and depth, the data (synthetic images of the recipe's crop size and
channels), GPU precision, and a CLIP teacher whose weights mimkit never downloads (an EMA teacher stands in).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from mimkit.engine.train import pretrain
from mimkit.runs import load_run_config
from support import QUIET_CPU_RUN, ROOT

RECIPES = sorted((ROOT / "configs").rglob("*.yaml"))
TINY_BACKBONE = ["method.backbone.embed_dim=32", "method.backbone.depth=1", "method.backbone.num_heads=2"]
TINY_HEADS = {
    "ibot": [
        "method.out_dim=64",
        "method.patch_out_dim=64",
        "method.head_hidden_dim=32",
        "method.head_bottleneck_dim=16",
    ],
    "dtm": [],
}
FILE_TEACHERS = ("open_clip", "timm", "mimkit")


def shrunk(recipe: Path, output_dir: Path) -> list[str]:
    cfg = load_run_config(recipe, [])
    views = cfg.method.views
    size = getattr(views, "global_size", None) or views.size
    channels = 1 if cfg.data.source == "fashion-mnist" else 3
    overrides = [
        *TINY_BACKBONE,
        *TINY_HEADS[cfg.method.name],
        "data.source=synthetic",
        f"data.synthetic_size={size}",
        "data.synthetic_images=4",
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
    teacher = getattr(cfg.method, "teacher", None)
    if teacher is not None and teacher.kind in FILE_TEACHERS:
        overrides += ["method.teacher.kind=ema", "method.teacher.model=null", "method.teacher.weights=null"]
        overrides += ["method.teacher.checkpoint=null", "method.teacher.model_args={}"]
    return overrides


def test_every_method_has_a_recipe() -> None:
    assert {load_run_config(r, []).method.name for r in RECIPES} >= {"ibot", "dtm"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_trains_two_steps_when_shrunk(recipe: Path, tmp_path: Path) -> None:
    run_dir = pretrain(load_run_config(recipe, shrunk(recipe, tmp_path / "run")))
    with open(run_dir / "metrics.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f) if row.get("loss")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert load_run_config(run_dir / "config.yaml", []).method.name == load_run_config(recipe, []).method.name
