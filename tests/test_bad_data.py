"""Bad data never corrupts a run silently (docs/troubleshooting.md, "Image folders and shards"): a folder's channel
count comes from every image, 16-bit and float pixels are scaled rather than clipped, link loops never multiply
images, an image too large to decode is one skipped file, and a damaged shard index or a missing split is a message
that names the file and the fix. Each case's id is a heading of that page."""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.data.config import DataConfig
from mimkit.data.info import UnreadableImage
from mimkit.data.sources import build_source, image_modes
from mimkit.data.sources.base import to_8bit
from mimkit.engine.train import pretrain
from mimkit.runs import load_run_config
from support import ROOT

TOY = str(ROOT / "tests" / "recipes" / "toy.yaml")
DOC = ROOT / "docs" / "troubleshooting.md"
SECTION = "## Image folders and shards"


def write_rgb(path: Path, seed: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_huge_png(path: Path, side: int = 20000) -> None:
    """A PNG whose header says side x side pixels (over PIL's decompression-bomb limit) in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 61)) + chunk(b"IEND", b""))


def folder(root: Path, images: int = 7) -> Path:
    for i in range(images):
        write_rgb(root / "a" / f"{i}.png", seed=i)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bad folders of the cases, and a run trained on shards with train/ and val/ (no test/)."""
    base = tmp_path_factory.mktemp("bad")
    for split in ("train", "val"):
        folder(base / "photos" / split, images=8 if split == "train" else 2)
    assert main(["data", "shard", str(base / "photos"), str(base / "shards"), "--images-per-shard", "4"]) == 0
    run = base / "run"
    overrides = ["data.source=shards", "data.synthetic=null", f"data.root={base / 'shards'}", "train.epochs=1"]
    pretrain(load_run_config(TOY, [*overrides, "data.batch_size=4", "method.crop=8", f"output_dir={run}"]))
    paths = {"run": run, "photos": base / "photos"}
    for name, text in {"not_json": "<html>502 Bad Gateway</html>", "not_mimkit": '{"format": "webdataset"}'}.items():
        (base / name).mkdir()
        (base / name / "index.json").write_text(text)
        paths[name] = base / name
    damaged = json.loads((base / "shards" / "train" / "index.json").read_text())
    (base / "damaged").mkdir()
    (base / "damaged" / "index.json").write_text(json.dumps(damaged))  # its tar files were not copied
    huge = folder(base / "huge")
    write_huge_png(huge / "a" / "huge.png")
    return {**paths, "damaged": base / "damaged", "huge": huge}


def shards_at(root: Path, tmp: Path) -> list[str]:
    return [
        "pretrain",
        "-c",
        TOY,
        "data.source=shards",
        "data.synthetic=null",
        f"data.root={root}",
        f"output_dir={tmp}",
    ]


FIX = r"write the shards again with `mimkit data shard IMAGE_FOLDER OUT`"
Case = Callable[[dict[str, Path], Path], list[str]]
CASES: dict[str, tuple[Case, str]] = {
    "shard-index-not-json": (
        lambda d, tmp: shards_at(d["not_json"], tmp),
        r"not_json/index.json is not JSON \(Expecting value: line 1 column 1 \(char 0\)\), so not a shard index "
        r"that `mimkit data shard` wrote \(or one cut short\); " + FIX,
    ),
    "shard-index-not-mimkit": (
        lambda d, tmp: shards_at(d["not_mimkit"], tmp),
        r"not_mimkit/index.json is not a mimkit shard index \(format 'webdataset', expected 'mimkit-shards/1'\); "
        + FIX,
    ),
    "shard-index-damaged": (
        lambda d, tmp: shards_at(d["damaged"], tmp),
        r"damaged/index.json is damaged: it lists shard-000000.tar, which is missing; " + FIX,
    ),
    "shard-split-missing": (
        lambda d, tmp: ["eval", "knn", str(d["run"]), "--k", "1"],
        r"shards has the splits train, val \(shard folders\) but no 'test'; set data.eval_split=val",
    ),
    "folder-split-missing": (
        lambda d, tmp: ["eval", "knn", str(d["run"]), "data.source=imagefolder", f"data.root={d['photos']}"],
        r"photos has the splits train, val \(sub-folders\) but no 'test'; set data.eval_split=val",
    ),
    "image-too-large": (
        lambda d, tmp: [
            *["pretrain", "-c", TOY, "data.source=imagefolder", "data.synthetic=null", f"data.root={d['huge']}"],
            *["data.batch_size=4", "method.crop=8", "data.strict=true", f"output_dir={tmp}"],
        ],
        r"unreadable image .*huge.png: DecompressionBombError: Image size \(400000000 pixels\) exceeds limit .* "
        r"\(set data.strict=false to skip such files with a warning\)",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_exits_2_with_a_message_that_names_the_fix(
    case: str, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, expected = CASES[case]
    capsys.readouterr()
    code = main(build(data, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert re.search(expected, err), err
    assert "Traceback" not in err and err.count("\n") <= 3, err


def test_every_case_is_in_its_section_of_the_troubleshooting_page() -> None:
    text = DOC.read_text()
    assert SECTION in text and text.index(SECTION) < text.index("## Resuming and stopping")
    section = text[text.index(SECTION) :].split("\n## ", 1)[0]
    headings = set(re.findall(r"^### `?([a-z0-9-]+)`?", section, flags=re.M))
    assert set(CASES) | {"mixed-channels", "high-bit-depth"} <= headings, sorted(set(CASES) - headings)


def test_a_too_large_image_is_one_counted_skip(data: dict[str, Path], tmp_path: Path) -> None:
    source = build_source(DataConfig(source="imagefolder", root=str(data["huge"])))
    assert len(source) == 8 and source.info.channels == 3
    with pytest.raises(UnreadableImage, match="DecompressionBombError"):
        source.load(source.files.index(data["huge"] / "a" / "huge.png"))
    overrides = ["data.source=imagefolder", "data.synthetic=null", f"data.root={data['huge']}", "train.epochs=1"]
    run = pretrain(load_run_config(TOY, [*overrides, "data.batch_size=4", "method.crop=8", f"output_dir={tmp_path}"]))
    log = (run / "train.log").read_text()
    assert "1 of 8 files cannot be read (e.g." in log and "huge.png: DecompressionBombError" in log
    assert "skipped unreadable image" in log and "epoch 0: skipped 1 unreadable image(s)" in log


# ---------------------------------------------------------------------------------------------------
# The channel count of a folder, from every image


@pytest.fixture
def notices(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The "mimkit" logger's records (a run's logging set-up stops them from reaching pytest's root handler)."""
    logger = logging.getLogger("mimkit")
    logger.addHandler(caplog.handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def test_one_gray_image_sorted_first_no_longer_makes_an_rgb_folder_gray(
    tmp_path: Path, notices: pytest.LogCaptureFixture
) -> None:
    Image.new("L", (16, 16), 7).save(tmp_path / "0_gray.png")
    for i in range(1, 5):
        write_rgb(tmp_path / f"{i}.jpg", seed=i)
    source = build_source(DataConfig(source="imagefolder", root=str(tmp_path)))
    build_source(DataConfig(source="imagefolder", root=str(tmp_path)))  # the same folder again: no second notice
    assert source.info.channels == 3 and source.load(0)[0].shape == (3, 16, 16)
    said = [r.getMessage() for r in notices.records if "grayscale" in r.getMessage()]
    assert said == [f"data  {tmp_path}: 1 of 5 images are grayscale; they are converted to RGB (data.channels=3, "
                       "the majority; data.channels=1 makes every image grayscale instead)"]  # fmt: skip


def test_a_mostly_gray_folder_is_gray_and_says_how_many_were_in_colour(
    tmp_path: Path, notices: pytest.LogCaptureFixture
) -> None:
    write_rgb(tmp_path / "0.png", seed=0)
    for i in range(1, 4):
        Image.new("L", (16, 16), i).save(tmp_path / f"{i}.png")
    source = build_source(DataConfig(source="imagefolder", root=str(tmp_path)))
    assert source.info.channels == 1 and source.load(0)[0].shape == (1, 16, 16)
    assert "1 of 4 images are in colour; they are converted to grayscale" in notices.text


def test_declared_channels_read_no_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder(tmp_path, images=3)
    monkeypatch.setattr(image_modes, "header_mode", lambda path: pytest.fail("read a header"))
    assert build_source(DataConfig(source="imagefolder", root=str(tmp_path), channels=1)).info.channels == 1


def test_a_slow_scan_is_cached_and_only_changed_files_are_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(image_modes, "CACHE_AFTER_SECONDS", 0.0)
    images = folder(tmp_path / "images", images=4)
    cfg = DataConfig(source="imagefolder", root=str(images))
    assert build_source(cfg).info.channels == 3
    assert len(list((tmp_path / "cache" / "image-modes").glob("*.json"))) == 1
    read: list[Path] = []
    original = image_modes.header_mode
    monkeypatch.setattr(image_modes, "header_mode", lambda path: read.append(path) or original(path))
    assert build_source(cfg).info.channels == 3 and read == []
    for i in range(3):  # now mostly gray: the cache must not hide it
        Image.new("L", (20, 20), 9).save(images / "a" / f"{i}.png")
    assert build_source(cfg).info.channels == 1 and sorted(p.name for p in read) == ["0.png", "1.png", "2.png"]


# ---------------------------------------------------------------------------------------------------
# 16-bit and float pixels: scaled by their range, never clipped


def test_16_bit_pngs_are_divided_by_257_not_clipped_to_white(tmp_path: Path) -> None:
    pixels = np.array([[0, 257, 1000], [32768, 65000, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    gray = build_source(DataConfig(source="imagefolder", root=str(tmp_path)))
    image, _ = gray.load(0)
    assert gray.info.channels == 1 and image[0].tolist() == [[0, 1, 4], [128, 253, 255]]
    as_rgb = build_source(DataConfig(source="imagefolder", root=str(tmp_path), channels=3)).load(0)[0]
    assert as_rgb.shape == (3, 2, 3) and all(torch.equal(plane, image[0]) for plane in as_rgb)


def test_float_tiffs_in_0_1_are_scaled_by_255_others_by_their_range(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "a_unit.tif")
    Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32)).save(tmp_path / "b_wide.tif")
    Image.fromarray(np.array([[0.0, np.nan, 1.0]], dtype=np.float32)).save(tmp_path / "c_nan.tif")
    source = build_source(DataConfig(source="imagefolder", root=str(tmp_path)))
    assert source.info.channels == 1
    assert source.load(0)[0].flatten().tolist() == [0, 128, 255]
    assert source.load(1)[0].flatten().tolist() == [0, 64, 255]
    with pytest.raises(UnreadableImage, match="NaN or infinite"):
        source.load(2)


def test_32_bit_integers_beyond_16_bits_are_scaled_by_their_range() -> None:
    assert to_8bit(np.array([[0, 65535]], dtype=np.int32), "I").tolist() == [[0, 255]]
    assert to_8bit(np.array([[-10, 0, 100_000]], dtype=np.int32), "I").tolist() == [[0, 0, 255]]
    assert to_8bit(np.array([[5.0, 5.0]], dtype=np.float32), "F").tolist() == [[0, 0]]


# ---------------------------------------------------------------------------------------------------
# Symbolic links


def test_a_link_loop_never_multiplies_images(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for i in range(16):
        write_rgb(root / "cls" / "deep" / f"{i:02d}.png", seed=i, size=8)
    os.symlink(root / "cls", root / "cls" / "deep" / "loop")  # a/deep/loop/deep/loop/... to the depth limit
    os.symlink(root, root / "cls" / "up")
    os.symlink(root / "cls" / "deep", root / "cls" / "again")  # one folder through two names
    source = build_source(DataConfig(source="imagefolder", root=str(root)))
    assert len(source) == 16 and source.info.class_names == ("cls",)
    assert len({path.resolve() for path in source.files}) == 16


def test_cached_modes_are_kept_per_file_also_for_a_relative_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache names each file relative to the root, so `data.root=.` keeps a.png and b.png apart."""
    from mimkit.data.sources import image_modes

    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(image_modes, "CACHE_AFTER_SECONDS", 0.0)
    folder = tmp_path / "flat"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "a.png")
    Image.new("RGB", (8, 8)).save(folder / "b.png")
    size = max((folder / n).stat().st_size for n in ("a.png", "b.png"))
    for name in ("a.png", "b.png"):  # the same size and time: only their names tell them apart in the cache
        os.truncate(folder / name, size)
        os.utime(folder / name, ns=(1_000_000_000, 1_000_000_000))
    monkeypatch.chdir(folder)
    files = [Path("a.png"), Path("b.png")]
    first = image_modes.read_modes(Path("."), files)
    again = image_modes.read_modes(Path("."), files)  # from the cache
    assert (first.gray, first.color) == (again.gray, again.color) == (1, 1)
