"""Image sources: Fashion-MNIST IDX files and folders of images (torchvision sets and synthetic shapes:
tests/test_generated_sources.py), channel conversion, and the held-out evaluation split."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.config import ConfigError
from mimkit.data import fashion_mnist
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError, UnreadableImage
from mimkit.data.sources import (
    GRAY_MEAN,
    IMAGENET_MEAN,
    build_source,
    convert_channels,
    same_images_notice,
)

# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST IDX files


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file holding a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_fmnist(folder: Path, split: str = "train", n: int = 5, gz: bool = True, seed: int = 0) -> np.ndarray:
    """Small Fashion-MNIST-like IDX files for `split`; returns the images (labels are index % 10)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    image_name, label_name = fashion_mnist.FILES[split]
    write_idx(folder / image_name, images, gz)
    write_idx(folder / label_name, np.arange(n, dtype=np.uint8) % 10, gz)
    return images


def fmnist_config(root: Path, **kwargs) -> DataConfig:
    return DataConfig(source="fashion-mnist", root=str(root), download=False, **kwargs)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_fashion_mnist_reads_idx_files(tmp_path: Path, gz: bool) -> None:
    images = write_fmnist(tmp_path, n=5, gz=gz)
    source = build_source(fmnist_config(tmp_path))
    assert len(source) == 5
    assert source.info.channels == 1 and source.info.image_size == (28, 28) and source.info.num_classes == 10
    image, label = source.load(3)
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28)
    assert torch.equal(image[0], torch.from_numpy(images[3])) and label == 3
    assert source.labels().tolist() == [0, 1, 2, 3, 4]


def test_fashion_mnist_test_split_reads_t10k_files(tmp_path: Path) -> None:
    write_fmnist(tmp_path, "train", n=5, seed=0)
    test_images = write_fmnist(tmp_path, "test", n=3, seed=1)
    source = build_source(fmnist_config(tmp_path), "test")
    assert len(source) == 3
    assert torch.equal(source.load(2)[0][0], torch.from_numpy(test_images[2]))


def test_fashion_mnist_as_rgb_repeats_the_gray_plane(tmp_path: Path) -> None:
    images = write_fmnist(tmp_path)
    source = build_source(fmnist_config(tmp_path, channels=3))
    image, _ = source.load(0)
    assert image.shape == (3, 28, 28)
    for plane in image:
        assert torch.equal(plane, torch.from_numpy(images[0]))
    assert source.info.channels == 3 and len(source.info.mean) == 3 and len(source.info.std) == 3


def test_fashion_mnist_unknown_split_is_refused(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    with pytest.raises(DataError, match="splits 'train' and 'test'; got split='val'"):
        build_source(fmnist_config(tmp_path), "val")


def test_truncated_idx_file_is_named(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "images", np.zeros((4, 28, 28), np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"images is truncated or damaged \(3036 data bytes, expected 3136\)"):
        fashion_mnist.read_idx(path)


def test_idx_file_with_extra_bytes_is_refused(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "images", np.zeros((2, 3), np.uint8), gz=False)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="truncated or damaged"):
        fashion_mnist.read_idx(path)


def test_bad_magic_number_is_named(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match=re.escape(f"{path} is not an IDX file")):
        fashion_mnist.read_idx(path)


def test_truncated_gzip_is_named(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "images", np.zeros((4, 28, 28), np.uint8), gz=True)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match=re.escape(f"{path} cannot be read")):
        fashion_mnist.read_idx(path)


def test_damaged_file_in_a_split_fails_naming_it(tmp_path: Path) -> None:
    write_fmnist(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-2])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte is truncated"):
        build_source(fmnist_config(tmp_path))


def test_images_and_labels_of_different_lengths_are_refused(tmp_path: Path) -> None:
    write_fmnist(tmp_path, n=5)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=True)
    with pytest.raises(DataError, match="do not hold matching images and labels"):
        build_source(fmnist_config(tmp_path))


def test_missing_files_in_root_point_to_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        build_source(fmnist_config(empty))
    message = str(info.value)
    assert "dataset-fashion-mnist" in message and str(empty) in message
    assert "mimkit data fetch fashion-mnist" in message


def test_missing_files_without_download_look_in_system_dir_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "system")
    with pytest.raises(DataError) as info:
        build_source(DataConfig(source="fashion-mnist", download=False))
    message = str(info.value)
    assert "dataset-fashion-mnist" in message
    assert str(tmp_path / "system") in message and str(tmp_path / "cache" / "fashion-mnist") in message


def test_files_in_the_cache_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "system")
    write_fmnist(tmp_path / "cache" / "fashion-mnist" / "FashionMNIST" / "raw", n=4)
    assert len(build_source(DataConfig(source="fashion-mnist", download=False))) == 4


# ---------------------------------------------------------------------------------------------------
# Folders of images


def write_image(path: Path, size: tuple[int, int] = (10, 12), mode: str = "RGB", seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return pixels


def folder_config(root: Path, **kwargs) -> DataConfig:
    return DataConfig(source="imagefolder", root=str(root), **kwargs)


def test_class_subfolders_give_sorted_class_names_and_labels(tmp_path: Path) -> None:
    for i, name in enumerate(["dog", "cat", "ant"]):
        for j in range(i + 1):
            write_image(tmp_path / name / f"{j}.png", seed=10 * i + j)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    source = build_source(folder_config(tmp_path))
    assert source.info.class_names == ("ant", "cat", "dog") and source.info.num_classes == 3
    assert len(source) == 6
    assert source.labels().tolist() == [0, 0, 0, 1, 1, 2]
    assert [source.load(i)[1] for i in range(6)] == [0, 0, 0, 1, 1, 2]
    assert source.info.image_size is None


def test_images_in_nested_folders_count_for_their_class(tmp_path: Path) -> None:
    write_image(tmp_path / "a" / "x" / "deep.png")
    write_image(tmp_path / "b" / "top.jpg")
    source = build_source(folder_config(tmp_path))
    assert source.info.class_names == ("a", "b") and source.labels().tolist() == [0, 1]


def test_folder_without_subfolders_has_no_labels(tmp_path: Path) -> None:
    for j in range(3):
        write_image(tmp_path / f"{j}.png", seed=j)
    source = build_source(folder_config(tmp_path))
    assert source.info.num_classes is None and source.info.class_names == ()
    assert source.labels() is None
    assert [source.load(i)[1] for i in range(3)] == [-1, -1, -1]


def test_loose_images_beside_subfolders_mean_no_labels(tmp_path: Path) -> None:
    write_image(tmp_path / "loose.png")
    write_image(tmp_path / "cls" / "a.png")
    source = build_source(folder_config(tmp_path))
    assert len(source) == 2 and source.labels() is None


def test_loaded_pixels_match_the_file(tmp_path: Path) -> None:
    pixels = write_image(tmp_path / "a.png", size=(10, 12))
    image, _ = build_source(folder_config(tmp_path)).load(0)
    assert image.dtype == torch.uint8 and image.shape == (3, 12, 10)
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(pixels))


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=re.escape(f"no images found under {tmp_path} ")):
        build_source(folder_config(tmp_path))


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        build_source(folder_config(tmp_path / "missing"))


def test_split_subfolder_is_selected(tmp_path: Path) -> None:
    for j in range(3):
        write_image(tmp_path / "train" / "a" / f"{j}.png", seed=j)
    write_image(tmp_path / "train" / "b" / "0.png")
    write_image(tmp_path / "val" / "a" / "0.png")
    cfg = folder_config(tmp_path, eval_split="val")
    train, val = build_source(cfg), build_source(cfg, cfg.eval_split)
    assert len(train) == 4 and train.info.class_names == ("a", "b")
    assert len(val) == 1 and val.info.class_names == ("a",)


def test_missing_split_subfolder_beside_other_splits_is_an_error(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "a" / "0.png")
    write_image(tmp_path / "val" / "a" / "0.png")
    with pytest.raises(DataError, match="test"):
        build_source(folder_config(tmp_path), "test")


def test_channel_count_is_guessed_from_the_images(tmp_path: Path) -> None:
    write_image(tmp_path / "gray" / "a.png", mode="L")
    write_image(tmp_path / "rgb" / "a.png", mode="RGB")
    gray, rgb = build_source(folder_config(tmp_path / "gray")), build_source(folder_config(tmp_path / "rgb"))
    assert gray.info.channels == 1 and gray.load(0)[0].shape[0] == 1 and gray.info.mean == GRAY_MEAN
    assert rgb.info.channels == 3 and rgb.load(0)[0].shape[0] == 3 and rgb.info.mean == IMAGENET_MEAN


def test_forced_channels_convert_every_image(tmp_path: Path) -> None:
    gray_pixels = write_image(tmp_path / "gray.png", mode="L")
    write_image(tmp_path / "rgb.png", mode="RGB")
    as_rgb = build_source(folder_config(tmp_path, channels=3))
    as_gray = build_source(folder_config(tmp_path, channels=1))
    assert as_rgb.info.channels == 3 and as_gray.info.channels == 1
    gray_as_rgb = as_rgb.load(0)[0]  # files sort as gray.png, rgb.png
    assert gray_as_rgb.shape[0] == 3
    for plane in gray_as_rgb:
        assert torch.equal(plane, torch.from_numpy(gray_pixels))
    assert as_gray.load(1)[0].shape[0] == 1


def test_unreadable_file_raises_unreadable_image_naming_it(tmp_path: Path) -> None:
    write_image(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("this is not a png")
    source = build_source(folder_config(tmp_path))
    assert len(source) == 2
    with pytest.raises(UnreadableImage) as info:
        source.load(1)
    assert info.value.where == str(tmp_path / "text.png")
    assert "UnidentifiedImageError" in info.value.reason


# ---------------------------------------------------------------------------------------------------
# Channel conversion


def test_gray_to_rgb_repeats_the_plane() -> None:
    gray = torch.randint(0, 256, (1, 5, 4), dtype=torch.uint8)
    rgb = convert_channels(gray, 3)
    assert rgb.shape == (3, 5, 4) and rgb.dtype == torch.uint8 and rgb.is_contiguous()
    assert all(torch.equal(plane, gray[0]) for plane in rgb)


def test_rgb_to_gray_uses_luma_weights() -> None:
    rgb = torch.zeros(3, 3, 1, dtype=torch.uint8)
    for channel in range(3):
        rgb[channel, channel] = 255
    gray = convert_channels(rgb, 1)
    assert gray.shape == (1, 3, 1) and gray.dtype == torch.uint8
    assert gray.flatten().tolist() == [76, 150, 29]  # round(255 * (0.299, 0.587, 0.114))
    white = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    assert convert_channels(white, 1).unique().tolist() == [255]


def test_same_channel_count_is_unchanged() -> None:
    image = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    assert convert_channels(image, 3) is image


# ---------------------------------------------------------------------------------------------------
# A held-out evaluation split (data.val_fraction) and the notice when there is none


def class_folder(root: Path, per_class: int = 10) -> Path:
    for label, name in enumerate(["cat", "dog"]):
        for j in range(per_class):
            write_image(root / name / f"{j}.png", seed=100 * label + j)
    return root


def test_val_fraction_holds_out_a_fixed_disjoint_part_of_the_training_images(tmp_path: Path) -> None:
    cfg = folder_config(class_folder(tmp_path), val_fraction=0.2)
    train, held = build_source(cfg), build_source(cfg, cfg.eval_split)
    assert (len(train), len(held)) == (16, 4)
    assert set(train.indices).isdisjoint(held.indices) and set(train.indices) | set(held.indices) == set(range(20))
    assert build_source(cfg, cfg.eval_split).indices == held.indices  # the same draw every time
    assert held.labels().tolist() == [held.load(i)[1] for i in range(4)]
    assert same_images_notice(cfg) is None


def test_without_splits_evaluation_scores_the_training_images_and_says_so(tmp_path: Path) -> None:
    cfg = folder_config(class_folder(tmp_path))
    assert build_source(cfg).info.name == build_source(cfg, cfg.eval_split).info.name
    notice = same_images_notice(cfg)
    assert notice is not None and "the training images themselves" in notice and "data.val_fraction=0.1" in notice


def test_split_folders_need_no_notice(tmp_path: Path) -> None:
    class_folder(tmp_path / "train")
    class_folder(tmp_path / "val", per_class=2)
    assert same_images_notice(folder_config(tmp_path, eval_split="val")) is None
    assert same_images_notice(DataConfig(source="synthetic", eval_split="train")) is not None


def test_a_val_fraction_that_empties_a_split_is_refused(tmp_path: Path) -> None:
    cfg = folder_config(class_folder(tmp_path, per_class=1), val_fraction=0.1)
    with pytest.raises(DataError, match=r"val_fraction 0\.1 of 2 images leaves a split empty"):
        build_source(cfg, cfg.eval_split)
    with pytest.raises(ConfigError, match="val_fraction: must lie in"):
        folder_config(tmp_path, val_fraction=1.0).validate()


# ---------------------------------------------------------------------------------------------------
# 8-bit images decode exactly as before (PIL's conversion); wider ones: tests/test_bad_data.py


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA"])
def test_8_bit_images_decode_as_pil_converts_them(tmp_path: Path, mode: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    name = "a.jpg" if mode in ("RGB", "L") else "a.png"
    image.save(tmp_path / name, quality=90)
    for channels in (1, 3):
        loaded, _ = build_source(folder_config(tmp_path, channels=channels)).load(0)
        with Image.open(tmp_path / name) as reread:
            expected = np.array(reread.convert("L" if channels == 1 else "RGB"))
        assert loaded.dtype == torch.uint8 and torch.equal(
            loaded, torch.from_numpy(expected).reshape(12, 10, -1).permute(2, 0, 1)
        )
