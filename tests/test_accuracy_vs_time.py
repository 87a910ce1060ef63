"""The accuracy-against-wall-clock study script trains, evaluates and reports a point end to end (a toy point)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import ROOT, load_benchmark

study = load_benchmark("accuracy_vs_time")


@pytest.mark.slow
def test_a_toy_point_is_trained_evaluated_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # the toy method, in the subprocesses
    toy = study.Point("toy", str(ROOT / "tests" / "recipes" / "toy.yaml"), ("data.synthetic.images=48",), "cls")
    monkeypatch.setattr(study, "STUDY", (toy,))
    monkeypatch.setattr(study, "LINEAR", ("--epochs", "2"))
    out = tmp_path / "report"
    assert study.main(["--runs", str(tmp_path / "runs"), "--out", str(out), "--name", "t"]) == 0
    result = json.loads((out / "t.json").read_text())
    (point,) = result["points"]
    assert point["name"] == "toy" and point["epochs"] == 2 and point["train_minutes"] > 0
    assert 0 <= point["knn"] <= 1 and 0 <= point["knn_random_init"] <= 1 and 0 <= point["linear"] <= 1
    assert 0 <= result["raw_pixels_linear"] <= 1 and result["machine"]["cpu"]
    assert point["commands"][0].split()[3:5] == ["pretrain", "-c"]
    table = (out / "t.md").read_text()
    assert "| toy | toy_method:ToyMethod |" in table and "| raw pixels |" in table
    assert (out / "t.png").stat().st_size > 0
    trained = (tmp_path / "runs" / "toy" / "checkpoints" / "last.ckpt").stat().st_mtime
    assert study.main(["--runs", str(tmp_path / "runs"), "--out", str(out), "--name", "t"]) == 0  # nothing redone
    assert (tmp_path / "runs" / "toy" / "checkpoints" / "last.ckpt").stat().st_mtime == trained
    with pytest.raises(SystemExit):
        study.main(["--only", "nope"])
    assert "unknown point(s) nope" in capsys.readouterr().err
