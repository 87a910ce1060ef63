"""The GPU tier's driver on a CPU at the test tier: its data stages (the training feed in both `data.augment_on`
modes, data_throughput.py recipe by recipe) and a step run land in gpu_tier.md; the feed's figures come from
metrics.csv after the first window; a stage past its time is killed with its workers."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from support import load_benchmark

driver = load_benchmark("gpu_tier")


def test_data_stages_and_a_step_run_at_the_test_tier_on_a_cpu(tmp_path) -> None:
    argv = ["--tier", "test", "--device", "cpu", "--methods", "ibot", "--no-compile", "--steps", "1"]
    report = driver.main([*argv, "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)])
    text = report.read_text()
    for stage in ("feed images", "feed_worker", "feed_device", "data_throughput ibot/vit_small_imagefolder", "ibot"):
        assert f"- {stage}: done in " in text, stage
    assert text.index("- feed_worker: done") < text.index("- data_throughput ") < text.index("- ibot: done")
    assert "/dev/shm: " in text and "CPU cores: " in text

    # the training feed: one run per mode on 16 files (8 JPEGs and 8 links), 2 epochs of 4 steps, a window every 2
    feed = json.loads((tmp_path / "feed.json").read_text())
    assert feed["workers"] == max(1, driver.cores() - 1) and feed["sizes"] == vars(driver.DATA_SIZES["test"]) | {
        "feed_set": list(driver.DATA_SIZES["test"].feed_set)
    }
    for mode in driver.MODES:
        result = feed["results"][mode]
        assert result["steps"] == [2, 4, 6, 8] and result["windows"] == 3, mode
        assert result["images_per_second"] > 0 and result["wait_logged"], mode
        assert 0 <= result["data_wait_fraction"] <= 1, mode
        assert {f"data.augment_on={mode}", "method.backbone.embed_dim=32"} <= set(result["overrides"]), mode
        row = f"| {mode} | done in "
        assert row in text and "| 3 | " in text.split(row)[1].split("\n")[0], mode
        assert "16 images" in (tmp_path / f"feed_{mode}.log").read_text()  # the 8 links count as images
        config = yaml.safe_load((tmp_path / f"feed_{mode}" / "config.yaml").read_text())
        assert config["data"]["augment_on"] == mode and config["method"]["backbone"]["embed_dim"] == 32
        assert (tmp_path / f"feed_{mode}" / "metrics.csv").is_file()
        assert not (tmp_path / f"feed_{mode}" / "checkpoints").exists()  # deleted: they would travel back in OUT

    # data_throughput on the device given (here the CPU), both modes' loader rows
    assert "| device part ms/img (cpu) |" in text
    assert "| ibot/vit_small_imagefolder | worker | " in text and "| ibot/vit_small_imagefolder | device | " in text
    assert "| vit_micro | 4 |" in text and (tmp_path / "ibot_test_cpu.json").is_file()


def test_feed_figures_leave_out_the_first_window_and_say_n_a_without_the_wait_column(tmp_path) -> None:
    with_wait = tmp_path / "with"
    with_wait.mkdir()
    (with_wait / "metrics.csv").write_text(
        "step,loss,images_per_second,data_wait_fraction,epoch\n"
        "2,1.0,10.0,0.9,0\n4,1.0,100.0,0.1,0\n4,,,,0\n6,1.0,300.0,0.3,1\n8,1.0,200.0,0.2,1\n"
    )
    summary = driver.feed_summary(with_wait)
    assert summary["steps"] == [2, 4, 6, 8] and summary["windows"] == 3
    assert summary["images_per_second"] == 200.0 and summary["data_wait_fraction"] == 0.2
    assert summary["first_images_per_second"] == 10.0 and summary["first_data_wait_fraction"] == 0.9
    without = tmp_path / "without"
    without.mkdir()
    (without / "metrics.csv").write_text("step,images_per_second\n2,10.0\n4,30.0\n")
    old = driver.feed_summary(without)
    assert old["images_per_second"] == 30.0 and old["data_wait_fraction"] is None and not old["wait_logged"]
    missing = driver.feed_summary(tmp_path / "never_ran")
    assert missing["windows"] == 0 and missing["images_per_second"] is None
    sizes = driver.DATA_SIZES["test"]
    results = {
        "worker": {"outcome": "done in 9 s", **summary},
        "device": {"outcome": "done in 8 s", **old},
        "never": {"outcome": "timed out after 60 s", **missing},
    }
    table = driver.feed_table(sizes, 3, results)
    assert "| worker | done in 9 s | 3 | 200.0 | 0.200 | 10.0 | 0.900 |" in table
    assert "| device | done in 8 s | 1 | 30.0 | n/a | 10.0 | n/a |" in table
    assert "| never | timed out after 60 s | 0 | – | – | – | – |" in table


def test_no_data_budget_skips_the_data_stages_and_an_empty_budget_every_run(tmp_path) -> None:
    argv = ["--tier", "test", "--device", "cpu", "--methods", "ibot", "--no-compile", "--out", str(tmp_path)]
    report = driver.main([*argv, "--data-budget-s", "0", "--budget-s", "1"])
    text = report.read_text()
    assert "- data stages: skipped (--data-budget-s 0)" in text and "No data stage finished." in text
    assert "- ibot: skipped" in text and not (tmp_path / "feed.json").exists()
    report = driver.main([*argv, "--data-budget-s", "5", "--budget-s", "5"])
    text = report.read_text()
    assert "- training feed: skipped" in text and "- data_throughput ibot/vit_small_imagefolder: skipped" in text
    assert "| worker | not run | 0 |" in text


def test_a_stage_past_its_time_is_killed_with_its_children(tmp_path) -> None:
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(120)"
    )
    started = time.monotonic()
    status, seconds = driver.run_stage([sys.executable, "-c", code], tmp_path / "stage.log", dict(os.environ), 3)
    assert status is None and 3 <= seconds < 30 and time.monotonic() - started < 30
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)  # a DataLoader worker would not go on eating the next stage's cores
    status, _ = driver.run_stage([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "fails.log", {}, 30)
    assert status == 3 and driver.outcome(status, 1.2, "fails.log") == "failed (exit 3) after 1 s; see fails.log"


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie awaiting its reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("mode", ["worker", "device"])
def test_feed_overrides_name_the_mode_and_keep_the_tiers_overrides_last(mode: str, tmp_path) -> None:
    sizes = driver.DATA_SIZES["test"]
    overrides = driver.feed_overrides(sizes, tmp_path / "images", mode, 15, "cuda", tmp_path / "run")
    assert f"data.augment_on={mode}" in overrides and "data.num_workers=15" in overrides
    assert "train.accelerator=cuda" in overrides and f"data.limit={sizes.feed_images}" in overrides
    assert overrides[-len(sizes.feed_set) :] == list(sizes.feed_set)
    gpu = driver.feed_overrides(driver.GPU_SIZES, tmp_path, mode, 15, "cuda", tmp_path / "run")
    assert "train.precision=bf16-mixed" in gpu and "data.batch_size=64" in gpu
