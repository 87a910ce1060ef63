"""mimkit's own tokenizers (k-means, VQ-VAE): the contract, fitting, measuring, the file, `mimkit tokenizer fit`,
and the registry of kinds (a kind registered in one place, here a toy one, is fitted, saved and used by CIM).

The DALL-E dVAE has its own file (tests/test_dall_e_tokenizer.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from mimkit.cli import main
from mimkit.config import ConfigError, read_yaml
from mimkit.data.loader import collate
from mimkit.data.sources import build_source
from mimkit.methods.cim import CIM
from mimkit.models.tokenizers.base import Status, Tokenizer, TokenizerConfig, codebook_usage, psnr
from mimkit.models.tokenizers.files import FORMAT, load_tokenizer, save_tokenizer
from mimkit.models.tokenizers.kmeans import KMeansTokenizer
from mimkit.models.tokenizers.registry import register_tokenizer, tokenizer_class, tokenizer_kinds
from mimkit.models.tokenizers.vqvae import VQVAETokenizer
from mimkit.procedures.tokenizer_fit import fit_tokenizer, load_tokenizer_recipe, measure
from mimkit.runs import load_run_config
from mimkit.schedules import Progress
from support import ROOT, tiny_overlay

TINY = ROOT / "tests" / "tiny" / "tokenizer.yaml"
KINDS = {
    "kmeans": ["tokenizer.kind=kmeans", "tokenizer.epochs=3"],
    "vqvae": [
        "tokenizer.kind=vqvae",
        "tokenizer.epochs=30",
        "tokenizer.lr=3e-3",
        "tokenizer.hidden_dim=16",
        "tokenizer.code_dim=8",
        "data.batch_size=16",
    ],
}


@pytest.fixture(scope="module", params=sorted(KINDS))
def fitted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp(request.param) / "tokenizer.pt"
    recipe = load_tokenizer_recipe(TINY, [*KINDS[request.param], f"output={out}"])
    return fit_tokenizer(recipe), recipe


def test_tokens_and_images_have_the_contract_shapes(fitted) -> None:
    result, _recipe = fitted
    tokenizer = result.tokenizer
    images = torch.rand(3, 1, 16, 24)
    tokens = tokenizer.encode(images)
    assert tokens.shape == (3, 4, 6) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < tokenizer.vocab_size
    decoded = tokenizer.decode(tokens)
    assert decoded.shape == (3, 1, 16, 24) and decoded.min() >= 0 and decoded.max() <= 1
    with pytest.raises(ValueError, match="divisible by 4"):
        tokenizer.encode(torch.rand(1, 1, 15, 16))


def test_a_fitted_tokenizer_reconstructs_a_training_batch_better_than_a_constant_image(fitted) -> None:
    result, recipe = fitted
    from mimkit.data.views import EvalView

    source = build_source(recipe.data)
    view = EvalView(source.info, 16, pixels=True)
    images = torch.stack([view(source.load(i)[0]) for i in range(32)])
    reconstructions = result.tokenizer.decode(result.tokenizer.encode(images))
    error = (reconstructions - images).square().mean()
    constant = (images.mean() - images).square().mean()
    assert error < 0.7 * constant
    assert result.metrics["psnr"] > result.metrics["psnr_constant"] + 1.5


def test_the_file_round_trips_with_its_metrics(fitted) -> None:
    result, _ = fitted
    loaded, metrics = load_tokenizer(result.path)
    images = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded.encode(images), result.tokenizer.cpu().encode(images))
    assert metrics == result.metrics and not any(p.requires_grad for p in loaded.parameters())


def test_kmeans_update_moves_each_centroid_to_the_mean_of_its_patches() -> None:
    tokenizer = KMeansTokenizer(vocab_size=2, patch_size=1, channels=1)
    tokenizer.centroids.copy_(torch.tensor([[0.0], [1.0]]))
    assigned = tokenizer.update(torch.tensor([[0.1], [0.3], [0.8]]))
    assert assigned.tolist() == [0, 0, 1]
    torch.testing.assert_close(tokenizer.centroids, torch.tensor([[0.2], [0.8]]))
    tokenizer.update(torch.tensor([[0.5]]))  # a running mean over all patches so far: (0.1 + 0.3 + 0.5) / 3
    torch.testing.assert_close(tokenizer.centroids[0], torch.tensor([0.3]))


def test_unused_codes_restart_on_the_data() -> None:
    generator = torch.Generator().manual_seed(0)
    kmeans = KMeansTokenizer(vocab_size=4, patch_size=1, channels=1)
    patches = torch.full((10, 1), 0.5)
    assert kmeans.restart_dead(patches, torch.tensor([True, False, True, False]), generator) == 2
    assert kmeans.centroids[[1, 3]].eq(0.5).all() and kmeans.centroids[[0, 2]].eq(0).all()
    vq = VQVAETokenizer(vocab_size=4, patch_size=2, channels=1, hidden_dim=4, code_dim=3)
    latents = torch.ones(6, 3)
    assert vq.restart_dead(latents, torch.tensor([False, True, True, True]), generator) == 1
    assert vq.codebook[0].eq(1).all() and vq.codebook[1:].eq(0).all()


def test_codebook_usage_and_psnr() -> None:
    usage = codebook_usage(torch.tensor([0, 1, 2, 3]), vocab_size=8)
    assert usage["perplexity"] == pytest.approx(4.0) and usage["dead_codes"] == 4
    assert codebook_usage(torch.zeros(5, dtype=torch.long), 3)["perplexity"] == pytest.approx(1.0)
    images = torch.full((1, 1, 4, 4), 0.5)
    assert psnr(images, images + 0.1) == pytest.approx(20.0, abs=1e-3)


def test_measure_reports_what_the_fit_command_prints() -> None:
    tokenizer = KMeansTokenizer(vocab_size=2, patch_size=2, channels=1)
    tokenizer.centroids[1] = 1.0
    images = torch.zeros(2, 1, 4, 4)
    images[1] = 1.0
    metrics = measure(tokenizer, images)
    assert metrics["psnr"] > 100 and metrics["dead_codes"] == 0 and metrics["perplexity"] == pytest.approx(2.0)


def test_a_file_that_is_no_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="is not a mimkit tokenizer file"):
        load_tokenizer(tmp_path / "junk.pt")
    torch.save({"state": {}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="mimkit tokenizer fit -c"):
        load_tokenizer(tmp_path / "other.pt")
    save_tokenizer(KMeansTokenizer(4, 2, 1), tmp_path / "ok.pt")
    assert not (tmp_path / "ok.pt.partial").exists()


def test_recipe_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"tokenizer.image_size.*not divisible by the patch size 4"):
        load_tokenizer_recipe(TINY, ["tokenizer.image_size=18"])
    with pytest.raises(ConfigError, match=r"encoder_file.*never downloads"):
        load_tokenizer_recipe(TINY, ["tokenizer.kind=dall-e"])


def test_fit_command_saves_the_file_and_its_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tok.pt"
    assert main(["tokenizer", "fit", "-c", str(TINY), f"output={out}"]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "perplexity" in printed and "unused" in printed
    assert load_tokenizer(out)[0].vocab_size == 16
    with Image.open(out.with_suffix(".png")) as figure:
        assert figure.width > 0


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "tokenizers").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_tokenizer_recipes_load(recipe: Path, tmp_path: Path) -> None:
    folder = ["data.root=" + str(tmp_path)] if read_yaml(recipe)["data"]["source"] == "imagefolder" else []
    loaded = load_tokenizer_recipe(recipe, folder)
    assert loaded.tokenizer.image_size % loaded.tokenizer.patch_size == 0 and loaded.output.startswith("tokenizers/")


def test_the_shipped_kinds_are_registered_with_their_configs() -> None:
    assert {"kmeans", "vqvae", "dall-e"} <= set(tokenizer_kinds())
    assert tokenizer_class("vqvae") is VQVAETokenizer
    assert type(load_tokenizer_recipe(TINY, ["tokenizer.kind=vqvae", "tokenizer.lr=0.01"]).tokenizer).__name__ == (
        "VQVAEConfig"
    )


def test_an_unknown_kind_lists_the_registered_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"tokenizer.kind: unknown tokenizer kind 'nope'; choose one of .*dall-e, kmeans"
    ):
        load_tokenizer_recipe(TINY, ["tokenizer.kind=nope"])


def test_a_field_of_another_kind_names_the_field_and_both_kinds() -> None:
    with pytest.raises(
        ConfigError, match=r"tokenizer.hidden_dim: a field of the vqvae tokenizer, not of kind 'kmeans'"
    ):
        load_tokenizer_recipe(TINY, ["tokenizer.hidden_dim=8"])
    with pytest.raises(ConfigError, match=r"tokenizer.lr: a field of the vqvae tokenizer, not of kind 'dall-e'"):
        load_tokenizer_recipe(TINY, ["tokenizer.kind=dall-e", "tokenizer.lr=0.1"])
    with pytest.raises(ConfigError, match=r"tokenizer.vocab: unknown field; did you mean 'tokenizer.vocab_size'"):
        load_tokenizer_recipe(TINY, ["tokenizer.vocab=8"])


def test_a_file_of_the_format_loads_and_one_of_an_unknown_kind_is_named(tmp_path: Path) -> None:
    centroids = torch.rand(4, 4)
    payload = {
        "format": FORMAT,
        "kind": "kmeans",
        "config": {"vocab_size": 4, "patch_size": 2, "channels": 1},
        "state": {"centroids": centroids, "counts": torch.ones(4)},
        "metrics": {"psnr": 12.5},
    }
    torch.save(payload, tmp_path / "kmeans.pt")
    loaded, metrics = load_tokenizer(tmp_path / "kmeans.pt")
    assert isinstance(loaded, KMeansTokenizer) and torch.equal(loaded.centroids, centroids) and metrics["psnr"] == 12.5
    torch.save({**payload, "kind": "gone"}, tmp_path / "gone.pt")
    with pytest.raises(ConfigError, match=r"method.tokenizer: .*gone.pt holds an unknown tokenizer kind 'gone'; the"):
        load_tokenizer(tmp_path / "gone.pt")


# ---------------------------------------------------------------------------------------------------
# Adding a kind: one class that registers its config, its builder and its fitting (here, in this file only)


@dataclass
class LevelsConfig(TokenizerConfig):
    kind: str = "test-levels"
    margin: float = 0.0
    """Widens the fitted brightness range on both sides."""


@register_tokenizer
class LevelsTokenizer(Tokenizer):
    """A toy kind: a patch's token is its mean brightness, quantised into vocab_size levels over the range of patch
    means seen while fitting; decoding paints each patch flat at its level."""

    kind = "test-levels"
    Config = LevelsConfig

    def __init__(self, vocab_size: int, patch_size: int, channels: int) -> None:
        super().__init__()
        self.vocab_size, self.patch_size, self.channels = vocab_size, patch_size, channels
        self.register_buffer("range", torch.tensor([0.0, 1.0]))

    @classmethod
    def build(cls, cfg: TokenizerConfig, channels: int) -> LevelsTokenizer:
        return cls(cfg.vocab_size, cfg.patch_size, channels)

    def config(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "patch_size": self.patch_size, "channels": self.channels}

    def fit(
        self, cfg: TokenizerConfig, batches: Iterable[torch.Tensor], generator: torch.Generator, status: Status
    ) -> None:
        assert isinstance(cfg, LevelsConfig)
        means = torch.cat([self.patch_means(images).flatten() for images in batches])
        status(f"{len(means)} patches")
        self.range.copy_(torch.stack([means.min() - cfg.margin, means.max() + cfg.margin]))

    def patch_means(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images.mean(1, keepdim=True), self.patch_size)[:, 0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        low, high = self.range
        scaled = (self.patch_means(images) - low) / (high - low)
        return (scaled * (self.vocab_size - 1)).round().clamp(0, self.vocab_size - 1).long()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        low, high = self.range
        levels = low + tokens.float() / (self.vocab_size - 1) * (high - low)
        flat = levels.repeat_interleave(self.patch_size, -2).repeat_interleave(self.patch_size, -1)
        return flat[:, None].expand(-1, self.channels, -1, -1).clamp(0, 1)


def test_a_kind_registered_in_one_file_is_fitted_saved_loaded_and_corrupts_for_cim(tmp_path: Path) -> None:
    out = tmp_path / "levels.pt"
    recipe = load_tokenizer_recipe(TINY, ["tokenizer.kind=test-levels", "tokenizer.margin=0.01", f"output={out}"])
    assert isinstance(recipe.tokenizer, LevelsConfig) and "test-levels" in tokenizer_kinds()
    fitted = fit_tokenizer(recipe)
    assert fitted.metrics["psnr"] > fitted.metrics["psnr_constant"]
    loaded, _ = load_tokenizer(out)
    assert isinstance(loaded, LevelsTokenizer) and torch.equal(loaded.range, fitted.tokenizer.range)
    assert not torch.equal(loaded.range, torch.tensor([0.0, 1.0]))  # fitted on the data

    tiny = [o for o in tiny_overlay("cim")["overrides"] if not o.startswith("method.tokenizer")]
    synthetic = ["data.source=synthetic", "data.synthetic.size=28", "data.channels=1", "data.synthetic.images=8"]
    shape = ["method.backbone.embed_dim=32", "method.backbone.depth=1", "method.backbone.num_heads=2"]
    cfg = load_run_config(
        ROOT / "configs" / "cim" / "vit_tiny_fmnist_revdet.yaml",
        [*tiny, *synthetic, *shape, f"method.tokenizer={out}", "method.tokenizer_recipe=null"],
    )
    source = build_source(cfg.data)
    method = CIM(cfg.method, source.info)
    assert isinstance(method.networks()["tokenizer"], LevelsTokenizer)
    views = method.views()
    batch = collate([(views(source.load(i)[0], 0), 0, i) for i in range(4)])
    output = method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=1, epochs=1))
    output.loss.backward()
    assert torch.isfinite(output.loss) and output.metrics["replaced_ratio"] > 0


def test_the_reported_psnr_says_whether_its_images_were_held_out(tmp_path: Path) -> None:
    """A folder without split sub-folders has no held-out images unless data.val_fraction holds some out: the
    metrics then say they were measured on the fitting images, not 'held-out' ones."""
    from mimkit.procedures.tokenizer_fit import describe_metrics

    folder = tmp_path / "data" / "images"
    folder.mkdir(parents=True)
    for i in range(12):
        Image.new("L", (16, 16), color=20 * i).save(folder / f"{i:02d}.png")
    overrides = [
        *["tokenizer.kind=kmeans", "tokenizer.vocab_size=4", "tokenizer.patch_size=4", "tokenizer.image_size=16"],
        *["data.source=imagefolder", f"data.root={folder}", "data.synthetic=null"],
        *["data.num_workers=0", "data.batch_size=4", "eval_images=4"],
    ]
    recipe = ROOT / "tests" / "tiny" / "tokenizer.yaml"
    same = fit_tokenizer(load_tokenizer_recipe(recipe, [*overrides, f"output={tmp_path}/out/a.pt"]))
    assert same.metrics["held_out"] == 0.0 and "of the images it was fitted on" in describe_metrics(same.metrics)
    held = fit_tokenizer(
        load_tokenizer_recipe(recipe, [*overrides, "data.val_fraction=0.25", f"output={tmp_path}/out/b.pt"])
    )
    assert held.metrics["held_out"] == 1.0 and describe_metrics(held.metrics).endswith("on 3 held-out images")


def test_a_refit_on_other_data_says_what_it_replaces(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recipe = ROOT / "tests" / "tiny" / "tokenizer.yaml"
    output = f"output={tmp_path}/tok.pt"
    first = fit_tokenizer(load_tokenizer_recipe(recipe, [output]))
    assert torch.load(first.path, weights_only=True)["fitted_on"]["images"] == 64
    with caplog.at_level("WARNING", logger="mimkit"):
        fit_tokenizer(load_tokenizer_recipe(recipe, [output]))  # the same data: nothing to say
        assert "replaced" not in caplog.text
        fit_tokenizer(load_tokenizer_recipe(recipe, [output, "data.synthetic.images=32"]))
    assert (
        "held a tokenizer fitted on synthetic images=64 size=16 classes=4 (train, 64 images); it is replaced by "
        in (caplog.text)
    )
