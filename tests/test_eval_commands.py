"""`mimkit eval knn|linear|finetune|segment` end to end on a tiny iBOT run over synthetic shapes; last-4 [CLS]
features."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimkit.cli import build_parser, main
from mimkit.commands.eval import knn as knn_command
from mimkit.commands.eval import linear as linear_command
from mimkit.config import ConfigError
from mimkit.engine.train import pretrain
from mimkit.eval import knn, linear
from mimkit.eval.finetune import finetune
from mimkit.eval.frozen import FeatureOptions, KnnConfig, LinearConfig, evaluate_knn, feature_key, linear_probe
from mimkit.eval.probe import LastBlocksCLS, probe_features
from mimkit.eval.results import latest_by_evaluation, read_history, save_result
from mimkit.models.backbones import BackboneConfig, create_timm_model
from mimkit.models.families.vit import MaskableViT
from mimkit.runs import load_run, load_run_config
from support import IBOT_RECIPE, QUIET_CPU_RUN, ROOT, SYNTHETIC_28, TINY_IBOT_HEADS

TINY_RUN = [
    "method.backbone.patch_size=4",
    "method.backbone.embed_dim=32",
    "method.backbone.depth=4",
    "method.backbone.num_heads=2",
    *TINY_IBOT_HEADS,
    "method.views.num_local=1",
    "method.views.local_size=12",
    *SYNTHETIC_28,
    "data.synthetic.images=24",
    "data.limit=20",
    "data.batch_size=8",
    "train.epochs=1",
    *QUIET_CPU_RUN,
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch iBOT run (ViT with 4 blocks of width 32) on 20 of 24 synthetic 28x28 images, 4 classes."""
    return pretrain(load_run_config(IBOT_RECIPE, [*TINY_RUN, f"output_dir={tmp_path_factory.mktemp('ibot')}"]))


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------
# last-4 [CLS] features


def test_last4_features_equal_the_blocks_computed_by_hand(run_dir: Path) -> None:
    encoder = load_run(run_dir).encoder()
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        features = LastBlocksCLS(encoder)(images)
        vit = encoder.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        expected = []
        for block in vit.blocks:
            x = block(x)
            expected.append(vit.norm(x)[:, 0])
        final = encoder(images)[:, 0]
    assert features.shape == (3, 1, 4 * 32)
    torch.testing.assert_close(features[:, 0], torch.cat(expected, dim=-1))
    torch.testing.assert_close(features[:, 0, -32:], final)  # the last block's entry is the usual [CLS]
    assert not any(block._forward_hooks for block in vit.blocks)


def test_evaluation_uses_whole_splits_whatever_the_pretraining_limit(run_dir: Path) -> None:
    assert len(load_run(run_dir).source("train")) == 24
    assert len(load_run(run_dir, ["data.limit=6"]).source("train")) == 6


def test_last4_features_of_a_source_in_dataset_order(run_dir: Path) -> None:
    run = load_run(run_dir)
    source = run.source("test", limit=5)
    features = probe_features(run.encoder(), source, 28, "last4", batch_size=2)
    assert features.features.shape == (5, 128)
    assert features.labels.tolist() == [source.load(i)[1] for i in range(5)]


def test_last4_needs_four_blocks() -> None:
    vit = create_timm_model(BackboneConfig(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2), 1)[0]
    with pytest.raises(ConfigError, match="at least 4 blocks"):
        LastBlocksCLS(MaskableViT(vit))


# ---------------------------------------------------------------------------------------------------
# eval linear


def test_linear_writes_one_row_per_lr_and_picks_the_argmax(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lrs = ["0.001", "0.1", "1.0"]
    code, out, err = cli(capsys, "eval", "linear", str(run_dir), "--variant", "cls", "--lrs", *lrs, "--epochs", "3")
    assert code == 0, err
    result = json.loads((run_dir / "eval" / "linear.json").read_text())
    assert result["variant"] == "cls" and result["selection"] == "test"
    assert [row["lr"] for row in result["table"]] == [float(lr) for lr in lrs]
    assert all(0 <= row["top1"] <= row["top5"] <= 1 for row in result["table"])
    top1 = [row["top1"] for row in result["table"]]
    assert result["best_top1"] == max(top1)
    assert result["best_lr"] == result["table"][top1.index(max(top1))]["lr"]
    assert "| lr | top-1 % | top-5 % |" in out and "selected on the test split" in out


def test_linear_selects_on_held_out_train_features(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "linear", str(run_dir), "--variant", "cls+avg", "--lrs", "0.01", "1.0", "--epochs", "2"]
    code, out, err = cli(capsys, *argv, "--val-fraction", "0.25")
    assert code == 0, err
    result = json.loads((run_dir / "eval" / "linear.json").read_text())
    assert result["selection"] == "val" and "6 held-out train images" in out
    val = [row["val_top1"] for row in result["table"]]
    best = val.index(max(val))
    assert result["best_lr"] == result["table"][best]["lr"] and result["best_top1"] == result["table"][best]["top1"]


def test_linear_cache_reuses_features_without_running_the_encoder(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["eval", "linear", str(run_dir), "--variant", "last4", "--lrs", "0.1", "--epochs", "2", "--cache"]
    assert cli(capsys, *argv)[0] == 0
    cached = [run_dir / "eval" / f"features_last4_{split}.pt" for split in ("train", "test")]
    assert all(path.is_file() for path in cached)
    first = json.loads((run_dir / "eval" / "linear.json").read_text())

    def no_encoder(*args: object, **kwargs: object) -> None:
        raise AssertionError("the encoder ran although the features were cached")

    monkeypatch.setattr(MaskableViT, "forward", no_encoder)
    assert cli(capsys, *argv)[0] == 0
    assert json.loads((run_dir / "eval" / "linear.json").read_text())["table"] == first["table"]
    with pytest.raises(AssertionError, match="the encoder ran"):  # other images: the cache no longer applies
        main([*argv, "--limit", "12"])


def test_random_init_baseline_sits_beside_the_trained_results(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "linear", str(run_dir), "--variant", "cls", "--lrs", "0.1", "--epochs", "2", "--cache"]
    assert cli(capsys, *argv)[0] == 0
    code, out, err = cli(capsys, *argv, "--random-init")
    assert code == 0, err
    assert "random init of" in out
    trained = json.loads((run_dir / "eval" / "linear.json").read_text())
    baseline = json.loads((run_dir / "eval" / "linear_random_init.json").read_text())
    assert not trained["random_init"] and baseline["random_init"]
    features = {
        suffix: torch.load(run_dir / "eval" / f"features_cls_train{suffix}.pt", weights_only=False)
        for suffix in ("", "_random_init")
    }
    assert features[""]["key"]["features_of"] == "pretrained"
    assert not torch.equal(features[""]["features"], features["_random_init"]["features"])


def test_raw_pixel_probe_sits_beside_the_trained_results(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "linear", str(run_dir), "--lrs", "0.1", "--epochs", "2", "--cache"]
    assert cli(capsys, *argv)[0] == 0
    trained = (run_dir / "eval" / "linear.json").read_text()
    code, out, err = cli(capsys, *argv, "--raw-pixels")
    assert code == 0, err
    assert "raw pixels" in out
    baseline = json.loads((run_dir / "eval" / "linear_raw_pixels.json").read_text())
    assert baseline["features_of"] == "raw pixels" and baseline["variant"] == "cls"
    assert (run_dir / "eval" / "linear.json").read_text() == trained
    pixels = torch.load(run_dir / "eval" / "features_cls_train_raw_pixels.pt", weights_only=False)
    assert pixels["features"].shape == (24, 28 * 28)  # synthetic split: every image, 1 x 28 x 28 pixels


def test_linear_takes_one_baseline_at_a_time(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "eval", "linear", str(run_dir), "--raw-pixels", "--random-init")
    assert code == 2 and "--raw-pixels and --random-init" in err


def test_linear_rejects_a_bad_val_fraction(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "eval", "linear", str(run_dir), "--val-fraction", "1.5")
    assert code == 2 and "--val-fraction" in err


# ---------------------------------------------------------------------------------------------------
# eval knn and finetune


def test_knn_writes_accuracies_with_baselines(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "eval", "knn", str(run_dir), "--k", "1", "5", "--baselines", "--batch-size", "8")
    assert code == 0, err
    result = json.loads((run_dir / "eval" / "knn.json").read_text())
    assert set(result["accuracy"]) == {"pretrained", "random init", "raw pixels"}
    for accuracies in result["accuracy"].values():
        assert set(accuracies) == {"1", "5"} and all(0 <= v <= 1 for v in accuracies.values())
    assert result["pooling"] == "cls" and result["temperature"] == 0.07
    assert "k-NN accuracy" in out
    baselines = {name: result["accuracy"][name] for name in ("random init", "raw pixels")}
    assert cli(capsys, "eval", "knn", str(run_dir), "--k", "1", "5", "--batch-size", "8")[0] == 0
    again = json.loads((run_dir / "eval" / "knn.json").read_text())["accuracy"]
    assert {name: again[name] for name in baselines} == baselines  # a plain re-run keeps the baselines
    assert cli(capsys, "eval", "knn", str(run_dir), "--k", "1", "--batch-size", "8", "--pooling", "avg")[0] == 0
    assert set(json.loads((run_dir / "eval" / "knn.json").read_text())["accuracy"]) == {"pretrained"}
    history = [r for r in read_history(run_dir) if r["evaluation"] == "knn"][-3:]  # every one kept, in order
    assert [r["result"]["pooling"] for r in history] == ["cls", "cls", "avg"]
    assert history[0]["headline"].startswith("k=1: pretrained ") and "raw pixels" in history[0]["headline"]
    assert history[0]["result"]["accuracy"]["raw pixels"] == baselines["raw pixels"]


def test_knn_on_a_float16_bank_in_chunks(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("eval", "knn", str(run_dir), "--k", "1", "5", "--batch-size", "8")
    assert cli(capsys, *args)[0] == 0
    float32 = json.loads((run_dir / "eval" / "knn.json").read_text())["accuracy"]["pretrained"]
    assert cli(capsys, *args, "--bank-dtype", "float16", "--bank-chunk", "3")[0] == 0
    result = json.loads((run_dir / "eval" / "knn.json").read_text())
    assert result["bank_dtype"] == "float16"
    assert all(abs(result["accuracy"]["pretrained"][k] - float32[k]) <= 0.05 for k in float32)  # near-ties only
    assert cli(capsys, *args, "--bank-chunk", "0")[0] == 2


def test_python_api_gives_the_commands_results(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = load_run(run_dir)
    options = FeatureOptions(batch_size=8)
    assert cli(capsys, "eval", "knn", str(run_dir), "--k", "1", "5", "--batch-size", "8")[0] == 0
    saved = json.loads((run_dir / "eval" / "knn.json").read_text())["accuracy"]["pretrained"]
    result = evaluate_knn(run, KnnConfig(ks=(1, 5), features=options))
    assert {str(k): v for k, v in result.rows["pretrained"].items()} == saved
    assert result.data["splits"][0]["split"] == "train"
    assert cli(capsys, "eval", "linear", str(run_dir), "--lrs", "0.1", "--epochs", "3", "--batch-size", "8")[0] == 0
    saved = json.loads((run_dir / "eval" / "linear.json").read_text())
    probe = linear_probe(run, LinearConfig(lrs=(0.1,), epochs=3, features=options))
    assert probe.variant == saved["variant"] and probe.probes.best_top1 == saved["best_top1"]


def test_feature_cache_key_names_what_changes_the_features(run_dir: Path) -> None:
    run = load_run(run_dir)
    key = feature_key(run, "train", 28, "cls", None, "pretrained")
    assert key["checkpoint"] == str(run.checkpoint) and key["modified"] == run.checkpoint.stat().st_mtime_ns
    assert {key[name] for name in ("split", "variant", "features_of")} == {"train", "cls", "pretrained"}
    assert feature_key(run, "train", 28, "last4", None, "pretrained") != key
    assert feature_key(run, "train", 28, "cls", 8, "pretrained") != key


def test_finetune_writes_accuracies_and_weights(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "finetune", str(run_dir), "--epochs", "1", "--batch-size", "8", "optim.warmup_epochs=0"]
    code, out, err = cli(capsys, *argv, "--limit", "16", "--num-workers", "0", *QUIET_CPU_RUN)
    assert code == 0, err
    result = json.loads((run_dir / "eval" / "finetune_vit_base_mae.json").read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 1 and len(result["history"]) == 1
    assert result["protocol"] == "finetune/vit_base_mae" and result["init"].endswith("last.ckpt")
    folder = run_dir / "finetune" / "vit_base_mae"
    assert result["run_dir"] == str(folder) and (folder / "checkpoints" / "last.ckpt").is_file()
    assert load_file(str(folder / "best.safetensors"))["head.weight"].shape == (4, 32)
    assert "top-1" in out
    assert cli(capsys, *argv, "--limit", "16", "--num-workers", "0", *QUIET_CPU_RUN, "--random-init")[0] == 0
    assert json.loads((run_dir / "eval" / "finetune_vit_base_mae_random_init.json").read_text())["init"] is None
    latest = latest_by_evaluation(run_dir)
    assert latest["finetune_vit_base_mae_random_init"]["headline"].startswith("vit_base_mae_random_init: top-1 ")
    assert latest["finetune_vit_base_mae"]["result"]["top1"] == result["top1"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("evaluation", ["knn", "linear", "segment"])
def test_two_processes_under_torchrun_share_the_features_and_agree_with_one(
    evaluation: str, run_dir: Path, tmp_path: Path
) -> None:
    """Each process extracts half of every split; the gathered features give the single process's accuracies."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    options = {
        "knn": ["--k", "1", "3"],
        "linear": ["--epochs", "2", "--lrs", "0.1", "--variant", "cls"],
        "segment": ["--epochs", "2", "--lrs", "0.1", "1"],
    }[evaluation]
    results = []
    for launcher in (["-m", "mimkit"], ["-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mimkit"]):
        command = [sys.executable, *launcher, "eval", evaluation, str(run_dir), *options, "--num-workers", "0"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads((run_dir / "eval" / f"{evaluation}.json").read_text()))
    one, two = results
    key = "accuracy" if evaluation == "knn" else "table"
    assert one[key] == two[key]
    assert evaluation != "segment" or one["per_class_iou"] == two["per_class_iou"]


def test_history_skips_a_line_cut_by_a_crash(tmp_path: Path) -> None:
    save_result(tmp_path, "knn", {"accuracy": {"pretrained": {"20": 0.5}}}, "k=20: pretrained 50.00", 0.5)
    with (tmp_path / "eval" / "history.jsonl").open("a") as history:
        history.write('{"time": "2026-12-02T10:00:00", "evalua')
    save_result(tmp_path, "knn", {"accuracy": {"pretrained": {"20": 0.6}}}, "k=20: pretrained 60.00", 0.6)
    assert [r["headline"] for r in read_history(tmp_path)] == ["k=20: pretrained 50.00", "k=20: pretrained 60.00"]
    assert json.loads((tmp_path / "eval" / "knn.json").read_text())["accuracy"]["pretrained"]["20"] == 0.6


@pytest.mark.parametrize("evaluation", ["knn", "linear", "finetune"])
def test_a_wrong_run_path_exits_2(evaluation: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "eval", evaluation, str(tmp_path / "missing"))
    assert code == 2
    assert f"no checkpoint at {tmp_path / 'missing'}" in err and "give a run folder or a .ckpt file" in err


# ---------------------------------------------------------------------------------------------------
# Parsers


def test_parser_defaults_are_the_library_defaults() -> None:
    assert knn_command.DEFAULT_KS == knn.DEFAULT_KS
    assert linear_command.DEFAULT_LRS == linear.DEFAULT_LRS
    args = build_parser().parse_args(["eval", "finetune", "runs/x"])
    assert args.protocol == inspect.signature(finetune).parameters["protocol"].default


def test_eval_help_imports_neither_torch_nor_timm() -> None:
    code = "import sys; from mimkit.cli import main\ntry: main(['eval', 'linear', '--help'])\nexcept SystemExit: pass\n"
    code += "assert not {'torch', 'timm'} & set(sys.modules), 'heavy import'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize("pooling", ["cls", "avg"])
def test_raw_pixel_features_are_the_pixels_for_every_pooling(pooling: str) -> None:
    from mimkit.eval.features import RawPixels, pool_tokens

    images = torch.randn(3, 1, 4, 4)
    tokens = RawPixels()(images)
    torch.testing.assert_close(pool_tokens(tokens, RawPixels(), pooling), images.flatten(1))


def test_the_python_example_of_the_docs_runs(run_dir: Path) -> None:
    text = (ROOT / "docs" / "evaluation.md").read_text()
    code = text.split("## In Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"runs/ibot_vit_tiny_fmnist"', repr(str(run_dir))).replace("batch_size=256", "batch_size=8")
    exec(compile(code, "evaluation.md", "exec"), {})
