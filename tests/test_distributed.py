"""Two CPU processes (DDP over gloo) train like one process at the same global batch: every recipe family (method,
objective, backbone family), losses and final weights; BatchNorm encoders through train.sync_batchnorm."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimkit.engine.logs import read_metrics
from mimkit.engine.runtime import GlobalBatchNorm, sync_batch_norms
from mimkit.methods.saved import read_checkpoint
from mimkit.models.families import family_of
from mimkit.models.heads import GlobalBatchNorm1d
from mimkit.runs import load_run_config
from support import IBOT_RECIPE, ROOT, SYNTHETIC_28, tiny_overlay

TINY_VIT = [
    "method.backbone.embed_dim=32",
    "method.backbone.depth=2",
    "method.backbone.num_heads=2",
    "method.backbone.drop_path_rate=0.0",
    *SYNTHETIC_28,
    "data.synthetic.images=16",
    "data.num_workers=0",
    "optim.eps=1e-6",
]
"""AdamW's eps above the float noise of gradients that are zero in exact arithmetic (an attention key's bias
moves every logit of a query alike): with eps 1e-8, Adam turns that noise into +-lr steps that differ between
any two summation orders, one process or two."""
TINY_RESNET = [
    "method.backbone.model_args={layers: [1, 1, 1, 1], channels: [8, 16, 32, 32], output_stride: 8}",
    *SYNTHETIC_28,
    "data.synthetic.images=32",
    "data.num_workers=0",
    "optim.eps=1e-6",
]
"""The ResNet CIM recipes' small ResNet-18, narrower, for 4 steps (its BatchNorm layers are what a second process
changes)."""
TINY_BEIT = [
    *TINY_VIT,
    "method.backbone.img_size=32",
    "method.backbone.patch_size=8",
    "method.views.size=32",
    "method.mask.min_block_patches=2",
    "data.synthetic.size=32",
    "data.channels=3",
    "train.precision=32-true",
    "train.accelerator=cpu",
]
CONFIGS = ROOT / "configs"
RGB_ON_DEVICE = ["data.channels=3", "data.augment_on=device"]
RUNS = {
    "toy": (ROOT / "tests" / "recipes" / "toy.yaml", ["method.dropout=0.0"]),
    "ibot": (IBOT_RECIPE, [*TINY_VIT, *tiny_overlay("ibot")["overrides"], "method.views.num_local=2"]),
    "ibot_rgb_augment_on_device": (
        IBOT_RECIPE,
        [*TINY_VIT, *tiny_overlay("ibot")["overrides"], "method.views.num_local=2", *RGB_ON_DEVICE],
    ),
    "dtm": (CONFIGS / "dtm" / "vit_tiny_fmnist_ema.yaml", [*TINY_VIT, *tiny_overlay("dtm")["overrides"]]),
    "dtm_beit": (CONFIGS / "dtm" / "vit_base_clip_imagenet.yaml", [*TINY_BEIT, *tiny_overlay("dtm")["overrides"]]),
    "symmim": (
        CONFIGS / "symmim" / "vit_tiny_fmnist.yaml",
        [*TINY_VIT, *tiny_overlay("symmim")["overrides"], "train.knn_every_epochs=0"],
    ),
    **{
        f"cim_{backbone}_{objective}": (
            CONFIGS / "cim" / f"{backbone}_tiny_fmnist_{objective}.yaml",
            [*tiny, *tiny_overlay("cim")["overrides"], "train.knn_every_epochs=0"],
        )
        for backbone, tiny in (("vit", TINY_VIT), ("resnet", TINY_RESNET))
        for objective in ("respix", "revdet")
    },
}
"""A run of each recipe family (method, objective, backbone family: `family_key`), and iBOT on RGB images with its
photometric augmentation batched in the training process (`data.augment_on=device`), without randomness inside its
networks (dropout, drop path): only the data, the masks and the method's own draws (DTM's morphing schedules,
CIM's replacement tokens) are random, and none of them may depend on the process."""
WEIGHTS_AGREE = {
    "toy",
    "ibot",
    "ibot_rgb_augment_on_device",
    "dtm",
    "dtm_beit",
    "cim_vit_respix",
    "cim_vit_revdet",
    "cim_resnet_respix",
    "cim_resnet_revdet",
}
"""Runs whose final weights agree within 1e-5 too. SymMIM's losses agree (its batch norms use the global batch),
but after AdamW some [CLS] and mask-token weights differ by a fraction of one step: not yet explained, so not
claimed."""
LOSS_RTOL = {"symmim": 1e-5}
"""Relative loss tolerances above the default 5e-7 (float32 summation order): SymMIM's losses differ by 7e-6, as
unexplained as its weights."""

DDP = ("data.batch_size=4", "--strategy", "ddp", "--devices", "2")
"""Two processes at half the batch: the same global batch as one process at data.batch_size=8."""


def family_key(recipe: Path) -> tuple[str, str, str]:
    """What a recipe family is: the method, its objective (CIM's ResPix or RevDet), the backbone family."""
    method = load_run_config(recipe, ["data.source=synthetic"]).method
    return method.name, getattr(method, "objective", ""), family_of(method.backbone.name).family


def run(name: str, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    recipe, overrides = RUNS[name]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mimkit", "pretrain", "-c", str(recipe), f"output_dir={run_dir}"]
    command += [*overrides, "train.epochs=1", "train.log_every_steps=1", "train.progress_bar=false", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir) if "loss" in row]


def largest_relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def test_every_shipped_recipe_family_has_a_ddp_run() -> None:
    # fine-tuning protocols have their DDP test in test_finetune.py
    shipped = {family_key(r) for r in CONFIGS.rglob("*.yaml") if r.parent.name not in ("tokenizers", "finetune")}
    covered = {family_key(recipe) for recipe, _ in RUNS.values() if recipe.is_relative_to(CONFIGS)}
    assert shipped <= covered, sorted(shipped - covered)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(RUNS))
def test_ddp_on_two_cpu_processes_matches_one_process(name: str, tmp_path: Path) -> None:
    single = run(name, tmp_path / "single", "data.batch_size=8")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run(name, tmp_path / "ddp", *DDP)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(one) == len(two) >= 2
    assert largest_relative_difference(one, two) <= LOSS_RTOL.get(name, 5e-7), (one, two)
    state_one = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.ckpt")
    state_two = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert state_two["world_size"] == 2 and len(state_two["rng"]) == 2
    if name in WEIGHTS_AGREE:
        for key, value in state_one["method"].items():  # tensors, and plain values (a CIM tokenizer's kind)
            other = state_two["method"][key]
            same = (
                value.float().allclose(other.float(), rtol=1e-5, atol=1e-5)
                if torch.is_tensor(value)
                else value == other
            )
            assert same, key
    if "sync_batchnorm:" in ddp.stderr:  # the control: per-process statistics are what made them differ
        per_process = run(name, tmp_path / "per_process", *DDP, "train.sync_batchnorm=false")
        assert per_process.returncode == 0, per_process.stderr[-3000:]
        assert largest_relative_difference(one, losses(tmp_path / "per_process")) > 1e-4


FULL_DISK_RUN = """
import errno, io, sys
import torch
from mimkit.cli import main

real_save, writes = torch.save, []

def save(obj, f, *args, **kwargs):  # checkpoint writes after the first two find the disk full halfway
    if isinstance(f, io.BufferedWriter) and f.name.endswith(".ckpt.tmp"):
        writes.append(f.name)
        if len(writes) > 2:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.exit(main())
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_full_disk_stops_every_process_with_the_message(tmp_path: Path) -> None:
    script = tmp_path / "full_disk_run.py"  # a file: Fabric starts the second process by running it again
    script.write_text(FULL_DISK_RUN)
    recipe, overrides = RUNS["toy"]
    command = [sys.executable, str(script), "pretrain", "-c", str(recipe), f"output_dir={tmp_path / 'run'}", *DDP]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *overrides], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("mimkit: error: output_dir: the disk is full: writing ") == 2  # one per process
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["epoch_0000.ckpt", "last.ckpt"]


def test_sync_batch_norms_keeps_the_parameters_buffers_and_state_dict() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), GlobalBatchNorm1d(144), torch.nn.ReLU()
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    images = torch.randn(6, 3, 8, 8)
    expected, keys = net(images), list(net.state_dict())
    weight = net[1].weight
    assert sync_batch_norms(net, torch.device("cpu")) == 1  # GlobalBatchNorm1d is global already
    assert isinstance(net[1], GlobalBatchNorm) and isinstance(net[3], GlobalBatchNorm1d)
    assert net[1].weight is weight and list(net.state_dict()) == keys
    out = net(images)  # one process: plain BatchNorm, running statistics updated as before
    torch.testing.assert_close(out, expected)
    assert int(net[1].num_batches_tracked) == 2
    out.square().mean().backward()
    optimizer.step()
    assert not torch.equal(net[1].weight, torch.ones(4))  # the optimizer built before still updates it


@pytest.mark.slow
def test_augmentation_on_the_device_trains_like_augmentation_in_the_workers(tmp_path: Path) -> None:
    """Same seeded draws, the finishing batched instead of per image: the same losses within float rounding."""
    name = "ibot_rgb_augment_on_device"
    device = run(name, tmp_path / "device", "data.batch_size=8")
    assert device.returncode == 0, device.stderr[-3000:]
    assert "batched in the training process" in device.stderr  # the notice of device mode on a CPU
    worker = run(name, tmp_path / "worker", "data.batch_size=8", "data.augment_on=worker")
    assert worker.returncode == 0, worker.stderr[-3000:]
    one, two = losses(tmp_path / "device"), losses(tmp_path / "worker")
    assert len(one) == len(two) >= 2
    assert largest_relative_difference(one, two) <= 1e-5, (one, two)
