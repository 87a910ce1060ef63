"""The bad-input catalogue of docs/troubleshooting.md: every user mistake exits 2 (or warns) with a message that
names the problem and the fix, and never with a Python traceback. Each case's id is a heading of that page."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.engine.train import pretrain
from mimkit.procedures.tokenizer_fit import fit_tokenizer, load_tokenizer_recipe
from mimkit.runs import load_run_config
from support import IBOT_RECIPE, QUIET_CPU_RUN, ROOT, SYNTHETIC_28, TINY_IBOT_HEADS, TINY_TOKENIZER, tiny_overlay

TOY = str(ROOT / "tests" / "recipes" / "toy.yaml")
RECIPE = str(IBOT_RECIPE)
TINY = ["method.backbone.embed_dim=32", "method.backbone.depth=1", "method.backbone.num_heads=2", *TINY_IBOT_HEADS]
DOC = ROOT / "docs" / "troubleshooting.md"
CIM_RECIPE = str(ROOT / "configs" / "cim" / "vit_tiny_fmnist_respix.yaml")
DALL_E = str(ROOT / "configs" / "tokenizers" / "dall_e.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    overrides = [*TINY, *SYNTHETIC_28, "data.synthetic.images=8", "data.batch_size=4", "train.epochs=1"]
    out = tmp_path_factory.mktemp("run") / "ibot"
    if not TINY_TOKENIZER.is_file():  # CIM cases read it; fitting it here keeps their output to the message
        fit_tokenizer(load_tokenizer_recipe(ROOT / "tests" / "tiny" / "tokenizer.yaml", [f"output={TINY_TOKENIZER}"]))
    return pretrain(load_run_config(IBOT_RECIPE, [*overrides, *QUIET_CPU_RUN, f"output_dir={out}"]))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("files") / "image.png"
    Image.new("RGB", (8, 8)).save(path)
    return path


def list_recipe(folder: Path) -> Path:
    """A YAML file whose top level is a list, as a hand-written recipe can be by mistake."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "list.yaml").write_text("- method: ibot\n- data: {}\n")
    return folder / "list.yaml"


def split_folders(folder: Path) -> Path:
    """An image folder whose train split has class folders and whose test split has none (no labels)."""
    for name in ("train/a/1.png", "train/b/2.png", "test/3.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(folder / name)
    return folder


Case = Callable[[Path, Path, Path], list[str]]
CASES: dict[str, tuple[Case, str]] = {
    "crop-larger-than-img-size": (
        lambda run, image, tmp: ["pretrain", "-c", RECIPE, "method.views.global_size=56", "--print-config"],
        r"method.views.global_size: 56 is larger than the backbone's img_size \(28\)",
    ),
    "local-crops-larger-than-global": (
        lambda run, image, tmp: ["pretrain", "-c", RECIPE, "method.views.local_size=42", "--print-config"],
        r"method.views.local_size: local crops \(42\) larger than the global ones \(28\)",
    ),
    "more-cpu-processes-than-cores": (
        lambda run, image, tmp: ["pretrain", "-c", TOY, f"output_dir={tmp}", "--devices", "999"],
        r"train.devices: 999 processes on a CPU with \d+ cores; each needs a core of its own, so use --devices \d+",
    ),
    "unknown-augment-on": (
        lambda run, image, tmp: ["pretrain", "-c", RECIPE, "data.augment_on=gpu", "--print-config"],
        r"data.augment_on: must be one of 'auto', 'worker', 'device'; got 'gpu'",
    ),
    "broken-override": (
        lambda run, image, tmp: ["pretrain", "-c", RECIPE, "optim.betas=[0.9,", "--print-config"],
        r"override 'optim.betas=\[0.9,': its value is not valid YAML .*close its brackets",
    ),
    "not-a-weights-file": (
        lambda run, image, tmp: [
            *["pretrain", "-c", RECIPE, *TINY, "data.source=synthetic", f"output_dir={tmp}"],
            f"method.backbone.weights={image}",
        ],
        r"method.backbone.weights: .*image.png is not a weights file .*give timm weights",
    ),
    "mimkit-checkpoint-as-weights": (
        lambda run, image, tmp: [
            *["pretrain", "-c", RECIPE, *TINY, "data.source=synthetic", f"output_dir={tmp}"],
            f"method.backbone.weights={run / 'checkpoints' / 'last.ckpt'}",
        ],
        r"is a mimkit checkpoint, not timm weights; export its encoder first \(mimkit export RUN\)",
    ),
    "not-a-checkpoint": (
        lambda run, image, tmp: ["eval", "linear", str(image)],
        r"image.png is not a readable mimkit checkpoint \(UnpicklingError\); give a run folder or a .ckpt file",
    ),
    "k-below-one": (
        lambda run, image, tmp: ["eval", "knn", str(run), "--k", "0"],
        r"--k: every k must be >= 1; got 0",
    ),
    "lr-not-positive": (
        lambda run, image, tmp: ["eval", "linear", str(run), "--lrs", "0.1", "-1"],
        r"--lrs: every lr must be > 0; got 0.1 -1.0",
    ),
    "k-larger-than-the-bank": (
        lambda run, image, tmp: ["eval", "knn", str(run), "--k", "500", "--limit", "8"],
        r"--k: 500 neighbours of only 8 training images; use k <= 8",
    ),
    "no-such-run": (
        lambda run, image, tmp: ["eval", "knn", str(tmp / "missing")],
        r"no checkpoint at .*missing \(give a run folder or a .ckpt file\)",
    ),
    "missing-tokenizer": (
        lambda run, image, tmp: [
            *["pretrain", "-c", CIM_RECIPE, "method.tokenizer_recipe=null", f"method.tokenizer={tmp}/none.pt"],
            *SYNTHETIC_28,
            f"output_dir={tmp}",
        ],
        r"method.tokenizer: .*none.pt does not exist; make it with: mimkit tokenizer fit -c tokenizers/",
    ),
    "dall-e-files-missing": (
        lambda run, image, tmp: ["tokenizer", "fit", "-c", DALL_E, "data.source=synthetic", f"output={tmp}/t.pt"],
        r"tokenizer: encoder file weights/dall_e/encoder.pkl does not exist; download encoder.pkl and decoder.pkl",
    ),
    "token-grid-mismatch": (
        lambda run, image, tmp: [
            *["pretrain", "-c", CIM_RECIPE, "method.generator.patch_size=4", f"output_dir={tmp}"],
            *tiny_overlay("cim")["overrides"][:2],  # the tiny tokenizer (never one in the checkout's tokenizers/)
            *SYNTHETIC_28,
        ],
        r"method.generator.patch_size: the generator's grid \(7, 7\) must be the token grid \(4, 4\): give it patch",
    ),
    "unknown-field": (
        lambda run, image, tmp: ["pretrain", "-c", RECIPE, "optim.lrr=1", "--print-config"],
        r"optim.lrr: unknown field; did you mean 'optim.lr'\?",
    ),
    "unknown-data-source": (
        lambda run, image, tmp: ["pretrain", "-c", RECIPE, "data.source=synthtic", "--print-config"],
        r"data.source: unknown source 'synthtic'; did you mean 'synthetic'\? \(registered: fashion-mnist, imagefolder",
    ),
    "section-of-another-source": (
        lambda run, image, tmp: ["pretrain", "-c", RECIPE, "data.synthetic.size=16", "--print-config"],
        r"data.synthetic: a section for source 'synthetic', which is not the chosen one \(data.source is "
        r"'fashion-mnist'\); remove it or set data.synthetic=null",
    ),
    "finetune-protocol-for-another-family": (
        lambda run, image, tmp: ["eval", "finetune", str(run), "-c", "finetune/resnet50_rsb", f"--out={tmp}"],
        r"method.families: this protocol is for resnet encoders and vit_tiny_patch16_224 is a vit; pick a protocol",
    ),
    "finetune-eval-split-without-labels": (
        lambda run, image, tmp: [
            *["eval", "finetune", str(run), f"--out={tmp}", "data.source=imagefolder", "data.synthetic=null"],
            f"data.root={split_folders(tmp.parent / 'photos')}",
        ],
        r"data.eval_split: 'test' of imagefolder has no labels, and fine-tuning scores on it; .*data.val_fraction",
    ),
    "global-batch-does-not-divide": (
        lambda run, image, tmp: [
            *["pretrain", "-c", TOY, f"output_dir={tmp}"],
            *["data.global_batch=10", "optim.accumulate_grad_batches=4"],
        ],
        r"data.global_batch: 10 images do not divide over 1 process\(es\) x 4 .*multiple of 4 \(e.g. 8 or 12\)",
    ),
    "recipe-not-a-mapping": (
        lambda run, image, tmp: ["pretrain", "-c", str(list_recipe(tmp)), "--print-config"],
        r"list.yaml holds a YAML list, not a recipe: a recipe is a mapping of sections \(method:, data:",
    ),
}
if not torch.cuda.is_available():
    CASES["fsdp-on-a-cpu"] = (
        lambda run, image, tmp: ["pretrain", "-c", TOY, f"output_dir={tmp}", "--devices", "1", "--strategy", "fsdp"],
        r"train.strategy: fsdp shards the model across GPUs .*on a CPU use --strategy ddp",
    )
    CASES["gpu-without-a-gpu"] = (
        lambda run, image, tmp: ["pretrain", "-c", TOY, f"output_dir={tmp}", "--accelerator", "gpu"],
        r"train.accelerator: gpu, but torch sees no CUDA device .*use --accelerator cpu",
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mistake_exits_2_with_a_message_that_names_the_fix(
    case: str, run: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, expected = CASES[case]
    capsys.readouterr()
    code = main(build(run, image, tmp_path / "out"))
    out, err = capsys.readouterr()
    assert code == 2, (out + err)[-2000:]
    assert re.search(expected, err), err
    assert "Traceback" not in err and "weights_only" not in err
    assert err.count("\n") <= 3, err  # one message, not a dump


TESTED_ELSEWHERE = {
    "unwritable-output-dir": "test_faults.py",
    "full-disk": "test_bad_disk.py",
    "non-finite-loss": "test_faults.py",
    "unreadable-images": "test_data_sources.py",
    "resume-changes": "test_resume.py",
    "damaged-checkpoint": "test_checkpoint.py",
    "ctrl-c": "test_resume.py",
    "masks-never-mask": "test_mask_ratio.py",
    "masks-far-off": "test_mask_ratio.py",
    "tokenizer-refit-on-other-data": "test_tokenizers.py",
    "data-bound-run": "test_feed.py",
    "finetune-resume-changes": "test_finetune.py",
}
"""Entries of the page whose cases need a run in progress (a fault, a signal, a warning), tested in these files."""


def test_every_case_is_in_the_troubleshooting_page() -> None:
    headings = set(re.findall(r"^### `?([a-z0-9-]+)`?", DOC.read_text(), flags=re.M))
    assert set(CASES) | set(TESTED_ELSEWHERE) <= headings, sorted(set(CASES) | set(TESTED_ELSEWHERE) - headings)


def test_every_entry_of_the_troubleshooting_page_has_a_test() -> None:
    """Each `### id` is a case of a catalogue test (its id as a string in a test file) or tested elsewhere."""
    headings = re.findall(r"^### `?([a-z0-9-]+)`?", DOC.read_text(), flags=re.M)
    tests = " ".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name)
    untested = [h for h in headings if h not in CASES and h not in TESTED_ELSEWHERE and f'"{h}"' not in tests]
    assert not untested, untested
    assert all((ROOT / "tests" / name).is_file() for name in TESTED_ELSEWHERE.values())


def test_overrides_are_accepted_after_flags(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "knn", str(run), "--k", "1", "data.num_workers=0", "--limit", "8"]) == 0
    assert main(["pretrain", "-c", RECIPE, "--precision", "32-true", "optim.lr=0.5", "--print-config"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "fetch", "fashion-mnist", "optim.lr=1"])  # a command without overrides says so


def test_a_data_error_in_a_worker_shows_its_message_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos" / "a"
    folder.mkdir(parents=True)
    for i in range(7):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(folder / f"{i}.png")
    (folder / "broken.png").write_text("not an image")
    args = ["pretrain", "-c", TOY, f"output_dir={tmp_path / 'run'}", "data.source=imagefolder", "data.synthetic=null"]
    args += [f"data.root={tmp_path / 'photos'}", "data.batch_size=4", "method.crop=8", "data.strict=true"]
    assert main([*args, "data.num_workers=1"]) == 2
    err = capsys.readouterr().err
    assert "unreadable image" in err and "broken.png" in err and "data.strict=false" in err
    assert "Original Traceback" not in err and "Traceback" not in err


def test_crops_larger_than_the_images_warn_that_they_are_upsampled(tmp_path: Path) -> None:
    sizes = ["method.backbone.img_size=56", "method.views.global_size=56", "method.views.local_size=28"]
    overrides = [*TINY, *SYNTHETIC_28, "data.synthetic.images=4", "data.batch_size=4", "train.epochs=1", *sizes]
    run = pretrain(load_run_config(IBOT_RECIPE, [*overrides, *QUIET_CPU_RUN, f"output_dir={tmp_path / 'run'}"]))
    log = (run / "train.log").read_text()
    assert "the images are 28x28 and the encoder trains at 56 px: every crop is upsampled" in log
