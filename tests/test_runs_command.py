"""`mimkit runs show` and `mimkit runs compare`: what a run folder holds, read from its own files."""

from __future__ import annotations

from pathlib import Path

import pytest

from mimkit.cli import main
from mimkit.engine.train import pretrain
from mimkit.eval.results import save_result
from mimkit.run_summary import config_differences, flatten, result_rows, summarize
from mimkit.runs import load_run_config
from support import ROOT

TOY = ROOT / "tests" / "recipes" / "toy.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two toy runs that differ in lr and epochs, the first with two k-NN evaluations and a linear probe."""
    root = tmp_path_factory.mktemp("runs")
    first = pretrain(load_run_config(TOY, [f"output_dir={root / 'a'}"]))
    second = pretrain(load_run_config(TOY, [f"output_dir={root / 'b'}", "optim.lr=3e-3", "train.epochs=1"]))
    save_result(first, "knn", {"checkpoint": "x"}, "k=20: pretrained 40.00", 0.40)
    save_result(first, "knn", {"checkpoint": "x"}, "k=20: pretrained 41.50", 0.415)
    save_result(first, "linear", {"checkpoint": "x"}, "pretrained, cls features: top-1 55.00", 0.55)
    return first, second


def test_summary_reads_progress_loss_time_evals_and_checkpoints(runs: tuple[Path, Path]) -> None:
    summary = summarize(runs[0])
    assert (summary.epochs_done, summary.steps_done, summary.epochs) == (2, 16, 2)
    assert summary.last_loss is not None and summary.last_loss[0] == 16
    assert summary.train_minutes is not None and summary.train_minutes > 0
    assert summary.evaluations["knn"]["score"] == 0.415  # the newest of the two
    assert {name for name, _ in summary.checkpoints} == {"epoch_0000.ckpt", "epoch_0001.ckpt", "last.ckpt"}
    facts = summary.facts()
    assert facts["method"] == "toy_method:ToyMethod" and facts["epochs"] == "2 of 2 (16 steps)"
    assert facts["data"].startswith("synthetic") and "batch 8" in facts["data"]
    assert facts["eval knn"].startswith("k=20: pretrained 41.50")
    assert "KiB" in facts["checkpoints"] or "MiB" in facts["checkpoints"]


def test_show_prints_the_summary(runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", "show", str(runs[0])]) == 0
    out = capsys.readouterr().out
    for text in ("toy_method:ToyMethod", "2 of 2 (16 steps)", "k=20: pretrained 41.50", "top-1 55.00", "last.ckpt"):
        assert text in out, text


def test_compare_lists_only_what_differs_and_the_results(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    summaries = [summarize(path) for path in runs]
    assert config_differences(summaries) == {"optim.lr": [1e-3, 3e-3], "train.epochs": [2, 1]}
    rows = result_rows(summaries)
    assert rows["knn top-1 (%)"] == [pytest.approx(41.5), None] and rows["linear top-1 (%)"] == [
        pytest.approx(55.0),
        None,
    ]
    assert main(["runs", "compare", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "optim.lr" in out and "train.epochs" in out and "seed" not in out and "41.50" in out


def test_flatten_keeps_lists_and_empty_mappings_as_values() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": {}}, "e": None}) == {"a.b": 1, "a.c": [1, 2], "a.d": {}, "e": None}


def test_not_a_run_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", "show", str(tmp_path)]) == 2
    assert "is not a mimkit run folder (no config.yaml)" in capsys.readouterr().err
