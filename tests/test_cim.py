"""CIM: the ResPix target, the corruption (RevDet labels, no gradient into the generator), the heads, both enhancer
families training with both objectives, and the errors a recipe can meet before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.data.loader import collate
from mimkit.data.sources import build_source
from mimkit.engine.train import pretrain
from mimkit.losses.pixels import sliding_window_normalize, sliding_window_stats
from mimkit.methods.cim import CIM
from mimkit.models.heads import PixelShuffleHead
from mimkit.runs import load_run, load_run_config
from mimkit.schedules import Progress
from support import QUIET_CPU_RUN, ROOT, TINY_TOKENIZER, tiny_overlay

TINY_VIT = ["method.backbone.embed_dim=32", "method.backbone.depth=2", "method.backbone.num_heads=2"]
SYNTHETIC = ["data.source=synthetic", "data.synthetic.size=28", "data.channels=1", "data.synthetic.images=16"]
PROGRESS = Progress(epoch=0, step=0, steps_per_epoch=10, epochs=1)


def recipe(backbone: str, objective: str) -> Path:
    return ROOT / "configs" / "cim" / f"{backbone}_tiny_fmnist_{objective}.yaml"


def tiny_cim(backbone: str = "vit", objective: str = "respix", overrides: tuple[str, ...] = ()) -> tuple[CIM, dict]:
    """A tiny CIM of the Fashion-MNIST recipe on synthetic 28-px images, and a collated batch of its views."""
    shape = TINY_VIT if backbone == "vit" else []
    cfg = load_run_config(
        recipe(backbone, objective), [*tiny_overlay("cim")["overrides"], *shape, *SYNTHETIC, *overrides]
    )
    source = build_source(cfg.data)
    CIM.prepare(cfg.method, source)
    torch.manual_seed(0)
    method = CIM(cfg.method, source.info)
    views = method.views()
    batch = collate([(views(source.load(i)[0], 0), 0, i) for i in range(8)])
    return method, batch


def test_sliding_window_target_is_each_pixel_standardised_by_its_window() -> None:
    images = torch.rand(2, 3, 9, 10) * 4 + 1
    for window in (3, 4):
        target = sliding_window_normalize(images, window)
        assert target.shape == images.shape
        before, after = (window - 1) // 2, window // 2
        for b, c, i, j in [(0, 0, 0, 0), (1, 2, 4, 5), (0, 1, 8, 9), (1, 0, 3, 0)]:
            patch = images[b, c, max(i - before, 0) : i + after + 1, max(j - before, 0) : j + after + 1]
            expected = (images[b, c, i, j] - patch.mean()) / (patch.var(unbiased=False) + 1e-6).sqrt()
            torch.testing.assert_close(target[b, c, i, j], expected, rtol=1e-4, atol=1e-4)


def test_inside_each_window_the_standardised_pixels_have_mean_0_and_std_1() -> None:
    images = torch.rand(4, 1, 32, 32)
    mean, std = sliding_window_stats(images, 7)
    i, j = 16, 16  # every pixel of the window around (i, j), standardised with that window's statistics
    window = images[:, 0, i - 3 : i + 4, j - 3 : j + 4]
    standardised = (window - mean[:, 0, i, j, None, None]) / std[:, 0, i, j, None, None]
    torch.testing.assert_close(standardised.mean((1, 2)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardised.std((1, 2), unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    target = sliding_window_normalize(images, 7)[:, :, 3:-3, 3:-3]  # away from the border: ~N(0, 1) overall
    assert abs(target.mean().item()) < 0.05 and abs(target.std().item() - 1) < 0.1


def test_pixel_shuffle_head_is_a_per_token_linear_layer_put_in_place() -> None:
    head = PixelShuffleHead(in_dim=5, out_channels=2, upscale=3)
    tokens = torch.randn(1, 4, 5)  # a 2 x 2 grid
    out = head(tokens, (2, 2))
    assert out.shape == (1, 2, 6, 6)
    linear = tokens @ head.proj.weight.flatten(1).T + head.proj.bias  # (1, 4, 2 * 3 * 3)
    for token, (h, w) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for c in range(2):
            for i in range(3):
                for k in range(3):
                    value = linear[0, token, c * 9 + i * 3 + k]
                    torch.testing.assert_close(out[0, c, h * 3 + i, w * 3 + k], value)


@pytest.mark.parametrize("sampling", ["sample", "argmax"])
def test_revdet_labels_are_masked_and_replaced_by_another_token(sampling: str) -> None:
    method, batch = tiny_cim(objective="revdet", overrides=(f"method.sampling={sampling}",))
    images, masks = batch["views"]["image"], batch["views"]["mask"]
    assert masks.any() and (~masks).any()
    corruption = method.corrupt(images, masks, batch["views"]["seed"])
    assert torch.equal(corruption.replaced, masks & (corruption.corrupted_tokens != corruption.tokens))
    assert torch.equal(corruption.corrupted_tokens[~masks], corruption.tokens[~masks])
    if sampling == "argmax":
        assert torch.equal(corruption.corrupted_tokens[masks], corruption.logits.argmax(-1))
    torch.testing.assert_close(corruption.images, method.corrupter.render(corruption.corrupted_tokens, images))
    assert corruption.images.shape == images.shape


def test_each_images_samples_depend_on_its_own_seed_not_on_the_batch() -> None:
    method, batch = tiny_cim()
    views = batch["views"]
    whole = method.corrupt(views["image"], views["mask"], views["seed"])
    first = method.corrupt(views["image"][:4], views["mask"][:4], views["seed"][:4])
    assert torch.equal(first.corrupted_tokens, whole.corrupted_tokens[:4])  # as on one of two processes
    other = method.corrupt(views["image"][:4], views["mask"][:4], views["seed"][:4] + 1)
    assert not torch.equal(other.corrupted_tokens, first.corrupted_tokens)


def test_no_gradient_reaches_the_generator_from_the_enhancer() -> None:
    method, batch = tiny_cim()
    images, masks = batch["views"]["image"], batch["views"]["mask"]
    corruption = method.corrupt(images, masks, batch["views"]["seed"])
    enhancer_loss = (method.enhance(corruption.images) - sliding_window_normalize(images, method.window)).square()
    enhancer_loss.mean().backward()
    generator = [*method.generator.parameters(), *method.generator_head.parameters()]
    assert all(p.grad is None for p in generator)
    assert all(p.grad is not None for p in method.enhancer.parameters() if p.requires_grad)
    method.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(corruption.logits, corruption.tokens[masks]).backward()
    assert all(p.grad is None for p in method.enhancer.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.generator.parameters())


@pytest.mark.parametrize("objective", ["respix", "revdet"])
@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_each_enhancer_learns_each_objective(backbone: str, objective: str) -> None:
    method, batch = tiny_cim(backbone, objective, ("method.sampling=argmax",))
    optimizer = torch.optim.AdamW([p for g in method.param_groups() for p in g.params], lr=3e-3)
    losses = []
    method.train()
    for _ in range(12):
        torch.manual_seed(0)  # the same corruption each step: the loss can only fall by learning
        output = method.training_step(batch, PROGRESS)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.metrics["loss_enhancer"].item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert {"loss_generator", "generator_accuracy", "mask_ratio", "replaced_ratio"} <= set(output.metrics)


def test_generator_and_enhancer_are_separate_groups_and_clipped_apart() -> None:
    method, _ = tiny_cim()
    groups = method.param_groups()
    assert {g.name for g in groups} == {"enhancer_decay", "enhancer_no_decay", "generator_decay", "generator_no_decay"}
    grouped = [id(p) for g in groups for p in g.params]
    trainable = [id(p) for p in method.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)
    assert not any(p.requires_grad for p in method.corrupter.tokenizer.parameters())
    policy = method.clip_policy()
    assert policy.mode == "per_module" and "tokenizer" not in policy.modules
    assert {"enhancer", "enhancer_head", "generator", "generator_head"} <= set(policy.modules)
    assert method.encoder() is method.enhancer


def test_a_checkpoint_with_the_tokenizer_at_its_old_key_still_loads() -> None:
    method, _ = tiny_cim()
    moved = "corrupter.tokenizer."
    old = {
        ("tokenizer." + k[len(moved) :] if k.startswith(moved) else k): v.clone()
        for k, v in method.state_dict().items()
        if not k.endswith("_extra_state")  # written before the tokenizer's kind travelled with its state
    }
    assert "tokenizer.centroids" in old and not any(k.startswith(moved) for k in old)  # as written before the move
    old["tokenizer.centroids"] += 1.0
    fresh, _ = tiny_cim()
    fresh.load_state_dict(old)  # strict: every old key found its new place
    torch.testing.assert_close(fresh.corrupter.tokenizer.centroids, old["tokenizer.centroids"])
    assert fresh.networks()["tokenizer"] is fresh.corrupter.tokenizer  # `mimkit export --network tokenizer`


def test_a_saved_run_opens_evaluates_and_exports_without_its_tokenizer_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checkpoint carries the tokenizer (its kind, arguments and weights): the file is only needed to start."""
    tiny_cim()  # the session's tiny tokenizer, fitted on first use
    tokenizer = tmp_path / "tok.pt"
    tokenizer.write_bytes(TINY_TOKENIZER.read_bytes())
    overrides = [
        *tiny_overlay("cim")["overrides"],
        f"method.tokenizer={tokenizer}",
        *TINY_VIT,
        *SYNTHETIC,
        "data.batch_size=8",
        "train.epochs=1",
        *QUIET_CPU_RUN,
        f"output_dir={tmp_path / 'run'}",
    ]
    run = pretrain(load_run_config(recipe("vit", "respix"), overrides))
    trained = load_run(run).method.corrupter.tokenizer.state_dict()
    tokenizer.unlink()
    reopened = load_run(run).method.corrupter.tokenizer
    assert all(torch.equal(v, reopened.state_dict()[k]) for k, v in trained.items() if isinstance(v, torch.Tensor))
    assert main(["eval", "knn", str(run), "--k", "1", "--num-workers", "0"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert main(["pretrain", "--resume", str(run), "train.epochs=2"]) == 0  # resumes with the saved tokenizer
    assert not tokenizer.exists()  # nothing refitted although the recipe names a tokenizer recipe
    assert "is gone; using the kmeans tokenizer saved with the run" in (run / "train.log").read_text()


def test_panels_show_the_corruption_and_the_prediction() -> None:
    for objective, last in [("respix", "ResPix output"), ("revdet", "replaced (true)")]:
        method, batch = tiny_cim(objective=objective)
        panels = method.eval().panels(batch["views"])
        assert [p.title for p in panels][:4] == [
            "original",
            "generator mask",
            "tokenizer reconstruction",
            "corrupted (enhancer input)",
        ]
        assert panels[-1].title == last and all(len(p.values) == 8 for p in panels)
    assert (method.reconstruct(batch["views"]) is None) == (objective == "revdet")


def test_a_missing_tokenizer_without_a_recipe_stops_before_training(tmp_path: Path) -> None:
    overrides = [
        f"method.tokenizer={tmp_path / 'none.pt'}",
        "method.tokenizer_recipe=null",
        *TINY_VIT,
        *SYNTHETIC,
        *QUIET_CPU_RUN,
        f"output_dir={tmp_path / 'run'}",
    ]
    with pytest.raises(ConfigError, match=r"none.pt does not exist; make it with: mimkit tokenizer fit -c"):
        pretrain(load_run_config(recipe("vit", "respix"), overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_tokenizer_with_a_recipe_is_fitted_first(tmp_path: Path) -> None:
    tokenizer = tmp_path / "fitted.pt"
    method, _ = tiny_cim(overrides=(f"method.tokenizer={tokenizer}",))
    assert tokenizer.is_file() and method.corrupter.tokenizer.vocab_size == 16


def test_misaligned_grids_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"method.generator.patch_size.*give it patch size 7"):
        tiny_cim(overrides=("method.generator.patch_size=4",))
    with pytest.raises(ConfigError, match=r"method.generator.img_size.*set it to 28"):
        tiny_cim(overrides=("method.generator.img_size=35",))
    with pytest.raises(ConfigError, match=r"method.backbone.*does not divide"):
        tiny_cim("resnet", "revdet", ("method.token_patch=4", "method.generator.patch_size=4"))  # 4x4 map, 7x7 tokens
