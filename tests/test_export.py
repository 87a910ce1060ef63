"""`mimkit export` (timm format): the weights reload into plain timm and compute what the run's networks compute."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.engine.train import pretrain
from mimkit.export import export_timm, load_exported
from mimkit.runs import load_run, load_run_config
from support import IBOT_RECIPE, QUIET_CPU_RUN, ROOT, SYNTHETIC_28, TINY_IBOT_HEADS

TINY_IBOT = [
    "method.backbone.patch_size=4",
    "method.views.local_size=12",
    "method.backbone.embed_dim=32",
    "method.backbone.depth=2",
    "method.backbone.num_heads=2",
    "method.backbone.mlp_ratio=2.0",
    *TINY_IBOT_HEADS,
    "method.views.num_local=1",
    "method.momentum_teacher=0.5",
    *SYNTHETIC_28,
    "data.synthetic.images=8",
    "data.batch_size=4",
    "optim.lr=1e-2",
    "optim.lr_scaling=none",
    "optim.warmup_epochs=0",
    "train.epochs=1",
    *QUIET_CPU_RUN,
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real iBOT run (a non-default ViT shape, 28x28 inputs, one channel): two optimizer steps on synthetic shapes."""
    out = tmp_path_factory.mktemp("ibot") / "run"
    cfg = load_run_config(IBOT_RECIPE, [*TINY_IBOT, f"output_dir={out}"])
    return pretrain(cfg)


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    return export_timm(run_dir)


def images(size: int, count: int = 3) -> torch.Tensor:
    return torch.randn(count, 1, size, size, generator=torch.Generator().manual_seed(size))


def test_export_reloads_into_timm_with_the_encoders_outputs(run_dir: Path, exported: Path) -> None:
    assert exported == run_dir / "export" / "timm"
    config = json.loads((exported / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    shape = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
    assert config["model_args"] == {"img_size": 28, "in_chans": 1, **shape}
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert config["mimkit"]["network"] == "teacher"  # iBOT's encoder is its EMA teacher

    state = load_file(exported / "model.safetensors")
    plain = timm.create_model(config["architecture"], num_classes=0, **config["model_args"])
    result = plain.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert not any(k.startswith("head") or "mask_token" in k for k in state)

    # the documented pure-timm call: strict loading from the local file, nothing downloaded
    model = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(exported / "model.safetensors"), num_classes=0),
        **config["model_args"],
    ).eval()
    encoder = load_run(run_dir).encoder()
    x = images(28)
    with torch.no_grad():
        expected = encoder(x)
        torch.testing.assert_close(model.forward_features(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(load_exported(exported).eval().forward_features(x), expected, rtol=0, atol=0)

    data = timm.data.resolve_model_data_config(load_exported(exported))
    source = load_run(run_dir).method.data
    assert data["input_size"] == [1, 28, 28] and data["interpolation"] == "bicubic"
    assert tuple(data["mean"]) == source.mean and tuple(data["std"]) == source.std


def test_student_and_teacher_exports_differ(run_dir: Path, exported: Path, tmp_path: Path) -> None:
    student = load_file(export_timm(run_dir, tmp_path / "student", network="student") / "model.safetensors")
    teacher = load_file(export_timm(run_dir, tmp_path / "teacher", network="teacher") / "model.safetensors")
    encoder = load_file(exported / "model.safetensors")
    assert student.keys() == teacher.keys() == encoder.keys()
    assert all(torch.equal(teacher[k], encoder[k]) for k in teacher)
    assert not torch.equal(student["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])
    assert json.loads((tmp_path / "student" / "config.json").read_text())["mimkit"]["network"] == "student"


def test_image_size_resamples_only_the_positional_embeddings(run_dir: Path, exported: Path, tmp_path: Path) -> None:
    resized = export_timm(run_dir, tmp_path / "36", image_size=36)
    config = json.loads((resized / "config.json").read_text())
    assert config["model_args"]["img_size"] == 36 and config["pretrained_cfg"]["input_size"] == [1, 36, 36]
    assert config["mimkit"]["trained_image_size"] == 28
    old, new = load_file(exported / "model.safetensors"), load_file(resized / "model.safetensors")
    assert new["pos_embed"].shape == (1, 1 + 9 * 9, 32)
    torch.testing.assert_close(new["pos_embed"], resample_abs_pos_embed(old["pos_embed"], [9, 9], [7, 7]))
    assert all(torch.equal(old[k], new[k]) for k in old if k != "pos_embed")

    model = load_exported(resized).eval()
    x = images(36)
    with torch.no_grad():  # the run's encoder resamples on the fly in the same way
        torch.testing.assert_close(model.forward_features(x), load_run(run_dir).encoder()(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="not a multiple of the patch size 4"):
        export_timm(run_dir, tmp_path / "30", image_size=30)


def test_cli_writes_the_export_and_working_snippets(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """timm is the default format; both printed calls (mimkit's and plain timm's) load the export, also resized."""
    for size in (None, 36):
        out = tmp_path / f"cli_{size}"
        resize = ["--image-size", str(size)] if size else []
        assert main(["export", str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(out), *resize]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert any(str(out / "model.safetensors") in line for line in lines)
        models = []
        for prefix in ("load it with: ", "or with timm alone: "):
            (line,) = [line for line in lines if line.startswith(prefix)]
            namespace: dict = {}
            exec(line.removeprefix(prefix), namespace)
            models.append(namespace["model"])
        x = images(size or 28)
        assert models[0].patch_embed.img_size == (size or 28,) * 2
        with torch.no_grad():
            torch.testing.assert_close(models[1].forward_features(x), models[0].forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{missing}", "--format", "timm"], "no checkpoint at"),
        (["{run}", "--format", "onnx"], "unsupported format 'onnx'; choose one of timm"),
        (["{run}", "--format", "timm", "--network", "head"], "unknown network 'head'"),
        (["{run}", "--format", "timm", "--image-size", "0"], "image_size: must be positive"),
    ],
    ids=["missing-run", "format", "network", "image-size"],
)
def test_cli_bad_input_exits_2_with_a_message(
    arguments: list[str], message: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export", *(a.format(missing=tmp_path / "nowhere", run=run_dir) for a in arguments)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_methods_without_the_network_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toy = load_run_config(
        ROOT / "tests" / "recipes" / "toy.yaml",
        ["train.epochs=1", "data.synthetic.images=8", f"output_dir={tmp_path / 'toy'}"],
    )
    run = pretrain(toy)
    assert main(["export", str(run), "--format", "timm", "--network", "student"]) == 2
    assert "has no student network; use --network encoder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="wraps no timm model"):
        export_timm(run)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_exported(tmp_path)


def test_exported_files_get_the_usual_file_mode(exported: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert (exported / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_export_needs_only_the_checkpoint_not_the_data(tmp_path: Path) -> None:
    """export.md: the data's channels and normalisation travel in the checkpoint; a run whose image folder is gone
    (another machine) exports the same weights."""
    from PIL import Image

    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (28, 28), color=(30 * i, 10, 200 - 20 * i)).save(folder / f"{i}.png")
    data = [o for o in TINY_IBOT if not o.startswith("data.")] + ["data.batch_size=4"]
    overrides = [*data, "data.source=imagefolder", f"data.root={tmp_path / 'images'}", "data.synthetic=null"]
    run = pretrain(load_run_config(IBOT_RECIPE, [*overrides, f"output_dir={tmp_path / 'run'}"]))
    before = load_file(str(export_timm(run, tmp_path / "before") / "model.safetensors"))
    (tmp_path / "images").rename(tmp_path / "elsewhere")
    after = load_file(str(export_timm(run, tmp_path / "after") / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
