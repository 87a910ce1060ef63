"""docs/own_images.md, run as written on a generated folder of JPEGs (tiny sizes): every command of the page works.

The page's bash blocks are parsed; DIR becomes the generated folder, runs/ a temporary folder, and pretraining
gets the overrides that make it a seconds-long CPU run (a tiny ViT on 32-pixel crops, one epoch).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimkit.cli import main
from support import QUIET_CPU_RUN, ROOT, TINY_TOKENIZER, tiny_overlay

DOC = ROOT / "docs" / "own_images.md"
TINY_VIT = [
    "method.backbone.img_size=32",
    "method.backbone.patch_size=8",
    "method.backbone.embed_dim=32",
    "method.backbone.depth=4",  # the linear probe reads the last 4 blocks
    "method.backbone.num_heads=2",
    "method.views.local_size=16",
    "method.views.num_local=2",
    "data.batch_size=4",
    "train.epochs=1",
    "train.knn_every_epochs=0",
    *QUIET_CPU_RUN,
]


def bash_blocks() -> list[list[list[str]]]:
    """The page's ```bash blocks as lists of argv (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return [[shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()] for block in blocks]


def jpeg_folder(root: Path, per_class: int = 15) -> Path:
    """Two classes of 40 x 40 JPEGs: bright blobs on dark and dark on bright, with noise."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(["day", "night"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, size=(40, 40, 3), dtype=np.uint8) + (150 if label == 0 else 20)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:03d}.jpg", quality=90)
    return root


def substituted(argv: list[str], folder: Path, runs: Path) -> list[str]:
    """mimkit's argv with the folder and run paths of this test."""
    assert argv[0] == "mimkit", argv
    return [a.replace("DIR", str(folder)).replace("runs/", f"{runs}/") for a in argv[1:]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return jpeg_folder(tmp_path_factory.mktemp("images") / "images")


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # recipes by name, from a folder that is not the checkout
    walkthrough = bash_blocks()[0]
    assert [argv[1] for argv in walkthrough] == ["data", "pretrain", "runs", "eval", "eval", "viz", "export"]
    extra = {
        "pretrain": [*tiny_overlay("ibot")["overrides"], *TINY_VIT],
        "linear": ["--epochs", "2", "--num-workers", "0"],
        "knn": ["--num-workers", "0"],
        "viz": ["--points", "20", "--images", "2"],
    }
    for argv in walkthrough:
        args = substituted(argv, folder, tmp_path / "runs")
        args += extra.get(args[0], []) + extra.get(args[1] if len(args) > 1 else "", [])
        assert main(args) == 0, args
        out, err = capsys.readouterr()
        if args[0] == "data":
            assert "27 images" in out and "3 images" in out and "2 classes" in out  # 10% held out
        if args[0] == "pretrain":
            assert "the training images themselves" not in err
    run = tmp_path / "runs" / "mine"
    assert {r["evaluation"] for r in map(json.loads, (run / "eval" / "history.jsonl").read_text().splitlines())} >= {
        "knn",
        "linear",
    }
    assert (run / "report" / "index.html").is_file() and (run / "export" / "timm" / "model.safetensors").is_file()
    assert "or with timm alone: import timm" in out


def test_without_val_fraction_evaluation_warns(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["pretrain", "-c", "ibot/vit_small_imagefolder", f"data.root={folder}", f"output_dir={run}"]
    assert main([*argv, *tiny_overlay("ibot")["overrides"], *TINY_VIT]) == 0
    assert main(["eval", "knn", str(run), "--num-workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "evaluation scores the training images themselves" in err and "data.val_fraction=0.1" in err
    assert "k-NN: 30 training images, so k = 10 20" in err  # the default ks that the bank holds


def test_the_other_recipes_and_the_tokenizer_commands_run(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Section 3 and 4: the commands are valid as written (pretraining checked with --print-config), and the
    tokenizer fit runs at a tiny size."""
    monkeypatch.chdir(tmp_path)
    later = [argv for block in bash_blocks()[1:] for argv in block]
    assert {argv[1] for argv in later} == {"pretrain", "tokenizer"}
    for argv in later:
        args = substituted(argv, folder, tmp_path / "runs")
        if args[0] == "pretrain":
            assert main([*args, "--print-config"]) == 0, args
        else:
            tiny = ["tokenizer.vocab_size=8", "tokenizer.image_size=32", "eval_images=3", "data.num_workers=0"]
            assert main([*args, *tiny, f"output={tmp_path / 'tok.pt'}"]) == 0, args
    assert (tmp_path / "tok.pt").is_file() and TINY_TOKENIZER.name
