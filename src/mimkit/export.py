"""Export a run's backbone as plain timm weights: `model.safetensors` plus a timm `config.json`.

The weights are the encoder's plain timm module's own state dict (no mask token, no head), for ViT, BEiT and
CNN encoders alike, so anyone can load them with `timm.create_model` and no mimkit. `config.json` uses the
layout of timm's Hugging Face configs (architecture, `model_args`, nested `pretrained_cfg`), so both
`load_exported` here and timm's `local-dir:` loader read it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import save_file
from torch import nn

from mimkit import __version__
from mimkit.config import ConfigError, check
from mimkit.data.info import DataInfo
from mimkit.data.output_folder import check_output_folder
from mimkit.engine.checkpoint import ensure_writable
from mimkit.models.encoder import Encoder
from mimkit.runs import LoadedRun, load_run

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EVAL_INTERPOLATION, EVAL_CROP_PCT = "bicubic", 0.875
"""mimkit's EvalView: bicubic resize of the shorter side to size / 0.875, then a centre crop."""


def export_timm(
    run_or_checkpoint: str | Path,
    out_dir: str | Path | None = None,
    *,
    network: str = "encoder",
    image_size: int | None = None,
) -> Path:
    """Write `out_dir/model.safetensors` and `out_dir/config.json` for `network` of a run; return `out_dir`.

    `network` is "encoder" (what evaluation uses) or a role of `Method.networks()` that is an encoder (student,
    teacher, ...). `out_dir` defaults to `RUN/export/timm`; a folder of images, the run's checkpoint folder and
    data.root (or a folder inside them) are refused. `image_size` other than the trained one is the encoder's to
    allow: a ViT resamples its positional embeddings, a CNN takes any size, a BEiT refuses.
    """
    check(image_size is None or image_size > 0, "image_size", f"must be positive; got {image_size}")
    run = load_run(run_or_checkpoint)
    out = run.run_dir / "export" / "timm" if out_dir is None else Path(out_dir)
    reads = {"the run's checkpoints": run.checkpoint.parent, "data.root": run.cfg.data.root}
    check_output_folder(out, "out", "choose another folder with --out (the default is RUN/export/timm)", reads)
    encoder, role = _select_network(run, network)
    size = image_size or encoder.image_size
    name, model_args = encoder.timm_spec(size)
    ensure_writable(out, "out", "choose a writable folder with --out")
    state = encoder.timm_state_dict(image_size)
    config = _timm_config(encoder.timm_model(), name, model_args, run.method.data, size)
    config["mimkit"] = {
        "version": __version__,
        "checkpoint": str(run.checkpoint),
        "method": run.cfg.method.name,
        "network": role,
        "trained_image_size": encoder.image_size,
    }
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    _readable_as_usual(out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _readable_as_usual(path: Path) -> None:
    """safetensors writes files private (0600); an export is for sharing: the mode any new file gets here."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _timm_config(model: nn.Module, name: str, model_args: dict[str, Any], data: DataInfo, size: int) -> dict[str, Any]:
    """timm's Hugging Face config layout: what to build (`model_args`) and how to feed it (`pretrained_cfg`).

    `model_args` are exactly what mimkit passed to timm, so timm rebuilds the same network; everything else
    comes from the named architecture's defaults.
    """
    channels = model_args["in_chans"]
    own = model.pretrained_cfg or {}
    config: dict[str, Any] = {"architecture": name, "num_classes": 0, "num_features": model.num_features}
    if isinstance(getattr(model, "global_pool", None), str):
        config["global_pool"] = model.global_pool
    return config | {
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "mimkit",
            "custom_load": False,
            "input_size": [channels, size, size],
            "fixed_input_size": bool(own.get("fixed_input_size", False)),
            "interpolation": EVAL_INTERPOLATION,
            "crop_pct": EVAL_CROP_PCT,
            "crop_mode": "center",
            "mean": list(data.mean),
            "std": list(data.std),
            "num_classes": 0,
            "first_conv": own.get("first_conv", ""),
            "classifier": own.get("classifier", "head"),
        },
    }


def _select_network(run: LoadedRun, network: str) -> tuple[Encoder, str]:
    """The encoder to export and its role among the method's networks (for the record)."""
    networks = run.method.networks()
    roles = [role for role, module in networks.items() if isinstance(module, Encoder)]
    if network == "encoder":
        encoder = run.encoder()
        return encoder, next((role for role in roles if networks[role] is encoder), "encoder")
    module = networks.get(network)
    if not isinstance(module, Encoder):
        what = "no" if module is None else f"a {type(module).__name__} (not an encoder) as its"
        raise ConfigError(
            f"network: unknown network {network!r}: method {run.cfg.method.name!r} has {what} {network} network; "
            f"use --network encoder" + (f" or one of {', '.join(roles)}" if roles else "")
        )
    return module, network


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
