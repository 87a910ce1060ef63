"""The recipes shipped inside the package (`mimkit/configs/<family>/<name>.yaml`), found by name from any folder,
and a check of a recipe's field names that needs no torch (so a typo fails at once, before the heavy imports).

The field names come from the registries (`mimkit.runs.config_fields`), which need torch; the first full load of a
recipe remembers them in mimkit's cache under a stamp of the package's source files, and later commands check
against that file. Nothing is kept by hand: an edited or upgraded package has a new stamp, so its first run checks
after the imports and writes the names anew.

`-c ibot/vit_tiny_fmnist` names a shipped recipe; a path to a YAML file (one's own recipe) is taken as it is.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mimkit.cache import cache_dir
from mimkit.config import ConfigError, check_field_names

RECIPES = Path(__file__).resolve().parent / "configs"
PACKAGE = Path(__file__).resolve().parent
FIELDS_PREFIX = "config_fields-"
SUFFIX = ".yaml"
SUMMARY_WIDTH = 100
PROTOCOL_FAMILIES = ("finetune",)
"""Recipe families of evaluation protocols: partial run configs put on a pretrained encoder (`mimkit eval finetune
-c finetune/<name>`), not pretraining recipes."""


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
    """The recipe families that pretrain (their recipes name a method; the others make files, e.g. tokenizers, or
    are evaluation protocols)."""
    families = {
        r.name.split("/")[0] for r in shipped_recipes() if "method" in (yaml.safe_load(r.path.read_text()) or {})
    }
    return sorted(families - set(PROTOCOL_FAMILIES))


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


def source_stamp() -> str:
    """A digest of the package's source files (names, sizes, modification times): changes with any edit or upgrade."""
    digest = hashlib.sha1()
    for path in sorted(PACKAGE.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(PACKAGE)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def fields_file() -> Path:
    """Where this installation's config field names are remembered."""
    return cache_dir() / f"{FIELDS_PREFIX}{source_stamp()}.json"


def remember_fields(fields: dict[str, Any]) -> None:
    """Write the field names for later checks (atomically), replacing older installations' files; a cache that
    cannot be written only means no early check."""
    file = fields_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f"{file.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(fields, sort_keys=True))
        partial.replace(file)
        for old in file.parent.glob(f"{FIELDS_PREFIX}*.json"):
            if old != file:
                old.unlink(missing_ok=True)
    except OSError:
        pass


def remembered_fields() -> dict[str, Any] | None:
    """This installation's remembered field names; None when there are none yet (or the file is not one of ours,
    so that the next full load writes it anew)."""
    try:
        fields = json.loads(fields_file().read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(fields, dict) and isinstance(fields.get("run"), dict) and isinstance(fields.get("methods"), dict)
    return fields if ok else None


def check_recipe_fields(data: Mapping[str, Any]) -> None:
    """Raise the unknown-field error that validating `data` would raise, from the remembered field names alone; with
    none remembered yet (this installation's first run) or a method outside mimkit (`package.module:Class`), the full
    validation after the heavy imports finds it instead."""
    fields = remembered_fields()
    if fields is None:
        return
    run, methods = fields["run"], fields["methods"]
    check_field_names({k: v for k, v in data.items() if k != "method"}, run)
    method = data.get("method")
    if isinstance(method, Mapping) and str(method.get("name")) in methods:
        check_field_names(method, methods[str(method["name"])], "method")
