"""Fine-tuning pieces: layer-wise lr decay groups, stochastic depth per block, settings, a short training run."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.config import ConfigError
from mimkit.data.sources import SyntheticShapes
from mimkit.eval.finetune import FinetuneConfig, finetune, layer_decay_optimizer, set_drop_path
from mimkit.models.backbones import BackboneConfig, create_timm_model
from mimkit.runs import load_run_config
from support import ROOT

DEPTH = 4


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    cfg = BackboneConfig(img_size=16, patch_size=4, embed_dim=32, depth=DEPTH, num_heads=2, drop_path_rate=0.0)
    vit = create_timm_model(cfg, 1)[0]
    vit.reset_classifier(4)
    return vit


def synthetic(split: str, images: int = 16) -> SyntheticShapes:
    cfg = load_run_config(ROOT / "tests" / "recipes" / "toy.yaml", [f"data.synthetic.images={images}"])
    return SyntheticShapes(cfg.data, split)


def test_layer_decay_scales_decrease_towards_the_input() -> None:
    vit = tiny_vit()
    optimizer = layer_decay_optimizer(vit, FinetuneConfig(layer_decay=0.5, weight_decay=0.05))
    scale, decay = {}, {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            scale[param], decay[param] = group["lr_scale"], group["weight_decay"]
    assert set(scale) == set(vit.parameters())
    layers = [vit.patch_embed.proj.weight, *(block.attn.qkv.weight for block in vit.blocks), vit.head.weight]
    scales = [scale[p] for p in layers]
    assert scales == [0.5 ** (DEPTH + 1 - i) for i in range(DEPTH + 2)]  # x0.5 per layer towards the input
    assert scale[vit.cls_token] == scale[vit.pos_embed] == scales[0]
    assert scale[vit.norm.weight] == scales[-2]  # timm groups the final norm with the last block
    assert decay[vit.blocks[0].mlp.fc1.weight] == 0.05
    assert decay[vit.blocks[0].mlp.fc1.bias] == decay[vit.pos_embed] == decay[vit.norm.weight] == 0.0


def test_drop_path_rises_linearly_to_the_last_block() -> None:
    vit = tiny_vit()
    set_drop_path(vit, 0.3, (Block,))
    assert isinstance(vit.blocks[0].drop_path1, nn.Identity) and isinstance(vit.blocks[0].drop_path2, nn.Identity)
    rates = [block.drop_path1.drop_prob for block in vit.blocks[1:]]
    assert rates == pytest.approx([0.1, 0.2, 0.3])
    assert all(isinstance(block.drop_path2, DropPath) for block in vit.blocks[1:])


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"mixup": 0.8, "batch_size": 7}, "even batch size"),
        ({"layer_decay": 0.0}, "layer decay"),
        ({"crop_scale": (0.5, 0.2)}, "crop scale"),
    ],
)
def test_settings_are_checked(setting: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**setting).validate()


def test_short_run_trains_every_layer_of_a_frozen_backbone() -> None:
    vit = tiny_vit()
    vit.requires_grad_(False)  # as an EMA teacher arrives
    before = vit.patch_embed.proj.weight.detach().clone()
    cfg = FinetuneConfig(epochs=2, batch_size=8, warmup_epochs=1, mixup=0.0, cutmix=0.0, drop_path=0.1)
    rows = []
    result = finetune(
        vit, (Block,), synthetic("train"), synthetic("test", 8), 16, cfg, torch.device("cpu"), rows.append
    )
    assert rows == result.history and [row["epoch"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss"]) and 0 <= row["top1"] <= row["top5"] <= 1 for row in rows)
    assert result.top1 == rows[-1]["top1"] and result.best["top1"] == max(row["top1"] for row in rows)
    assert not torch.equal(vit.patch_embed.proj.weight, before)
    assert vit.head.out_features == 4


def test_unlabelled_data_is_refused() -> None:
    source = synthetic("train")
    source.info = type(source.info)(**{**source.info.__dict__, "num_classes": 0})
    with pytest.raises(ConfigError, match="labelled data"):
        finetune(tiny_vit(), (Block,), source, source, 16, FinetuneConfig(epochs=1, batch_size=8), torch.device("cpu"))
