"""Two CPU processes (DDP over gloo) train like one process at the same global batch: every method, losses and
final weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mimkit.engine.logs import read_metrics
from mimkit.methods.saved import read_checkpoint
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
RUNS = {
    "toy": (ROOT / "tests" / "recipes" / "toy.yaml", ["method.dropout=0.0"]),
    "ibot": (IBOT_RECIPE, [*TINY_VIT, *tiny_overlay("ibot")["overrides"], "method.views.num_local=2"]),
    "dtm": (ROOT / "configs" / "dtm" / "vit_tiny_fmnist_ema.yaml", [*TINY_VIT, *tiny_overlay("dtm")["overrides"]]),
    "symmim": (
        ROOT / "configs" / "symmim" / "vit_tiny_fmnist.yaml",
        [*TINY_VIT, *tiny_overlay("symmim")["overrides"], "train.knn_every_epochs=0"],
    ),
    "cim": (
        ROOT / "configs" / "cim" / "vit_tiny_fmnist_respix.yaml",
        [*TINY_VIT, *tiny_overlay("cim")["overrides"], "train.knn_every_epochs=0"],
    ),
}
"""Each method's run, without randomness inside its networks (dropout, drop path): only the data, the masks and
the method's own draws (DTM's morphing schedules, CIM's replacement tokens) are random, and none of them may
depend on the process."""
WEIGHTS_AGREE = {"toy", "ibot", "dtm", "cim"}
"""Methods whose final weights agree within 1e-5 too. SymMIM's losses agree (its batch norms use the global batch),
but after AdamW some [CLS] and mask-token weights differ by a fraction of one step: not yet explained, so not
claimed."""


def run(method: str, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    recipe, overrides = RUNS[method]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mimkit", "pretrain", "-c", str(recipe), f"output_dir={run_dir}"]
    command += [*overrides, "train.epochs=1", "train.log_every_steps=1", "train.progress_bar=false", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", sorted(RUNS))
def test_ddp_on_two_cpu_processes_matches_one_process(method: str, tmp_path: Path) -> None:
    single = run(method, tmp_path / "single", "data.batch_size=8")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run(method, tmp_path / "ddp", "data.batch_size=4", "--strategy", "ddp", "--devices", "2")
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        return [row["loss"] for row in read_metrics(run) if "loss" in row]

    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(one) == len(two) >= 2
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    state_one = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.ckpt")
    state_two = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert state_two["world_size"] == 2 and len(state_two["rng"]) == 2
    if method not in WEIGHTS_AGREE:
        return
    for key, value in state_one["method"].items():
        assert value.float().allclose(state_two["method"][key].float(), rtol=1e-5, atol=1e-5), key
