"""Where evaluation results go: `RUN/eval/<evaluation>.json` holds the latest of each evaluation (what tables and
scripts read), and `RUN/eval/history.jsonl` keeps every evaluation ever run, one line each, never overwritten."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

HISTORY = "history.jsonl"


def save_result(run_dir: Path, evaluation: str, result: dict[str, Any], headline: str, score: float) -> Path:
    """Write the latest `evaluation` result and append it to the history with a one-line `headline` and its
    `score` (the evaluation's main top-1, a fraction: what `mimkit runs compare` sets side by side)."""
    folder = run_dir / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    latest = folder / f"{evaluation}.json"
    latest.write_text(json.dumps(result, indent=2))
    record = {
        "time": datetime.now().isoformat(timespec="seconds"),
        "evaluation": evaluation,
        "headline": headline,
        "score": score,
    }
    path = folder / HISTORY
    with path.open("a+b") as history:  # appends go to the end; only the last byte is read
        cut = False
        if history.seek(0, os.SEEK_END):
            history.seek(-1, os.SEEK_END)
            cut = history.read(1) != b"\n"  # a line cut by a crash stays its own (unreadable) line
        history.write((("\n" if cut else "") + json.dumps({**record, "result": result}) + "\n").encode())
    return latest


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every evaluation of the run, oldest first (a line that cannot be read, from a crash mid-write, is left out)."""
    path = run_dir / "eval" / HISTORY
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def latest_by_evaluation(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The newest history record of each evaluation (knn, linear, linear_random_init, ...)."""
    return {record["evaluation"]: record for record in read_history(run_dir)}
