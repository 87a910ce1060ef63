"""Export a run's backbone as plain timm weights: `model.safetensors` plus a timm `config.json`.

The weights are the wrapped timm ViT's own state dict (no mask token, no head), so anyone can load them with
`timm.create_model` and no mimkit. `config.json` uses the layout of timm's Hugging Face configs (architecture,
`model_args`, nested `pretrained_cfg`), so both `load_exported` here and timm's `local-dir:` loader read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

import timm
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimkit import __version__
from mimkit.config import ConfigError, check
from mimkit.data.info import DataInfo
from mimkit.eval.run import LoadedRun, load_run
from mimkit.models.vit import BackboneConfig, MaskableViT

Network = Literal["encoder", "student", "teacher"]
NETWORKS: tuple[str, ...] = get_args(Network)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SHAPE_ARGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
"""BackboneConfig fields that override a timm architecture's shape (the ones `create_vit` passes on)."""
EVAL_INTERPOLATION, EVAL_CROP_PCT = "bicubic", 0.875
"""mimkit's EvalView: bicubic resize of the shorter side to size / 0.875, then a centre crop."""


def export_timm(
    run_or_checkpoint: str | Path,
    out_dir: str | Path | None = None,
    *,
    network: Network = "encoder",
    image_size: int | None = None,
) -> Path:
    """Write `out_dir/model.safetensors` and `out_dir/config.json` for `network` of a run; return `out_dir`.

    `out_dir` defaults to `RUN/export/timm`. `image_size` other than the trained one resamples the positional
    embeddings (bicubic, as timm does when it loads weights at a new size) and records the new input size.
    """
    if network not in NETWORKS:
        raise ConfigError(f"network: unknown network {network!r}; choose one of {', '.join(NETWORKS)}")
    check(image_size is None or image_size > 0, "image_size", f"must be positive; got {image_size}")
    run = load_run(run_or_checkpoint)
    vit, module_name = _select_network(run, network)
    backbone = getattr(run.cfg.method, "backbone", None)
    if not isinstance(backbone, BackboneConfig):
        raise ConfigError(f"method {run.cfg.method.name!r} has no timm backbone config (method.backbone) to export")
    trained_size = vit.patch_embed.img_size[0]
    size = image_size or trained_size
    patch = vit.patch_embed.patch_size[0]
    check(size % patch == 0, "image_size", f"{size} is not a multiple of the patch size {patch}")
    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    if size != trained_size and vit.pos_embed is not None:
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"],
            new_size=[size // patch, size // patch],
            old_size=list(vit.patch_embed.grid_size),
            num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
        ).contiguous()
    config = _timm_config(vit, backbone, run.method.data, size)
    config["mimkit"] = {
        "version": __version__,
        "checkpoint": str(run.checkpoint),
        "method": run.cfg.method.name,
        "network": module_name,
        "trained_image_size": trained_size,
    }
    out = run.run_dir / "export" / "timm" if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _timm_config(vit: VisionTransformer, backbone: BackboneConfig, data: DataInfo, size: int) -> dict[str, Any]:
    """timm's Hugging Face config layout: what to build (`model_args`) and how to feed it (`pretrained_cfg`).

    Only the shape fields the recipe overrode go into `model_args`, exactly as `create_vit` passed them, so
    timm rebuilds the same network; everything else comes from the named architecture's defaults.
    """
    channels = vit.patch_embed.proj.in_channels
    model_args: dict[str, Any] = {"img_size": size, "in_chans": channels}
    model_args |= {k: getattr(backbone, k) for k in SHAPE_ARGS if getattr(backbone, k) is not None}
    return {
        "architecture": backbone.name,
        "num_classes": 0,
        "num_features": vit.num_features,
        "global_pool": vit.global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "mimkit",
            "custom_load": False,
            "input_size": [channels, size, size],
            "fixed_input_size": True,
            "interpolation": EVAL_INTERPOLATION,
            "crop_pct": EVAL_CROP_PCT,
            "crop_mode": "center",
            "mean": list(data.mean),
            "std": list(data.std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def _select_network(run: LoadedRun, network: str) -> tuple[VisionTransformer, str]:
    """The timm ViT inside the chosen network, and the method attribute it lives in (for the record)."""
    method = run.method
    if network == "encoder":
        module = run.encoder()
    else:
        module = getattr(method, network, None)
        if not isinstance(module, nn.Module):
            raise ConfigError(
                f"network: method {run.cfg.method.name!r} has no {network} network; use --network encoder"
            )
    name = next((n for n, child in method.named_children() if child is module), network)
    vit = module.vit if isinstance(module, MaskableViT) else module
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"network: the {network} of {run.cfg.method.name!r} is not a timm VisionTransformer")
    return vit, name


def load_exported(path: str | Path, **kwargs: Any) -> nn.Module:
    """The timm model of an export folder, built by `timm.create_model` from its config.json (no download).

    `kwargs` go to `timm.create_model` over the saved `model_args`, e.g. `num_classes=10` adds a fresh head
    for fine-tuning, `dynamic_img_size=True` accepts any multiple of the patch size.
    """
    folder = Path(path)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder} (give a folder written by `mimkit export`)")
    config = json.loads(config_file.read_text())
    overlay = {**config["pretrained_cfg"], "file": str(folder / WEIGHTS_FILE)}
    return timm.create_model(
        config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **{**config["model_args"], **kwargs}
    )
