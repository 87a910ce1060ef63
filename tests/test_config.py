"""Configs: YAML recipes + dotted overrides -> validated dataclasses, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mimkit.config import ConfigError, apply_overrides, describe_fields, dump_yaml, read_yaml, to_dict
from mimkit.data.config import DataConfig, upgrade_older_fields
from mimkit.data.sources import SyntheticConfig, TorchvisionConfig
from mimkit.recipes import check_recipe_fields
from mimkit.runs import RunConfig, load_run_config
from support import IBOT_RECIPE, ROOT
from toy_method import ToyConfig

TOY = ROOT / "tests" / "recipes" / "toy.yaml"


def config_error(*overrides: str, path: Path = TOY) -> str:
    """The message of the ConfigError that loading `path` with `overrides` raises."""
    with pytest.raises(ConfigError) as info:
        load_run_config(path, list(overrides))
    return str(info.value)


# ---------------------------------------------------------------------------------------------------
# Reading and overrides


def test_recipe_values_and_defaults_are_typed() -> None:
    cfg = load_run_config(TOY)
    assert isinstance(cfg, RunConfig) and isinstance(cfg.method, ToyConfig)
    assert cfg.method.clip_mode == "global" and cfg.method.clip_grad == 1.0
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads `1e-3` as a string
    assert cfg.data.source == "synthetic" and cfg.data.batch_size == 8
    assert cfg.train.loggers == ["csv"] and cfg.seed == 3
    assert cfg.optim.betas == (0.9, 0.999)  # a default the recipe does not set
    assert cfg.method.hidden == 32  # a default of the method's own config class


def test_dotted_overrides_replace_recipe_values() -> None:
    cfg = load_run_config(
        TOY, ["optim.lr=2e-3", "data.batch_size=4", "train.loggers=[csv,tensorboard]", "method.hidden=7"]
    )
    assert cfg.optim.lr == 2e-3
    assert cfg.data.batch_size == 4
    assert cfg.train.loggers == ["csv", "tensorboard"]
    assert cfg.method.hidden == 7


def test_null_override_gives_none() -> None:
    cfg = load_run_config(TOY, ["method.fail_at_step=3", "optim.weight_decay_end=0.1"])
    assert cfg.method.fail_at_step == 3 and cfg.optim.weight_decay_end == 0.1
    cfg = load_run_config(TOY, ["method.fail_at_step=null", "train.knn_limit=null"])
    assert cfg.method.fail_at_step is None and cfg.train.knn_limit is None


def test_override_of_a_tuple_field_becomes_a_tuple() -> None:
    cfg = load_run_config(TOY, ["optim.betas=[0.8,0.95]"])
    assert cfg.optim.betas == (0.8, 0.95)


def test_whole_numbers_written_as_floats_are_accepted_for_integers() -> None:
    assert load_run_config(TOY, ["data.batch_size=4.0"]).data.batch_size == 4


def test_interpolation_resolves_against_the_recipe() -> None:
    cfg = load_run_config(TOY, ["optim.min_lr=${optim.lr}", "output_dir=runs/${seed}"])
    assert cfg.optim.min_lr == cfg.optim.lr == 1e-3
    assert cfg.output_dir == "runs/3"


def test_override_without_equals_sign_is_refused() -> None:
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["optim.lr"])


def test_missing_recipe_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist"):
        read_yaml(tmp_path / "nope.yaml")


def test_invalid_yaml_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        read_yaml(bad)


# ---------------------------------------------------------------------------------------------------
# Errors that name the field


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=abc", "optim.lr: expected a number, got 'abc'"),
        ("data.batch_size=1.5", "data.batch_size: expected an integer, got 1.5"),
        ("data.strict=maybe", "data.strict: expected true or false, got 'maybe'"),
        ("train.loggers=csv", "train.loggers: expected a list, got 'csv'"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values, got 1 ([0.9])"),
        ("train.loggers=[csv,foo]", "train.loggers[1]: must be one of 'csv', 'tensorboard', 'wandb'; got 'foo'"),
        ("data=3", "data: expected a mapping of fields, got 3"),
    ],
)
def test_wrong_type_names_the_field_and_the_value(override: str, expected: str) -> None:
    assert config_error(override) == expected


def test_bad_literal_lists_the_allowed_values() -> None:
    message = config_error("train.precision=fp8")
    assert message.startswith("train.precision: ")
    for allowed in ("'32-true'", "'bf16-mixed'", "'16-mixed'"):
        assert allowed in message
    assert "got 'fp8'" in message


def test_union_field_reports_every_alternative() -> None:
    message = config_error("train.devices=many")
    assert message.startswith("train.devices: ")
    assert "expected an integer" in message and "'auto'" in message
    assert load_run_config(TOY, ["train.devices=auto"]).train.devices == "auto"
    assert load_run_config(TOY, ["train.devices=2"]).train.devices == 2


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("optim.lrr=1", "optim.lrr: unknown field; did you mean 'optim.lr'?"),
        ("optm.lr=1", "optm: unknown field; did you mean 'optim'?"),
        ("method.hiden=3", "method.hiden: unknown field; did you mean 'method.hidden'?"),
    ],
)
def test_unknown_field_suggests_the_closest(override: str, suggestion: str) -> None:
    assert config_error(override) == suggestion


def test_unknown_field_without_close_match_lists_known_fields() -> None:
    message = config_error("optim.zzzzzz=1")
    assert message.startswith("optim.zzzzzz: unknown field; known fields: ")
    assert "lr_scaling" in message and "accumulate_grad_batches" in message


def test_unknown_method_lists_registered_methods() -> None:
    message = config_error("method.name=nope")
    assert message.startswith("method.name: unknown method 'nope'")
    assert "ibot" in message


def test_method_given_as_unimportable_path_is_named() -> None:
    assert "cannot import 'no_such_module:Thing'" in config_error("method.name=no_such_module:Thing")


def test_missing_method_name_is_an_error(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  source: synthetic\n")
    assert config_error(path=recipe).startswith("method.name: ")
    recipe.write_text("method:\n  clip_grad: 1.0\n")
    assert config_error(path=recipe).startswith("method.name: ")


def test_method_section_is_typed_by_the_named_method() -> None:
    # `hidden` is a field of the toy method, not of iBOT
    message = config_error("method.hidden=3", path=IBOT_RECIPE)
    assert message.startswith("method.hidden: unknown field")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["data.batch_size=0"], "data.batch_size: must be positive; got 0"),
        (["data.num_workers=-1"], "data.num_workers: must be >= 0"),
        (["data.channels=2"], "data.channels: must be 1, 3 or null; got 2"),
        (["data.limit=0"], "data.limit: must be positive"),
        (["data.source=imagefolder", "data.synthetic=null"], "data.root: source=imagefolder needs the folder"),
        (
            ["data.source=torchvision", "data.synthetic=null"],
            "data.torchvision.name: source=torchvision needs the dataset class name",
        ),
        (["data.synthetic.classes=7"], "data.synthetic.classes: at most 6 shape classes"),
        (["data.synthetic.size=4"], "data.synthetic.size: must be at least 8 pixels"),
        (["optim.lr=0"], "optim.lr: must be positive"),
        (["optim.betas=[0.9,1.0]"], "optim.betas: must lie in [0, 1)"),
        (["optim.accumulate_grad_batches=0"], "optim.accumulate_grad_batches: must be >= 1"),
        (["train.epochs=0"], "train.epochs: must be >= 1"),
        (["train.devices=0"], "train.devices: must be >= 1 or auto"),
        (["train.log_every_steps=0"], "train.log_every_steps: must be >= 1"),
        (["method.clip_grad=0"], "method.clip_grad: must be positive when clipping (global)"),
    ],
)
def test_validate_reports_out_of_range_values(overrides: list[str], field: str) -> None:
    assert config_error(*overrides).startswith(field)


def test_clip_grad_zero_is_fine_without_clipping() -> None:
    cfg = load_run_config(TOY, ["method.clip_grad=0", "method.clip_mode=none"])
    assert cfg.method.clip_mode == "none" and cfg.method.clip_grad == 0.0


def test_nested_method_sections_are_validated() -> None:
    assert config_error("method.views.num_local=-1", path=IBOT_RECIPE).startswith(
        "method.views.num_local: must be >= 0"
    )
    assert config_error("method.patch_out_dim=7", path=IBOT_RECIPE).startswith(
        "method.patch_out_dim: must equal out_dim"
    )


# ---------------------------------------------------------------------------------------------------
# Writing and describing


@pytest.mark.parametrize("recipe", [TOY, IBOT_RECIPE], ids=["toy", "ibot"])
def test_dump_yaml_round_trips(recipe: Path) -> None:
    cfg = load_run_config(recipe, ["optim.lr=0.02", "data.limit=10", "train.loggers=[csv]"])
    text = dump_yaml(cfg)
    again = load_run_config(None, [], base=yaml.safe_load(text))
    assert again == cfg
    assert dump_yaml(again) == text


def test_saved_config_accepts_overrides() -> None:
    base = yaml.safe_load(dump_yaml(load_run_config(TOY)))
    cfg = load_run_config(None, ["train.epochs=9"], base=base)
    assert cfg.train.epochs == 9 and cfg.seed == 3


def test_dump_yaml_is_plain_yaml() -> None:
    data = yaml.safe_load(dump_yaml(load_run_config(IBOT_RECIPE)))
    assert data["method"]["views"]["global_scale"] == [0.25, 1.0]
    assert data["method"]["mask"]["ratios"] == [[0.0, 0.0], [0.3, 0.2]]
    assert data["optim"]["betas"] == [0.9, 0.999]


def test_describe_fields_lists_types_defaults_and_attribute_docs() -> None:
    rows = {name: (type_name, default, doc) for name, type_name, default, doc in describe_fields(RunConfig)}
    assert rows["data.strict"] == (
        "bool",
        False,
        "Fail on the first unreadable image instead of skipping it with a counted warning.",
    )
    assert rows["data.channels"][0] == "int or null"
    assert rows["train.precision"][:2] == ("32-true|bf16-mixed|16-mixed", "32-true")
    assert rows["train.loggers"][1] == ["csv", "tensorboard"]
    assert rows["optim.betas"][0] == "tuple[float, float]"
    assert rows["data.num_workers"][2] == ""  # no docstring, no doc
    assert rows["resume"][2].startswith("null: fresh run (refuses a run folder that already has checkpoints); auto:")


def test_describe_fields_includes_inherited_and_method_docs() -> None:
    rows = {name: doc for name, _, _, doc in describe_fields(ToyConfig, "method")}
    assert rows["method.step_delay"] == "Seconds slept per step, so a test can kill a run in the middle of an epoch."
    assert set(rows) >= {"method.name", "method.clip_mode", "method.clip_grad", "method.hidden"}


def test_data_config_defaults_validate() -> None:
    DataConfig().validate()


# ---------------------------------------------------------------------------------------------------
# Data sources: each source's own section, typed by data.source


def test_a_source_section_is_typed_by_the_chosen_source() -> None:
    cfg = load_run_config(TOY, ["data.synthetic.size=20"])
    assert cfg.data.options == SyntheticConfig(images=64, size=20, classes=4)
    cfg = load_run_config(TOY, ["data.source=torchvision", "data.synthetic=null", "data.torchvision.name=CIFAR10"])
    assert cfg.data.options == TorchvisionConfig(name="CIFAR10")
    assert load_run_config(TOY, ["data.source=fashion-mnist", "data.synthetic=null"]).data.options is None


def test_a_config_built_in_python_gets_its_source_defaults() -> None:
    assert DataConfig(source="synthetic").options == SyntheticConfig()
    assert DataConfig().options is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.source=synthtic"],
            "data.source: unknown source 'synthtic'; did you mean 'synthetic'? "
            "(registered: fashion-mnist, imagefolder, segfolder, shards, synthetic, torchvision)",
        ),
        (
            ["data.source=fashion-mnist"],
            "data.synthetic: a section for source 'synthetic', which is not the chosen one (data.source is "
            "'fashion-mnist'); remove it or set data.synthetic=null",
        ),
        (["data.synthetic.name=CIFAR10"], "data.synthetic.name: unknown field; known fields: images, size, classes"),
        (
            ["data.source=imagefolder", "data.synthetic=null", "data.imagefolder.root=/x"],
            "data.imagefolder: a section for source 'imagefolder', which has no settings of its own",
        ),
        (["data.synthetic_sise=3"], "data.synthetic_sise: unknown field"),
        (["data.options.size=3"], "data.options: unknown field"),
    ],
)
def test_source_sections_are_checked_naming_the_field(overrides: list[str], message: str) -> None:
    assert config_error(*overrides).startswith(message)


@pytest.mark.usefixtures("remembered_fields")
def test_the_torch_free_check_leaves_source_sections_to_the_full_check() -> None:
    recipe = read_yaml(TOY)
    with pytest.raises(ConfigError, match=r"data\.batch_sise: unknown field; did you mean 'data\.batch_size'"):
        check_recipe_fields(apply_overrides(recipe, ["data.batch_sise=1"]))
    sections = [["data.synthetic.sise=3"], ["data.source=mine", "data.mine.anything=1"], ["data.synthetic_size=16"]]
    for overrides in sections:  # a section (only the registry knows its fields) or an older spelling: passed on
        check_recipe_fields(apply_overrides(recipe, overrides))
    assert config_error("data.synthetic.sise=3").startswith("data.synthetic.sise: unknown field")


def test_describe_fields_lists_every_source_section() -> None:
    rows = {name: (type_name, default) for name, type_name, default, _ in describe_fields(RunConfig)}
    assert rows["data.source"] == ("fashion-mnist|imagefolder|segfolder|shards|synthetic|torchvision", "fashion-mnist")
    assert rows["data.synthetic.size"] == ("int", 32) and rows["data.torchvision.name"] == ("str or null", None)
    assert "data.options" not in rows


OLD_DATA = {
    "source": "synthetic",
    "root": None,
    "name": None,
    "download": True,
    "batch_size": 8,
    "synthetic_images": 64,
    "synthetic_size": 16,
    "synthetic_classes": 3,
}
"""The data section of a run saved before sources owned their sections (every source's flat fields, always)."""


def test_older_flat_fields_move_into_the_chosen_source_section() -> None:
    upgraded = upgrade_older_fields(OLD_DATA)
    assert upgraded == {
        "source": "synthetic",
        "root": None,
        "download": True,
        "batch_size": 8,
        "synthetic": {"images": 64, "size": 16, "classes": 3},
    }
    assert upgrade_older_fields({**OLD_DATA, "synthetic": {"size": 16}})["synthetic"]["images"] == 64
    with pytest.raises(ConfigError, match=r"data\.synthetic_size: the older spelling of data\.synthetic\.size"):
        upgrade_older_fields({**OLD_DATA, "synthetic": {"size": 20}})  # an older override on a newer recipe
    fmnist = upgrade_older_fields({**OLD_DATA, "source": "fashion-mnist"})
    assert "synthetic" not in fmnist and "name" not in fmnist  # dumped for every source, meaningful for one
    cifar = upgrade_older_fields({**OLD_DATA, "source": "torchvision", "name": "CIFAR10"})
    assert cifar["torchvision"] == {"name": "CIFAR10"} and "synthetic" not in cifar


@pytest.mark.usefixtures("remembered_fields")
def test_a_run_saved_before_source_sections_still_loads() -> None:
    saved = {**to_dict(load_run_config(TOY)), "data": OLD_DATA}
    check_recipe_fields(saved)  # `mimkit pretrain --resume` checks the saved config.yaml before torch loads
    cfg = load_run_config(None, ["train.epochs=3"], base=saved)
    assert cfg.data.options == SyntheticConfig(images=64, size=16, classes=3) and cfg.data.batch_size == 8
    again = load_run_config(None, [], base=yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg and "synthetic_size" not in dump_yaml(cfg)
