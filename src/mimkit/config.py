"""Typed configs: YAML recipes + dotted command-line overrides -> validated dataclasses.

OmegaConf does the reading, merging and `${...}` interpolation; the conversion into dataclasses is ours
so that every error names the field, the value and what is allowed (OmegaConf has no `Literal`).
It knows no schema: the run schema (`mimkit.runs.RunConfig`) and its parts live beside the code they configure.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and the fix."""


def short_reason(error: BaseException) -> str:
    """The error's type and first line, leaving out torch's advice on `weights_only` (mimkit never unpickles code,
    so that advice would mislead)."""
    first = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first and "weights_only" not in first else type(error).__name__


def check(condition: bool, field_name: str, message: str) -> None:
    """Raise a ConfigError for `field_name` unless `condition` holds (used by `validate()` methods)."""
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


# ---------------------------------------------------------------------------------------------------
# Reading and converting


def read_yaml(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML recipe, apply `a.b=value` overrides, resolve interpolations; return a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (`mimkit recipes` lists the shipped recipes)")
    try:
        base = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    data = OmegaConf.to_container(base)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} holds a YAML {type(data).__name__}, not a recipe: a recipe is a mapping of sections "
            "(method:, data:, optim:, train:, ...); `mimkit recipes --path` shows shipped ones to copy"
        )
    return apply_overrides(data, overrides)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Merge `a.b=value` strings into `data` (values parsed as YAML) and resolve `${...}`."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
        try:
            yaml.safe_load(item.split("=", 1)[1])
        except yaml.YAMLError as error:
            problem = str(error).strip().splitlines()[0]
            raise ConfigError(
                f"override {item!r}: its value is not valid YAML ({problem}); quote it or close its brackets, "
                "e.g. optim.betas=[0.9,0.95]"
            ) from None
    try:
        merged = OmegaConf.merge(OmegaConf.create(dict(data)), OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        raise ConfigError(f"could not apply overrides {list(overrides)}: {error}") from None


def from_dict(cls: type[T], data: Any, prefix: str) -> T:
    """Build dataclass `cls` from a mapping, converting and checking every field against its type."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of fields, got {data!r}")
    older = getattr(cls, OLDER_ATTRIBUTE, None)
    if isinstance(older, Older):
        data = older.upgrade(data)
    hints = get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    chosen = {f.name: _chosen(f.metadata[SECTIONS], data, cls, prefix) for f in fields if SECTIONS in f.metadata}
    plain = [f.name for f in fields if SECTIONS not in f.metadata]
    _check_names(data, plain + [key for *_, keys in chosen.values() for key in keys], prefix)
    values = {}
    for f in fields:
        if f.name in chosen:
            key, section, _ = chosen[f.name]
            values[f.name] = None if section is None else from_dict(section, data.get(key), _join(prefix, key))
        elif f.name in data:
            values[f.name] = convert(data[f.name], hints[f.name], _join(prefix, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(prefix, f.name)}: required field is missing")
    return cls(**values)


def _check_names(data: Mapping[str, Any], names: Sequence[str], prefix: str) -> None:
    unknown = [key for key in data if key not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean '{_join(prefix, close[0])}'?" if close else f"; known fields: {', '.join(names)}"
        raise ConfigError(f"{_join(prefix, key)}: unknown field{hint}")


# ---------------------------------------------------------------------------------------------------
# Sections typed by a sibling field (a registry's choice), and older spellings

SECTIONS = "mimkit.sections"  # the dataclass field metadata key of a `Sections`
OLDER_ATTRIBUTE = "older_fields"  # the class attribute (an `Older`) of a config whose fields moved


@dataclass(frozen=True)
class Sections:
    """A field holding the section of whichever choice sibling field `by` names, its class looked up in `table` (a
    registry: choice -> section class, None for a choice with nothing of its own); declared as `field(default=None,
    metadata={SECTIONS: Sections(...)})`. YAML spells the section under the choice's own name (`data.source:
    synthetic` -> `data.synthetic: {size: 16}`); a section of another choice is an error, not silently ignored."""

    by: str
    table: Callable[[], Mapping[str, type | None]]


@dataclass(frozen=True)
class Older:
    """How older versions spelled a config class's fields, so that saved runs keep loading after fields move:
    `names` are the older top-level names (the torch-free name check lets them pass), and `upgrade` rewrites a
    mapping that may use them into today's spelling (`from_dict` calls it first)."""

    names: tuple[str, ...]
    upgrade: Callable[[Mapping[str, Any]], dict[str, Any]]


def _chosen(sections: Sections, data: Mapping[str, Any], cls: type, prefix: str) -> tuple[str, type | None, list[str]]:
    """The YAML key and section class of the choice `data` makes, and the keys of `data` it accounts for: that
    section, and sections of other choices set to null (how an override drops a recipe's section). Any other
    section of a choice is refused."""
    by = next(f for f in dataclasses.fields(cls) if f.name == sections.by)  # type: ignore[arg-type]
    name, table = _join(prefix, by.name), sections.table()
    choice = convert(data.get(by.name, by.default), get_type_hints(cls)[by.name], name)
    check_choice(choice, table, name)
    nulled = [key for key in data if key in table and data[key] is None]
    for key in [k for k in data if k in table and k not in nulled and (k != choice or table[k] is None)]:
        why = "has no settings of its own" if key == choice else f"is not the chosen one ({name} is {choice!r})"
        where = _join(prefix, key)
        raise ConfigError(f"{where}: a section for {by.name} {key!r}, which {why}; remove it or set {where}=null")
    return str(choice), table[choice], nulled + ([str(choice)] if table[choice] else [])


def check_choice(choice: Any, choices: Sequence[str] | Mapping[str, Any], name: str) -> None:
    """Raise a ConfigError for `name` unless `choice` is one of the registered `choices` (with a close-match hint)."""
    if choice not in choices:
        close = difflib.get_close_matches(str(choice), list(choices), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        what = name.rpartition(".")[2]
        raise ConfigError(f"{name}: unknown {what} {choice!r}{hint} (registered: {', '.join(sorted(choices))})")


def fill_sections(config: Any) -> None:
    """Give each empty choice-typed section of `config` its choice's defaults, so that a config built in Python holds
    what one read from a file without that section does (an unknown choice is left to validation)."""
    for f in dataclasses.fields(config):
        if (sections := f.metadata.get(SECTIONS)) is not None and getattr(config, f.name) is None:
            section = sections.table().get(getattr(config, sections.by))
            setattr(config, f.name, section() if section is not None else None)


def check_sections(config: Any, prefix: str) -> None:
    """Validate `config`'s choice-typed sections: a registered choice, a section of its class, the section's own
    `validate(prefix)`."""
    for f in (f for f in dataclasses.fields(config) if SECTIONS in f.metadata):
        by, table, section = f.metadata[SECTIONS].by, f.metadata[SECTIONS].table(), getattr(config, f.name)
        check_choice(choice := getattr(config, by), table, _join(prefix, by))
        expected, name = table[choice], _join(prefix, choice)
        wanted = expected.__name__ if expected is not None else "nothing (no settings of its own)"
        check(type(section) is (expected or type(None)), name, f"{by} {choice!r} takes {wanted}; got {section!r}")
        if hasattr(section, "validate"):
            section.validate(name)


FieldTree = dict[str, Any]
"""Field name -> the nested config's FieldTree, or None for a value: the names of a config class, as JSON. Keys in
angle brackets are not fields: `<by>` (None) stands for the sections that sibling field `by` chooses between
(`Sections`), which only the registry knows, and `<older>` lists older spellings (`Older`)."""
OLDER_KEY = "<older>"


def field_tree(cls: type) -> FieldTree:
    """The field names of config class `cls`, nested configs (also optional ones) as subtrees. It holds no
    registry's sections, so that a new choice (a data source, say) leaves the tree as it was."""
    hints = get_type_hints(cls)
    tree: FieldTree = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if SECTIONS in f.metadata:
            tree[f"<{f.metadata[SECTIONS].by}>"] = None
            continue
        annotation = hints[f.name]
        options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
        nested = [a for a in options if dataclasses.is_dataclass(a)]
        tree[f.name] = field_tree(nested[0]) if len(nested) == 1 else None
    older = getattr(cls, OLDER_ATTRIBUTE, None)
    if isinstance(older, Older):
        tree[OLDER_KEY] = sorted(older.names)
    return tree


def check_field_names(data: Any, tree: FieldTree, prefix: str = "") -> None:
    """Raise the unknown-field error `from_dict` would raise, from the field names alone (no class needed).

    It skips what it cannot know without the registries: where a config has choice-typed sections, a key that holds
    a mapping or null may be a section (`data.synthetic: {size: 16}`), so it is left to the full conversion, which
    checks the section's fields and refuses a section of another choice; so are older spellings (`Older`).
    """
    if not isinstance(data, Mapping):
        return
    names = [key for key in tree if not key.startswith("<")]
    sectioned = any(key.startswith("<") and key != OLDER_KEY for key in tree)
    skipped = {k for k, v in data.items() if sectioned and (v is None or isinstance(v, Mapping))} - set(names)
    skipped |= set(tree.get(OLDER_KEY, ()))
    _check_names({k: v for k, v in data.items() if k not in skipped}, names, prefix)
    for key, value in data.items():
        if key in names and tree[key] is not None:
            check_field_names(value, tree[key], _join(prefix, key))


def convert(value: Any, annotation: Any, name: str) -> Any:
    """Convert one value to `annotation`, or raise a ConfigError that says what was expected."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return convert(value, option, name)
            except ConfigError as error:
                errors.append(str(error).split(": ", 1)[1])
        raise ConfigError(f"{name}: {' or '.join(errors)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{name}: must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, name)  # type: ignore[arg-type]
    if origin in (list, tuple) or annotation in (list, tuple):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(convert(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        items = [convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    return _convert_scalar(value, annotation, name)


def _convert_scalar(value: Any, annotation: Any, name: str) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads `1e-3` as a string
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise TypeError(f"{name}: unsupported config annotation {annotation!r}")


def to_dict(config: Any) -> Any:
    """A dataclass config as plain YAML-friendly data (tuples become lists)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        data = {}
        for f in dataclasses.fields(config):
            sections, value = f.metadata.get(SECTIONS), getattr(config, f.name)
            if sections is None:
                data[f.name] = to_dict(value)
            elif value is not None:  # spelled under the choice's name, as `from_dict` reads it
                data[str(getattr(config, sections.by))] = to_dict(value)
        return data
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def describe_fields(cls: type, prefix: str = "", defaults: Any = None) -> typing.Iterator[tuple[str, str, Any, str]]:
    """(dotted name, type, default, doc) for every field of a config class, for `--help`-style listings.

    Nested configs report the defaults their parent gives them (a `default_factory` may differ from the nested
    class's own defaults), so the listing shows what a recipe that omits the field gets.
    """
    docs = _field_docs(cls)
    hints = get_type_hints(cls)
    sections = {s.by: s.table() for f in dataclasses.fields(cls) if (s := f.metadata.get(SECTIONS))}  # type: ignore[arg-type]
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if SECTIONS in f.metadata:  # each choice's section under its own name, with that section's defaults
            for choice, section in sorted(sections[f.metadata[SECTIONS].by].items()):
                if section is not None:
                    yield from describe_fields(section, _join(prefix, choice))
            continue
        name = _join(prefix, f.name)
        annotation = hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(annotation):
            yield from describe_fields(annotation, name, default)  # type: ignore[arg-type]
            continue
        type_name = "|".join(sorted(sections[f.name])) if f.name in sections else _type_name(annotation)
        yield name, type_name, default, docs.get(f.name, "")


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    return getattr(annotation, "__name__", str(annotation))


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after a field) of a dataclass, by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs
