"""The Encoder contract, as timm tests its models: every encoder family on its own, then every registered method on
every family it takes (build, two training steps, k-NN, linear probe, fine-tuning, export round-trip, viz).

Each method's tiny settings and what a family needs of it come from tests/tiny/<method>.yaml; the families' tiny
backbones from tests/tiny/backbones.yaml. A method that cannot take a family says so there, and the test checks
that it refuses it before training with a clear message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from torch import nn

from mimkit.cli import main
from mimkit.config import ConfigError, apply_overrides, from_dict
from mimkit.data.views import EvalView
from mimkit.engine.runtime import EncoderBlocks
from mimkit.engine.train import pretrain
from mimkit.methods import method_names
from mimkit.models.backbones import BackboneConfig, build_backbone
from mimkit.models.encoder import Encoder, block_types_of
from mimkit.models.families import family_names, family_of
from mimkit.runs import load_run, load_run_config
from support import QUIET_CPU_RUN, ROOT, tiny_overlay

BACKBONES: dict[str, dict] = tiny_overlay("backbones")
SIZE = 64
CONVNEXT = BackboneConfig("convnext_atto", img_size=SIZE, model_args={"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]})
DEIT3 = BackboneConfig("deit3_small_patch16_224", img_size=SIZE, patch_size=8, embed_dim=32, depth=4, num_heads=2)
"""A ViT of timm's deit module, taken by the vit family through its name pattern."""


def backbone_config(name: str) -> BackboneConfig:
    """The tiny backbone of tests/tiny/backbones.yaml as a BackboneConfig."""
    fields = apply_overrides({}, BACKBONES[name]["overrides"])["method"]["backbone"]
    return from_dict(BackboneConfig, fields, "method.backbone")


ENCODERS = {name: backbone_config(name) for name in BACKBONES} | {"convnext": CONVNEXT, "deit3": DEIT3}


def encoder_of(name: str, mask_token: bool = False) -> Encoder:
    torch.manual_seed(0)
    return build_backbone(ENCODERS[name], 1, mask_token=mask_token).eval()


# ---------------------------------------------------------------------------------------------------
# Every family on its own


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_tokens_grid_and_image_feature(name: str) -> None:
    encoder = encoder_of(name)
    images = torch.randn(2, 1, SIZE, SIZE)
    tokens = encoder(images)
    h, w = encoder.grid(SIZE, SIZE)
    assert tokens.shape == (2, encoder.num_prefix_tokens + h * w, encoder.embed_dim)
    assert encoder.num_prefix_tokens == (0 if name in ("resnet", "convnext") else 1)
    # the image feature is what timm's own headless forward gives: k-NN and probes see a timm feature
    torch.testing.assert_close(encoder.pooled(tokens), encoder.timm_model()(images))
    assert encoder.image_size == SIZE and encoder.patch_size == SIZE // h


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_block_types_name_the_repeated_blocks(name: str) -> None:
    encoder = encoder_of(name)
    blocks = [m for m in encoder.modules() if isinstance(m, encoder.block_types)]
    assert len(blocks) >= 4
    policy = EncoderBlocks()
    policy.types = block_types_of(nn.ModuleDict({"student": encoder}))
    assert all(policy(block, False, 0) for block in blocks)
    assert not policy(encoder, False, 0) and policy(encoder, True, 0)  # recurse through, wrap only blocks


def test_every_registered_family_is_in_the_contract_tests() -> None:
    tested = {family_of(cfg.name).family for cfg in ENCODERS.values()}
    assert tested == set(family_names())


@pytest.mark.parametrize("name", ["vit", "beit", "deit3"])
def test_transformers_take_masks_and_draw_attention(name: str) -> None:
    encoder = encoder_of(name, mask_token=True)
    images = torch.randn(2, 1, SIZE, SIZE)
    h, w = encoder.grid(SIZE, SIZE)
    none = torch.zeros(2, h, w, dtype=torch.bool)
    some = none.clone()
    some[:, 0, :3] = True
    torch.testing.assert_close(encoder(images, none), encoder(images))
    assert not torch.allclose(encoder(images, some), encoder(images))
    attention = encoder.last_attention(images)
    assert attention.shape == (2, 2, 1 + h * w, 1 + h * w)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2, 1 + h * w))
    assert encoder.block_features(images, 4).shape == (2, 4 * encoder.embed_dim)
    torch.testing.assert_close(encoder.block_features(images, 1), encoder(images)[:, 0])


@pytest.mark.parametrize("name", ["resnet", "convnext"])
def test_cnns_refuse_masks_attention_and_block_features_clearly(name: str) -> None:
    with pytest.raises(ConfigError, match=r"is a CNN, which takes no patch mask.*family that does: BEiT .*ViT"):
        encoder_of(name, mask_token=True)
    encoder = encoder_of(name)
    assert not encoder.has_attention and not encoder.supports_mask
    with pytest.raises(ConfigError, match="has no attention maps"):
        encoder.last_attention(torch.randn(1, 1, SIZE, SIZE))
    with pytest.raises(ConfigError, match=r"need a transformer encoder.*use the cls or cls\+avg variant"):
        encoder.check_block_features(4)


def test_beit_takes_its_own_size_only() -> None:
    encoder = encoder_of("beit")
    with pytest.raises(ConfigError, match=r"takes 64px images only.*num_local=0"):
        encoder.grid(32, 32)
    assert encoder.timm_model().pos_embed is None  # relative position bias, no absolute embedding
    assert all(block.attn.relative_position_bias_table is not None for block in encoder.timm_model().blocks)


def test_another_family_is_refused_with_the_ones_that_work() -> None:
    with pytest.raises(ConfigError, match=r"swin_transformer model; mimkit encoders wrap the timm families.*beit"):
        build_backbone(BackboneConfig("swin_tiny_patch4_window7_224"), 3, mask_token=False)
    with pytest.raises(ConfigError, match=r"resnet18 is a CNN \(resnet family\): a CNN's shape goes in .*model_args"):
        build_backbone(BackboneConfig("resnet18", embed_dim=32), 3, mask_token=False)


# ---------------------------------------------------------------------------------------------------
# Every method on every family


def refusal(method: str, backbone: str) -> str | None:
    """What the method's refusal of the backbone's family says (tests/tiny/<method>.yaml), or None if it trains."""
    return tiny_overlay(method).get("unsupported", {}).get(BACKBONES[backbone]["family"])


CASES = [(method, backbone) for method in method_names() for backbone in BACKBONES]
TRAINED = [case for case in CASES if refusal(*case) is None]
REFUSED = [case for case in CASES if refusal(*case) is not None]


def run_overrides(method: str, backbone: str, output_dir: Path) -> tuple[Path, list[str]]:
    # a method's first Fashion-MNIST ViT recipe: the families' overrides replace its ViT shape (not a CNN's model_args)
    fmnist = sorted(p for p in (ROOT / "configs" / method).glob("*.yaml") if "fmnist" in p.stem)
    recipe = next(p for p in fmnist if p.stem.startswith("vit"))
    tiny = tiny_overlay(method)
    family = BACKBONES[backbone]["family"]
    overrides = [
        *BACKBONES[backbone]["overrides"],
        *tiny["overrides"],
        *tiny["contract"],
        *(tiny.get("families", {}).get(family) or []),
        "data.source=synthetic",
        f"data.synthetic.size={SIZE}",
        "data.synthetic.images=8",
        "data.channels=1",
        "data.limit=null",
        "data.batch_size=4",
        "train.epochs=1",
        "train.log_every_steps=1",
        "train.knn_every_epochs=0",
        *QUIET_CPU_RUN,
        f"output_dir={output_dir}",
    ]
    return recipe, overrides


def test_every_method_and_family_is_covered() -> None:
    assert {"ibot", "dtm"} <= {method for method, _ in TRAINED}
    assert {"vit", "beit", "resnet"} <= {backbone for _, backbone in TRAINED}


@pytest.mark.parametrize(("method", "backbone"), REFUSED, ids=lambda x: x)
def test_a_refused_family_fails_before_training(method: str, backbone: str, tmp_path: Path) -> None:
    recipe, overrides = run_overrides(method, backbone, tmp_path / "run")
    with pytest.raises(ConfigError, match=refusal(method, backbone)):
        pretrain(load_run_config(recipe, overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module", params=TRAINED, ids=lambda case: f"{case[0]}-{case[1]}")
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """A two-step run of every method on every backbone family it takes."""
    method, backbone = request.param
    recipe, overrides = run_overrides(method, backbone, tmp_path_factory.mktemp(f"{method}_{backbone}") / "run")
    return method, backbone, pretrain(load_run_config(recipe, overrides))


def test_method_trains_on_the_family(trained: tuple[str, str, Path]) -> None:
    method, backbone, run = trained
    loaded = load_run(run)
    assert loaded.cfg.method.name == method
    assert isinstance(loaded.encoder(), Encoder) and loaded.encoder().timm_name == ENCODERS[backbone].name
    losses = [line for line in (run / "metrics.csv").read_text().splitlines()[1:] if line.split(",")[1]]
    assert len(losses) == 2
    assert any(network is loaded.encoder() for network in loaded.method.networks().values())


def test_knn_linear_and_finetune(trained: tuple[str, str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = trained[2]
    assert main(["eval", "knn", str(run), "--k", "1", "3", "--limit", "8"]) == 0
    assert main(["eval", "linear", str(run), "--variant", "cls", "--epochs", "1", "--lrs", "0.1", "--limit", "8"]) == 0
    finetune = ["eval", "finetune", str(run), "--epochs", "1", "--batch-size", "4", "optim.warmup_epochs=0"]
    quiet = ["train.accelerator=cpu", "train.progress_bar=false", "train.loggers=[csv]"]
    assert main([*finetune, "--limit", "8", "--num-workers", "0", "method.families=[]", *quiet]) == 0  # any family
    for name in ("knn", "linear", "finetune_vit_base_mae"):
        assert (run / "eval" / f"{name}.json").is_file()
    capsys.readouterr()
    assert main(["eval", "linear", str(run), "--epochs", "1", "--lrs", "0.1", "--limit", "8"]) == 0  # the default
    expected = "last4" if load_run(run).encoder().has_attention else "cls"
    assert json.loads((run / "eval" / "linear.json").read_text())["variant"] == expected
    last4 = main(["eval", "linear", str(run), "--variant", "last4", "--epochs", "1", "--limit", "8"])
    if trained[1] == "resnet":
        assert last4 == 2 and "use the cls or cls+avg variant" in capsys.readouterr().err
    else:
        assert last4 == 0


def test_export_loads_into_plain_timm_with_identical_outputs(trained: tuple[str, str, Path], tmp_path: Path) -> None:
    run = trained[2]
    assert main(["export", str(run), "--format", "timm", "--out", str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    overlay = dict(file=str(tmp_path / "export" / "model.safetensors"))
    plain = timm.create_model(
        config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, **config["model_args"]
    ).eval()
    encoder = load_run(run).encoder()
    images = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), encoder.pooled(encoder(images)))
        torch.testing.assert_close(plain(images), encoder.timm_model()(images))


def test_viz_draws_what_the_encoder_has(trained: tuple[str, str, Path], tmp_path: Path) -> None:
    run = trained[2]
    out = tmp_path / "figures"
    assert main(["viz", str(run), "--images", "2", "--points", "8", "--out", str(out)]) == 0
    drawn = {path.stem for path in out.glob("*.png")}
    expected = {"masks", "pca", "embedding", "curves"} | (
        {"attention"} if load_run(run).encoder().has_attention else set()
    )
    assert expected <= drawn
    for path in out.glob("*.png"):
        with Image.open(path) as image:
            assert image.width > 0
    assert (out / "index.html").is_file()


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_dense_evaluation_reads_every_family_s_token_grid(name: str) -> None:
    from mimkit.data.config import DataConfig
    from mimkit.data.sources import SyntheticConfig, build_source
    from mimkit.eval.segment import extract_token_maps

    encoder = encoder_of(name)
    source = build_source(DataConfig(source="synthetic", options=SyntheticConfig(images=3, size=SIZE, classes=2)), "x")
    maps = extract_token_maps(encoder, source, SIZE, 3, batch_size=2)
    h, w = encoder.grid(SIZE, SIZE)
    assert maps.tokens.shape == (3, h, w, encoder.embed_dim) and maps.targets.shape == (3, SIZE, SIZE)
    assert torch.equal(maps.targets[1].long(), source.label_map(1))
    with torch.no_grad():
        expected = encoder(EvalView(source.info, SIZE)(source.load(2)[0])[None])[0, encoder.num_prefix_tokens :]
    torch.testing.assert_close(maps.tokens[2].flatten(0, 1), expected)
