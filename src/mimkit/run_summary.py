"""What a run folder holds, read without building its networks: `mimkit runs show` and `mimkit runs compare`.

Everything comes from the folder's own files: config.yaml (what was asked), the last checkpoint's position (what
was done), metrics.csv (the last loss, the training minutes), eval/history.jsonl (every evaluation) and
health.json (collapse warnings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mimkit.config import ConfigError
from mimkit.engine.checkpoint import checkpoint_dir, last_path
from mimkit.engine.health import read_health
from mimkit.engine.logs import read_metrics
from mimkit.eval.results import latest_by_evaluation
from mimkit.methods.saved import read_checkpoint


@dataclass
class RunSummary:
    run_dir: Path
    config: dict[str, Any]
    epochs_done: int | None
    steps_done: int | None
    last_loss: tuple[int, float] | None
    """(step, loss) of the last logged step."""
    train_minutes: float | None
    evaluations: dict[str, dict[str, Any]]
    """The latest history record of each evaluation."""
    checkpoints: list[tuple[str, int]] = field(default_factory=list)
    """(file name, bytes), oldest first."""
    health_warnings: int = 0

    @property
    def epochs(self) -> int:
        return int(self.config.get("train", {}).get("epochs", 0))

    def facts(self) -> dict[str, str]:
        """The summary as label -> text, in reading order."""
        method = self.config.get("method", {})
        backbone = method.get("backbone", {})
        shape = {k: backbone[k] for k in ("img_size", "patch_size", "embed_dim", "depth") if backbone.get(k)}
        shape |= backbone.get("model_args") or {}
        data = self.config.get("data", {})
        images = f", first {data['limit']:,} images" if data.get("limit") else ""
        root = f" at {data['root']}" if data.get("root") else ""
        done = "?" if self.epochs_done is None else str(self.epochs_done)
        batch = (
            f"global batch {data['global_batch']}"
            if data.get("global_batch")
            else f"batch {data.get('batch_size', '?')} per process"
        )
        facts = {
            "method": str(method.get("name", "?")),
            "backbone": f"{backbone.get('name', '?')} {_inline(shape)}".strip(),
            "data": f"{data.get('source', '?')}{root}{images}, {batch}",
            "epochs": f"{done} of {self.epochs} ({self.steps_done if self.steps_done is not None else '?'} steps)",
            "last loss": f"{self.last_loss[1]:.4f} at step {self.last_loss[0]}" if self.last_loss else "none logged",
            "training time": f"{self.train_minutes:.1f} min" if self.train_minutes is not None else "not recorded",
            "health": f"{self.health_warnings} collapse warning(s) (health.json)"
            if self.health_warnings
            else "no warnings",
        }
        for name, record in self.evaluations.items():
            facts[f"eval {name}"] = f"{record['headline']} ({record['time']})"
        if not self.evaluations:
            facts["eval"] = "none yet (mimkit eval knn RUN)"
        facts["checkpoints"] = ", ".join(f"{n} {_size(b)}" for n, b in self.checkpoints) or "none"
        return facts


def _inline(values: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k} {v}" for k, v in values.items()) + ")" if values else ""


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.0f} KiB"


def summarize(run_dir: str | Path) -> RunSummary:
    """The summary of one run folder; a ConfigError when the folder is not a mimkit run."""
    run = Path(run_dir)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run} is not a mimkit run folder (no config.yaml); give the output_dir of a pretraining")
    config = yaml.safe_load(config_file.read_text()) or {}
    epochs = steps = None
    if last_path(run).is_file():
        position = read_checkpoint(last_path(run), mmap=True).get("position", {})
        epochs, steps = position.get("epoch"), position.get("step")
    rows = read_metrics(run) if (run / "metrics.csv").is_file() else []
    losses = [(int(r["step"]), r["loss"]) for r in rows if "loss" in r and "step" in r]
    minutes = [r["train_minutes"] for r in rows if "train_minutes" in r]
    files = sorted(checkpoint_dir(run).glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if run.is_dir() else []
    return RunSummary(
        run_dir=run,
        config=config,
        epochs_done=epochs,
        steps_done=steps,
        last_loss=losses[-1] if losses else None,
        train_minutes=minutes[-1] if minutes else None,
        evaluations=latest_by_evaluation(run),
        checkpoints=[(p.name, p.stat().st_size) for p in files],
        health_warnings=len(read_health(run)),
    )


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, name + ".")
        else:
            flat[name] = value
    return flat


def config_differences(summaries: Sequence[RunSummary]) -> dict[str, list[Any]]:
    """Config keys whose values are not the same in every run (a key one run lacks counts as different),
    without output_dir (always different)."""
    flats = [flatten(s.config) for s in summaries]
    keys = sorted(set().union(*flats) - {"output_dir"})
    missing = object()
    differing = {}
    for key in keys:
        values = [flat.get(key, missing) for flat in flats]
        if any(v != values[0] for v in values[1:]):
            differing[key] = [None if v is missing else v for v in values]
    return differing


def result_rows(summaries: Sequence[RunSummary]) -> dict[str, list[float | None]]:
    """Training time, last loss and each evaluation's score (a fraction: top-1, or the metric its record names, e.g.
    mIoU) for each run."""
    evaluations = sorted(set().union(*(s.evaluations for s in summaries)))
    rows: dict[str, list[float | None]] = {
        "training minutes": [s.train_minutes for s in summaries],
        "last loss": [s.last_loss[1] if s.last_loss else None for s in summaries],
    }
    for name in evaluations:
        metric = next(s.evaluations[name].get("metric", "top-1") for s in summaries if name in s.evaluations)
        rows[f"{name} {metric} (%)"] = [
            100 * s.evaluations[name]["score"] if name in s.evaluations else None for s in summaries
        ]
    return rows
