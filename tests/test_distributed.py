"""Two CPU processes (DDP over gloo) train like one process at the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mimkit.engine.logs import read_metrics
from mimkit.methods.saved import read_checkpoint
from support import ROOT

TOY = ROOT / "tests" / "recipes" / "toy.yaml"


def run_toy(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mimkit", "pretrain", "-c", str(TOY), f"output_dir={run_dir}"]
    command += ["method.dropout=0.0", "train.epochs=1", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path: Path) -> None:
    single = run_toy(tmp_path / "single", "data.batch_size=8")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_toy(tmp_path / "ddp", "data.batch_size=4", "--strategy", "ddp", "--devices", "2")
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        return [row["loss"] for row in read_metrics(run) if "loss" in row]

    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(one) == len(two) == 8
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    state_one = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.ckpt")
    state_two = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert state_two["world_size"] == 2 and len(state_two["rng"]) == 2
    for key, value in state_one["method"].items():
        assert value.float().allclose(state_two["method"][key].float(), rtol=1e-4, atol=1e-6), key
