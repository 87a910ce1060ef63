"""docs/methods/cim.md and docs/export.md, run as written at tiny sizes: every command and code block of the pages
works (as tests/test_own_images_doc.py does for docs/own_images.md).

Commands run from a temporary folder (their relative paths, runs/ and tokenizers/, land there); each gets the
overrides that make it a seconds-long CPU run. The DALL-E dVAE's files are stand-ins of the published layout at
small widths (mimkit reads its widths from the files), under a temporary home for `~`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.models.tokenizers.dall_e import DallETokenizer
from support import QUIET_CPU_RUN, ROOT, TINY_IBOT_HEADS

FMNIST = ["data.limit=64", "data.batch_size=32", "train.epochs=1", "train.knn_every_epochs=0", *QUIET_CPU_RUN]
TOKENIZER_DATA = ["data.limit=256", "data.num_workers=0", "eval_images=16"]
EXTRA = {
    "pretrain": FMNIST,
    "fit": TOKENIZER_DATA,
    "knn": ["--limit", "64", "--num-workers", "0"],
    "viz": ["--images", "2", "--points", "16"],
}
"""Overrides by sub-command (the last word of the command that names what runs)."""


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.DOTALL)


def commands(page: Path) -> list[list[str]]:
    """The page's bash commands as argv without `mimkit` (continuation lines joined, comments dropped)."""
    lines = [line for block in blocks(page, "bash") for line in block.replace("\\\n", " ").splitlines()]
    argvs = [shlex.split(line, comments=True) for line in lines if line.strip()]
    assert all(argv[0] == "mimkit" for argv in argvs), argvs
    return [argv[1:] for argv in argvs]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    kind = argv[1] if argv[0] in ("tokenizer", "eval") else argv[0]
    extra = EXTRA.get(kind, [])
    if "tokenizers/vqvae_fmnist" in argv:
        extra = [*extra, "data.limit=64", "tokenizer.epochs=1"]
    if kind == "pretrain" and any(a.startswith("cim/") for a in argv):  # the tokenizer it fits first, small
        extra = [*extra, "method.tokenizer_overrides=[data.limit=256,data.num_workers=0]"]
    code = main([*argv, *extra])
    out, err = capsys.readouterr()
    assert code == 0, (argv, out[-1500:], err[-1500:])


def rgb_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
    return root


@pytest.mark.slow
def test_cim_page_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dall_e = tmp_path / "home" / "dall_e"
    dall_e.mkdir(parents=True)
    small = DallETokenizer(vocab_size=32, n_hid=8, n_init=8)
    torch.save(small.encoder.state_dict(), dall_e / "encoder.pkl")
    torch.save(small.decoder.state_dict(), dall_e / "decoder.pkl")
    folder = rgb_folder(tmp_path / "images")
    argvs = commands(ROOT / "docs" / "methods" / "cim.md")
    assert [a[:2] for a in argvs[:3]] == [["tokenizer", "fit"]] * 3 and {a[0] for a in argvs[3:]} == {
        "pretrain",
        "eval",
        "viz",
        "export",
    }
    for argv in argvs:
        run([a.replace("DIR", str(folder)) for a in argv], capsys)
    assert (tmp_path / "tokenizers" / "dall_e.pt").is_file() and (
        tmp_path / "tokenizers" / "kmeans_fmnist.pt"
    ).is_file()
    assert (tmp_path / "runs" / "cim_vit_tiny_fmnist_respix" / "report" / "panels.png").is_file()
    assert (tmp_path / "runs" / "cim_resnet_tiny_fmnist_revdet" / "export" / "timm" / "model.safetensors").is_file()


@pytest.mark.slow
def test_export_page_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    run(["pretrain", "-c", "ibot/vit_tiny_fmnist", *TINY_IBOT_HEADS], capsys)  # the run the page exports
    for argv in commands(ROOT / "docs" / "export.md"):
        run(argv, capsys)
    folder = tmp_path / "runs" / "ibot_vit_tiny_fmnist" / "export" / "timm"
    first, plain = blocks(ROOT / "docs" / "export.md", "python")
    scope = {"images": torch.rand(2, 1, 56, 56)}
    exec(first, scope)  # the page's own example
    assert scope["features"].shape[:2] == (2, 1 + 8 * 8)
    scope = {}
    exec(plain.replace("DIR", str(folder)), scope)
    with torch.no_grad():
        assert scope["model"](torch.rand(1, 1, 56, 56)).shape == (1, 64)  # the folder the first example rewrote
