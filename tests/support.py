"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("MIMKIT_REFERENCE_DIR", ROOT.parent / "shared" / "fixtures" / "reference"))


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
