"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("MIMKIT_REFERENCE_DIR", ROOT.parent / "shared" / "fixtures" / "reference"))


def load_case(path: Path) -> dict:
    """A reference case file; fails (never skips) when the fixtures folder has no cases."""
    if not path.is_file():
        pytest.fail(f"no reference cases in {path.parent}; set MIMKIT_REFERENCE_DIR to the fixtures folder")
    return torch.load(path, weights_only=True)
