"""Adding a data source is one file: a source registered here, with nothing else edited, trains a tiny run through
the command, and its section `data.<source>` is typed, validated, listed and saved like a built-in one's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from mimkit.cli import main
from mimkit.config import ConfigError, check, describe_fields
from mimkit.data.config import DataConfig
from mimkit.data.info import DataInfo
from mimkit.data.sources import ImageSource, build_source, register_source, registry, source_names
from mimkit.runs import RunConfig, load_run_config
from support import ROOT, logged_losses

TOY = ROOT / "tests" / "recipes" / "toy.yaml"
STRIPES = ["data.source=stripes", "data.synthetic=null"]
"""The toy recipe reads synthetic shapes; these switch it to the stripes source (dropping the synthetic section)."""


@dataclass
class StripesConfig:
    """The section `data.stripes`."""

    images: int = 16
    period: int = 4
    """Pixels from one stripe to the next."""

    def validate(self, prefix: str) -> None:
        check(self.period >= 2, f"{prefix}.period", f"must be at least 2 pixels; got {self.period}")


@pytest.fixture
def stripes(monkeypatch: pytest.MonkeyPatch) -> type[ImageSource]:
    """A source of vertical (label 0) and horizontal (label 1) stripes, registered for this test only."""
    source_names()  # the built-in sources register first, so that the test's copy of the registry holds them
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))

    @register_source("stripes")
    class StripesSource(ImageSource):
        Config = StripesConfig

        def __init__(self, cfg: DataConfig, split: str) -> None:
            options: StripesConfig = cfg.options
            self.period, self.channels = options.period, cfg.channels or 1
            stats = (0.5,) * self.channels, (0.25,) * self.channels
            self.info = DataInfo("stripes", self.channels, options.images, (16, 16), 2, *stats, ("vertical", "across"))

        def load(self, index: int) -> tuple[torch.Tensor, int]:
            label = index % 2
            line = (torch.arange(16) + index) % self.period < self.period // 2
            image = (line[None, :] if label == 0 else line[:, None]).expand(16, 16)
            return (image.to(torch.uint8) * 255).expand(self.channels, 16, 16).contiguous(), label

        def labels(self) -> torch.Tensor:
            return torch.arange(len(self)) % 2

    return StripesSource


def test_a_registered_source_trains_a_tiny_run(stripes: type[ImageSource], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["pretrain", "-c", str(TOY), *STRIPES, "data.stripes.images=4", "data.batch_size=2", "train.epochs=1"]
    assert main([*args, f"output_dir={run_dir}"]) == 0
    assert sorted(logged_losses(run_dir)) == [1, 2]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert saved["source"] == "stripes" and saved["stripes"] == {"images": 4, "period": 4}
    assert load_run_config(run_dir / "config.yaml").data.options == StripesConfig(images=4)


def test_a_registered_source_section_is_validated(stripes: type[ImageSource]) -> None:
    cfg = load_run_config(TOY, [*STRIPES, "data.stripes.period=6"])
    assert cfg.data.options == StripesConfig(period=6)
    assert isinstance(build_source(cfg.data), stripes) and build_source(cfg.data).load(1)[1] == 1
    for overrides, message in [
        (["data.stripes.period=1"], "data.stripes.period: must be at least 2 pixels; got 1"),
        (["data.stripes.colour=red"], "data.stripes.colour: unknown field; known fields: images, period"),
        (
            ["data.source=stripe", "data.synthetic=null"],
            "data.source: unknown source 'stripe'; did you mean 'stripes'?",
        ),
    ]:
        with pytest.raises(ConfigError) as error:
            load_run_config(TOY, [*STRIPES, *overrides])
        assert str(error.value).startswith(message)
    assert main(["pretrain", "-c", str(TOY), *STRIPES, "data.stripes.period=one"]) == 2


def test_a_registered_source_is_listed(stripes: type[ImageSource]) -> None:
    rows = {name: (type_name, default) for name, type_name, default, _ in describe_fields(RunConfig)}
    assert rows["data.stripes.period"] == ("int", 4) and "stripes" in rows["data.source"][0].split("|")
    assert DataConfig(source="stripes").options == StripesConfig()


def test_a_registered_name_cannot_be_taken_twice(stripes: type[ImageSource]) -> None:
    with pytest.raises(ValueError, match="data source 'stripes' is already registered by"):
        register_source("stripes")(type("Other", (stripes,), {}))
