"""Recipes by name: `-c ibot/vit_tiny_fmnist` from any folder, `mimkit recipes`, and the wheel ships them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mimkit import recipes as recipes_module
from mimkit.cli import main
from mimkit.config import ConfigError, read_yaml
from mimkit.procedures.tokenizer_fit import load_tokenizer_recipe
from mimkit.recipes import PROTOCOL_FAMILIES, RECIPES, check_recipe_fields, fields_file, find_recipe, shipped_recipes
from mimkit.runs import config_fields, load_run_config
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
    assert "families are cim, dtm, finetune, ibot, symmim, tokenizers" in capsys.readouterr().err


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


def test_the_field_names_are_remembered_by_the_first_load_and_a_new_stamp_forgets_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path))
    typo = read_yaml(find_recipe("ibot/vit_tiny_fmnist"), ["optim.lrr=1"])
    check_recipe_fields(typo)  # nothing remembered yet: the full validation finds it instead
    load_run_config("ibot/vit_tiny_fmnist")
    assert json.loads(fields_file().read_text()) == config_fields()
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown field"):
        check_recipe_fields(typo)
    fields_file().write_text("{}")  # a file that is not ours: no early check, no crash, and written anew
    check_recipe_fields(typo)
    load_run_config("ibot/vit_tiny_fmnist")
    assert json.loads(fields_file().read_text()) == config_fields()
    monkeypatch.setattr(recipes_module, "source_stamp", lambda: "edited")  # an edited or upgraded package
    check_recipe_fields(typo)
    load_run_config("ibot/vit_tiny_fmnist")
    assert [p.name for p in tmp_path.glob("config_fields-*.json")] == ["config_fields-edited.json"]


@pytest.mark.parametrize(
    ("recipe", "typo"),
    [
        ("ibot/vit_tiny_fmnist", "optim.lrr=1"),
        ("ibot/vit_tiny_fmnist", "data.batchsize=8"),
        ("ibot/vit_tiny_fmnist", "method.views.num_locall=2"),
        ("cim/resnet_tiny_fmnist_respix", "method.generator.depthh=2"),
        ("symmim/vit_tiny_fmnist", "trian.epochs=1"),
    ],
)
@pytest.mark.usefixtures("remembered_fields")
def test_the_early_check_raises_what_validation_raises(recipe: str, typo: str) -> None:
    with pytest.raises(ConfigError) as slow:
        load_run_config(recipe, [typo])
    with pytest.raises(ConfigError) as early:
        check_recipe_fields(read_yaml(find_recipe(recipe), [typo]))
    assert str(early.value) == str(slow.value) and "unknown field" in str(slow.value)


@pytest.mark.usefixtures("remembered_fields")
def test_the_early_check_passes_every_shipped_recipe_and_open_mappings() -> None:
    for recipe in SHIPPED:
        if not recipe.name.startswith("tokenizers/"):
            check_recipe_fields(read_yaml(recipe.path, ["method.backbone.model_args.anything=1"]))


@pytest.mark.usefixtures("remembered_fields")
def test_a_typo_or_a_bad_loop_value_fails_before_torch_is_imported(tmp_path: Path) -> None:
    saved = tmp_path / "run" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text((RECIPES / "ibot" / "vit_tiny_fmnist.yaml").read_text())
    script = (
        "import sys; from mimkit.cli import main; "
        "codes = [main(['pretrain', '-c', 'ibot/vit_tiny_fmnist', 'optim.lrr=1']), "
        f"main(['pretrain', '--resume', {str(saved.parent)!r}, 'method.maskk=1']), "
        "main(['pretrain', '-c', 'ibot/vit_tiny_fmnist', 'optim.lr=-1']), "
        "main(['pretrain', '-c', 'ibot/vit_tiny_fmnist', 'train.epochs=0'])]; "
        "assert codes == [2, 2, 2, 2], codes; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "optim.lrr: unknown field; did you mean 'optim.lr'?" in done.stderr
    assert "method.maskk: unknown field; did you mean 'method.mask'?" in done.stderr
    assert "optim.lr: must be positive; got -1.0" in done.stderr and "train.epochs: must be >= 1; got 0" in done.stderr


def test_no_two_recipes_share_a_run_folder() -> None:
    pretraining = [r for r in SHIPPED if r.name.split("/")[0] not in ("tokenizers", *PROTOCOL_FAMILIES)]
    folders = [read_yaml(r.path).get("output_dir") for r in pretraining]
    assert len(folders) == len(set(folders)), sorted(f for f in folders if folders.count(f) > 1)
    outputs = [read_yaml(r.path)["output"] for r in SHIPPED if r.name.startswith("tokenizers/")]
    assert len(outputs) == len(set(outputs))
