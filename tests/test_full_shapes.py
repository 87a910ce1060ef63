"""Every ImageNet recipe at its real shapes: 2 steps at batch 2 on synthetic 224-px images in float32 and bf16-mixed,
then a resume for 2 more; DTM with a random-weight OpenCLIP teacher and CIM with random-weight DALL-E files of the
published layouts, written to files so that the real loading code runs. Only `make test-full` runs them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from support import load_benchmark

full_shapes = load_benchmark("full_shapes")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    work = tmp_path_factory.mktemp("full_shapes")
    return work, full_shapes.prepare_files(work)


def test_every_method_has_an_imagenet_recipe() -> None:
    assert {name.split("/")[0] for name in full_shapes.imagenet_recipes()} == {"cim", "dtm", "ibot", "symmim"}


@pytest.mark.full_shape
@pytest.mark.parametrize("precision", full_shapes.PRECISIONS)
@pytest.mark.parametrize("recipe", full_shapes.imagenet_recipes())
def test_the_recipe_trains_and_resumes_at_its_real_shapes(
    recipe: str, precision: str, files: tuple[Path, dict[str, list[str]]]
) -> None:
    work, overrides = files
    row = full_shapes.run_recipe(recipe, precision, work, overrides)
    assert row["steps"] == 4 and all(math.isfinite(x) for x in row["losses"])  # type: ignore[union-attr]
