"""Collapse warnings: the engine watches the `health_*` metrics a method returns (`mimkit.health`) and warns,
in the log and in `RUN/health.json` (shown in the run report), when one stays in a collapsed range for longer
than `train.health_window_steps`, saying what to try. It knows no method: only the metric names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HEALTH_FILE = "health.json"


@dataclass(frozen=True)
class Rule:
    metric: str
    below: bool
    """True: the collapse is the metric under `threshold`; False: over it."""
    threshold: float
    name: str
    advice: str

    def holds(self, value: float) -> bool:
        return value < self.threshold if self.below else value > self.threshold


RULES = (  # thresholds: ASSUMPTION, set on Fashion-MNIST runs (the demo's [CLS] plateau: entropy 0.92 of log K)
    Rule(
        "health_teacher_entropy",
        False,
        0.9,
        "uniform teacher",
        "the teacher's distributions are nearly uniform (entropy near log K), so that loss carries almost no "
        "signal and only the method's other objectives train the features; a slower center (center_momentum "
        "closer to 1), a lower teacher temperature or a smaller head (out_dim) move it off the plateau (on the "
        "Fashion-MNIST demo that does not raise k-NN: docs/methods/ibot.md)",
    ),
    Rule(
        "health_teacher_entropy",
        True,
        0.03,
        "one-hot teacher",
        "the teacher puts nearly all mass on one prototype; try a higher teacher temperature, faster centering "
        "(a smaller center_momentum) or a lower lr",
    ),
    Rule(
        "health_feature_std",
        True,
        0.05,
        "collapsed features",
        "the encoder maps every image to nearly the same feature; try a lower lr, a longer warm-up or a larger "
        "batch, and check the augmentations",
    ),
)


@dataclass
class HealthWarning:
    step: int
    since_step: int
    rule: str
    metric: str
    value: float
    advice: str

    def message(self) -> str:
        return (
            f"training health: {self.rule} since step {self.since_step} ({self.metric} = {self.value:.3f}): "
            f"{self.advice}"
        )


class HealthWatch:
    """Feeds on each logged step's metrics; a rule fires once per spell in which it held at every logged step
    for at least `window` steps (0: never)."""

    def __init__(self, window: int, earlier: Sequence[dict[str, Any]] = (), rules: tuple[Rule, ...] = RULES) -> None:
        """`earlier`: the warnings a resumed run gave before (`read_health`), kept in its file."""
        self.window, self.rules = window, rules
        self.since: dict[Rule, int] = {}
        self.fired: set[Rule] = set()
        self.earlier = list(earlier)
        self.warnings: list[HealthWarning] = []

    def observe(self, step: int, metrics: dict[str, Any]) -> list[HealthWarning]:
        new: list[HealthWarning] = []
        if self.window <= 0:
            return new
        for rule in self.rules:
            if rule.metric not in metrics:
                continue
            value = float(metrics[rule.metric])
            if not rule.holds(value):
                self.since.pop(rule, None)
                self.fired.discard(rule)
                continue
            start = self.since.setdefault(rule, step)
            if step - start >= self.window and rule not in self.fired:
                self.fired.add(rule)
                new.append(HealthWarning(step, start, rule.name, rule.metric, value, rule.advice))
        self.warnings += new
        return new

    def save(self, run_dir: Path) -> None:
        (run_dir / HEALTH_FILE).write_text(json.dumps(self.earlier + [asdict(w) for w in self.warnings], indent=1))


def read_health(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / HEALTH_FILE
    return json.loads(path.read_text()) if path.is_file() else []
