"""`mimkit pretrain`: train a backbone with a recipe; resume a stopped run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args, get_type_hints

from mimkit.config import ConfigError, apply_overrides, describe_fields, dump_yaml, from_dict, read_yaml
from mimkit.engine.config import OptimConfig, TrainConfig
from mimkit.recipes import check_recipe_fields, find_recipe

EPILOG = """examples:
  mimkit pretrain -c ibot/vit_tiny_fmnist
  mimkit pretrain -c ibot/vit_tiny_fmnist optim.lr=1e-3 train.epochs=5 output_dir=runs/try
  mimkit pretrain --resume runs/try                  continue a stopped run where it stopped
  mimkit pretrain -c ibot/vit_small_imagenet --devices 8 --strategy ddp
"""


def add(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "pretrain",
        help="pretrain a backbone with a recipe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain with a YAML recipe; any field can be overridden as dotted.key=value.",
        epilog=EPILOG + "\nSee every config field with: mimkit pretrain --fields ibot",
    )
    p.add_argument(
        "-c",
        "--config",
        help="recipe: a shipped name (`mimkit recipes`, e.g. ibot/vit_tiny_fmnist) or the path of a YAML file",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-3")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="RUN_OR_CKPT",
        help="continue the run in output_dir (or the given run folder / checkpoint) where it stopped",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: apply changed optimisation settings (optim.lr, ...) to the run in progress",
    )
    p.add_argument("--output-dir", help="run folder (same as output_dir=...)")
    p.add_argument("--devices", help="devices per node: a number or auto (train.devices)")
    p.add_argument("--num-nodes", type=int, help="number of nodes (train.num_nodes)")
    for name in ("strategy", "precision", "accelerator"):
        p.add_argument(f"--{name}", choices=train_choices(name), help=f"train.{name}")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build the method at the recipe's shapes on the CPU, measure one step, print its cost and exit",
    )
    p.add_argument("--fields", metavar="METHOD", help="list every config field of a method's recipes and exit")
    p.set_defaults(run=run)


def train_choices(field_name: str) -> tuple[str, ...]:
    """The values TrainConfig allows for a field (its Literal), so a flag offers exactly what the config takes."""
    return get_args(get_type_hints(TrainConfig)[field_name])


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


def run(args: argparse.Namespace) -> int:
    if args.fields:
        return print_fields(args.fields)
    if args.resume and "=" in args.resume:  # `--resume key=value`: a bare --resume followed by an override
        args.overrides.append(args.resume)
        args.resume = ""
    overrides = pretrain_overrides(args)
    if args.config:
        data = read_yaml(find_recipe(args.config), overrides)
    elif args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; pass the recipe with -c as well")
        # the run continues where it lies now, even if it was moved since it started
        data = apply_overrides(read_yaml(saved), [f"output_dir={args.resume}", *overrides])
    else:
        raise ConfigError(
            "pretrain needs a recipe: mimkit pretrain -c NAME (`mimkit recipes` lists them), -c your.yaml, "
            "or --resume RUN_FOLDER"
        )
    check_recipe_fields(data)  # a typo fails before torch loads
    check_loop_values(data)  # and so does a bad optimisation or loop value
    from mimkit.runs import load_run_config

    cfg = load_run_config(None, base=data)  # the recipe read once, its overrides applied
    if args.resume is not None:
        cfg.resume = args.resume or cfg.output_dir
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    if args.dry_run:
        from mimkit.engine.dry_run import dry_run

        print(f"dry run of {args.config or args.resume}: {cfg.method.name}, one step on the CPU")
        print("\n".join(dry_run(cfg).lines()))
        return 0
    from mimkit.engine.stop import TrainingStopped
    from mimkit.engine.train import NonFiniteLossError, pretrain  # heavy imports only when training
    from mimkit.eval.online import online_knn

    try:
        pretrain(cfg, online_knn(cfg), force=args.force)
    except TrainingStopped as stopped:
        print(f"mimkit: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except NonFiniteLossError as error:
        print(f"mimkit: error: {error}", file=sys.stderr)
        return 1
    return 0


def check_loop_values(data: dict) -> None:
    """The optim and train sections converted and validated as the full check will (their config classes need no
    torch), so a bad value there fails at once; method and data values are checked after the heavy imports."""
    for name, cls in (("optim", OptimConfig), ("train", TrainConfig)):
        from_dict(cls, data.get(name), name).validate(name)


def print_fields(method_name: str) -> int:
    from mimkit.methods import method_class
    from mimkit.runs import RunConfig

    method_cls = method_class(method_name)
    rows = list(describe_fields(method_cls.Config, "method"))
    rows += [r for r in describe_fields(RunConfig) if not r[0].startswith("method")]
    width = max(len(r[0]) for r in rows)
    for name, type_name, default, doc in rows:
        print(f"{name:<{width}}  {type_name} = {default!r}" + (f"\n{'':<{width}}    {doc}" if doc else ""))
    return 0
