"""Dense evaluation: the linear segmentation probe, its token maps and baselines, the segmentation folder source and
its bad-input errors, and `mimkit eval segment` / `mimkit viz --what segmentation` end to end on a tiny run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError, DataInfo
from mimkit.data.sources import SegFolderConfig, SegFolderSource
from mimkit.data.views import EvalView
from mimkit.engine.train import pretrain
from mimkit.eval.segment import PatchPixels, TokenMaps, train_segmentation_probes
from mimkit.eval.segmentation_scores import IGNORE_INDEX
from mimkit.runs import load_run_config
from support import IBOT_RECIPE, QUIET_CPU_RUN, ROOT, SYNTHETIC_28, TINY_IBOT_HEADS

# ---------------------------------------------------------------------------------------------------
# the probe


def toy_token_maps(images: int, classes: int, seed: int) -> TokenMaps:
    """4x4 token grids whose tokens carry their class along one feature direction each (plus noise), label maps of
    16x16 pixels with each token's class on its 4x4 pixels: linearly separable per token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, classes, (images, 4, 4), generator=g)
    tokens = torch.nn.functional.one_hot(ids, 8).float() * 3 + 0.3 * torch.randn(images, 4, 4, 8, generator=g)
    targets = ids.repeat_interleave(4, 1).repeat_interleave(4, 2).to(torch.uint8)
    targets[:, 0, 0] = IGNORE_INDEX  # one unscored pixel per image
    return TokenMaps(tokens, targets)


def test_the_probe_learns_a_linearly_separable_toy_task() -> None:
    result = train_segmentation_probes(
        toy_token_maps(64, 5, seed=0), toy_token_maps(32, 5, seed=1), 5, lrs=(1e-4, 0.1), epochs=10, batch_size=16
    )
    tiny, good = result.scores
    assert good.miou > 0.9 and good.pixel_accuracy > 0.95  # bilinear upsampling blurs only the tokens' borders
    assert tiny.miou < good.miou and result.best_lr == 0.1 and result.best == good
    assert "**0.1**" in result.to_markdown()


def test_without_standardisation_the_head_reads_the_raw_tokens() -> None:
    train = toy_token_maps(32, 3, seed=4)
    train.tokens += 5.0  # far from zero mean: standardisation would move it
    plain = train_segmentation_probes(train, train, 3, lrs=(0.1,), epochs=2, batch_size=16, standardise=False)
    assert plain.probe is not None
    assert torch.equal(plain.probe.mean, torch.zeros(8)) and torch.equal(plain.probe.std, torch.ones(8))
    standardised = train_segmentation_probes(train, train, 3, lrs=(0.1,), epochs=2, batch_size=16)
    assert standardised.probe is not None and standardised.probe.mean.min() > 4


def test_each_head_of_a_sweep_is_the_probe_its_lr_alone_gives() -> None:
    train, test = toy_token_maps(24, 4, seed=2), toy_token_maps(8, 4, seed=3)
    sweep = train_segmentation_probes(train, test, 4, lrs=(0.01, 0.3), epochs=3, batch_size=8)
    alone = train_segmentation_probes(train, test, 4, lrs=(0.3,), epochs=3, batch_size=8)
    assert sweep.probe is not None and alone.probe is not None
    torch.testing.assert_close(sweep.probe.weight[1], alone.probe.weight[0], rtol=1e-4, atol=1e-6)
    assert sweep.scores[1] == alone.scores[0]


def test_patch_pixels_are_each_patch_s_own_pixels_on_the_encoder_s_grid() -> None:
    images = torch.randn(2, 3, 28, 28)
    tokens = PatchPixels(7, 28)(images)
    assert tokens.shape == (2, 16, 3 * 49)
    torch.testing.assert_close(tokens[1, 5], images[1, :, 7:14, 7:14].flatten())  # row 1, column 1
    padded = PatchPixels(8, 28)(images)  # 28 px at stride 8: 4x4 cells, the last ones padded, as a CNN's grid
    assert PatchPixels(8, 28).grid(28, 28) == (4, 4) == PatchPixels(7, 28).grid(28, 28)
    assert padded.shape == (2, 16, 3 * 64)
    torch.testing.assert_close(padded[0, 15].view(3, 8, 8)[:, :4, :4], images[0, :, 24:, 24:])
    assert padded[0, 15].view(3, 8, 8)[:, 4:, :].abs().sum() == 0


def test_label_maps_follow_their_image_through_the_evaluation_view() -> None:
    view = EvalView(DataInfo("x", 1, 1, None, None, (0.5,), (0.25,)), 16)
    labels = torch.zeros(40, 30, dtype=torch.long)
    labels[:, 15:] = 3  # right half class 3
    labels[0, 0] = IGNORE_INDEX
    image = (labels.clamp(max=3) * 60).to(torch.uint8)[None]
    mapped = view.label_map(labels)
    assert mapped.shape == (16, 16) and set(mapped.unique().tolist()) <= {0, 3, IGNORE_INDEX}  # no invented ids
    assert torch.equal(mapped == 3, view(image)[0] > view(image)[0].mean())  # same resize and crop as the image
    assert torch.equal(view.label_map(mapped), mapped)  # already at the size: untouched


# ---------------------------------------------------------------------------------------------------
# the segmentation folder source


def write_segfolder(root: Path, images: int = 6, size: int = 28, classes: int = 3) -> Path:
    """ADE20K's layout with `images` gray images per split (train, test), each a bright disc of class 1 + index % 2
    on background 0, and a classes.txt."""
    y, x = np.mgrid[:size, :size]
    for split in ("train", "test"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(images):
            disc = (y - size / 2) ** 2 + (x - size / 2 - (i % 3)) ** 2 < (size / 4) ** 2
            ids = (disc * (1 + i % 2)).astype(np.uint8)
            pixels = (ids * 100 + np.random.default_rng(i).integers(0, 40, ids.shape)).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / "images" / split / f"{i:03d}.png")
            Image.fromarray(ids, "L").save(root / "annotations" / split / f"{i:03d}.png")
    (root / "classes.txt").write_text("\n".join(["background", "disc", "other disc", "never seen"][:classes]) + "\n")
    return root


def segfolder(root: Path, split: str = "train", **options: object) -> SegFolderSource:
    cfg = DataConfig(source="segfolder", root=str(root), options=SegFolderConfig(**options))  # type: ignore[arg-type]
    return SegFolderSource(cfg, split)


def test_a_segmentation_folder_gives_images_label_maps_and_class_names(tmp_path: Path) -> None:
    source = segfolder(write_segfolder(tmp_path))
    image, label = source.load(1)
    assert image.shape == (1, 28, 28) and label == -1 and len(source) == 6
    assert source.segmentation_classes() == ("background", "disc", "other disc")
    assert set(source.label_map(1).unique().tolist()) == {0, 2}
    source.check_label_maps()


def test_palette_label_maps_are_read_as_their_indices_and_zero_can_be_ignored(tmp_path: Path) -> None:
    write_segfolder(tmp_path)
    path = tmp_path / "annotations" / "train" / "001.png"
    ids = np.asarray(Image.open(path))
    palette = Image.fromarray(ids, "P")
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255] * (253 * 3))  # VOC-style colours for ids 0, 1, 2
    palette.save(path)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(segfolder(tmp_path).label_map(1).numpy(), ids)
    reduced = segfolder(tmp_path, reduce_zero_label=True).label_map(1).numpy()
    np.testing.assert_array_equal(reduced, np.where(ids == 0, IGNORE_INDEX, ids.astype(np.int64) - 1))


def test_reduce_zero_label_keeps_unscored_pixels_and_out_of_range_ids(tmp_path: Path) -> None:
    write_segfolder(tmp_path)
    ids = np.array([[0, 1, 2], [255, 256, 3]], dtype=np.uint16)
    Image.fromarray(np.kron(ids, np.ones((14, 10), np.uint16))[:28, :28]).save(
        tmp_path / "annotations" / "train" / "000.png"
    )
    reduced = segfolder(tmp_path, reduce_zero_label=True).label_map(0)
    assert reduced[0, :10].unique().tolist() == [IGNORE_INDEX] and reduced[0, 10:20].unique().tolist() == [0]
    assert reduced[14, :10].unique().tolist() == [IGNORE_INDEX]  # 255 stays unscored
    assert reduced[14, 10:20].unique().tolist() == [256]  # 256 is not folded into 255: the id check reports it


def test_colour_coded_label_maps_are_refused_with_the_way_to_convert_them(tmp_path: Path) -> None:
    write_segfolder(tmp_path)
    path = tmp_path / "annotations" / "train" / "002.png"
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(DataError, match=r"002\.png: the label map is a RGB image.*mode-L PNG"):
        segfolder(tmp_path).check_label_maps()


def test_missing_label_maps_or_class_list_are_named(tmp_path: Path) -> None:
    write_segfolder(tmp_path)
    (tmp_path / "annotations" / "test" / "004.png").unlink()
    with pytest.raises(DataError, match=r"1 of 6 images .* have no label map, e\.g\. .*test/004\.png"):
        segfolder(tmp_path, "test")
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DataError, match=r"classes\.txt not found.*one per line"):
        segfolder(tmp_path)


# ---------------------------------------------------------------------------------------------------
# the command


def assert_refused(capsys: pytest.CaptureFixture[str], message: str, *argv: str) -> None:
    """The command stops with exit code 2 (bad input) and `message` (a regular expression) on stderr, no traceback."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch iBOT run (ViT of 2 blocks, width 32, 7-pixel patches) on 24 synthetic 28x28 images, 4 classes."""
    overrides = [
        "method.backbone.patch_size=7",
        "method.backbone.embed_dim=32",
        "method.backbone.depth=2",
        "method.backbone.num_heads=2",
        *TINY_IBOT_HEADS,
        "method.views.num_local=0",
        *SYNTHETIC_28,
        "data.synthetic.images=24",
        "data.batch_size=8",
        "train.epochs=1",
        *QUIET_CPU_RUN,
        f"output_dir={tmp_path_factory.mktemp('segment') / 'run'}",
    ]
    return pretrain(load_run_config(IBOT_RECIPE, overrides))


def test_eval_segment_with_baselines_saves_scores_history_and_a_drawable_probe(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "segment", str(run_dir), "--baselines", "--epochs", "2", "--lrs", "0.1", "1"]) == 0
    out = capsys.readouterr().out
    assert "4x4 tokens upsampled to 28x28" in out and "raw pixels:" in out
    for name in ("segment", "segment_random_init", "segment_raw_pixels"):
        saved = json.loads((run_dir / "eval" / f"{name}.json").read_text())
        assert [row["lr"] for row in saved["table"]] == [0.1, 1.0] and saved["grid"] == [4, 4]
        assert saved["classes"] == ["background", "square", "disk", "bars", "cross"]
        assert 0 < saved["miou"] <= 1 and saved["miou"] == max(row["miou"] for row in saved["table"])
    assert main(["runs", "show", str(run_dir)]) == 0
    assert "eval segment_raw_pixels" in capsys.readouterr().out
    from mimkit.run_summary import result_rows, summarize

    rows = result_rows([summarize(run_dir)])
    pretrained = json.loads((run_dir / "eval" / "segment.json").read_text())["miou"]
    assert rows["segment mIoU (%)"] == [pytest.approx(100 * pretrained)] and "segment top-1 (%)" not in rows
    assert main(["viz", str(run_dir), "--what", "segmentation", "--images", "2"]) == 0
    figure = run_dir / "report" / "segmentation.png"
    assert figure.stat().st_size > 1000
    figure.unlink()
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 10**9))  # trained on
    capsys.readouterr()
    assert main(["viz", str(run_dir), "--what", "segmentation", "--images", "2"]) == 0
    assert "was trained on another checkpoint; run mimkit eval segment again; skipped" in capsys.readouterr().out
    assert not figure.exists()


def test_eval_segment_on_a_segmentation_folder(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_segfolder(tmp_path / "data")
    data = ["data.source=segfolder", "data.synthetic=null", f"data.root={root}", "data.channels=1"]
    assert main(["eval", "segment", str(run_dir), *data, "--epochs", "3", "--lrs", "0.3"]) == 0
    assert "3 classes" in capsys.readouterr().out
    saved = json.loads((run_dir / "eval" / "segment.json").read_text())
    assert (
        set(saved["per_class_iou"]) == {"background", "disc", "other disc"} and saved["data"]["source"] == "segfolder"
    )


def damaged_segfolder(case: str, root: Path) -> list[str]:
    """A segmentation folder with one of the catalogue's faults in image 003 of the eval split; the data overrides
    that evaluate on it."""
    write_segfolder(root)
    path = root / "annotations" / "test" / "003.png"
    ids = np.asarray(Image.open(path))
    if case == "label-map-size":
        Image.fromarray(ids).resize((20, 20), Image.NEAREST).save(path)
    elif case == "label-ids-beyond-classes":
        Image.fromarray(np.where(ids > 0, 7, 0).astype(np.uint8), "L").save(path)
    elif case == "colour-coded-label-map":
        Image.open(path).convert("RGB").save(path)
    elif case == "missing-label-map":
        path.unlink()
    elif case == "no-label-maps":
        return ["data.source=imagefolder", "data.synthetic=null", f"data.root={root / 'images'}", "data.channels=1"]
    return ["data.source=segfolder", "data.synthetic=null", f"data.root={root}", "data.channels=1"]


SEGMENTATION_CASES = {
    "label-map-size": r"003\.png: the label map is 20x20 but its image .* is 28x28.*nearest-neighbour",
    "label-ids-beyond-classes": r"003\.png \(ids \[7\] lie outside the 3 classes.*set such pixels to 255",
    "colour-coded-label-map": r"003\.png: the label map is a RGB image.*mode-L PNG",
    "missing-label-map": r"1 of 6 images under .*test have no label map, e\.g\. .*test/003\.png",
    "no-label-maps": r"has no label maps; dense evaluation needs a source that has them \(synthetic, fashion-mnist, "
    "segfolder",
}
"""docs/troubleshooting.md's "Segmentation data" entries and what each prints."""


@pytest.mark.parametrize("case", sorted(SEGMENTATION_CASES))
def test_bad_segmentation_data_stops_eval_segment_before_any_probe_trains(
    run_dir: Path, tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = damaged_segfolder(case, tmp_path / "data")
    import mimkit.eval.dense

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a probe was trained")

    def results() -> dict[str, int]:
        return (
            {p.name: p.stat().st_mtime_ns for p in (run_dir / "eval").glob("*")} if (run_dir / "eval").exists() else {}
        )

    before = results()
    monkeypatch.setattr(mimkit.eval.dense, "train_segmentation_probes", never)
    assert_refused(capsys, SEGMENTATION_CASES[case], "eval", "segment", str(run_dir), *overrides)
    assert results() == before  # nothing written to RUN/eval: no result, no history line, no probe


def test_every_segmentation_case_is_in_the_troubleshooting_page() -> None:
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    section = text[text.index("## Segmentation data") :].split("\n## ", 1)[0]
    assert set(SEGMENTATION_CASES) <= set(re.findall(r"^### `([a-z0-9-]+)`", section, flags=re.M))


def test_the_command_s_default_lrs_are_the_library_s() -> None:
    from mimkit.commands.eval import segment as segment_command
    from mimkit.eval import segment

    assert segment_command.SEGMENT_LRS == segment.SEGMENT_LRS


def test_separable_upsampling_equals_bilinear_interpolation() -> None:
    from mimkit.eval.segment import bilinear_weights

    maps = torch.randn(3, 5, 4, 6)
    expected = torch.nn.functional.interpolate(maps, size=(28, 30), mode="bilinear", align_corners=False)
    found = torch.einsum("nchw,Hh,Ww->ncHW", maps, bilinear_weights(28, 4), bilinear_weights(30, 6))
    torch.testing.assert_close(found, expected)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_bad_label_map_seen_by_one_torchrun_process_stops_both(run_dir: Path, tmp_path: Path) -> None:
    """The process that reads the bad map says which; the other stops too instead of waiting in the gather."""
    overrides = damaged_segfolder("label-ids-beyond-classes", tmp_path / "data")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mimkit"]
    command = [*launcher, "eval", "segment", str(run_dir), *overrides, "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert re.search(SEGMENTATION_CASES["label-ids-beyond-classes"], done.stderr), done.stderr[-3000:]
    assert "mimkit: error: dense evaluation of segfolder:" in done.stderr and "another process found bad data" in (
        done.stderr
    )
