"""Where evaluation results go: `RUN/eval/<evaluation>.json` holds the latest of each evaluation (what tables and
scripts read), and `RUN/eval/history.jsonl` keeps every evaluation ever run, one line each, never overwritten.

A result records the data it was computed on (`evaluated_data`), so a newer result on other data (another
data.root, split or limit) is never mistaken for a comparable one: `replaced_notice` says when one replaces it."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence, Sized
from datetime import datetime
from pathlib import Path
from typing import Any

from mimkit.data.config import DataConfig

HISTORY = "history.jsonl"


def evaluated_data(data: DataConfig, splits: Sequence[tuple[str, Sized]], limit: int | None) -> dict[str, Any]:
    """What an evaluation read: the source and its settings, the data folder (absolute), each split by name with
    its image count, the held-out fraction and the image limit."""
    options = dataclasses.asdict(data.options) if dataclasses.is_dataclass(data.options) else data.options
    return {
        "source": data.source,
        "options": options,
        "root": None if data.root is None else str(Path(data.root).expanduser().resolve()),
        "splits": [{"split": name, "images": len(images)} for name, images in splits],
        "val_fraction": data.val_fraction,
        "limit": limit,
    }


def describe_data(record: dict[str, Any]) -> str:
    """One line for a data record: `synthetic at /data (train 8 + test 8 images, limit 8)`."""
    counts = " + ".join(f"{split['split']} {split['images']}" for split in record.get("splits", []))
    extras = [f"limit {record['limit']}"] if record.get("limit") is not None else []
    extras += [f"val_fraction {record['val_fraction']}"] if record.get("val_fraction") else []
    where = f" at {record['root']}" if record.get("root") else ""
    return f"{record.get('source')}{where} ({', '.join([f'{counts} images', *extras])})"


def replaced_notice(run_dir: Path, evaluation: str, data: dict[str, Any]) -> str | None:
    """A notice when the latest `evaluation` result of the run was computed on other data than `data` (None when
    there is none, it is on the same data, or it predates data records)."""
    latest = run_dir / "eval" / f"{evaluation}.json"
    try:
        earlier = json.loads(latest.read_text()).get("data")
        when = datetime.fromtimestamp(latest.stat().st_mtime).isoformat(timespec="seconds")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(earlier, dict) or earlier == json.loads(json.dumps(data)):
        return None
    return (
        f"{latest}: replaces the {evaluation} result of {when} on {describe_data(earlier)} with one on "
        f"{describe_data(data)}; the old one stays in {latest.parent / HISTORY}"
    )


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` a hidden temporary file beside `path`, then swap it in: a reader (or a crash) sees the old file or the
    new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_result(
    run_dir: Path,
    evaluation: str,
    result: dict[str, Any],
    headline: str,
    score: float,
    data: dict[str, Any] | None = None,
    metric: str = "top-1",
) -> Path:
    """Write the latest `evaluation` result and append it to the history with a one-line `headline`, its `score`
    (the evaluation's main number, a fraction: what `mimkit runs compare` sets side by side), the `metric` that
    number is (top-1, mIoU) and, in the result,
    the `data` it was computed on (`evaluated_data`)."""
    if data is not None:
        result = {**result, "data": data}
    folder = run_dir / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    latest = folder / f"{evaluation}.json"
    latest.write_text(json.dumps(result, indent=2))
    record = {
        "time": datetime.now().isoformat(timespec="seconds"),
        "evaluation": evaluation,
        "headline": headline,
        "score": score,
        "metric": metric,
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
