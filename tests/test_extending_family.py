"""docs/extending.md's claim for encoder families: a family registered in one place (here, inside this test) is built
by its timm names, passes the encoder contract, and trains, without any other file changing.

The toy family wraps timm's `vision_transformer_relpos` module, which no built-in family covers: relative-position
ViTs with average pooling and no [CLS] token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from timm.models.vision_transformer_relpos import RelPosBlock, VisionTransformerRelPos
from torch import nn

from mimkit.config import ConfigError
from mimkit.engine.train import pretrain
from mimkit.models import families
from mimkit.models.backbone_config import TRANSFORMER_SHAPE, BackboneConfig
from mimkit.models.backbones import build_backbone
from mimkit.models.encoder import Encoder
from mimkit.runs import load_run, load_run_config
from support import IBOT_RECIPE, QUIET_CPU_RUN, TINY_IBOT_HEADS

NAME = "vit_relpos_small_patch16_224"
TINY = BackboneConfig(NAME, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)


class RelPosEncoder(Encoder):
    """A timm relative-position ViT: its normed patch tokens, no prefix, no mask token."""

    family = "relpos"
    timm_modules = ("vision_transformer_relpos",)
    example = NAME
    kind = "relative-position ViT"
    shape_fields = TRANSFORMER_SHAPE
    block_types = (RelPosBlock,)

    def __init__(self, model: VisionTransformerRelPos, cfg: BackboneConfig, timm_args: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.timm_name, self.timm_args = model, cfg.name, timm_args
        self.embed_dim, self.num_prefix_tokens = model.embed_dim, model.num_prefix_tokens
        self.patch_size, self.image_size = model.patch_embed.patch_size[0], cfg.img_size

    @classmethod
    def timm_arguments(cls, cfg: BackboneConfig) -> dict[str, Any]:
        return {"img_size": cfg.img_size, **cfg.shape_overrides()}

    @classmethod
    def wrap(cls, model: nn.Module, cfg: BackboneConfig, timm_args: dict[str, Any], *, mask_token: bool) -> Encoder:
        return cls(model, cfg, timm_args)  # type: ignore[arg-type]

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.forward_features(images)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        if (height, width) != (self.image_size, self.image_size):
            raise ConfigError(f"{self.timm_name} takes {self.image_size}px images only")
        return height // self.patch_size, width // self.patch_size

    def timm_model(self) -> nn.Module:
        return self.model

    def timm_spec(self, image_size: int | None = None) -> tuple[str, dict[str, Any]]:
        return self.timm_name, dict(self.timm_args)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> type[Encoder]:
    """The toy family registered for this test only (the registry is restored afterwards)."""
    monkeypatch.setattr(families, "_FAMILIES", families.registered_families())
    return families.register_family(RelPosEncoder)


def test_an_unregistered_family_is_refused_with_the_registered_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"vision_transformer_relpos model; mimkit encoders wrap .*vision_transformer"
    ):
        build_backbone(TINY, 1, mask_token=False)


def test_a_registered_family_builds_and_keeps_the_contract(registered: type[Encoder]) -> None:
    assert "relpos" in families.family_names() and families.family_of(NAME) is registered
    torch.manual_seed(0)
    encoder = build_backbone(TINY, 1, mask_token=False).eval()
    assert isinstance(encoder, RelPosEncoder)
    images = torch.randn(2, 1, 32, 32)
    tokens = encoder(images)
    assert tokens.shape == (2, 16, 32) and encoder.grid(32, 32) == (4, 4)
    torch.testing.assert_close(encoder.pooled(tokens), encoder.timm_model()(images))  # timm's own image feature
    assert sum(isinstance(m, encoder.block_types) for m in encoder.modules()) == 2
    with pytest.raises(ConfigError, match=r"relative-position ViT, which takes no patch mask.*ViT"):
        build_backbone(TINY, 1, mask_token=True)


def test_a_registered_family_trains_and_reloads(registered: type[Encoder], tmp_path: Path) -> None:
    """iBOT without masks or local crops (DINO) on the toy family: two steps, then the run reopens."""
    overrides = [
        f"method.backbone.name={NAME}",
        *(f"method.backbone.{k}={v}" for k, v in TINY.shape_overrides().items()),
        "method.backbone.img_size=32",
        *TINY_IBOT_HEADS,
        "method.views.global_size=32",
        "method.views.num_local=0",
        "method.mask.ratios=[[0.0,0.0]]",
        "data.source=synthetic",
        "data.synthetic.size=32",
        "data.synthetic.images=4",
        "data.channels=1",
        "data.limit=null",
        "data.batch_size=2",
        "train.epochs=1",
        "train.log_every_steps=1",
        *QUIET_CPU_RUN,
        f"output_dir={tmp_path / 'run'}",
    ]
    run = pretrain(load_run_config(IBOT_RECIPE, overrides))
    losses = [line for line in (run / "metrics.csv").read_text().splitlines()[1:] if line.split(",")[1]]
    assert len(losses) == 2
    assert isinstance(load_run(run).encoder(), RelPosEncoder)


def test_a_family_of_ones_own_registered_first_still_takes_over_a_builtin_module() -> None:
    """docs/extending.md: a module of one's own imported before the recipe loads; the built-ins, found later on the
    first lookup, must not outrank it."""
    import subprocess
    import sys

    script = (
        "from mimkit.models.encoder import Encoder\n"
        "from mimkit.models.families import register_family, family_of\n"
        "@register_family\n"
        "class Mine(Encoder):\n"
        "    family, timm_modules = 'mine', ('resnet',)\n"
        "assert family_of('resnet18') is Mine, family_of('resnet18')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
