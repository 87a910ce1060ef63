"""Faults that must not cost work or show a traceback: corrupted checkpoints, unwritable or full folders, a bad
loss term, data that cannot be read at all; and the engine's exactness aids (activation checkpointing, gradient
accumulation)."""

from __future__ import annotations

import logging
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric

from mimkit.cli import main
from mimkit.data.loader import collate
from mimkit.data.sources import build_source
from mimkit.engine.optim import Hyperparameters, build_optimizer
from mimkit.engine.step import train_step
from mimkit.engine.train import NonFiniteLossError, pretrain
from mimkit.methods.saved import read_checkpoint
from mimkit.models.backbones import BackboneConfig, build_backbone
from mimkit.runs import load_run, load_run_config
from mimkit.schedules import Progress
from support import IBOT_RECIPE, QUIET_CPU_RUN, ROOT, SYNTHETIC_28, TINY_IBOT_HEADS
from toy_method import ToyMethod

TOY = ROOT / "tests" / "recipes" / "toy.yaml"


def toy(run_dir: Path, *overrides: str):
    return load_run_config(TOY, [f"output_dir={run_dir}", *overrides])


@pytest.fixture
def finished(tmp_path: Path) -> Path:
    return pretrain(toy(tmp_path / "run", "train.epochs=2"))


# ---------------------------------------------------------------------------------------------------
# Corrupted checkpoints


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(
    finished: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    last = finished / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\0" * 512 + data[512:])
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        loaded = load_run(finished)
    assert loaded.checkpoint == finished / "checkpoints" / "epoch_0001.ckpt"
    assert str(last) in caplog.text and "epoch_0001.ckpt instead" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        pretrain(toy(finished, "train.epochs=3", "resume=auto"))
    assert "epoch_0001.ckpt instead" in caplog.text
    assert read_checkpoint(last)["position"]["epoch"] == 3  # resumed from epoch 2's state and wrote a good last


def test_no_readable_checkpoint_left_is_a_clear_error(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in (finished / "checkpoints").glob("*.ckpt"):
        path.write_bytes(b"not a checkpoint")
    assert main(["pretrain", "--resume", str(finished)]) == 2
    err = capsys.readouterr().err
    assert "no other checkpoint" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------
# Unwritable and full folders


def test_an_unwritable_output_dir_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    for output_dir in (blocker / "run", Path("/proc/mimkit_cannot_write_here")):
        assert main(["pretrain", "-c", str(TOY), f"output_dir={output_dir}"]) == 2
        err = capsys.readouterr().err
        assert f"output_dir: cannot write to {output_dir}" in err and "choose another output_dir" in err


def test_a_full_disk_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(2**30, 2**30 - 1024, 1024))
    assert main(["pretrain", "-c", str(TOY), f"output_dir={tmp_path / 'run'}"]) == 2
    assert "MiB free, and this needs about" in capsys.readouterr().err
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_eval_checks_its_folder_before_working(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (finished / "eval").write_text("a file where the results folder goes")
    assert main(["eval", "knn", str(finished), "--k", "1"]) == 2
    out, err = capsys.readouterr()
    assert "eval: cannot write to" in err and "copy the run folder" in err and "k-NN accuracy" not in out


def test_export_checks_its_folder_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["method.backbone.embed_dim=32", "method.backbone.depth=1", "method.backbone.num_heads=2"]
    tiny += [*TINY_IBOT_HEADS, *SYNTHETIC_28, "data.synthetic.images=8", "data.batch_size=4", "train.epochs=1"]
    run = pretrain(load_run_config(IBOT_RECIPE, [*tiny, *QUIET_CPU_RUN, f"output_dir={tmp_path / 'run'}"]))
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert main(["export", str(run), "--format", "timm", "--out", str(blocker / "x")]) == 2
    assert "out: cannot write to" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Losses and data


def test_a_non_finite_loss_names_the_term(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="non-finite: loss_reconstruction"):
        pretrain(toy(tmp_path / "run", "method.nan_at_step=3"))


def test_a_folder_of_unreadable_images_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(16):
        folder = tmp_path / "photos" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_text("not an image")
    args = [
        "pretrain",
        "-c",
        str(TOY),
        f"output_dir={tmp_path / 'run'}",
        "data.source=imagefolder",
        "data.synthetic=null",
    ]
    args += [f"data.root={tmp_path / 'photos'}", "data.batch_size=4", "method.crop=8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "none of the first 12 images of epoch 0 could be read" in err and ".png" in err
    assert "lower the lr" not in err.lower() and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------
# Activation checkpointing and gradient accumulation


@pytest.mark.parametrize(
    "cfg",
    [
        BackboneConfig("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2),
        BackboneConfig("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2),
        BackboneConfig("resnet18", img_size=32, model_args={"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]}),
    ],
    ids=["vit", "beit", "resnet"],
)
def test_activation_checkpointing_gives_the_same_gradients(cfg: BackboneConfig) -> None:
    images = torch.randn(2, 3, 32, 32)
    gradients = []
    for enabled in (False, True):
        torch.manual_seed(0)
        encoder = build_backbone(
            BackboneConfig(**{**cfg.__dict__, "drop_path_rate": 0.0, "activation_checkpointing": enabled}),
            3,
            mask_token=False,
        )
        encoder(images).square().mean().backward()
        gradients.append({n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 10
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, msg=name)


def test_gradient_accumulation_reproduces_the_large_batch_step() -> None:
    cfg = load_run_config(TOY, ["method.dropout=0.0"])
    source = build_source(cfg.data)
    views = ToyMethod(cfg.method, source.info).views()
    torch.manual_seed(5)
    samples = [(views(source.load(i)[0], 0), source.load(i)[1], i) for i in range(8)]
    weights = []
    for batches in ([collate(samples)], [collate(samples[:4]), collate(samples[4:])]):
        torch.manual_seed(0)
        method = ToyMethod(cfg.method, source.info)
        fabric = Fabric(accelerator="cpu", devices=1)
        module, optimizer = fabric.setup(method, build_optimizer(method, cfg.optim))
        module.mark_forward_method("training_step")
        result = train_step(
            fabric, module, method, optimizer, Hyperparameters.from_config(cfg.optim, 8), batches, Progress(0, 5, 8, 2)
        )
        assert result.norms is not None and result.images == 8
        weights.append({k: v.clone() for k, v in method.state_dict().items()})
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, msg=key)
