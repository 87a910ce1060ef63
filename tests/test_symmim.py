"""SymMIM: InfoNCE in the MoCo v3 form (one process and two gloo processes), pixel targets, and the method's step."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mimkit.data.loader import ViewDataset, collate
from mimkit.data.sources import build_source
from mimkit.losses.contrastive import info_nce
from mimkit.losses.pixels import masked_mse, normalize_patches, patchify
from mimkit.methods.symmim import SymMIM
from mimkit.runs import load_run_config
from mimkit.schedules import Progress
from support import ROOT, tiny_overlay

RECIPE = ROOT / "configs" / "symmim" / "vit_tiny_fmnist.yaml"
TAU = 0.2


def test_info_nce_of_equal_similarities_is_2_tau_log_batch() -> None:
    vectors = torch.ones(6, 4)
    torch.testing.assert_close(info_nce(vectors, vectors, TAU), torch.tensor(2 * TAU * math.log(6)))


def test_info_nce_prefers_the_matching_key() -> None:
    keys = torch.eye(4)
    assert info_nce(keys, keys, TAU) < info_nce(keys, keys.roll(1, 0), TAU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(rank: int, port: int, queries: torch.Tensor, keys: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        half = len(queries) // 2
        q = queries[rank * half : (rank + 1) * half].clone().requires_grad_()
        k = keys[rank * half : (rank + 1) * half].clone().requires_grad_()
        loss = info_nce(q, k, TAU)
        loss.backward()
        equal = info_nce(torch.ones(half, 4), torch.ones(half, 4), TAU)
        # DDP averages gradients over the processes: the halves, averaged, are the 1-process gradient
        torch.save({"loss": loss.detach(), "q": q.grad / 2, "k": k.grad / 2, "equal": equal}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_give_the_one_process_loss_and_gradients(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
    q, k = queries.clone().requires_grad_(), keys.clone().requires_grad_()
    loss = info_nce(q, k, TAU)
    loss.backward()
    mp.spawn(_two_processes, args=(_free_port(), queries, keys, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    torch.testing.assert_close((parts[0]["loss"] + parts[1]["loss"]) / 2, loss.detach())
    torch.testing.assert_close(torch.cat([p["q"] for p in parts]), q.grad)
    torch.testing.assert_close(torch.cat([p["k"] for p in parts]), k.grad)  # the all-gather passes gradients
    for part in parts:
        torch.testing.assert_close(part["equal"], torch.tensor(2 * TAU * math.log(8)))  # the global batch


def test_patchify_and_per_patch_targets() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 12)
    torch.testing.assert_close(patches[0, 1].view(2, 2, 3).permute(2, 0, 1), images[0, :, 0:2, 2:4])
    normalized = normalize_patches(patches)
    torch.testing.assert_close(normalized.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)


def test_masked_mse_reads_the_masked_patches_only() -> None:
    targets = torch.zeros(1, 4, 3)
    predictions = torch.tensor([[[1.0] * 3, [5.0] * 3, [1.0] * 3, [5.0] * 3]])
    mask = torch.tensor([[True, False, True, False]])
    torch.testing.assert_close(masked_mse(predictions, targets, mask), torch.tensor(1.0))


def tiny_symmim(*overrides: str) -> tuple[SymMIM, dict]:
    shrink = ["method.backbone.embed_dim=32", "method.backbone.depth=2", "method.backbone.num_heads=2"]
    shrink += [*tiny_overlay("symmim")["overrides"], "data.source=synthetic", "data.synthetic.size=28"]
    cfg = load_run_config(RECIPE, [*shrink, "data.channels=1", *overrides])
    source = build_source(cfg.data)
    torch.manual_seed(0)
    method = SymMIM(cfg.method, source.info)
    dataset = ViewDataset(source, method.views(), seed=0)
    return method, collate([dataset[(0, i)] for i in range(8)])


def test_a_step_trains_the_online_branch_only() -> None:
    method, batch = tiny_symmim()
    out = method.training_step(batch, Progress(0, 0, 10, 1))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.metrics["loss_con"] > 0 and out.metrics["loss_mim"] > 0
    assert out.metrics["online_mask_ratio"] == out.metrics["momentum_mask_ratio"] == 0.5
    assert all(p.grad is None for p in [*method.momentum_encoder.parameters(), *method.momentum_projector.parameters()])
    assert method.online.mask_token.grad.abs().sum() > 0 and method.predictor[0].weight.grad is not None
    assert method.encoder() is method.online


def test_the_masks_differ_between_the_branches_and_lambda_zero_is_pixels_only() -> None:
    _, batch = tiny_symmim()
    online, momentum = batch["views"]["online_masks"][0], batch["views"]["momentum_masks"][0]
    assert not torch.equal(online, momentum)
    pixels_only, batch = tiny_symmim("method.lambda_con=0")
    out = pixels_only.training_step(batch, Progress(0, 0, 10, 1))
    torch.testing.assert_close(out.loss, out.metrics["loss_mim"])


def test_a_frozen_patch_projection_stays_at_its_random_init_in_both_branches() -> None:
    method, batch = tiny_symmim("method.freeze_patch_embed=true")
    patch = method.online.timm_model().patch_embed
    assert not any(p.requires_grad for p in patch.parameters())
    grouped = {id(p) for g in method.param_groups() for p in g.params}
    assert not any(id(p) in grouped for p in patch.parameters())
    method.training_step(batch, Progress(0, 0, 10, 1)).loss.backward()
    assert all(p.grad is None for p in patch.parameters())
    assert method.online.timm_model().blocks[0].attn.qkv.weight.grad is not None
    momentum = method.momentum_encoder.timm_model().patch_embed
    assert all(torch.equal(a, b) for a, b in zip(patch.parameters(), momentum.parameters(), strict=True))
    trainable, _ = tiny_symmim()
    assert all(p.requires_grad for p in trainable.online.timm_model().patch_embed.parameters())


def test_crop_targets_regress_the_crops_before_their_photometric_steps() -> None:
    augmented, batch = tiny_symmim("data.channels=3")
    cropped, crop_batch = tiny_symmim("data.channels=3", "method.pixel_target=crop")
    assert "views_plain" not in batch["views"] and len(crop_batch["views"]["views_plain"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(batch["views"]["views"], crop_batch["views"]["views"], strict=True))

    def loss_mim(method: SymMIM, views: dict) -> float:
        torch.manual_seed(1)  # the same drop-path draws for every call
        with torch.no_grad():
            return float(method.training_step(views, Progress(0, 0, 10, 1)).metrics["loss_mim"])

    reference = loss_mim(augmented, batch)
    assert loss_mim(cropped, crop_batch) != pytest.approx(reference)
    crop_batch["views"]["views_plain"] = crop_batch["views"]["views"]  # targets = inputs: the augmented loss
    assert loss_mim(cropped, crop_batch) == pytest.approx(reference)


def test_the_momentum_encoder_follows_the_online_one() -> None:
    method, _ = tiny_symmim()
    before = method.momentum_encoder.mask_token.clone()
    with torch.no_grad():
        method.online.mask_token.add_(1.0)
    method.after_step(Progress(0, 0, 10, 1))
    torch.testing.assert_close(method.momentum_encoder.mask_token, before + 0.01)  # momentum 0.99 at the start


def test_reconstructions_come_back_in_the_images_normalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    method, batch = tiny_symmim()
    images = batch["views"]["views"][0]
    perfect = normalize_patches(patchify(images, 7))  # what a perfect pixel head predicts
    monkeypatch.setattr(method.pixel_head, "forward", lambda tokens: perfect)
    with torch.no_grad():
        found = method.reconstruct(batch["views"])
    assert torch.equal(found.masks, batch["views"]["online_masks"][0]) and torch.equal(found.originals, images)
    torch.testing.assert_close(found.reconstructions, images, atol=1e-4, rtol=1e-4)  # per-patch scale restored
