"""Tar shards: `mimkit data shard` writes them, data.source=shards reads them, training reads by shard and resumes
exactly."""

from __future__ import annotations

import itertools
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError, UnreadableImage
from mimkit.data.loader import EpochSampler
from mimkit.data.shards import write_shards
from mimkit.data.sources import ImageFolderSource, build_source, same_images_notice
from mimkit.engine.train import pretrain
from mimkit.runs import load_run_config
from support import ROOT, assert_same_losses

TOY = ROOT / "tests" / "recipes" / "toy.yaml"


def image_folder(root: Path, per_class: int = 13, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for name in ("ant", "bee"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("images") / "images")


@pytest.fixture(scope="module")
def shards(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    images = ImageFolderSource(DataConfig(source="imagefolder", root=str(folder)), "train")
    write_shards(images, out, images_per_shard=5)
    return out


def test_shards_hold_every_image_with_its_bytes_and_label(folder: Path, shards: Path) -> None:
    index = json.loads((shards / "index.json").read_text())
    assert [len(s["members"]) for s in index["shards"]] == [5, 5, 5, 5, 5, 1] and index["classes"] == ["ant", "bee"]
    with tarfile.open(shards / "shard-000000.tar") as tar:  # the webdataset layout: <key>.png + <key>.cls
        names = tar.getnames()
        assert len(names) == 10 and names[0].endswith(".png") and names[1] == names[0][:-4] + ".cls"
    images = ImageFolderSource(DataConfig(source="imagefolder", root=str(folder)), "train")
    source = build_source(DataConfig(source="shards", root=str(shards)))
    assert len(source) == 26 and source.info.num_classes == 2 and source.info.channels == 3
    for i in range(len(source)):
        original = int(source.keys[i])
        image, label = source.load(i)
        assert label == images.targets[original] and torch.equal(image, images.load(original)[0])
    assert source.labels().tolist() == [source.load(i)[1] for i in range(26)]
    assert sorted(len(g) for g in source.groups()) == [1, 5, 5, 5, 5, 5]
    assert same_images_notice(DataConfig(source="shards", root=str(shards))) is not None


def test_a_truncated_shard_names_the_image(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    last = copy / "shard-000005.tar"
    last.write_bytes(last.read_bytes()[:600])
    source = build_source(DataConfig(source="shards", root=str(copy)))
    with pytest.raises(UnreadableImage, match=r"shard-000005\.tar:\d+"):
        source.load(25)
    with pytest.raises(DataError, match="not a shard folder; write one with `mimkit data shard"):
        build_source(DataConfig(source="shards", root=str(tmp_path)))


def test_the_sampler_reads_by_shard_and_splits_ranks(shards: Path) -> None:
    groups = build_source(DataConfig(source="shards", root=str(shards))).groups()
    owner = {i: g for g, members in enumerate(groups) for i in members}

    def indices(rank: int, epoch: int, start: int = 0) -> list[int]:
        sampler = EpochSampler(26, shuffle=True, seed=3, num_replicas=2, rank=rank, drop_last=True, groups=groups)
        sampler.set_position(epoch, start)
        return [index for _, index in sampler]

    first, second = indices(0, 0), indices(1, 0)
    assert len(first) == len(second) == 13 and not set(first) & set(second)
    for run in (first, second):  # a rank's images come shard after shard: at most one shard change per 5 images
        changes = sum(owner[a] != owner[b] for a, b in itertools.pairwise(run))
        assert changes <= 3
    assert indices(0, 0) == first and indices(0, 1) != first
    assert indices(0, 0, start=4) == first[4:]


def test_data_shard_command_mirrors_split_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image_folder(tmp_path / "src" / "train", per_class=3)
    image_folder(tmp_path / "src" / "val", per_class=1)
    out = tmp_path / "out"
    assert main(["data", "shard", str(tmp_path / "src"), str(out), "--images-per-shard", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'train'}: 6 images in 2 shard(s)" in printed and f"{out / 'val'}: 2 images in 1 shard(s)" in printed
    cfg = DataConfig(source="shards", root=str(out), eval_split="val")
    assert (len(build_source(cfg)), len(build_source(cfg, "val"))) == (6, 2) and same_images_notice(cfg) is None
    assert main(["data", "shard", str(tmp_path / "src"), str(out)]) == 2
    assert "already holds shards" in capsys.readouterr().err


def test_training_on_shards_resumes_exactly(folder: Path, shards: Path, tmp_path: Path) -> None:
    data = ["data.source=shards", "data.synthetic=null", f"data.root={shards}", "data.num_workers=2"]
    data += ["train.checkpoint_every_steps=2"]
    reference = pretrain(load_run_config(TOY, [f"output_dir={tmp_path / 'reference'}", *data]))
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(load_run_config(TOY, [f"output_dir={crashed}", *data, "method.fail_at_step=5"]))
    pretrain(load_run_config(TOY, [f"output_dir={crashed}", *data, "resume=auto", "method.fail_at_step=null"]))
    assert_same_losses(crashed, reference)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda index: [index], r"is not a mimkit shard index \(format 'list', expected 'mimkit-shards/1'\)"),
        (lambda index: {**index, "channels": 2}, r"is damaged: channels is 2, not 1 or 3"),
        (
            lambda index: {**index, "shards": [{**index["shards"][0], "members": [["k", -5, 10, 0]]}]},
            r"is damaged: shard-000000.tar: member \['k', -5, 10, 0\] is not \[key, offset, size, label\]",
        ),
        (
            lambda index: {**index, "shards": [{**index["shards"][0], "members": [["k", 0, 10, 7]]}]},
            r"member \['k', 0, 10, 7\] is not \[key, offset, size, label\]",  # label 7 of 2 classes
        ),
    ],
    ids=["a-list", "channels", "negative-offset", "label-out-of-range"],
)
def test_an_index_not_as_mimkit_writes_it_is_refused_naming_the_fix(
    shards: Path, tmp_path: Path, change: Callable[[dict], object], message: str
) -> None:
    for path in shards.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "index.json").write_text(json.dumps(change(json.loads((shards / "index.json").read_text()))))
    with pytest.raises(DataError, match=message + r".*write the shards again with `mimkit data shard"):
        build_source(DataConfig(source="shards", root=str(tmp_path)))


def test_shards_of_16_bit_images_decode_as_the_folder_does(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for i in range(3):
        pixels = np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000 + i
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
    images = ImageFolderSource(DataConfig(source="imagefolder", root=str(tmp_path / "images")), "train")
    write_shards(images, tmp_path / "shards")
    source = build_source(DataConfig(source="shards", root=str(tmp_path / "shards")))
    assert source.info.channels == images.info.channels == 1
    for i in range(3):
        image = source.load(i)[0]
        assert torch.equal(image, images.load(int(source.keys[i]))[0]) and image.max() == 183  # 47000 / 257


def test_a_missing_split_names_the_splits_there_are(tmp_path: Path) -> None:
    image_folder(tmp_path / "src" / "train", per_class=1)
    image_folder(tmp_path / "src" / "val", per_class=1)
    assert main(["data", "shard", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    cfg = DataConfig(source="shards", root=str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"has the splits train, val \(shard folders\) but no 'test'; set data.eval_"):
        build_source(cfg, cfg.eval_split)
    with pytest.raises(DataError, match=r"but no 'training'; set data.split=train"):
        build_source(DataConfig(source="shards", root=str(tmp_path / "out"), split="training", eval_split="val"))
    assert same_images_notice(cfg) is None  # the notice's check does not fail on it
