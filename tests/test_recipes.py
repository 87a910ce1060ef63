"""Recipes by name: `-c ibot/vit_tiny_fmnist` from any folder, `mimkit recipes`, and the wheel ships them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.models.tokenizers.fit import load_tokenizer_recipe
from mimkit.recipes import RECIPES, find_recipe, shipped_recipes
from mimkit.runs import load_run_config
from support import ROOT

SHIPPED = shipped_recipes()


def test_every_shipped_recipe_has_a_name_and_a_summary() -> None:
    assert {"ibot/vit_tiny_fmnist", "cim/resnet_tiny_fmnist_respix", "tokenizers/kmeans_fmnist"} <= {
        r.name for r in SHIPPED
    }
    assert len(SHIPPED) == len(list(RECIPES.glob("*/*.yaml")))
    for recipe in SHIPPED:
        assert 10 < len(recipe.summary) <= 100, recipe.name


def test_the_checkout_configs_folder_is_the_packaged_one() -> None:
    assert (ROOT / "configs").resolve() == RECIPES


def test_a_recipe_by_name_loads_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("ibot/vit_tiny_fmnist", "ibot/vit_tiny_fmnist.yaml", "configs/ibot/vit_tiny_fmnist.yaml"):
        assert find_recipe(name) == RECIPES / "ibot" / "vit_tiny_fmnist.yaml"
    cfg = load_run_config("ibot/vit_tiny_fmnist", ["train.epochs=1"])
    assert cfg.method.name == "ibot" and cfg.train.epochs == 1
    assert load_tokenizer_recipe("tokenizers/kmeans_fmnist").tokenizer.kind == "kmeans"


def test_a_file_of_ones_own_wins_over_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "ibot" / "vit_tiny_fmnist.yaml"
    own.parent.mkdir()
    own.write_text((RECIPES / "ibot" / "vit_tiny_fmnist.yaml").read_text().replace("epochs: 3", "epochs: 7"))
    monkeypatch.chdir(tmp_path)
    assert find_recipe("ibot/vit_tiny_fmnist.yaml") == Path("ibot/vit_tiny_fmnist.yaml")
    assert load_run_config(str(own)).train.epochs == 7


def test_a_misspelt_name_says_what_is_close() -> None:
    with pytest.raises(ConfigError, match=r"did you mean ibot/vit_tiny_fmnist\b.*mimkit recipes"):
        find_recipe("ibot/vit_tiny_fmnst")
    with pytest.raises(ConfigError, match="no shipped recipe of that name; `mimkit recipes`"):
        find_recipe("zzz/qqq")


def test_recipes_command_lists_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(recipe.name in out for recipe in SHIPPED)
    assert main(["recipes", "cim", "--path"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cim/")]
    assert len(lines) == len(shipped_recipes("cim")) and all(str(RECIPES) in line for line in lines)
    assert main(["recipes", "foo"]) == 2
    assert "families are cim, dtm, ibot, symmim, tokenizers" in capsys.readouterr().err


@pytest.mark.slow
def test_the_wheel_ships_every_recipe(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info folders beside the sources
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*build, str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mimkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"mimkit/configs/{recipe.name}.yaml" for recipe in SHIPPED} <= names
