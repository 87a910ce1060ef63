"""Training curves from a run's metrics.csv: losses, schedules, throughput, online k-NN and the health measures
(`mimkit.health`), against the step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PANELS: tuple[tuple[str, Callable[[str], bool], bool], ...] = (
    ("loss", lambda key: key == "loss" or key.startswith("loss_"), True),
    ("learning rate", lambda key: key == "lr", False),
    ("weight decay", lambda key: key == "weight_decay", False),
    ("images / s", lambda key: key == "images_per_second", True),
    ("k-NN top-1", lambda key: key == "knn_top1", False),
    ("training health (0-1)", lambda key: key.startswith("health_"), True),
)
"""Panel title, which metrics.csv columns it draws, and whether smoothing applies (not to exact schedules or
sparse evaluations). A panel without data is left out."""


def series(rows: Sequence[dict[str, float]]) -> dict[str, tuple[list[float], list[float]]]:
    """Column -> (steps, values) over the rows that have both (epoch-end rows hold other columns)."""
    found: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        if "step" not in row:
            continue
        for key, value in row.items():
            if key != "step":
                steps, values = found.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(value)
    return found


def smoothed(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with a debiased start (TensorBoard's smoothing; weight 0 returns the values)."""
    out, average = [], 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** (i + 1)) if weight > 0 else value)
    return out


def curves_figure(rows: Sequence[dict[str, float]], smoothing: float = 0.0) -> Figure:
    """One panel per quantity present; smoothed curves keep the raw curve visible underneath, faded."""
    data = series(rows)
    panels = [(title, sorted(k for k in data if wanted(k)), smooth) for title, wanted, smooth in PANELS]
    panels = [panel for panel in panels if panel[1]]
    figure = Figure(figsize=(4.2 * max(len(panels), 1), 3.2), layout="constrained")
    if not panels:
        figure.text(0.5, 0.5, "metrics.csv has no step metrics yet", ha="center", va="center")
        return figure
    for ax, (title, keys, smooth) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for key in keys:
            steps, values = data[key]
            if smoothing > 0 and smooth:
                line = ax.plot(steps, values, alpha=0.25, linewidth=0.8)[0]
                ax.plot(steps, smoothed(values, smoothing), color=line.get_color(), label=key)
            else:
                ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(keys) > 1:
            ax.legend(fontsize=7)
    return figure
