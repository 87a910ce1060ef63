"""How batches reach the loop: the loader settings a run passes on, `data_wait_fraction` in metrics.csv, and the
one warning of a data-bound run (docs/troubleshooting.md#data-bound-run)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric

from mimkit.cli import main
from mimkit.config import ConfigError, check
from mimkit.data.config import DataConfig
from mimkit.data.info import DataInfo
from mimkit.data.sources import ImageSource, build_source, register_source, registry, source_names
from mimkit.engine.feed import DATA_BOUND_FRACTION, FeedMeter, build_feed
from mimkit.engine.logs import read_metrics
from mimkit.engine.train import pretrain
from mimkit.methods.base import method_class
from mimkit.runs import load_run_config
from support import ROOT

TOY = ROOT / "tests" / "recipes" / "toy.yaml"
WARNING = "the run waited for data"
PLAIN = ["data.source=plain", "data.synthetic=null", "data.plain.images=64"]
"""The toy recipe on the source `plain` instead of its synthetic shapes."""


@dataclass
class PlainConfig:
    """The section `data.plain`."""

    images: int = 64
    load_delay: float = 0.0
    """Seconds each image takes to load."""

    def validate(self, prefix: str) -> None:
        check(self.load_delay >= 0, f"{prefix}.load_delay", f"must be >= 0; got {self.load_delay}")


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source of uniform grey 16x16 images that load in no time but `load_delay` (the synthetic shapes' drawing
    is slow on a busy machine: it would blur what the tests measure); registered for the test only."""
    source_names()
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))

    @register_source("plain")
    class PlainSource(ImageSource):
        Config = PlainConfig

        def __init__(self, cfg: DataConfig, split: str) -> None:
            self.options: PlainConfig = cfg.options
            self.info = DataInfo("plain", 1, self.options.images, (16, 16), 2, (0.5,), (0.25,), ("dark", "light"))

        def load(self, index: int) -> tuple[torch.Tensor, int]:
            time.sleep(self.options.load_delay)
            return torch.full((1, 16, 16), 100 + 50 * (index % 2), dtype=torch.uint8), index % 2


def train(run_dir: Path, *overrides: str) -> tuple[list[float], str]:
    """The `data_wait_fraction` of every logged step and the train.log of a toy run."""
    run = pretrain(load_run_config(TOY, [f"output_dir={run_dir}", *overrides]))
    waits = [row["data_wait_fraction"] for row in read_metrics(run) if "loss" in row]
    return waits, (run / "train.log").read_text()


def test_every_logged_step_has_its_data_wait_fraction(tmp_path: Path) -> None:
    waits, _ = train(tmp_path / "run")
    assert len(waits) == 16
    assert all(0.0 <= wait <= 1.0 for wait in waits)


def test_slow_data_gives_a_high_wait_and_one_warning(plain: None, tmp_path: Path) -> None:
    waits, log = train(tmp_path / "run", *PLAIN, "data.plain.load_delay=0.03", "train.epochs=1")  # 0.24 s a batch
    assert len(waits) == 8 and min(waits) > 2 * DATA_BOUND_FRACTION
    assert log.count(WARNING) == 1
    assert "raise data.num_workers (now 0; this machine has" in log and "data.augment_on=device" in log


def test_a_slow_step_with_fast_data_gives_a_low_wait_and_no_warning(plain: None, tmp_path: Path) -> None:
    waits, log = train(tmp_path / "run", *PLAIN, "method.step_delay=0.2", "train.epochs=1")
    assert len(waits) == 8 and max(waits) < DATA_BOUND_FRACTION
    assert WARNING not in log


class Host:
    """Stands in for Fabric in FeedMeter.fetch: batches stay where they are."""

    def to_device(self, batch: Any) -> Any:
        return batch


def batches(delays: list[float]) -> Iterator[dict[str, Any]]:
    for delay in delays:
        time.sleep(delay)
        yield {}


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The "mimkit" logger's records (a run's logging set-up stops them from reaching pytest's root handler)."""
    logger = logging.getLogger("mimkit")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def window(meter: FeedMeter, delays: list[float], step_seconds: float, last_step: int) -> float:
    """Fetch a batch per delay, each followed by a step of `step_seconds`; end the window; its data_wait_fraction."""
    loader = batches(delays)
    for _ in delays:
        assert meter.fetch(loader, Host()) == {}  # type: ignore[arg-type]
        time.sleep(step_seconds)
    _, wait = meter.rates()
    meter.end_window(last_step)
    return wait


def test_the_warning_skips_start_up_and_comes_once(warnings: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    cfg = load_run_config(TOY, [f"output_dir={tmp_path}"]).data
    meter = FeedMeter(cfg, "worker", warn=True)
    assert window(meter, [0.05, 0.05], 0.0, last_step=2) > 0.9  # the run's first window: not warned about
    assert not warnings.records
    meter.start_epoch(3)  # an epoch's first batch waits for its workers: counted, but not warned about
    assert window(meter, [0.1, 0.0, 0.0], 0.02, last_step=5) > DATA_BOUND_FRACTION
    assert not warnings.records
    for last_step in (7, 9):
        assert window(meter, [0.05, 0.05], 0.0, last_step=last_step) > 0.9
    [warning] = [record.getMessage() for record in warnings.records]
    assert re.match(r"the run waited for data (9\d|100)% of the time over steps 6-7: raise data.num_workers", warning)


def test_a_rank_told_not_to_warn_never_does(warnings: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    meter = FeedMeter(load_run_config(TOY, [f"output_dir={tmp_path}"]).data, "device", warn=False)
    for last_step in (1, 2, 3):
        window(meter, [0.03], 0.0, last_step=last_step)
    assert not warnings.records


def test_the_loader_takes_the_prefetch_factor(tmp_path: Path) -> None:
    cfg = load_run_config(TOY, [f"output_dir={tmp_path}", "data.num_workers=2", "data.prefetch_factor=3"])
    source = build_source(cfg.data)
    method = method_class(cfg.method.name)(cfg.method, source.info)
    fabric = Fabric(accelerator="cpu", devices=1)
    feed = build_feed(cfg.data, cfg.seed, fabric, source, method, cfg.data.batch_size)
    loader = feed.loader
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (2, 3, True)
    assert not loader.pin_memory and feed.augment_on == "worker"  # pinned on CUDA only; augmented where it runs
    cfg.data.num_workers = 0  # torch takes no prefetch_factor without workers
    assert build_feed(cfg.data, cfg.seed, fabric, source, method, cfg.data.batch_size).loader.prefetch_factor is None


def test_a_prefetch_factor_below_one_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"data.prefetch_factor: must be >= 1; got 0"):
        load_run_config(TOY, ["data.prefetch_factor=0"])
    assert main(["pretrain", "-c", str(TOY), "data.prefetch_factor=0", "--print-config"]) == 2
    assert "data.prefetch_factor: must be >= 1; got 0" in capsys.readouterr().err
