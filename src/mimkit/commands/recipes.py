"""`mimkit recipes`: the shipped recipes, one line each, by the name `-c` takes."""

from __future__ import annotations

import argparse

from mimkit.recipes import recipe_families, shipped_recipes


def add(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("recipes", help="list the shipped recipes (give a name to -c from any folder)")
    p.add_argument("family", nargs="?", help=f"only this family: {', '.join(recipe_families())}")
    p.add_argument("--path", action="store_true", help="also print where each recipe's YAML file lies")
    p.set_defaults(run=run_recipes)


def run_recipes(args: argparse.Namespace) -> int:
    from mimkit.config import ConfigError

    recipes = shipped_recipes(args.family)
    if not recipes:
        families = ", ".join(recipe_families())
        raise ConfigError(f"no shipped recipes of family {args.family!r}; the families are {families}")
    width = max(len(r.name) for r in recipes)
    for recipe in recipes:
        where = f"  [{recipe.path}]" if args.path else ""
        print(f"{recipe.name:<{width}}  {recipe.summary}{where}")
    print(
        "\nmimkit pretrain -c NAME [key=value ...]   (tokenizers: mimkit tokenizer fit -c NAME; finetune: mimkit "
        "eval finetune RUN -c NAME); copy one with `--path` to make your own"
    )
    return 0
