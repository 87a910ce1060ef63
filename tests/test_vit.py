"""MaskableViT: timm's ViT plus a mask token inserted before positional embeddings; weights stay timm's."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from mimkit.config import ConfigError
from mimkit.models.backbones import BackboneConfig, build_backbone, create_timm_model
from mimkit.models.families.vit import MaskableViT

TINY = BackboneConfig(
    name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0
)


def tiny(mask_token: bool = True) -> MaskableViT:
    torch.manual_seed(0)
    return build_backbone(TINY, in_chans=3, mask_token=mask_token).eval()


def test_without_mask_it_equals_timm_forward_features() -> None:
    model = tiny()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), model.vit.forward_features(images))


def test_mask_token_replaces_patch_embeddings_before_positions() -> None:
    model = tiny()
    with torch.no_grad():
        model.mask_token.normal_()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    captured = {}
    model.vit.norm_pre.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    model(images, mask)
    tokens = captured["x"]  # after positional embedding
    expected = model.mask_token[0, 0] + model.vit.pos_embed[0, 1 + 1 * 4 + 2]
    torch.testing.assert_close(tokens[0, 1 + 6], expected)
    unmasked = model.vit.patch_embed(images)[1].flatten(0, 1) + model.vit.pos_embed[0, 1:]
    torch.testing.assert_close(tokens[1, 1:], unmasked)


def test_equal_size_crops_run_in_one_call_with_the_same_result() -> None:
    model = tiny()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    calls = []
    model.vit.blocks.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    grouped = model.forward_crops(crops)
    assert [c[0] for c in calls] == [4, 2]  # the two 32x32 crops share one call, the 16x16 crop gets its own
    for crop, output in zip(crops, grouped, strict=True):
        torch.testing.assert_close(output, model(crop), rtol=1e-5, atol=1e-6)
    assert grouped[2].shape == (2, 1 + 4, 32)


def test_state_dict_of_the_wrapped_vit_loads_into_timm() -> None:
    model = tiny()
    reference = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    result = reference.load_state_dict(model.vit.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_teacher_networks_have_no_mask_token() -> None:
    model = tiny(mask_token=False)
    assert model.mask_token is None
    with pytest.raises(ValueError, match="no mask token"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1, 4, 4, dtype=torch.bool))


def test_mask_of_the_wrong_grid_is_rejected() -> None:
    with pytest.raises(ValueError, match="does not match the patch grid"):
        tiny()(torch.randn(1, 3, 32, 32), torch.zeros(1, 3, 3, dtype=torch.bool))


def test_grayscale_input_flows_into_the_patch_embedding() -> None:
    model = build_backbone(TINY, in_chans=1, mask_token=True)
    assert model.vit.patch_embed.proj.in_channels == 1
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 17, 32)


def test_bad_backbone_configs_fail_with_clear_messages() -> None:
    with pytest.raises(ConfigError, match=r"unknown timm model 'vit_tinny.*did you mean"):
        create_timm_model(BackboneConfig(name="vit_tinny_patch16_224"), 3)[0]
    with pytest.raises(
        ConfigError, match="swin_transformer model; mimkit encoders wrap the timm families beit, convnext"
    ):
        create_timm_model(BackboneConfig(name="swin_tiny_patch4_window7_224"), 3)
    with pytest.raises(ConfigError, match="not divisible by patch size 8"):
        create_timm_model(BackboneConfig(name="vit_tiny_patch16_224", img_size=30, patch_size=8), 3)[0]


def test_weights_file_loads_and_mismatches_are_clear(tmp_path: Path) -> None:
    source = tiny().vit
    good = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(good))
    loaded = create_timm_model(BackboneConfig(**{**TINY.__dict__, "weights": str(good)}), 3)[0]
    torch.testing.assert_close(loaded.pos_embed, source.pos_embed)
    with pytest.raises(ConfigError, match="does not exist"):
        create_timm_model(BackboneConfig(**{**TINY.__dict__, "weights": str(tmp_path / "missing.pth")}), 3)[0]
    wrong = BackboneConfig(**{**TINY.__dict__, "embed_dim": 64, "weights": str(good)})
    with pytest.raises(ConfigError, match="does not match the model"):
        create_timm_model(wrong, 3)[0]


def test_attention_is_fused() -> None:
    assert all(block.attn.fused_attn for block in tiny().vit.blocks)
