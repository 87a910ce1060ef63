"""The tokenizer kinds by name: what `tokenizer.kind` in a recipe and `kind` in a tokenizer file choose.

A kind is one module of this package whose Tokenizer subclass carries `@register_tokenizer` (or such a class
defined anywhere, once its module is imported): it owns its recipe config (`Config`), its builder and its fitting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from mimkit.config import ConfigError, from_dict
from mimkit.models.tokenizers.base import Tokenizer, TokenizerConfig
from mimkit.registry import import_package

T = TypeVar("T", bound=type[Tokenizer])
_KINDS: dict[str, type[Tokenizer]] = {}


def register_tokenizer(cls: T) -> T:
    """Class decorator: make a tokenizer class available to recipes and files under its `kind`."""
    if cls.kind in _KINDS and _KINDS[cls.kind] is not cls:
        raise ValueError(f"tokenizer kind {cls.kind!r} is already registered by {_KINDS[cls.kind].__qualname__}")
    _KINDS[cls.kind] = cls
    return cls


def _load_builtins() -> None:
    """Import every module of this package once: each kind registers itself."""
    import_package(__package__, str(Path(__file__).parent))


def tokenizer_kinds() -> list[str]:
    _load_builtins()
    return sorted(_KINDS)


def tokenizer_class(kind: str, field_name: str = "tokenizer.kind") -> type[Tokenizer]:
    """The registered class of `kind`, or a ConfigError on `field_name` listing the registered kinds."""
    _load_builtins()
    if kind not in _KINDS:
        raise ConfigError(
            f"{field_name}: unknown tokenizer kind {kind!r}; choose one of {', '.join(tokenizer_kinds())}"
        )
    return _KINDS[kind]


def tokenizer_config(data: Mapping[str, Any] | None, prefix: str = "tokenizer") -> TokenizerConfig:
    """The config of the kind that `data["kind"]` names (the base config's default kind when it names none), read
    from `data`; a field that belongs to other kinds only is an error naming the field and both kinds."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of fields, got {data!r}")
    data = dict(data or {})
    kind = str(data.get("kind", TokenizerConfig.kind))
    config_class = tokenizer_class(kind, f"{prefix}.kind").Config
    own = _field_names(config_class)
    for key in data:
        owners = [k for k in tokenizer_kinds() if key not in own and key in _field_names(_KINDS[k].Config)]
        if owners:
            raise ConfigError(
                f"{prefix}.{key}: a field of the {' and '.join(owners)} tokenizer, not of kind {kind!r} "
                f"(its fields: {', '.join(own)})"
            )
    return from_dict(config_class, {**data, "kind": kind}, prefix)


def _field_names(config_class: type[TokenizerConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class)]
