"""Training-health warnings: the engine watches the `health_*` metrics a method returns (`mimkit.health`) and warns,
in the log and in `RUN/health.json` (shown in the run report), when one stays in a collapsed range (or, for masks,
far off their configured share) for longer than `train.health_window_steps`, saying what to try. It knows no method:
only the metric names, which may carry a role (`health_online_mask_fill` is watched as `health_mask_fill`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mimkit.data.masking import FAR_OFF

HEALTH_FILE = "health.json"
HEALTH = "health_"


@dataclass(frozen=True)
class Rule:
    metric: str
    below: bool
    """True: the collapse is the metric under `threshold`; False: over it."""
    threshold: float
    name: str
    advice: str
    context: tuple[str, ...] = ()
    """Metrics shown beside the value in the warning (with the watched metric's role)."""

    def holds(self, value: float) -> bool:
        return value < self.threshold if self.below else value > self.threshold

    def role(self, name: str) -> str | None:
        """The role prefix ("" or "online_") under which `name` is this rule's metric; None when it is not."""
        measure = self.metric.removeprefix(HEALTH)
        if not (name.startswith(HEALTH) and name.endswith(measure)):
            return None
        role = name[len(HEALTH) : len(name) - len(measure)]
        return role if role == "" or role.endswith("_") else None


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
    Rule(
        "health_mask_fill",
        True,
        1 / FAR_OFF,
        "masks far off",
        "the masks cover less than half of the patches their config asks for, so the masked objective trains on "
        "little corruption; the token grid is too small for the ratio (a crop's ratio x patches under one patch) "
        "or for the blocks: raise the mask ratios, lower min_block_patches, or train at a larger image size or a "
        "smaller patch (docs/troubleshooting.md, Masks)",
        ("mask_ratio", "mask_ratio_configured"),
    ),
    Rule(
        "health_mask_fill",
        False,
        FAR_OFF,
        "masks far off",
        "the masks cover more than twice the patches their config asks for; check the mask config and the method's "
        "mask generator (docs/troubleshooting.md, Masks)",
        ("mask_ratio", "mask_ratio_configured"),
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
    context: dict[str, float] = field(default_factory=dict)

    def message(self) -> str:
        values = "".join(f", {name} = {value:.3f}" for name, value in self.context.items())
        return (
            f"training health: {self.rule} since step {self.since_step} ({self.metric} = {self.value:.3f}{values}): "
            f"{self.advice}"
        )


class HealthWatch:
    """Feeds on each logged step's metrics; a rule fires once per spell in which it held at every logged step
    for at least `window` steps (0: never), for each metric it watches (one per role)."""

    def __init__(self, window: int, earlier: Sequence[dict[str, Any]] = (), rules: tuple[Rule, ...] = RULES) -> None:
        """`earlier`: the warnings a resumed run gave before (`read_health`), kept in its file."""
        self.window, self.rules = window, rules
        self.since: dict[tuple[Rule, str], int] = {}
        self.fired: set[tuple[Rule, str]] = set()
        self.earlier = list(earlier)
        self.warnings: list[HealthWarning] = []

    def observe(self, step: int, metrics: dict[str, Any]) -> list[HealthWarning]:
        new: list[HealthWarning] = []
        if self.window <= 0:
            return new
        for rule in self.rules:
            for name in metrics:
                role = rule.role(name)
                if role is None:
                    continue
                key, value = (rule, name), float(metrics[name])
                if not rule.holds(value):
                    self.since.pop(key, None)
                    self.fired.discard(key)
                    continue
                start = self.since.setdefault(key, step)
                if step - start >= self.window and key not in self.fired:
                    self.fired.add(key)
                    shown = {role + c: float(metrics[role + c]) for c in rule.context if role + c in metrics}
                    new.append(HealthWarning(step, start, rule.name, name, value, rule.advice, shown))
        self.warnings += new
        return new

    def save(self, run_dir: Path) -> None:
        (run_dir / HEALTH_FILE).write_text(json.dumps(self.earlier + [asdict(w) for w in self.warnings], indent=1))


def read_health(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / HEALTH_FILE
    return json.loads(path.read_text()) if path.is_file() else []
