"""The `mimkit` command, in-process: help, option errors before any training, printed configs, data info."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mimkit import __version__
from mimkit.cli import build_parser, main
from mimkit.config import dump_yaml
from mimkit.runs import load_run_config
from support import ROOT

TOY = str(ROOT / "tests" / "recipes" / "toy.yaml")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `mimkit argv...` (argparse exits become codes)."""
    try:
        code = main(list(argv))
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def printed_config(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code, out, err = run(capsys, "pretrain", *argv, "--print-config")
    assert code == 0, err
    return yaml.safe_load(out)


# ---------------------------------------------------------------------------------------------------
# Help


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "pretrain" in out and "pretrain a backbone with a recipe" in out
    assert "data" in out and "get and inspect datasets" in out
    assert "eval" in out
    assert "mimkit pretrain -c ibot/vit_tiny_fmnist" in out  # the examples


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys)
    assert code == 0 and "commands:" in out and "pretrain" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"mimkit {__version__}"


def test_pretrain_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "pretrain", "--help")
    assert code == 0
    for option in (
        "--config",
        "--resume",
        "--output-dir",
        "--devices",
        "--num-nodes",
        "--strategy",
        "--precision",
        "--accelerator",
        "--print-config",
        "--fields",
        "KEY=VALUE",
    ):
        assert option in out, option
    assert "mimkit pretrain --fields ibot" in out


def test_data_help_lists_its_actions(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "data", "--help")
    assert code == 0 and "fetch" in out and "info" in out


# ---------------------------------------------------------------------------------------------------
# Errors before training


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.precision=fp8", "train.precision: must be one of '32-true', 'bf16-mixed', '16-mixed'; got 'fp8'"),
        ("optim.lr=abc", "optim.lr: expected a number, got 'abc'"),
        ("optim.lrr=1", "optim.lrr: unknown field; did you mean 'optim.lr'?"),
        ("data.batch_size=0", "data.batch_size: must be positive; got 0"),
        ("method.name=nope", "method.name: unknown method 'nope'"),
    ],
)
def test_wrong_value_exits_2_naming_the_field_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, override: str, message: str
) -> None:
    code, _, err = run(capsys, "pretrain", "-c", TOY, f"output_dir={tmp_path / 'run'}", override)
    assert code == 2
    assert err.startswith("mimkit: error: ") and message in err
    assert not (tmp_path / "run").exists()


def test_wrong_flag_value_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "pretrain", "-c", TOY, f"output_dir={tmp_path / 'run'}", "--precision", "fp8")
    assert code == 2 and "--precision" in err and "fp8" in err
    code, _, err = run(capsys, "pretrain", "-c", TOY, f"output_dir={tmp_path / 'run'}", "--devices", "many")
    assert code == 2 and "train.devices" in err
    assert not (tmp_path / "run").exists()


def test_pretrain_without_recipe_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "pretrain")
    assert code == 2 and "pretrain needs a recipe" in err


def test_missing_recipe_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "pretrain", "-c", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: no such file and no shipped recipe of that name" in err


def test_resume_of_a_folder_without_config_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "pretrain", "--resume", str(tmp_path))
    assert code == 2 and "no config.yaml there" in err


# ---------------------------------------------------------------------------------------------------
# --print-config and flags


def test_print_config_shows_the_resolved_recipe_with_overrides(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = printed_config(capsys, "-c", TOY, "optim.lr=0.02", f"output_dir={tmp_path / 'run'}")
    assert config["optim"]["lr"] == 0.02
    assert config["method"]["name"] == "toy_method:ToyMethod" and config["seed"] == 3
    assert config["optim"]["betas"] == [0.9, 0.999]  # defaults are spelled out
    assert config["resume"] is None
    assert not (tmp_path / "run").exists()


def test_printed_config_loads_back_identically(capsys: pytest.CaptureFixture[str]) -> None:
    config = printed_config(capsys, "-c", TOY, "train.epochs=7")
    assert load_run_config(None, [], base=config) == load_run_config(TOY, ["train.epochs=7"])


def test_flags_set_their_fields(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = printed_config(
        capsys,
        "-c",
        TOY,
        "--devices",
        "2",
        "--num-nodes",
        "3",
        "--strategy",
        "ddp",
        "--precision",
        "bf16-mixed",
        "--accelerator",
        "cpu",
        "--output-dir",
        str(tmp_path / "out"),
    )
    train = config["train"]
    assert (train["devices"], train["num_nodes"], train["strategy"]) == (2, 3, "ddp")
    assert (train["precision"], train["accelerator"]) == ("bf16-mixed", "cpu")
    assert config["output_dir"] == str(tmp_path / "out")


def test_devices_flag_accepts_auto(capsys: pytest.CaptureFixture[str]) -> None:
    assert printed_config(capsys, "-c", TOY, "--devices", "auto")["train"]["devices"] == "auto"


def test_bare_resume_continues_the_output_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = printed_config(capsys, "-c", TOY, f"output_dir={tmp_path}", "--resume")
    assert config["resume"] == str(tmp_path)


def saved_run(folder: Path, output_dir: Path) -> Path:
    """A run folder holding only the config.yaml a run writes."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(load_run_config(TOY, [f"output_dir={output_dir}"])))
    return folder


def test_resume_a_run_folder_uses_its_saved_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = saved_run(tmp_path / "run", output_dir=tmp_path / "run")
    config = printed_config(capsys, "--resume", str(run_dir), "train.epochs=5")
    assert config["resume"] == str(run_dir) and config["output_dir"] == str(run_dir)
    assert config["train"]["epochs"] == 5 and config["seed"] == 3


def test_resume_a_moved_run_folder_keeps_writing_into_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    moved = saved_run(tmp_path / "moved", output_dir=tmp_path / "original")
    config = printed_config(capsys, "--resume", str(moved))
    assert config["output_dir"] == str(moved)


def test_bare_resume_followed_by_an_override(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = printed_config(capsys, "-c", TOY, f"output_dir={tmp_path}", "--resume", "train.epochs=5")
    assert config["train"]["epochs"] == 5 and config["resume"] == str(tmp_path)


# ---------------------------------------------------------------------------------------------------
# --fields


def test_fields_lists_method_and_run_fields_with_docs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "pretrain", "--fields", "ibot")
    assert code == 0
    lines = out.splitlines()
    names = {line.split()[0] for line in lines if line and not line.startswith(" ")}
    assert {"method.out_dim", "method.views.global_size", "method.mask.ratios", "method.backbone.name"} <= names
    assert {"data.strict", "optim.lr", "train.precision", "seed", "output_dir", "resume"} <= names
    assert "method" not in names  # the untyped `method` field of RunConfig is replaced by the method's own
    out_dim = next(i for i, line in enumerate(lines) if line.startswith("method.out_dim "))
    assert "int = 8192" in lines[out_dim] and lines[out_dim + 1].strip() == "Prototypes K for [CLS]."
    assert "train.precision" in out and "32-true|bf16-mixed|16-mixed = '32-true'" in out
    assert "Fail on the first unreadable image" in out


def test_fields_of_an_unknown_method_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "pretrain", "--fields", "nope")
    assert code == 2 and "unknown method 'nope'" in err and "ibot" in err


# ---------------------------------------------------------------------------------------------------
# data


def test_data_info_describes_both_splits(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "data", "info", "-c", TOY)
    assert code == 0
    assert out.splitlines() == [
        "train: synthetic: 64 images, 1 channel(s), 16x16, 4 classes",
        "test: synthetic: 64 images, 1 channel(s), 16x16, 4 classes",
    ]


def test_data_info_applies_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "data", "info", "-c", TOY, "data.limit=10", "data.channels=3")
    assert code == 0 and out.splitlines()[0] == "train: synthetic: 10 images, 3 channel(s), 16x16, 4 classes"


def test_data_info_reports_missing_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(
        capsys, "data", "info", "-c", TOY, "data.source=fashion-mnist", "data.synthetic=null", f"data.root={tmp_path}"
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("train: not available (Fashion-MNIST IDX files not found")
    assert lines[1].startswith("test: not available (") and "dataset-fashion-mnist" in lines[1]


def test_data_info_needs_a_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "data", "info")
    assert code == 2 and "--config" in err


# ---------------------------------------------------------------------------------------------------
# A run through the command


def test_pretrain_runs_then_refuses_to_overwrite_then_resumes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = ("pretrain", "-c", TOY, f"output_dir={run_dir}", "train.epochs=1", "data.synthetic.images=16")
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    code, _, err = run(capsys, *args)
    assert code == 2 and "already holds checkpoints" in err
    code, _, err = run(capsys, *args, "--resume")
    assert code == 0, err
    assert "already complete" in (run_dir / "train.log").read_text()


def test_fields_show_the_defaults_a_recipe_gets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--fields", "ibot"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:4] == ["method.morph.enabled", "bool", "=", "False"] for line in lines)  # iBOT: off


def test_help_names_exactly_the_methods_that_exist(capsys: pytest.CaptureFixture[str]) -> None:
    """The help lists the shipped recipe families that pretrain: every registered method ships recipes."""
    from mimkit.methods import method_names

    with pytest.raises(SystemExit):
        main(["--help"])
    described = capsys.readouterr().out.split("vision backbones (", 1)[1].split(")", 1)[0]
    assert {name.strip() for name in described.split(",")} == set(method_names())


def test_any_dotted_override_reaches_the_config_check_unless_it_is_a_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["pretrain", "-c", "ibot/vit_tiny_fmnist", "--print-config", "optim.lrr=1"]) == 2
    assert "optim.lrr: unknown field; did you mean 'optim.lr'?" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr=1e-3").mkdir()
    assert main(["eval", "knn", "lr=1e-3"]) == 2  # a run folder with '=' in its name is the command's argument
    assert "unrecognized arguments" not in capsys.readouterr().err
    assert main(["pretrain", "-c", "ibot/vit_tiny_fmnist", "--output-dir", "new=1", "--print-config"]) == 0
    assert "output_dir: new=1" in capsys.readouterr().out  # an option's value, though it looks like an override


def test_every_evaluation_module_is_a_sub_command() -> None:
    from mimkit.commands.eval import evaluation_modules

    assert {"knn", "linear", "finetune"} <= set(evaluation_modules())
    for name in evaluation_modules():
        assert callable(build_parser().parse_args(["eval", name, "runs/x"]).run), name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "common", "runs/x"])  # the shared module is no evaluation
