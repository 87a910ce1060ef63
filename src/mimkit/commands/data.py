"""`mimkit data`: get and inspect datasets."""

from __future__ import annotations

import argparse

from mimkit.data.info import DataError


def add(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("data", help="get and inspect datasets")
    sub = p.add_subparsers(title="data commands", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help="make Fashion-MNIST available (system package, else download to the cache)")
    fetch.add_argument("dataset", choices=["fashion-mnist"])
    fetch.set_defaults(run=run_data_fetch)
    info = sub.add_parser("info", help="describe the data a recipe reads")
    info.add_argument("-c", "--config", required=True, help="recipe: a shipped name or a YAML path")
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
    from mimkit.runs import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    for split in (cfg.data.split, cfg.data.eval_split):
        try:
            print(f"{split}: {describe(build_source(cfg.data, split))}")
        except DataError as error:
            print(f"{split}: not available ({error})")
    return 0
