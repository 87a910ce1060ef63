"""Typed configs: YAML recipes + dotted command-line overrides -> validated dataclasses.

OmegaConf does the reading, merging and `${...}` interpolation; the conversion into dataclasses is ours
so that every error names the field, the value and what is allowed (OmegaConf has no `Literal`).
A recipe's `method` section is typed by the config class of the method it names (see `mimkit.methods`).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and the fix."""


def check(condition: bool, field_name: str, message: str) -> None:
    """Raise a ConfigError for `field_name` unless `condition` holds (used by `validate()` methods)."""
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


@dataclass
class DataConfig:
    """Where the images come from and how they are batched."""

    source: Literal["fashion-mnist", "imagefolder", "torchvision", "synthetic"] = "fashion-mnist"
    root: str | None = None
    """Folder of the data. fashion-mnist: IDX files (default: the Debian package, then mimkit's cache)."""
    name: str | None = None
    """torchvision dataset class name (source=torchvision), e.g. CIFAR10."""
    split: str = "train"
    eval_split: str = "test"
    download: bool = True
    """Allow torchvision downloads (fashion-mnist fallback, torchvision sets)."""
    channels: int | None = None
    """Force 1 (grayscale) or 3 (RGB) channels; None keeps the source's own."""
    strict: bool = False
    """Fail on the first unreadable image instead of skipping it with a counted warning."""
    limit: int | None = None
    """Use only the first `limit` images (quick runs, tests)."""
    batch_size: int = 64
    """Images per device and optimizer micro-step."""
    num_workers: int = 2
    synthetic_images: int = 512
    synthetic_size: int = 32
    synthetic_classes: int = 4

    def validate(self, prefix: str = "data") -> None:
        check(
            self.source != "torchvision" or bool(self.name),
            f"{prefix}.name",
            "source=torchvision needs the dataset class name, e.g. data.name=CIFAR10",
        )
        check(
            self.source != "imagefolder" or bool(self.root),
            f"{prefix}.root",
            "source=imagefolder needs the folder of images, e.g. data.root=/data/imagenet",
        )
        check(self.channels in (None, 1, 3), f"{prefix}.channels", f"must be 1, 3 or null; got {self.channels}")
        check(self.limit is None or self.limit > 0, f"{prefix}.limit", f"must be positive; got {self.limit}")
        check(self.batch_size > 0, f"{prefix}.batch_size", f"must be positive; got {self.batch_size}")
        check(self.num_workers >= 0, f"{prefix}.num_workers", f"must be >= 0; got {self.num_workers}")
        check(
            self.synthetic_classes > 0 and self.synthetic_images > 0 and self.synthetic_size >= 8,
            f"{prefix}.synthetic_*",
            "need positive counts and a size of at least 8 pixels",
        )


@dataclass
class OptimConfig:
    """AdamW with per-iteration cosine schedules for learning rate and weight decay."""

    lr: float = 5e-4
    """Base learning rate for `lr_reference_batch` images; scaled by the global batch size."""
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    lr_reference_batch: int = 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    warmup_start_lr: float = 0.0
    weight_decay: float = 0.04
    weight_decay_end: float | None = None
    """Cosine-scheduled weight decay ends here; None keeps it constant."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    accumulate_grad_batches: int = 1

    def validate(self, prefix: str = "optim") -> None:
        check(self.lr > 0, f"{prefix}.lr", f"must be positive; got {self.lr}")
        check(self.min_lr >= 0, f"{prefix}.min_lr", f"must be >= 0; got {self.min_lr}")
        check(self.warmup_epochs >= 0, f"{prefix}.warmup_epochs", f"must be >= 0; got {self.warmup_epochs}")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0; got {self.weight_decay}")
        check(all(0 <= b < 1 for b in self.betas), f"{prefix}.betas", f"must lie in [0, 1); got {self.betas}")
        check(self.lr_reference_batch > 0, f"{prefix}.lr_reference_batch", "must be positive")
        check(
            self.accumulate_grad_batches >= 1,
            f"{prefix}.accumulate_grad_batches",
            f"must be >= 1; got {self.accumulate_grad_batches}",
        )


@dataclass
class TrainConfig:
    """How the loop runs: length, hardware, precision, checkpoints and logs."""

    epochs: int = 100
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp"] = "auto"
    checkpoint_every_epochs: int = 1
    """Keep `epoch_NNNN.ckpt` every N epochs (0: only `last.ckpt`)."""
    checkpoint_every_steps: int = 0
    """Also refresh `last.ckpt` every N optimizer steps inside an epoch (0: only at epoch ends)."""
    log_every_steps: int = 10
    on_nonfinite: Literal["error", "skip"] = "error"
    """A non-finite loss stops the run with a checkpoint of the last good state, or skips the step."""
    compile: bool = False
    progress_bar: bool = True
    loggers: list[Literal["csv", "tensorboard", "wandb"]] = field(default_factory=lambda: ["csv", "tensorboard"])
    knn_every_epochs: int = 0
    """Online k-NN of `method.encoder()` every N epochs when the data has labels (0: never)."""
    knn_limit: int | None = 10000
    """Images per split used by the online k-NN (None: all)."""

    def validate(self, prefix: str = "train") -> None:
        check(self.epochs >= 1, f"{prefix}.epochs", f"must be >= 1; got {self.epochs}")
        check(self.devices == "auto" or self.devices >= 1, f"{prefix}.devices", "must be >= 1 or auto")
        check(self.num_nodes >= 1, f"{prefix}.num_nodes", f"must be >= 1; got {self.num_nodes}")
        for name in ("checkpoint_every_epochs", "checkpoint_every_steps", "knn_every_epochs"):
            check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
        check(self.log_every_steps >= 1, f"{prefix}.log_every_steps", "must be >= 1")


@dataclass
class RunConfig:
    """One pretraining run: a method recipe plus data, optimisation and loop settings."""

    method: Any
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    output_dir: str = "runs/default"
    resume: str | None = None
    """null: fresh run (refuses a run folder that already has checkpoints); auto: continue if possible;
    or the path of a checkpoint to continue from."""

    def validate(self) -> None:
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        if hasattr(self.method, "validate"):
            self.method.validate()


# ---------------------------------------------------------------------------------------------------
# Reading and converting


def read_yaml(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML recipe, apply `a.b=value` overrides, resolve interpolations; return a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (shipped recipes live under configs/)")
    try:
        base = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return apply_overrides(OmegaConf.to_container(base), overrides)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Merge `a.b=value` strings into `data` (values parsed as YAML) and resolve `${...}`."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
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
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [key for key in data if key not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean '{_join(prefix, close[0])}'?" if close else f"; known fields: {', '.join(names)}"
        raise ConfigError(f"{_join(prefix, key)}: unknown field{hint}")
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            values[f.name] = convert(data[f.name], hints[f.name], _join(prefix, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(prefix, f.name)}: required field is missing")
    return cls(**values)


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
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def load_run_config(
    path: str | Path | None, overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None
) -> RunConfig:
    """Read a recipe (or start from `base`, e.g. a run's saved config), apply overrides, validate."""
    from mimkit.methods import method_class  # the registry imports the methods, which import this module

    data = read_yaml(path, overrides) if path is not None else apply_overrides(base or {}, overrides)
    method_data = data.get("method")
    if not isinstance(method_data, Mapping) or "name" not in method_data:
        raise ConfigError("method.name: every recipe names its method, e.g. method.name=ibot")
    method_cls = method_class(str(method_data["name"]))
    config = from_dict(RunConfig, {**data, "method": None}, "")
    config.method = from_dict(method_cls.Config, method_data, "method")
    config.validate()
    return config


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def describe_fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, str, Any, str]]:
    """(dotted name, type, default, doc) for every field of a config class, for `--help`-style listings."""
    docs = _field_docs(cls)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = _join(prefix, f.name)
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            yield from describe_fields(annotation, name)  # type: ignore[arg-type]
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        yield name, _type_name(annotation), default, docs.get(f.name, "")


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
    import ast
    import inspect
    import textwrap

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
