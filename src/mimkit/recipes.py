"""The recipes shipped inside the package (`mimkit/configs/<family>/<name>.yaml`), found by name from any folder,
and a check of a recipe's field names that needs no torch (so a typo fails at once, before the heavy imports).

`-c ibot/vit_tiny_fmnist` names a shipped recipe; a path to a YAML file (one's own recipe) is taken as it is.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mimkit.config import ConfigError, check_field_names

RECIPES = Path(__file__).resolve().parent / "configs"
FIELDS_FILE = Path(__file__).resolve().parent / "config_fields.json"
"""The field names of the run config and of every registered method's config (`mimkit.runs.config_fields`),
kept current by tests/test_recipes.py."""
SUFFIX = ".yaml"
SUMMARY_WIDTH = 100


@dataclass(frozen=True)
class Recipe:
    name: str
    """`<family>/<name>` without `.yaml`: what `-c` takes."""
    path: Path

    @property
    def summary(self) -> str:
        """The first sentence of the recipe's opening comment (every shipped recipe opens with one), shortened."""
        lines = []
        for line in self.path.read_text().splitlines():
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
        text = " ".join(lines)
        sentence = text.split(". ", 1)[0].rstrip(".")
        return sentence if len(sentence) <= SUMMARY_WIDTH else sentence[: SUMMARY_WIDTH - 3].rsplit(" ", 1)[0] + "..."


def shipped_recipes(family: str | None = None) -> list[Recipe]:
    """Every shipped recipe (of one family: `ibot`, `tokenizers`, ...), sorted by name."""
    found = [Recipe(p.relative_to(RECIPES).with_suffix("").as_posix(), p) for p in RECIPES.glob(f"*/*{SUFFIX}")]
    return sorted((r for r in found if family is None or r.name.split("/")[0] == family), key=lambda r: r.name)


def recipe_families() -> list[str]:
    """The folders of shipped recipes (ibot, ..., tokenizers): what `mimkit recipes FAMILY` takes."""
    return sorted({r.name.split("/")[0] for r in shipped_recipes()})


def method_families() -> list[str]:
    """The recipe families that pretrain (their recipes name a method; the others make files, e.g. tokenizers)."""
    return sorted(
        {r.name.split("/")[0] for r in shipped_recipes() if "method" in (yaml.safe_load(r.path.read_text()) or {})}
    )


def find_recipe(name_or_path: str | Path) -> Path:
    """The YAML file `-c` means: an existing file as given, else the shipped recipe of that name (with or without
    `.yaml`, with or without a leading `configs/`); otherwise an error naming the closest shipped recipes."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(SUFFIX).removeprefix("configs/")
    shipped = {r.name: r.path for r in shipped_recipes()}
    if name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(name, shipped, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(
        f"config {name_or_path}: no such file and no shipped recipe of that name; {hint}"
        "`mimkit recipes` lists the shipped ones (e.g. -c ibot/vit_tiny_fmnist), or give the path of your own YAML"
    )


def check_recipe_fields(data: Mapping[str, Any]) -> None:
    """Raise the unknown-field error that validating `data` would raise, from FIELDS_FILE alone; a method outside
    mimkit (`package.module:Class`) is left to the full validation."""
    fields = json.loads(FIELDS_FILE.read_text())
    check_field_names({k: v for k, v in data.items() if k != "method"}, fields["run"])
    method = data.get("method")
    if isinstance(method, Mapping) and str(method.get("name")) in fields["methods"]:
        check_field_names(method, fields["methods"][str(method["name"])], "method")
