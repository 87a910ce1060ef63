"""Before the first step: `mimkit pretrain --dry-run` (a recipe's cost, one CPU step) and a run's start-up time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mimkit.cli import main
from mimkit.engine.dry_run import dry_run
from mimkit.runs import load_run_config
from support import ROOT

TOY = ROOT / "tests" / "recipes" / "toy.yaml"


def test_the_toy_methods_step_costs_what_its_two_linear_layers_do() -> None:
    """Per image: forward 2 x (2 x 144 x 32) FLOPs; backward the weight gradients of both layers and the input
    gradient of the second (the images need none): 46,080 FLOPs in all."""
    report = dry_run(load_run_config(TOY, ["method.dropout=0.0"]))
    size, hidden = 144, 32
    assert report.flops_per_image == 2 * (2 * size * hidden) + 3 * (2 * size * hidden)
    assert report.networks["net"] == (size * hidden + hidden + hidden * size + size,) * 2
    assert report.activation_bytes_per_image > 0 and report.images == 64 and report.steps_per_epoch == 8


def test_the_command_prints_networks_cost_and_steps(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "-c", str(TOY), "--dry-run", "data.global_batch=16"]) == 0
    out = capsys.readouterr().out
    assert "net" in out and "GFLOPs" in out and "MiB of activations" in out and "checkpoint: about" in out
    assert "64 images -> 4 steps per epoch at a global batch of 16 (1 process); 2 epochs see 0.0M images" in out


def test_data_that_is_not_here_still_gives_the_models_cost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "imagenet"
    args = ["pretrain", "-c", str(TOY), "--dry-run", "data.source=imagefolder", "data.synthetic=null"]
    assert main([*args, f"data.root={missing}", "data.channels=1"]) == 0
    out = capsys.readouterr().out
    assert "GFLOPs" in out and "not readable here" in out and str(missing) in out


def test_a_run_logs_how_long_it_took_to_start(tmp_path: Path) -> None:
    from mimkit.engine.train import pretrain

    run = pretrain(load_run_config(TOY, [f"output_dir={tmp_path / 'run'}", "train.epochs=1"]))
    line = next(line for line in (run / "train.log").read_text().splitlines() if "start-up" in line)
    total, imports, set_up = (float(x) for x in re.findall(r"([\d.]+) s", line))
    assert total == pytest.approx(imports + set_up, abs=0.11) and set_up >= 0
