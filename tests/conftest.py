"""Shared test set-up: CPU only, few threads, and the reference-fixture cases as parameters."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from support import REFERENCE_DIR, TINY_TOKENIZER

REFERENCE_CASES = {"ibot_case": "ibot_loss", "dtm_case": "dtm_morph"}

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full-shapes",
        action="store_true",
        help="also run the ImageNet recipes at their real shapes (tests marked full_shape; `make test-full`)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked full_shape take about 15 minutes on 2 cores: only `--full-shapes` (`make test-full`) runs them."""
    if config.getoption("--full-shapes"):
        return
    skip = pytest.mark.skip(reason="an ImageNet recipe at its real shapes: make test-full")
    for item in items:
        if "full_shape" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests taking `ibot_case` / `dtm_case` run once per case file found, so new cases need no code."""
    for argument, folder in REFERENCE_CASES.items():
        if argument in metafunc.fixturenames:
            files = sorted((REFERENCE_DIR / folder).glob("case_*.pt"))
            if not files:
                files = [REFERENCE_DIR / folder / "NO_CASES_FOUND"]  # the test fails, naming the folder
            metafunc.parametrize(argument, files, ids=[f.stem for f in files])


@pytest.fixture
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture(scope="session", autouse=True)
def remove_tiny_tokenizer() -> Iterator[None]:
    """The session's tiny CIM tokenizer (fitted on first use) goes with the session."""
    yield
    shutil.rmtree(TINY_TOKENIZER.parent, ignore_errors=True)


@pytest.fixture
def remembered_fields() -> None:
    """The config field names remembered in the cache, as after a first full load (the torch-free typo check)."""
    from mimkit.recipes import remember_fields
    from mimkit.runs import config_fields

    remember_fields(config_fields())
