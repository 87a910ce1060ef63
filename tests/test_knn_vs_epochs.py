"""The accuracy-vs-epochs benchmark scores the initialisation and every epoch checkpoint, like `mimkit eval knn`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mimkit.cli import main
from mimkit.engine.train import pretrain
from mimkit.runs import load_run_config
from support import IBOT_RECIPE, QUIET_CPU_RUN, SYNTHETIC_28, load_benchmark

bench = load_benchmark("knn_vs_epochs")
TINY = [
    "method.backbone.patch_size=4",
    "method.backbone.embed_dim=16",
    "method.backbone.depth=1",
    "method.backbone.num_heads=2",
    "method.out_dim=32",
    "method.patch_out_dim=32",
    "method.head_hidden_dim=32",
    "method.head_bottleneck_dim=8",
    "method.views.num_local=1",
    "method.views.local_size=12",
    *SYNTHETIC_28,
    "data.synthetic.images=24",
    "data.batch_size=8",
    "train.epochs=2",
    *QUIET_CPU_RUN,
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch iBOT run with a checkpoint after each epoch."""
    out = tmp_path_factory.mktemp("ibot")
    return pretrain(load_run_config(IBOT_RECIPE, [*TINY, f"output_dir={out}"]))


def test_scores_initialisation_and_each_epoch_like_eval_knn(run_dir: Path, tmp_path: Path) -> None:
    path = bench.main([str(run_dir), "--out", str(tmp_path), "--name", "curve"])
    result = json.loads(path.read_text())
    (curve,) = result["curves"]
    assert curve["method"] == "ibot" and [p["epoch"] for p in curve["points"]] == [0, 1, 2]
    assert curve["points"][0]["checkpoint"] is None and curve["points"][2]["checkpoint"].endswith("epoch_0001.ckpt")
    assert all(0 <= p["knn_top1"] <= 1 for p in curve["points"]) and 0 <= result["raw_pixels"] <= 1
    assert result["machine"]["cpu"] and result["versions"]["torch"]
    assert main(["eval", "knn", str(run_dir), "--k", "20", "--baselines"]) == 0
    knn = json.loads((run_dir / "eval" / "knn.json").read_text())["accuracy"]
    assert curve["points"][2]["knn_top1"] == pytest.approx(knn["pretrained"]["20"])  # last epoch = last.ckpt
    assert curve["points"][0]["knn_top1"] == pytest.approx(knn["random init"]["20"])
    assert result["raw_pixels"] == pytest.approx(knn["raw pixels"]["20"])
    table = path.with_suffix(".md").read_text()
    assert f"| {run_dir.name} | ibot |" in table and "epoch 2" in table
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_a_run_without_epoch_checkpoints_is_named(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no epoch checkpoints in .*checkpoint_every_epochs"):
        bench.epoch_checkpoints(tmp_path)
