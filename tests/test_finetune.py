"""Fine-tuning on the engine: per-image mixing and drop path, layer-wise lr decay, the protocols, the run (scores,
best weights, resume, two processes) and its bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from mimkit.config import ConfigError, read_yaml
from mimkit.data.classify import NO_PARTNER, ClassifyViewConfig, ClassifyViews
from mimkit.data.config import DataConfig
from mimkit.data.info import DataInfo
from mimkit.data.loader import ViewDataset
from mimkit.data.mixing import Mix, MixConfig, draw_mix, mix_images, soft_targets
from mimkit.data.sources import SyntheticShapes
from mimkit.engine.logs import read_metrics
from mimkit.eval import finetune as ft
from mimkit.methods.finetune import Finetune
from mimkit.methods.saved import read_checkpoint
from mimkit.models.drop_path import SeededDropPath
from mimkit.recipes import find_recipe, shipped_recipes
from mimkit.runs import load_run_config
from support import QUIET_CPU_RUN, ROOT, assert_same_losses, logged_losses

TINY_VIT = {"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 16, "in_chans": 1}
TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 32], "in_chans": 1}
SYNTHETIC = ["data.source=synthetic", "data.synthetic.size=16", "data.synthetic.images=32", "data.global_batch=8"]
QUICK = [*SYNTHETIC, *QUIET_CPU_RUN, "train.epochs=2", "train.log_every_steps=1", "optim.warmup_epochs=1"]
PROTOCOLS = [r.name for r in shipped_recipes("finetune")]


def export_folder(folder: Path, name: str, args: dict, size: int = 16) -> Path:
    """A folder as `mimkit export` writes it, of a random timm model: what a fine-tune can start from."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **args)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config = {"architecture": name, "model_args": args, "pretrained_cfg": {"input_size": [1, size, size]}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_folder(tmp_path_factory.mktemp("export") / "vit", "vit_tiny_patch16_224", TINY_VIT)


def info(channels: int = 1) -> DataInfo:
    return DataInfo("synthetic", channels, 32, (16, 16), 4, (0.5,) * channels, (0.25,) * channels)


# ------------------------------------------------------------------------------------------------
# parts


def test_cutmix_coefficient_is_the_kept_area_and_mixup_interpolates() -> None:
    torch.manual_seed(0)
    cut = draw_mix(MixConfig(mixup=0.0, cutmix=1.0), 16, 16)
    assert cut.box is not None
    a, b = torch.zeros(1, 16, 16), torch.ones(1, 16, 16)
    assert 1 - mix_images(a, b, cut).mean().item() == pytest.approx(cut.lam)
    assert mix_images(a, b, Mix(0.25)).unique().tolist() == [0.75]
    assert draw_mix(MixConfig(prob=0.0), 16, 16) == Mix()


def test_soft_targets_mix_smoothed_labels() -> None:
    targets = soft_targets(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([0.75, 1.0]), 4, 0.1)
    assert targets.sum(1).tolist() == pytest.approx([1.0, 1.0])
    first = [0.75 * 0.925 + 0.25 * 0.025, 0.75 * 0.025 + 0.25 * 0.925, 0.025, 0.025]
    assert targets[0].tolist() == pytest.approx(first)
    assert targets[1].tolist() == pytest.approx([0.025, 0.925, 0.025, 0.025])


def test_seeded_drop_path_decides_per_image_so_a_batch_equals_its_halves() -> None:
    """What makes drop path independent of how a batch is split over processes."""
    torch.manual_seed(0)
    cfg = load_run_config(None, base=_base("vit_tiny_patch16_224", TINY_VIT, drop_path_rate=0.5)).method
    task = Finetune(cfg, info()).train()
    rates = [m.rate for m in task.modules() if isinstance(m, SeededDropPath)]
    assert len(rates) == task.draws.count == 6 and rates == sorted(rates) and max(rates) == pytest.approx(0.5)
    images, uniforms = torch.randn(4, 1, 16, 16), torch.rand(4, task.draws.count)
    task.draws.uniforms = uniforms
    whole = task.classifier(images)
    halves = []
    for part in (slice(0, 2), slice(2, 4)):
        task.draws.uniforms = uniforms[part]
        halves.append(task.classifier(images[part]))
    assert torch.allclose(whole, torch.cat(halves), atol=1e-6)
    task.draws.uniforms = torch.zeros(4, task.draws.count)  # every branch kept: scaled by 1 / keep
    kept = task.classifier(images)
    task.draws.uniforms = torch.ones(4, task.draws.count)  # every branch dropped
    assert not torch.allclose(kept, task.classifier(images))
    task.eval()
    assert not torch.allclose(kept, task.classifier(images))  # eval: no drop, no scaling


def test_views_mix_with_a_partner_drawn_under_the_image_seed() -> None:
    source = SyntheticShapes(load_run_config(ROOT / "tests" / "recipes" / "toy.yaml").data, "train")
    views = ClassifyViews(source.info, 16, ClassifyViewConfig(mix=MixConfig(prob=1.0)), drops=3)
    dataset = ViewDataset(source, views, seed=0)
    first, _, _ = dataset[(0, 5)]
    again, _, _ = dataset[(0, 5)]
    other_epoch, _, _ = dataset[(1, 5)]
    assert torch.equal(first["image"], again["image"]) and not torch.equal(first["image"], other_epoch["image"])
    assert first["image"].shape == (1, 16, 16) and first["drops"].shape == (3,)
    assert 0 <= first["lam"] <= 1 and first["partner_label"] != NO_PARTNER
    unmixed = ClassifyViews(source.info, 16, ClassifyViewConfig(mix=MixConfig(prob=0.0), rand_augment=""), drops=0)
    plain, _, _ = ViewDataset(source, unmixed, seed=0)[(0, 5)]
    assert plain["partner_label"] == NO_PARTNER and plain["lam"] == 1.0


def test_rgb_images_take_randaugment_and_erasing() -> None:
    views = ClassifyViews(info(3), 16, ClassifyViewConfig(erase_prob=1.0), drops=0)
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    assert views(image, 0)["image"].shape == (3, 16, 16)


def _base(name: str, args: dict, **backbone: object) -> dict:
    shape = {k: v for k, v in args.items() if k not in ("in_chans", "img_size")}
    return {
        "method": {
            "name": "finetune",
            "backbone": {"name": name, "img_size": 16, "model_args": shape, **backbone},
            "layer_decay": 0.5,
        },
        "data": {"source": "synthetic"},
    }


def test_layer_decay_groups_scale_towards_the_input_and_cover_every_parameter() -> None:
    cfg = load_run_config(None, base=_base("vit_tiny_patch16_224", TINY_VIT)).method
    task = Finetune(cfg, info())
    groups = task.param_groups()
    scale = {id(p): g.lr_scale for g in groups for p in g.params}
    decay = {id(p): g.weight_decay_scale for g in groups for p in g.params}
    trainable = [p for p in task.parameters() if p.requires_grad]
    assert sorted(scale) == sorted(id(p) for p in trainable) and len(scale) == sum(len(g.params) for g in groups)
    vit = task.encoder().timm_model()
    blocks = [block.attn.qkv.weight for block in vit.blocks]
    layers = [vit.patch_embed.proj.weight, *blocks, task.classifier.head.weight]
    assert [scale[id(p)] for p in layers] == [0.5 ** (4 + 1 - i) for i in range(4 + 2)]
    assert decay[id(vit.pos_embed)] == decay[id(vit.cls_token)] == decay[id(vit.blocks[0].norm1.weight)] == 0.0
    assert decay[id(vit.blocks[0].mlp.fc1.weight)] == 1.0


def test_a_frozen_encoder_trains_only_the_head() -> None:
    cfg = load_run_config(None, ["method.freeze=true"], base=_base("vit_tiny_patch16_224", TINY_VIT)).method
    task = Finetune(cfg, info()).train()
    assert [g.name for g in task.param_groups()] == ["head_decay", "head_no_decay"]
    assert not task.encoder().training


def test_a_global_batch_that_does_not_divide_names_the_fix() -> None:
    assert DataConfig(global_batch=1024).process_batch(8, 2) == 64
    with pytest.raises(ConfigError, match=r"1024 images do not divide over 3 process.*multiple of 3 \(e.g. 1023 or"):
        DataConfig(global_batch=1024).process_batch(3, 1)


# ------------------------------------------------------------------------------------------------
# runs


def test_finetune_scores_every_epoch_keeps_the_best_and_starts_from_the_weights(vit: Path, tmp_path: Path) -> None:
    result = ft.finetune(vit, "finetune/vit_base_mae", [*QUICK, "method.ema_decay=0.5"], output_dir=tmp_path / "ft")
    assert [row["epoch"] for row in result.history] == [0, 1]
    assert all(0 <= row["top1"] <= row["top5"] <= 1 and 0 <= row["ema_top1"] <= 1 for row in result.history)
    best = json.loads((tmp_path / "ft" / "best.json").read_text())
    assert best["epoch"] == result.best["epoch"] and best["top1"] == result.best["top1"]
    assert "head.weight" in load_file(str(tmp_path / "ft" / "best.safetensors"))
    saved = read_checkpoint(tmp_path / "ft" / "checkpoints" / "last.ckpt")
    assert saved["config"]["method"]["init"] == str(vit) and saved["world_size"] == 1
    start = Finetune(load_run_config(tmp_path / "ft" / "config.yaml").method, info())
    exported = load_file(str(vit / "model.safetensors"))
    assert all(torch.equal(v, exported[k]) for k, v in start.encoder().timm_model().state_dict().items())


def test_random_init_is_the_baseline_beside_the_run(vit: Path, tmp_path: Path) -> None:
    cfg = ft.finetune_config(ft.pretrained(vit, random_init=True), "finetune/vit_base_mae", QUICK)
    assert cfg.method.init is None and cfg.output_dir == str(vit / "finetune" / "vit_base_mae_random_init")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_protocol_trains_at_a_tiny_shape(protocol: str, tmp_path: Path) -> None:
    resnet = "resnet" in (read_yaml(find_recipe(protocol))["method"].get("families") or [])
    start = (
        export_folder(tmp_path / "resnet", "resnet18", TINY_RESNET)
        if resnet
        else export_folder(tmp_path / "vit", "vit_tiny_patch16_224", TINY_VIT)
    )
    result = ft.finetune(start, protocol, [*QUICK, "train.epochs=1"], output_dir=tmp_path / "ft")
    assert len(result.history) == 1 and all(row["loss"] > 0 for row in read_metrics(tmp_path / "ft") if "loss" in row)


def test_the_linear_protocol_trains_only_the_head_with_sgd(vit: Path, tmp_path: Path) -> None:
    ft.finetune(vit, "finetune/vit_small_ibot_linear", [*QUICK, "train.epochs=1"], output_dir=tmp_path / "ft")
    saved = read_checkpoint(tmp_path / "ft" / "checkpoints" / "last.ckpt")
    exported = load_file(str(vit / "model.safetensors"))
    prefix = "classifier.encoder.vit."
    encoder = {k[len(prefix) :]: v for k, v in saved["method"].items() if k.startswith(prefix)}
    assert encoder.keys() == exported.keys() and all(torch.equal(v, exported[k]) for k, v in encoder.items())
    assert saved["method"]["classifier.head.weight"].shape == (4, 4 * 32)  # [CLS] of the last 4 blocks
    momentum = [s for s in saved["optimizer"]["state"].values() if "momentum_buffer" in s]
    assert len(momentum) == 2  # SGD's, for the head's weight and bias only


def test_a_protocol_for_another_family_is_refused_before_any_work(tmp_path: Path) -> None:
    resnet = export_folder(tmp_path / "resnet", "resnet18", TINY_RESNET)
    with pytest.raises(ConfigError, match="this protocol is for vit, beit encoders and resnet18 is a resnet"):
        ft.finetune(resnet, "finetune/vit_base_mae", QUICK, output_dir=tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


def test_an_eval_split_without_labels_is_refused_before_any_work(
    vit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = ft.build_source

    def unlabelled(data: DataConfig, split: str | None = None) -> object:
        source = built(data, split)
        source.info = DataInfo(**{**source.info.__dict__, "num_classes": None})
        return source

    monkeypatch.setattr(ft, "build_source", unlabelled)
    with pytest.raises(ConfigError, match=r"data\.eval_split: 'test' of synthetic has no labels.*val_fraction"):
        ft.finetune(vit, "finetune/vit_base_mae", QUICK, output_dir=tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


def test_resuming_with_a_changed_protocol_is_refused_and_loses_nothing(vit: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    ft.finetune(vit, "finetune/vit_base_mae", [*QUICK, "train.epochs=1"], output_dir=out)
    before = (out / "checkpoints" / "last.ckpt").read_bytes(), (out / "metrics.csv").read_text()
    with pytest.raises(ConfigError, match=r"method\.layer_decay: 0\.65 -> 0\.75"):
        ft.finetune(vit, "finetune/vit_large_mae", [*QUICK, "train.epochs=1"], output_dir=out, resume=True)
    assert ((out / "checkpoints" / "last.ckpt").read_bytes(), (out / "metrics.csv").read_text()) == before
    assert len(ft.finetune(vit, "finetune/vit_base_mae", QUICK, output_dir=out, resume=True).history) == 2


KILLED_AT_STEP = """
import os, signal, sys
from mimkit.eval.finetune import finetune
from mimkit.methods.finetune import Finetune
step = Finetune.after_step
def after_step(self, progress):
    step(self, progress)
    if progress.step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
Finetune.after_step = after_step
finetune(sys.argv[1], "finetune/vit_base_mae", sys.argv[3:], output_dir=sys.argv[2])
"""


def test_kill_9_then_resume_logs_the_losses_of_an_uninterrupted_run(vit: Path, tmp_path: Path) -> None:
    overrides = [*QUICK, "train.epochs=3", "train.checkpoint_every_steps=2", "data.num_workers=1"]
    reference = ft.finetune(vit, "finetune/vit_base_mae", overrides, output_dir=tmp_path / "reference").run_dir
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", KILLED_AT_STEP, str(vit), str(run), *overrides]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["position"]["step"] == 6
    ft.finetune(vit, "finetune/vit_base_mae", overrides, output_dir=run, resume=True)
    assert_same_losses(run, reference)
    assert [r["top1"] for r in ft.FinetuneResult.read(run).history] == [
        r["top1"] for r in ft.FinetuneResult.read(reference).history
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_log_the_losses_of_one_at_the_same_global_batch(vit: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mimkit", "eval", "finetune", str(vit), *QUICK, "optim.eps=1e-6"]
    for name, extra in (("one", []), ("two", ["train.devices=2", "train.strategy=ddp"])):
        done = subprocess.run([*command, f"--out={tmp_path / name}", *extra], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) >= 6
    assert max(abs(one[s] - two[s]) / abs(one[s]) for s in one) <= 1e-5, (one, two)
    scores = [ft.FinetuneResult.read(tmp_path / name).history for name in ("one", "two")]
    assert [r["top1"] for r in scores[0]] == [r["top1"] for r in scores[1]]
