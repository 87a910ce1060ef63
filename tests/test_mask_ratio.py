"""The masking a method really applies: block masks reach their configured ratio on small token grids (and draw the
same masks as before wherever the configured block fits), every method reports its realised and configured ratios,
the pre-training check refuses masks that never mask and warns on far-off ones, and a run whose masks are far off
says so in its log and in health.json."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from mimkit.config import ConfigError
from mimkit.data import masking
from mimkit.data.loader import collate
from mimkit.data.masking import MaskConfig, MaskGenerator, block_mask, check_mask_fill, measure_fill, smallest_block
from mimkit.data.sources import build_source
from mimkit.engine.health import read_health
from mimkit.engine.train import pretrain
from mimkit.methods.base import method_class, method_names
from mimkit.runs import load_run_config
from mimkit.schedules import Progress
from support import IBOT_RECIPE, QUIET_CPU_RUN, ROOT, SYNTHETIC_28, TINY_IBOT_HEADS, tiny_overlay

ASPECT = (0.3, 1 / 0.3)
CIM_DEFAULT = MaskConfig(ratios=[(0.45, 0.05)], min_block_patches=16)
"""CIM's generator mask (BEiT's smallest block of 16 on 14 x 14), which the issue met at 64 px: a 4 x 4 grid."""
CONFIGS = {
    "cim default": CIM_DEFAULT,
    "dtm default": MaskConfig(ratios=[(75 / 196, 0.0)], min_block_patches=16),
    "ibot default": MaskConfig(),
    "cim fmnist": MaskConfig(ratios=[(0.45, 0.05)], min_block_patches=2),
    "dtm fmnist": MaskConfig(ratios=[(0.4, 0.0)], min_block_patches=4),
}
TINY_VIT = ["method.backbone.embed_dim=32", "method.backbone.depth=1", "method.backbone.num_heads=2"]


def within_tolerance(realised: float, configured: float, patches: int) -> bool:
    """Within 10 % of the configured share, or one patch of the grid (a crop masks whole patches, never more than
    asked, so a 4 x 4 grid's ratio 0.1 masks 1 patch of the 1.6 asked for)."""
    return abs(realised - configured) <= max(0.1 * configured, 1 / patches)


@pytest.mark.parametrize("grid", [4, 7, 8, 14])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_block_masks_reach_the_configured_ratio_on_small_grids(name: str, grid: int) -> None:
    fill = measure_fill(CONFIGS[name], (grid, grid), draws=400)
    assert within_tolerance(fill.realised, fill.configured, grid * grid), fill
    assert not fill.far_off


def test_the_issues_64_px_cim_masks_were_nearly_empty_and_now_reach_the_ratio() -> None:
    rng = random.Random(0)
    before = [block_mask(4, 4, rng.uniform(0.4, 0.5) * 16, 16, ASPECT, rng).float().mean().item() for _ in range(400)]
    realised_before = sum(before) / len(before)
    assert realised_before < 0.45 / 2  # the issue's logged 0.06-0.12 against 0.40-0.50
    after = measure_fill(CIM_DEFAULT, (4, 4), draws=400)
    assert within_tolerance(after.realised, 0.45, 16) and after.realised > 0.4


@pytest.mark.parametrize(
    ("name", "grid"),
    [("ibot default", 14), ("ibot default", 4), ("cim fmnist", 4), ("dtm fmnist", 4), ("dtm default", 14)],
)
def test_where_the_configured_block_fits_the_masks_are_the_same_as_before(name: str, grid: int) -> None:
    cfg = CONFIGS[name]
    new = MaskGenerator(cfg, random.Random(1))
    old_rng = random.Random(1)
    old = MaskGenerator(cfg, old_rng)  # draws the ratio; the blocks below with the configured smallest block
    configured = cfg.min_block_patches if cfg.min_block_patches is not None else (grid // 3) ** 2
    for _ in range(300):
        target = old.ratio(0) * grid * grid
        expected = block_mask(grid, grid, target, configured, cfg.aspect_ratio, old_rng)
        assert torch.equal(new(grid, grid, 0), expected)


def test_the_smallest_block_falls_back_to_beits_grid_rule_only_beyond_the_budget() -> None:
    assert smallest_block(14, 14, 19.6, None) == 16  # BEiT/iBOT's rule
    assert smallest_block(14, 14, 78.0, 16) == 16
    assert smallest_block(4, 4, 7.2, 2) == 2  # fits the budget: as configured
    assert smallest_block(4, 4, 7.2, 16) == 1  # BEiT's rule for 4 x 4
    assert smallest_block(8, 8, 3.0, 16) == 3.0  # BEiT's 4 would exceed the budget too
    assert smallest_block(4, 4, 0.0, None) == 0.0


def test_expected_ratio_is_what_the_config_asks_for_on_average() -> None:
    assert MaskConfig().expected_ratio(0) == pytest.approx(0.15)
    assert MaskConfig(ratios=[(0.45, 0.05)]).expected_ratio(0) == pytest.approx(0.45)
    assert MaskConfig(shape="symmetric", symmetric_block=2).expected_ratio(0) == 0.5
    assert MaskConfig(start_epoch=3).expected_ratio(2) == 0.0
    assert MaskConfig(ratios=[(0.0, 0.0)]).expected_ratio(0) == 0.0


def test_the_check_refuses_masks_that_never_mask_and_says_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"^method\.mask\.ratios: on the 4x4 token grid no mask covers a patch") as e:
        check_mask_fill(MaskConfig(shape="rand", ratios=[(0.05, 0.0)]), (4, 4))
    assert "at least 0.0625" in str(e.value) and "larger image size" in str(e.value)
    with pytest.raises(ConfigError, match=r"^method\.online_mask\.ratios"):
        check_mask_fill(MaskConfig(ratios=[(0.03, 0.0)]), (4, 4), "method.online_mask")


def test_the_check_warns_on_far_off_masks_and_leaves_the_training_streams_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    random.seed(5)
    torch.manual_seed(5)
    state, torch_state = random.getstate(), torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        healthy = check_mask_fill(CIM_DEFAULT, (4, 4))
        assert not healthy.far_off and caplog.text == ""
        far = check_mask_fill(MaskConfig(ratios=[(0.05, 0.0), (0.1, 0.0)]), (4, 4))  # 0 or 1 patch of 0.8 / 1.6
    assert far.far_off and far.fill < 0.5
    assert "method.mask: on the 4x4 token grid the masks cover 0.03" in caplog.text
    assert "the config asks for 0.075" in caplog.text
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)


def tiny_method(name: str) -> tuple[object, dict]:
    """The method of its first tiny-ViT Fashion-MNIST recipe, shrunk, and a collated batch of its views."""
    recipe = sorted((ROOT / "configs" / name).glob("vit_tiny_fmnist*.yaml"))[0]
    overrides = [*tiny_overlay(name)["overrides"], *TINY_VIT, *SYNTHETIC_28, "data.channels=1"]
    cfg = load_run_config(recipe, [*overrides, "data.synthetic.images=8"])
    source = build_source(cfg.data)
    cls = method_class(name)
    cls.prepare(cfg.method, source)
    torch.manual_seed(0)
    method = cls(cfg.method, source.info)
    views = method.views()
    return method, collate([(views(source.load(i)[0], 0), 0, i) for i in range(4)])


@pytest.mark.parametrize("name", method_names())
def test_every_method_reports_its_realised_and_configured_mask_ratios(name: str) -> None:
    method, batch = tiny_method(name)
    assert method.mask_configs(), "a method that draws masks names them for the pre-training check"
    method.check_masks()  # the shipped recipe's masks pass the check
    metrics = method.training_step(batch, Progress(0, 0, 10, 1)).metrics
    realised = [key for key in metrics if key.endswith("mask_ratio")]
    assert len(realised) == len(method.mask_configs())
    for key in realised:
        role = key.removesuffix("mask_ratio")
        configured = float(metrics[f"{key}_configured"])
        assert configured > 0
        assert float(metrics[f"health_{role}mask_fill"]) == pytest.approx(float(metrics[key]) / configured)


def ibot_on_a_4x4_grid(out: Path) -> Path:
    """A tiny iBOT run (28-px synthetic images, 7-px patches: a 4 x 4 grid) with CIM's generator mask."""
    overrides = [*TINY_VIT, *TINY_IBOT_HEADS, *SYNTHETIC_28, "data.synthetic.images=64", "data.batch_size=8"]
    overrides += ["method.mask.ratios=[[0.45,0.05]]", "method.mask.min_block_patches=16"]
    overrides += ["train.epochs=1", "train.log_every_steps=1", "train.health_window_steps=4"]
    return pretrain(load_run_config(IBOT_RECIPE, [*overrides, *QUIET_CPU_RUN, f"output_dir={out}"]))


def test_a_run_with_far_off_masks_warns_at_the_start_and_in_health_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fitted = ibot_on_a_4x4_grid(tmp_path / "fitted")
    assert not [w for w in read_health(fitted) if w["rule"] == "masks far off"]
    assert "masks far off" not in (fitted / "train.log").read_text()

    def configured_block(height: int, width: int, num_patches: float, min_block_patches: int | None) -> float:
        return (min(height, width) // 3) ** 2 if min_block_patches is None else min_block_patches

    monkeypatch.setattr(masking, "smallest_block", configured_block)  # the generator before the small-grid rule
    old = ibot_on_a_4x4_grid(tmp_path / "old")
    log = (old / "train.log").read_text()
    assert "method.mask: on the 4x4 token grid the masks cover" in log
    (warning,) = [w for w in read_health(old) if w["rule"] == "masks far off"]
    assert warning["metric"] == "health_mask_fill" and warning["value"] < 0.5
    assert warning["context"]["mask_ratio_configured"] == pytest.approx(0.45)
    assert "WARNING training health: masks far off since step 1 (health_mask_fill = " in log
