"""`mimkit export RUN` (timm format): ship a run's backbone as weights any timm user can load.

Choices are checked by the run function, not argparse, so a wrong value is a ConfigError like every other
mimkit input error (a one-line message, exit status 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("timm",)


def add(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "export",
        help="export a run's backbone (timm safetensors + config.json)",
        description="Write the backbone of a run as model.safetensors and config.json, loadable by timm.create_model.",
    )
    # dest is not "run": that attribute holds the function the CLI calls
    p.add_argument("checkpoint", metavar="RUN", help="run folder (its checkpoints/last.ckpt) or checkpoint file")
    p.add_argument("--format", default="timm", metavar="{timm}", help="export format (default: timm)")
    p.add_argument(
        "--network",
        default="encoder",
        metavar="NETWORK",
        help="which network: the method's encoder (iBOT: the EMA teacher; the default), or an encoder by its role "
        "in the method (student, teacher, ...)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="input size of the export (a ViT resamples its positional embeddings)",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/export/<format>)")
    p.set_defaults(run=run_export)


def load_snippet(folder: Path) -> str:
    """One line of Python that loads the export (repr quotes any path safely)."""
    return f"from mimkit.export import load_exported; model = load_exported({str(folder)!r}).eval()"


def timm_snippet(config: dict, weights: Path) -> str:
    """The plain timm call that rebuilds the export without mimkit: the architecture's name alone would build
    timm's default shape (224 px, its width and depth), so the saved `model_args` go with it."""
    arguments = ", ".join(f"{key}={value!r}" for key, value in config["model_args"].items())
    return (
        f"import timm; model = timm.create_model({config['architecture']!r}, pretrained=True, num_classes=0, "
        f"pretrained_cfg_overlay=dict(file={str(weights)!r}), {arguments}).eval()"
    )


def run_export(args: argparse.Namespace) -> int:
    import json

    from mimkit.config import ConfigError
    from mimkit.export import CONFIG_FILE, WEIGHTS_FILE, export_timm

    if args.format not in FORMATS:
        raise ConfigError(f"--format: unsupported format {args.format!r}; choose one of {', '.join(FORMATS)}")
    out = export_timm(args.checkpoint, args.out, network=args.network, image_size=args.image_size)
    config = json.loads((out / CONFIG_FILE).read_text())
    weights = out / WEIGHTS_FILE
    source = config["mimkit"]
    print(
        f"exported the {source['network']} of {source['method']} ({config['architecture']}, "
        f"input {'x'.join(map(str, config['pretrained_cfg']['input_size']))}) from {source['checkpoint']}"
    )
    print(f"  {weights} ({weights.stat().st_size / 2**20:.1f} MiB)")
    print(f"  {out / CONFIG_FILE}")
    print(f"load it with: {load_snippet(out)}")
    print(f"or with timm alone: {timm_snippet(config, weights)}")
    return 0
