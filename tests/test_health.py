"""Training-health measures and the watch: each measure reads 1 / 0 at its extremes, and the watch warns once per
spell that outlasts its window (per role of a measure), with advice, and never on a healthy signal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mimkit.engine.health import HealthWatch, read_health
from mimkit.engine.logs import read_metrics
from mimkit.engine.train import pretrain
from mimkit.health import distribution_health, feature_health
from mimkit.runs import load_run_config
from mimkit.viz.report import write_report
from support import IBOT_RECIPE, QUIET_CPU_RUN, SYNTHETIC_28, TINY_IBOT_HEADS


def test_distribution_measures_at_uniform_and_one_hot() -> None:
    uniform = distribution_health(torch.full((8, 16), 1 / 16))
    assert uniform["health_teacher_entropy"].item() == pytest.approx(1.0)
    assert uniform["health_teacher_max_prob"].item() == pytest.approx(1 / 16)
    one_hot = torch.zeros(8, 16)
    one_hot[torch.arange(8), torch.arange(8)] = 1.0
    peaked = distribution_health(one_hot)
    assert peaked["health_teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert peaked["health_teacher_max_prob"].item() == 1.0
    assert peaked["health_prototypes_used"].item() == pytest.approx(8 / 16)


def test_feature_measures_tell_spread_from_collapsed_features() -> None:
    torch.manual_seed(0)
    spread = feature_health(torch.randn(256, 32))
    assert spread["health_feature_std"].item() == pytest.approx(1.0, abs=0.05)
    assert spread["health_feature_rank"].item() > 0.8
    point = feature_health(torch.ones(256, 32) + 1e-6 * torch.randn(256, 32))
    assert point["health_feature_std"].item() < 0.01
    line = torch.randn(256, 1) * torch.randn(1, 32) + 5 * torch.randn(1, 32)
    assert feature_health(line)["health_feature_rank"].item() < 2 / 32
    assert math.isfinite(feature_health(torch.zeros(4, 8))["health_feature_rank"].item())


def test_watch_warns_once_per_spell_after_its_window(tmp_path: Path) -> None:
    watch = HealthWatch(window=30)
    said = [w for step in range(0, 100, 10) for w in watch.observe(step, {"health_teacher_entropy": 0.99})]
    assert len(said) == 1 and said[0].since_step == 0 and said[0].step == 30
    assert "uniform teacher" in said[0].message() and "teacher temperature" in said[0].message()
    assert watch.observe(100, {"health_teacher_entropy": 0.5}) == []  # recovered: the spell ends
    again = [w for step in range(110, 150, 10) for w in watch.observe(step, {"health_teacher_entropy": 0.01})]
    assert [w.rule for w in again] == ["one-hot teacher"]
    watch.save(tmp_path)
    assert [w["rule"] for w in read_health(tmp_path)] == ["uniform teacher", "one-hot teacher"]
    resumed = HealthWatch(window=30, earlier=read_health(tmp_path))
    resumed.save(tmp_path)
    assert len(read_health(tmp_path)) == 2


def test_watch_is_quiet_on_healthy_metrics_short_spells_and_when_off() -> None:
    healthy = {"health_teacher_entropy": 0.6, "health_feature_std": 0.8, "loss": 1.0}
    watch = HealthWatch(window=20)
    assert not any(watch.observe(step, healthy) for step in range(0, 500, 10))
    brief = HealthWatch(window=50)
    for step in range(0, 200, 10):  # collapsed for 40 steps at a time, then back
        value = 0.01 if step % 60 < 50 else 0.5
        assert brief.observe(step, {"health_feature_std": value}) == []
    off = HealthWatch(window=0)
    assert off.observe(1000, {"health_feature_std": 0.0}) == []


def test_mask_fill_is_watched_under_every_role_with_its_ratios_in_the_message() -> None:
    watch = HealthWatch(window=20)
    far = {"health_online_mask_fill": 0.2, "online_mask_ratio": 0.1, "online_mask_ratio_configured": 0.5}
    fine = {"health_momentum_mask_fill": 1.0, "momentum_mask_ratio": 0.5, "momentum_mask_ratio_configured": 0.5}
    said = [w for step in range(0, 50, 10) for w in watch.observe(step, far | fine)]
    assert [(w.rule, w.metric) for w in said] == [("masks far off", "health_online_mask_fill")]
    assert said[0].context == {"online_mask_ratio": 0.1, "online_mask_ratio_configured": 0.5}
    assert "(health_online_mask_fill = 0.200, online_mask_ratio = 0.100, online_mask_ratio_configured = 0.500)" in (
        said[0].message()
    )
    over_watch = HealthWatch(window=20)
    over = [w for step in range(0, 50, 10) for w in over_watch.observe(step, {"health_mask_fill": 2.5})]
    assert [w.rule for w in over] == ["masks far off"] and "more than twice" in over[0].advice
    quiet = HealthWatch(window=20)
    assert not any(
        quiet.observe(step, {"health_mask_fill": 0.6, "health_xmask_fill": 0.0}) for step in range(0, 90, 10)
    )


def tiny_ibot(out: Path, *extra: str) -> Path:
    tiny = ["method.backbone.embed_dim=32", "method.backbone.depth=1", "method.backbone.num_heads=2"]
    overrides = [*tiny, *TINY_IBOT_HEADS, *SYNTHETIC_28, "data.synthetic.images=64", "data.batch_size=8"]
    overrides += ["train.epochs=1", "train.log_every_steps=1", "train.health_window_steps=4"]
    return pretrain(load_run_config(IBOT_RECIPE, [*overrides, *QUIET_CPU_RUN, f"output_dir={out}", *extra]))


def test_a_uniform_teacher_is_warned_about_and_a_healthy_run_is_not(tmp_path: Path) -> None:
    healthy = tiny_ibot(tmp_path / "healthy")
    assert read_health(healthy) == [] and "training health" not in (healthy / "train.log").read_text()
    rows = [row for row in read_metrics(healthy) if "health_teacher_entropy" in row]
    assert len(rows) == 8 and all(0 < row["health_feature_std"] < 2 for row in rows)
    collapsed = tiny_ibot(tmp_path / "collapsed", "method.teacher_temp=100", "method.warmup_teacher_temp=100")
    (warning,) = read_health(collapsed)
    assert warning["rule"] == "uniform teacher" and warning["value"] > 0.99
    assert "WARNING training health: uniform teacher since step 1" in (collapsed / "train.log").read_text()
    report = write_report(tmp_path / "report", collapsed, "", {})
    assert "uniform teacher" in report.read_text()
