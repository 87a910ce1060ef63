"""Logs of a run: the console/file logger, metrics.csv (what plots read) and the live progress display."""

from __future__ import annotations

import csv
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.loggers import Logger
from lightning.fabric.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mimkit import IMPORTED_AT

log = logging.getLogger("mimkit")
METRICS_FILE = "metrics.csv"


def setup_logging(run_dir: Path | None, rank: int = 0) -> None:
    """Rich console output on rank 0 (warnings only elsewhere) and `train.log` in the run folder."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    stderr = Console(stderr=True)
    if stderr.is_terminal:
        console: logging.Handler = RichHandler(console=stderr, show_path=False, markup=False, rich_tracebacks=False)
    else:  # CI logs, SLURM output files: plain lines, no wrapping
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.addHandler(console)
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file)


class MetricsCSV(Logger):
    """`metrics.csv` in the run folder: one row per logged step, one column per metric, appended as it goes.

    A new metric adds a column by rewriting the file once. A resumed run first drops the rows the interrupted
    run wrote after its checkpoint, so the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.path = Path(run_dir) / METRICS_FILE
        self.columns: list[str] = []

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def start_at(self, resume_step: int | None) -> None:
        """Fresh run (None): the file is replaced at the first row. Resumed: keep rows up to the checkpoint's step."""
        if resume_step is None or not self.path.exists():
            return
        columns, rows = self._read()
        self._write(columns, [r for r in rows if r.get("step", "") != "" and float(r["step"]) <= resume_step])

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The resolved config is saved as config.yaml beside this file."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        new = [k for k in row if k not in self.columns]
        if new:
            columns, rows = self._read() if self.columns else ([], [])
            self._write(columns + [k for k in row if k not in columns], [*rows, row])
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def _read(self) -> tuple[list[str], list[dict[str, Any]]]:
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def _write(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        self.columns = columns
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def log_start_up(set_up_began: float) -> None:
    """How long a run took to reach its first step: the imports (since mimkit was imported) and its set-up (data,
    networks, optimizer, a restored checkpoint) since `set_up_began`."""
    now = time.perf_counter()
    imports, set_up = set_up_began - IMPORTED_AT, now - set_up_began
    log.info("start-up %.1f s: imports %.1f s, set-up %.1f s", now - IMPORTED_AT, imports, set_up)


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """metrics.csv as a list of rows, numbers parsed, empty cells left out."""
    rows = []
    with open(Path(run_dir) / METRICS_FILE, newline="") as f:
        for raw in csv.DictReader(f):
            rows.append({k: float(v) for k, v in raw.items() if v not in ("", None)})
    return rows


REFRESH_S = 0.5
"""How often the progress bar reads the loss (a host-device sync) and redraws its numbers."""


class ProgressDisplay:
    """A rich progress bar (loss, lr, images/s, data wait, ETA) on a terminal; a log line every few steps otherwise."""

    def __init__(self, total_steps: int, done_steps: int, *, enabled: bool, log_every: int) -> None:
        self.total, self.log_every = total_steps, log_every
        console = Console(stderr=True)
        self.bar: Progress | None = None
        if enabled and console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold blue]epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[numbers]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = self.bar.add_task(
                "pretrain", total=total_steps, completed=done_steps, epoch=0, numbers="waiting for the first step"
            )
            self.bar.start()
        self.started, self.start_step = time.perf_counter(), done_steps
        self.shown, self.numbers = -math.inf, "waiting for the first step"

    def update(
        self, step: int, epoch: int, loss: torch.Tensor, lr: float, images_per_second: float, data_wait: float
    ) -> None:
        """`loss` stays a tensor until it is shown (at most every REFRESH_S on a terminal, every `log_every` steps
        otherwise): reading it waits for the device, which the training loop should not do every step.
        `data_wait`: the share of the time the loop waited for data (`mimkit.engine.feed.FeedMeter`)."""
        if self.bar is not None:
            now = time.perf_counter()
            if now - self.shown >= REFRESH_S or step == self.total:
                self.shown = now
                rates = f"{images_per_second:.0f} img/s  wait {data_wait:.0%}"
                self.numbers = f"loss {float(loss):.4f}  lr {lr:.2e}  {rates}"
            self.bar.update(self.task, completed=step, epoch=epoch, numbers=self.numbers)
        elif step % self.log_every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.started
            rate = (step - self.start_step) / max(elapsed, 1e-9)
            eta = (self.total - step) / max(rate, 1e-9)
            log.info(
                "epoch %d step %d/%d loss %.4f lr %.2e %.0f img/s wait %.0f%% ETA %s",
                epoch,
                step,
                self.total,
                float(loss),
                lr,
                images_per_second,
                100 * data_wait,
                _duration(eta),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            sys.stderr.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
