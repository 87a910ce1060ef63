"""The registry of encoder families: which timm models mimkit can train, and the Encoder class that wraps each.

A family is an `Encoder` subclass registered with `@register_family`: it names the timm modules (and, for models
that share another family's class, name patterns) it covers, and knows its own timm arguments, block types and
mask support. The builder (`mimkit.models.backbones`) looks a timm name up here and never branches on a family,
so a new family is one registered class: a module of this package (found and imported on first lookup, as the
built-in vit, beit and cnn are), or any module of one's own imported before the recipe is loaded.
"""

from __future__ import annotations

import difflib
import fnmatch
from pathlib import Path
from typing import TypeVar

import timm

from mimkit.config import ConfigError
from mimkit.models.encoder import Encoder
from mimkit.registry import import_package

_FAMILIES: dict[str, type[Encoder]] = {}
E = TypeVar("E", bound=type[Encoder])


def register_family(cls: E) -> E:
    """Class decorator: `cls` wraps the timm models of its `timm_modules` and `name_patterns` under `cls.family`.
    A family of one's own is registered after the built-ins, so it takes over a module they cover."""
    if not cls.__module__.startswith(f"{__package__}."):
        _load_builtins()
    if not cls.family or not (cls.timm_modules or cls.name_patterns):
        raise ValueError(f"{cls.__qualname__}: an encoder family needs a `family` name and timm_modules or patterns")
    known = _FAMILIES.get(cls.family)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"encoder family {cls.family!r} is already registered by {known.__qualname__}")
    _FAMILIES[cls.family] = cls
    return cls


def _load_builtins() -> None:
    """Import every module of this package once: each built-in family registers itself with `@register_family`."""
    import_package(__package__, str(Path(__file__).parent))


def family_names() -> list[str]:
    _load_builtins()
    return sorted(_FAMILIES)


def registered_families() -> dict[str, type[Encoder]]:
    """Family name -> its Encoder class, in registration order."""
    _load_builtins()
    return dict(_FAMILIES)


def examples() -> str:
    return ", ".join(cls.example for cls in registered_families().values() if cls.example)


def family_of(name: str, prefix: str = "method.backbone") -> type[Encoder]:
    """The Encoder class of the family a timm model belongs to; a ConfigError naming the families that work."""
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(
            f"{prefix}.name: unknown timm model {name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else f"; e.g. {examples()}")
        )
    module = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    # the latest registration wins: a family of one's own can take over a module
    for cls in reversed(registered_families().values()):
        if module in cls.timm_modules or any(fnmatch.fnmatch(name, p) for p in cls.name_patterns):
            return cls
    covered = sorted({m for cls in _FAMILIES.values() for m in cls.timm_modules})
    raise ConfigError(
        f"{prefix}.name: {name!r} is a timm {module} model; mimkit encoders wrap the timm families "
        f"{', '.join(covered)} (e.g. {examples()}); a new family is one registered Encoder class "
        "(docs/extending.md)"
    )
