"""Continuing a run: which checkpoint, and which config changes a run in progress can take.

A resumed run's weights, optimizer state and position were made with its saved config. Changes that only alter
how the loop runs from here on (length, logging, checkpoint intervals, hardware) are applied with a notice;
changes to the optimisation (lr, weight decay, ...) and fields a newer mimkit added to the schema (with their
defaults) only with `--force`; anything else (the method, its
networks, the data, the batch, the seed) is refused with the list of fields, before anything is written. A
method may name fields that do not shape the run (`MethodConfig.runtime_fields`, e.g. debugging hooks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mimkit.config import ConfigError, to_dict
from mimkit.data.config import upgrade_older_fields
from mimkit.engine import checkpoint as ckpt
from mimkit.methods.saved import check_pretraining_checkpoint, readable_checkpoint
from mimkit.runs import RunConfig

SAFE = (
    "train.epochs",
    "train.log_every_steps",
    "train.health_window_steps",
    "train.checkpoint_every_epochs",
    "train.checkpoint_every_steps",
    "train.keep_epoch_checkpoints",
    "train.sync_batchnorm",
    "train.progress_bar",
    "train.loggers",
    "train.knn_every_epochs",
    "train.knn_limit",
    "train.on_nonfinite",
    "train.compile",
    "train.precision",
    "train.accelerator",
    "train.devices",
    "train.num_nodes",
    "train.strategy",
    "data.root",
    "data.num_workers",
    "data.prefetch_factor",
    "data.augment_on",
    "data.download",
    "data.strict",
)
"""Fields a run in progress takes with a notice: how the loop runs from here on, where the data now lies."""
WITH_FORCE = ("optim.",)
"""Prefixes of fields a run in progress takes with --force: the optimisation from here on."""
REFUSED_EVEN_WITH_FORCE = ("optim.accumulate_grad_batches",)
"""It changes the steps of an epoch, so the saved position would point elsewhere."""
IGNORED = ("resume", "output_dir")
"""Where the run lies now and how it was asked to resume: never a change of the run."""


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to continue from, or None; refuses to overwrite a run that has checkpoints."""
    run_dir = Path(cfg.output_dir)
    last = ckpt.last_checkpoint(run_dir)
    if cfg.resume is None:
        if last is not None:
            raise ConfigError(
                f"resume: {run_dir} already holds checkpoints; pass --resume (or resume=auto) to "
                "continue that run, or choose another output_dir"
            )
        return None
    if cfg.resume == "auto":
        return last
    path = Path(cfg.resume)
    if path.is_dir():  # a run folder
        path = ckpt.checkpoint_dir(path) / ckpt.LAST
    if not path.exists():
        raise ConfigError(f"resume: no checkpoint at {path}")
    return path


def readable_resume(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """The checkpoint to resume from, falling back to the newest readable one of its folder if it is truncated or
    corrupted (with a warning naming both), and its contents (memory-mapped: the weights are not read here; the
    config it was written with, the method state a method may rebuild file-made parts from); None for a sharded
    checkpoint folder."""
    if path.is_dir():
        return path, None
    try:
        path, state = readable_checkpoint(path, mmap=True)
    except ValueError as error:  # reported here, before anything is written
        raise ConfigError(f"resume: {error}") from None
    check_pretraining_checkpoint(state, path)
    return path, state


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> values; lists and tuples compare as lists."""
    if isinstance(config, dict):
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat |= flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix[:-1]: list(config) if isinstance(config, tuple) else config}


def config_changes(saved: dict[str, Any], cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Field -> (saved value, new value) for every field the new config changes; a run saved before sources owned
    their sections compares in today's spelling (a renamed field is no change)."""
    saved = {**saved, "data": upgrade_older_fields(saved.get("data") or {})}
    old, new = flatten(saved), flatten(to_dict(cfg))
    changed = {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())}
    return {k: v for k, v in changed.items() if v[0] != v[1] and k not in IGNORED}


def check_resume_changes(saved: dict[str, Any], cfg: RunConfig, force: bool = False) -> list[str]:
    """Notices for the changes a resumed run applies; a ConfigError naming every change it cannot take."""
    changes = config_changes(saved, cfg)
    safe = (*SAFE, *(f"method.{name}" for name in getattr(cfg.method, "runtime_fields", ())))
    known = flatten({**saved, "data": upgrade_older_fields(saved.get("data") or {})})
    added = {k for k in changes if k not in known and not any(k.startswith(f"{old}.") for old in known)}
    refused = {
        k: v
        for k, v in changes.items()
        if k not in safe and k not in added and (not k.startswith(WITH_FORCE) or k in REFUSED_EVEN_WITH_FORCE)
    }
    forced = {k: v for k, v in changes.items() if k not in safe and k not in refused}

    def lines(items: dict[str, tuple[Any, Any]]) -> str:
        return "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in items.items())

    if refused:
        raise ConfigError(
            "resume: a run in progress cannot take these changes (its weights and position were made with the "
            f"saved values):\n{lines(refused)}\nresume without them, or start a new run with another output_dir"
        )
    if forced and not force:
        news = " (fields mimkit added since the run was saved take their defaults)" if added & forced.keys() else ""
        raise ConfigError(
            f"resume: these changes alter the optimisation of a run in progress{news}:\n{lines(forced)}\n"
            "pass --force to apply them from the current step on, or resume without them"
        )
    return [f"resume: applying {key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()]
