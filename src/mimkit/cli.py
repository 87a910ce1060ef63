"""The `mimkit` command: pretrain, data, and (registered by their modules) evaluation, visualisation, export."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mimkit import __version__
from mimkit.config import ConfigError, describe_fields, dump_yaml, load_run_config, read_yaml
from mimkit.data.info import DataError

EPILOG = """examples:
  mimkit pretrain -c configs/ibot/vit_tiny_fmnist.yaml
  mimkit pretrain -c configs/ibot/vit_tiny_fmnist.yaml optim.lr=1e-3 train.epochs=5 output_dir=runs/try
  mimkit pretrain --resume runs/try                  continue a stopped run where it stopped
  mimkit pretrain -c configs/ibot/vit_small_imagenet.yaml --devices 8 --strategy ddp
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        return args.run(args) or 0
    except (ConfigError, DataError, FileNotFoundError) as error:
        print(f"mimkit: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimkit",
        description="Masked-image-modeling pretraining of vision backbones (iBOT, DTM, CIM, SymMIM).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"mimkit {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


# ---------------------------------------------------------------------------------------------------
# pretrain


def add_pretrain(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "pretrain",
        help="pretrain a backbone with a recipe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain with a YAML recipe; any field can be overridden as dotted.key=value.",
        epilog=EPILOG + "\nSee every config field with: mimkit pretrain --fields ibot",
    )
    p.add_argument("-c", "--config", help="recipe YAML (configs/<method>/<backbone>_<data>.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-3")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="RUN_OR_CKPT",
        help="continue the run in output_dir (or the given run folder / checkpoint) where it stopped",
    )
    p.add_argument("--output-dir", help="run folder (same as output_dir=...)")
    p.add_argument("--devices", help="devices per node: a number or auto (train.devices)")
    p.add_argument("--num-nodes", type=int, help="number of nodes (train.num_nodes)")
    p.add_argument("--strategy", choices=["auto", "ddp", "ddp_spawn", "fsdp"], help="train.strategy")
    p.add_argument("--precision", choices=["32-true", "bf16-mixed", "16-mixed"], help="train.precision")
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu", "cuda", "mps"], help="train.accelerator")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--fields", metavar="METHOD", help="list every config field of a method's recipes and exit")
    p.set_defaults(run=run_pretrain)


def pretrain_overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "output_dir": args.output_dir,
        "train.devices": args.devices,
        "train.num_nodes": args.num_nodes,
        "train.strategy": args.strategy,
        "train.precision": args.precision,
        "train.accelerator": args.accelerator,
    }
    return list(args.overrides) + [f"{key}={value}" for key, value in flags.items() if value is not None]


def run_pretrain(args: argparse.Namespace) -> int:
    if args.fields:
        return print_fields(args.fields)
    overrides = pretrain_overrides(args)
    if args.config:
        cfg = load_run_config(args.config, overrides)
    elif args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; pass the recipe with -c as well")
        cfg = load_run_config(None, overrides, base=read_yaml(saved))
    else:
        raise ConfigError(
            "pretrain needs a recipe: mimkit pretrain -c configs/<method>/<recipe>.yaml (or --resume RUN_FOLDER)"
        )
    if args.resume is not None:
        cfg.resume = args.resume or cfg.output_dir
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from mimkit.engine.train import pretrain  # heavy imports only when training

    pretrain(cfg)
    return 0


def print_fields(method_name: str) -> int:
    from mimkit.config import RunConfig
    from mimkit.methods import method_class

    method_cls = method_class(method_name)
    rows = list(describe_fields(method_cls.Config, "method"))
    rows += [r for r in describe_fields(RunConfig) if not r[0].startswith("method")]
    width = max(len(r[0]) for r in rows)
    for name, type_name, default, doc in rows:
        print(f"{name:<{width}}  {type_name} = {default!r}" + (f"\n{'':<{width}}    {doc}" if doc else ""))
    return 0


# ---------------------------------------------------------------------------------------------------
# data


def add_data(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("data", help="get and inspect datasets")
    sub = p.add_subparsers(title="data commands", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help="make Fashion-MNIST available (system package, else download to the cache)")
    fetch.add_argument("dataset", choices=["fashion-mnist"])
    fetch.set_defaults(run=run_data_fetch)
    info = sub.add_parser("info", help="describe the data a recipe reads")
    info.add_argument("-c", "--config", required=True)
    info.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    info.set_defaults(run=run_data_info)


def run_data_fetch(args: argparse.Namespace) -> int:
    from mimkit.data import fashion_mnist

    for split in ("train", "test"):
        found = fashion_mnist.locate(split, None) or fashion_mnist.download(split)
        print(f"fashion-mnist {split}: {found[0]}")
    return 0


def run_data_info(args: argparse.Namespace) -> int:
    from mimkit.data.sources import build_source, describe

    cfg = load_run_config(args.config, args.overrides)
    for split in (cfg.data.split, cfg.data.eval_split):
        try:
            print(f"{split}: {describe(build_source(cfg.data, split))}")
        except DataError as error:
            print(f"{split}: not available ({error})")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_pretrain, add_data]

if __name__ == "__main__":
    sys.exit(main())
