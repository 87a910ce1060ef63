"""The registry of image sources: `data.source` names one, and its section `data.<source>` is typed by its `Config`.

Every module of this package is imported once on the first look-up, so a built-in source registers itself by
being a file here; a source defined elsewhere registers when its module is imported (before the config is read).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mimkit.config import check_choice
from mimkit.data.sources.base import ImageSource
from mimkit.registry import import_package

S = TypeVar("S", bound=type[ImageSource])

_SOURCES: dict[str, type[ImageSource]] = {}


def _load_builtins() -> None:
    """Import every module of this package once: each built-in source registers itself with `@register_source`."""
    import_package(__package__, str(Path(__file__).parent))


def register_source(name: str) -> Callable[[S], S]:
    """Class decorator: make an ImageSource subclass available as `data.source: <name>`. The class is built as
    `cls(data_config, split)`; its `Config` dataclass (if any) types its section `data.<name>`, and its
    `check_config` / `same_images` class methods say what it needs of the shared fields."""

    def add(cls: S) -> S:
        if name in _SOURCES and _SOURCES[name] is not cls:
            raise ValueError(f"data source {name!r} is already registered by {_SOURCES[name].__qualname__}")
        _SOURCES[name] = cls
        return cls

    return add


def source_classes() -> dict[str, type[ImageSource]]:
    """Every registered source by name."""
    _load_builtins()
    return dict(sorted(_SOURCES.items()))


def source_names() -> list[str]:
    return list(source_classes())


def source_class(name: str) -> type[ImageSource]:
    """The source registered as `name`; a ConfigError on data.source listing the registered ones otherwise."""
    sources = source_classes()
    check_choice(name, sources, "data.source")
    return sources[name]
