"""Pretraining on a folder of photos with broken files: skipped and counted, or fatal under data.strict."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimkit.data.info import DataError
from mimkit.engine.train import pretrain
from mimkit.methods.saved import read_checkpoint
from mimkit.runs import load_run_config
from support import ROOT

TOY = ROOT / "tests" / "recipes" / "toy.yaml"
VALID_IMAGES = 26  # + 2 broken files = 28, a multiple of the batch size: every file is read each epoch
BAD_FILES = ("broken.png", "truncated.jpg")


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_image_folder(root: Path) -> Path:
    """Two classes of small RGB PNGs and JPEGs of varied sizes, one truncated JPEG and one text file named .png."""
    rng = np.random.default_rng(0)
    for i in range(VALID_IMAGES):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        height, width = int(rng.integers(16, 25)), int(rng.integers(16, 25))
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        if i % 3:
            Image.fromarray(pixels, "RGB").save(folder / f"img_{i:02d}.png")
        else:
            (folder / f"img_{i:02d}.jpg").write_bytes(jpeg_bytes(pixels))
    whole = jpeg_bytes(rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8))
    (root / "cats" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "dogs" / "broken.png").write_text("this is a text file, not a PNG\n")
    return root


def folder_config(data_root: Path, run_dir: Path, *overrides: str):
    return load_run_config(
        TOY,
        [
            f"output_dir={run_dir}",
            "data.source=imagefolder",
            "data.synthetic=null",
            f"data.root={data_root}",
            "data.batch_size=4",
            "method.crop=12",  # every image is at least 16 pixels on a side
            "train.epochs=1",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def finished_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch on the folder, the loading spread over two worker processes."""
    return pretrain(folder_config(data_root, tmp_path_factory.mktemp("runs") / "run", "data.num_workers=2"))


def test_folder_has_the_expected_files(data_root: Path) -> None:
    files = sorted(p.name for p in data_root.rglob("*") if p.is_file())
    assert len(files) == VALID_IMAGES + len(BAD_FILES) and set(BAD_FILES) <= set(files)


def test_training_finishes_despite_broken_files(finished_run: Path) -> None:
    state = read_checkpoint(finished_run / "checkpoints" / "last.ckpt")
    assert state["position"]["epoch"] == 1
    assert state["position"]["step"] == (VALID_IMAGES + len(BAD_FILES)) // 4
    assert state["position"]["skipped_images"] == 2
    assert state["method"]["steps_seen"].item() == 7


def test_train_log_warns_with_the_count_of_skipped_images(finished_run: Path) -> None:
    log = (finished_run / "train.log").read_text()
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert any("skipped 2 unreadable image(s)" in line for line in warnings), log
    assert "imagefolder:" in log and f"{VALID_IMAGES + 2} images, 3 channel(s), various sizes, 2 classes" in log


def test_metrics_record_the_skipped_images(finished_run: Path) -> None:
    with open(finished_run / "metrics.csv", newline="") as f:
        counts = [float(row["skipped_images"]) for row in csv.DictReader(f) if row.get("skipped_images")]
    assert counts == [2.0]


def test_train_log_names_the_skipped_files(finished_run: Path) -> None:
    log = (finished_run / "train.log").read_text()
    assert all(name in log for name in BAD_FILES), log


def test_strict_data_fails_naming_the_bad_file(data_root: Path, tmp_path: Path) -> None:
    cfg = folder_config(data_root, tmp_path / "run", "data.strict=true", "data.num_workers=0")
    with pytest.raises(DataError) as info:
        pretrain(cfg)
    message = str(info.value)
    assert "unreadable image" in message and "data.strict=false" in message
    assert any(str(data_root / folder / name) in message for folder in ("cats", "dogs") for name in BAD_FILES)
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_strict_data_fails_through_worker_processes(data_root: Path, tmp_path: Path) -> None:
    cfg = folder_config(data_root, tmp_path / "run", "data.strict=true", "data.num_workers=1")
    with pytest.raises(DataError, match=r"unreadable image .*(broken\.png|truncated\.jpg)"):
        pretrain(cfg)
