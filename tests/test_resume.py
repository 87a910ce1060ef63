"""Resume: changes a run in progress can take are applied with a notice, others are refused before anything is
written; SIGINT stops with a checkpoint from which `--resume` continues exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mimkit.cli import main
from mimkit.config import ConfigError, to_dict
from mimkit.engine.resume import check_resume_changes, config_changes
from mimkit.engine.train import pretrain
from mimkit.methods.saved import read_checkpoint
from mimkit.runs import load_run_config
from support import ROOT, assert_same_losses, logged_losses, logged_step

TOY = ROOT / "tests" / "recipes" / "toy.yaml"


@pytest.fixture
def finished(tmp_path: Path) -> Path:
    return pretrain(load_run_config(TOY, [f"output_dir={tmp_path / 'run'}", "train.epochs=1"]))


def test_an_unrestorable_change_is_refused_and_leaves_the_run_intact(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = (finished / "config.yaml").read_text()
    assert main(["pretrain", "--resume", str(finished), "method.hidden=64"]) == 2
    err = capsys.readouterr().err
    assert "cannot take these changes" in err and "method.hidden: 32 -> 64" in err and "another output_dir" in err
    assert len(err.splitlines()) < 6  # a message, no size-mismatch dump
    assert (finished / "config.yaml").read_text() == saved
    assert main(["pretrain", "--resume", str(finished)]) == 0  # the run still resumes as it was


def test_a_safe_change_is_applied_with_a_notice(finished: Path) -> None:
    assert main(["pretrain", "--resume", str(finished), "train.epochs=2"]) == 0
    assert read_checkpoint(finished / "checkpoints" / "last.ckpt")["position"]["epoch"] == 2
    assert yaml.safe_load((finished / "config.yaml").read_text())["train"]["epochs"] == 2
    assert "resume: applying train.epochs: 1 -> 2" in (finished / "train.log").read_text()


def test_an_optimisation_change_needs_force(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["pretrain", "--resume", str(finished), "train.epochs=2", "optim.lr=0.002"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.001 -> 0.002" in err and "pass --force" in err
    assert main([*args, "--force"]) == 0
    assert yaml.safe_load((finished / "config.yaml").read_text())["optim"]["lr"] == 0.002


def test_change_classification() -> None:
    cfg = load_run_config(TOY, [])
    saved = to_dict(cfg)
    assert config_changes(saved, cfg) == {}
    moved = load_run_config(TOY, ["output_dir=elsewhere", "data.num_workers=2", "resume=auto"])
    assert check_resume_changes(saved, moved) == ["resume: applying data.num_workers: 0 -> 2"]
    fewer = load_run_config(TOY, ["train.keep_epoch_checkpoints=1"])  # room on a full disk, taken on resume
    assert check_resume_changes(saved, fewer) == ["resume: applying train.keep_epoch_checkpoints: 3 -> 1"]
    with pytest.raises(ConfigError, match=r"optim.accumulate_grad_batches: 1 -> 2"):
        check_resume_changes(saved, load_run_config(TOY, ["optim.accumulate_grad_batches=2"]), force=True)
    with pytest.raises(ConfigError, match=r"seed: 3 -> 4"):
        check_resume_changes(saved, load_run_config(TOY, ["seed=4"]), force=True)


def test_a_field_added_since_the_run_was_saved_takes_its_default_only_with_force() -> None:
    """A run saved before a method gained a field (CIM's `no_weight_decay`, say) resumes with its default once
    told to; a field that was there and changed is still refused."""
    cfg = load_run_config(TOY, [])
    saved = to_dict(cfg)
    del saved["method"]["hidden"]
    with pytest.raises(
        ConfigError, match=r"(?s)fields mimkit added since the run was saved.*method.hidden: None -> 32"
    ):
        check_resume_changes(saved, cfg)
    assert check_resume_changes(saved, cfg, force=True) == ["resume: applying method.hidden: None -> 32"]
    with pytest.raises(ConfigError, match=r"cannot take these changes.*\n  seed: 3 -> 4"):
        check_resume_changes(saved, load_run_config(TOY, ["seed=4"]), force=True)


def test_a_run_saved_with_the_older_flat_data_fields_resumes_without_changes() -> None:
    cfg = load_run_config(TOY, [])
    saved = to_dict(cfg)
    section = saved["data"].pop("synthetic")
    saved["data"] |= {f"synthetic_{key}": value for key, value in section.items()} | {"name": None}
    assert config_changes(saved, cfg) == {}
    assert config_changes(saved, load_run_config(TOY, ["data.synthetic.images=7"])) == {
        "data.synthetic.images": (64, 7)
    }  # a real change still counts


def test_sigint_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    common = ["data.synthetic.images=96", "train.epochs=2", "data.num_workers=1"]
    reference = pretrain(load_run_config(TOY, [f"output_dir={tmp_path / 'reference'}", *common]))
    run = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    command = [sys.executable, "-m", "mimkit", "pretrain", "-c", str(TOY), f"output_dir={run}", *common]
    process = subprocess.Popen(
        [*command, "method.step_delay=0.15"], env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not logged_step(run, at_least=5):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group, DataLoader worker included
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and f"mimkit pretrain --resume {run}" in err
    step = read_checkpoint(run / "checkpoints" / "last.ckpt")["position"]["step"]
    assert step == max(logged_losses(run)) and 0 < step < 24 and step % 12 != 0, "stopped inside an epoch, nothing lost"
    subprocess.run([*command, "--resume"], env=env, check=True, stderr=subprocess.DEVNULL)
    assert_same_losses(run, reference)


def test_a_second_sigint_stops_at_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    command = [sys.executable, "-m", "mimkit", "pretrain", "-c", str(TOY), f"output_dir={run}", "method.step_delay=30"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    log = run / "train.log"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and "steps/epoch" in log.read_text()):
        time.sleep(0.05)
    time.sleep(0.5)  # inside the first step's 30-second delay
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    start = time.time()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert time.time() - start < 15, "the second SIGINT waited for the step to end"
    assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err
