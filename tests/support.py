"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("MIMKIT_REFERENCE_DIR", ROOT.parent / "shared" / "fixtures" / "reference"))
IBOT_RECIPE = ROOT / "configs" / "ibot" / "vit_tiny_fmnist.yaml"

# Override lists that shrink a recipe into a seconds-long test run.
SYNTHETIC_28 = ["data.source=synthetic", "data.synthetic.size=28"]
TINY_IBOT_HEADS = [
    "method.out_dim=64",
    "method.patch_out_dim=64",
    "method.head_hidden_dim=48",
    "method.head_bottleneck_dim=16",
]
TINY_TOKENIZER = Path(tempfile.gettempdir()) / f"mimkit-tests-{os.getpid()}" / "tiny_kmeans.pt"
"""The tiny CIM overlay's tokenizer file: fitted by the first CIM run of a test session (tests/tiny/tokenizer.yaml)."""
QUIET_CPU_RUN = ["data.num_workers=0", "train.accelerator=cpu", "train.progress_bar=false", "train.loggers=[csv]"]


def tiny_overlay(name: str) -> dict:
    """tests/tiny/<name>.yaml: the overrides that shrink a recipe family (ibot, dtm, ...) or the backbone families;
    `{root}` in it stands for the repository, `{tiny_tokenizer}` for TINY_TOKENIZER."""
    path = ROOT / "tests" / "tiny" / f"{name}.yaml"
    if not path.is_file():
        pytest.fail(f"no tiny overlay for {name!r}: add {path.relative_to(ROOT)}")
    text = path.read_text().replace("{root}", str(ROOT)).replace("{tiny_tokenizer}", str(TINY_TOKENIZER))
    return yaml.safe_load(text)


def logged_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss of a run's metrics.csv."""
    from mimkit.engine.logs import read_metrics

    return {int(r["step"]): r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def assert_same_losses(run: Path, reference: Path) -> None:
    """The run logged the same steps as the reference with the same losses (to float32 precision)."""
    expected, got = logged_losses(reference), logged_losses(run)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def logged_step(run: Path, at_least: int) -> bool:
    """Whether a (running) run has logged a step >= `at_least` yet."""
    try:
        return max(logged_losses(run), default=0) >= at_least
    except (FileNotFoundError, ValueError, KeyError):
        return False


def load_case(path: Path) -> dict:
    """A reference case file; fails (never skips) when the fixtures folder has no cases."""
    if not path.is_file():
        pytest.fail(f"no reference cases in {path.parent}; set MIMKIT_REFERENCE_DIR to the fixtures folder")
    return torch.load(path, weights_only=True)


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/ is not a package: import `benchmarks/<name>.py` by path (registered, so its dataclasses resolve)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
