"""The training loop with the toy method: checkpoints, exact resume, non-finite losses, accumulation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from mimkit.config import ConfigError
from mimkit.engine.logs import ProgressDisplay, read_metrics
from mimkit.engine.train import NonFiniteLossError, pretrain
from mimkit.eval.online import online_knn
from mimkit.methods.saved import read_checkpoint
from mimkit.runs import load_run_config
from support import ROOT, assert_same_losses, logged_losses, logged_step

TOY = ROOT / "tests" / "recipes" / "toy.yaml"


def toy_config(run_dir: Path, *overrides: str):
    return load_run_config(TOY, [f"output_dir={run_dir}", *overrides])


def test_run_folder_holds_checkpoints_logs_and_config(tmp_path: Path) -> None:
    run = pretrain(toy_config(tmp_path / "run"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch_0000.ckpt",
        "epoch_0001.ckpt",
        "last.ckpt",
    ]
    assert sorted(logged_losses(run)) == list(range(1, 17))
    saved = load_run_config(run / "config.yaml")
    assert saved.seed == 3 and saved.method.name == "toy_method:ToyMethod"
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["position"]["epoch"] == 2 and state["position"]["step"] == 16
    assert state["method"]["steps_seen"].item() == 16
    assert {"torch", "timm", "lightning"} <= set(state["versions"])
    assert (run / "environment.yaml").is_file() and (run / "train.log").is_file()
    environment = yaml.safe_load((run / "environment.yaml").read_text())
    assert environment["precision"] == "32-true" and environment["world_size"] == 1


def test_crash_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    reference = pretrain(toy_config(tmp_path / "reference"))
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(toy_config(crashed, "train.checkpoint_every_steps=3", "method.fail_at_step=11"))
    assert read_checkpoint(crashed / "checkpoints" / "last.ckpt")["position"]["step"] == 9  # mid-epoch 2
    pretrain(toy_config(crashed, "resume=auto", "method.fail_at_step=null"))
    assert_same_losses(crashed, reference)


def test_training_time_is_summed_over_resumed_segments(tmp_path: Path) -> None:
    """train_minutes (epoch rows) and the checkpoint's train_seconds count every step once, across a resume."""
    delay, run = 0.03, tmp_path / "run"
    common = [f"method.step_delay={delay}", "train.checkpoint_every_steps=3"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(toy_config(run, *common, "method.fail_at_step=11"))
    before = read_checkpoint(run / "checkpoints" / "last.ckpt")["position"]
    assert before["step"] == 9 and before["train_seconds"] >= 9 * delay
    pretrain(toy_config(run, *common, "resume=auto", "method.fail_at_step=null"))
    seconds = read_checkpoint(run / "checkpoints" / "last.ckpt")["position"]["train_seconds"]
    assert 16 * delay <= seconds < 60  # 9 steps before the crash + 7 after the resume, each counted once
    minutes = [row["train_minutes"] for row in read_metrics(run) if "train_minutes" in row]
    assert len(minutes) == 2 and 0 < minutes[0] < minutes[1] == pytest.approx(seconds / 60, rel=0.2)


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path: Path) -> None:
    pretrain(toy_config(tmp_path / "run", "train.epochs=1"))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        pretrain(toy_config(tmp_path / "run", "train.epochs=1"))
    assert pretrain(toy_config(tmp_path / "run", "train.epochs=1", "resume=auto")) == tmp_path / "run"


def test_nonfinite_loss_stops_with_last_good_state(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="last good state is saved"):
        pretrain(toy_config(tmp_path / "run", "method.nan_at_step=5"))
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert state["position"]["step"] == 5 and state["method"]["steps_seen"].item() == 5
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


def test_nonfinite_loss_can_be_skipped_and_counted(tmp_path: Path) -> None:
    run = pretrain(toy_config(tmp_path / "run", "method.nan_at_step=5", "train.on_nonfinite=skip"))
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["position"]["skipped_steps"] == 1
    assert state["method"]["steps_seen"].item() == 15
    assert max(r.get("skipped_steps", 0) for r in read_metrics(run)) == 1


def test_gradient_accumulation_equals_the_large_batch(tmp_path: Path) -> None:
    common = ["method.dropout=0.0", "train.epochs=1", "optim.warmup_epochs=0", "method.clip_mode=none"]
    big = pretrain(toy_config(tmp_path / "big", "data.batch_size=8", *common))
    small = pretrain(toy_config(tmp_path / "small", "data.batch_size=4", "optim.accumulate_grad_batches=2", *common))
    a = read_checkpoint(big / "checkpoints" / "last.ckpt")["method"]
    b = read_checkpoint(small / "checkpoints" / "last.ckpt")["method"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_bf16_mixed_precision_trains_on_cpu(tmp_path: Path) -> None:
    run = pretrain(toy_config(tmp_path / "run", "train.precision=bf16-mixed", "train.epochs=1"))
    assert all(torch.isfinite(torch.tensor(v)) for v in logged_losses(run).values())


def test_sigkill_during_an_epoch_then_resume_matches(tmp_path: Path) -> None:
    """A real process killed with SIGKILL mid-epoch continues from its last checkpoint with identical losses."""
    common = ["train.checkpoint_every_steps=2", "data.synthetic.images=96", "train.epochs=2"]
    reference = pretrain(toy_config(tmp_path / "reference", *common))
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    command = [sys.executable, "-m", "mimkit", "pretrain", "-c", str(TOY), f"output_dir={run}", *common]
    process = subprocess.Popen([*command, "method.step_delay=0.15"], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not logged_step(run, at_least=7):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = read_checkpoint(run / "checkpoints" / "last.ckpt")["position"]["step"]
    assert 0 < step < 24 and step % 12 != 0, "the kill should land inside an epoch"
    subprocess.run([*command, "--resume"], env=env, check=True, stderr=subprocess.DEVNULL)
    assert_same_losses(run, reference)


def test_online_knn_is_logged_every_n_epochs(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path / "run", "train.knn_every_epochs=1", "train.knn_limit=32")
    run = pretrain(cfg, online_knn(cfg))  # what `mimkit pretrain` hands the engine
    knn = [row for row in read_metrics(run) if "knn_top1" in row]
    assert [int(row["epoch"]) for row in knn] == [0, 1]
    assert all(0.0 <= row["knn_top1"] <= 1.0 for row in knn)


def test_the_progress_bar_shows_no_loss_before_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    display = ProgressDisplay(10, 0, enabled=True, log_every=5)
    try:
        assert display.bar is not None
        assert display.bar.tasks[0].fields["numbers"] == "waiting for the first step"
        display.update(1, 0, 1.5, 1e-3, 64.0, 0.23)
        assert display.bar.tasks[0].fields["numbers"] == "loss 1.5000  lr 1.00e-03  64 img/s  wait 23%"
    finally:
        display.close()
