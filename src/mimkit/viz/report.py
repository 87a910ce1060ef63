"""The HTML report of a run: one self-contained folder (index.html beside its PNG figures, linked relatively).

Evaluation results are whatever JSON files `RUN/eval/` holds, after a table of every evaluation ever run
(`RUN/eval/history.jsonl`); they are rendered generically (row -> column
-> value mappings and lists of records become tables), so new evaluations appear without changes here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from mimkit.engine.health import read_health
from mimkit.eval.results import read_history

CAPTIONS = {
    "curves": "Training curves from metrics.csv against the optimizer step.",
    "attention": "[CLS] attention of the last block per head; below, each head's smallest patch set holding the "
    "kept fraction of its attention, shaded.",
    "masks": "Crops as the method's own views make them, with the masked patches shaded.",
    "pca": "First three principal components of the patch tokens (fitted over these images) as RGB.",
    "reconstructions": "Originals, masked inputs and the pixel head's reconstructions.",
    "segmentation": "Eval images, their label maps and what the linear segmentation probe of mimkit eval segment "
    "predicts from the frozen patch tokens.",
    "panels": "The method's inputs and outputs, one image per row (CIM: generator mask, tokenizer reconstruction, "
    "corrupted image, ResPix output or RevDet probabilities beside the truly replaced tokens).",
}
"""Figure file stem -> caption; the report shows known figures first, in this order, then any other PNG."""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f4f4f4; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: .85em; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
"""


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


def _scalar(value: Any) -> bool:
    return (
        value is None
        or isinstance(value, str | int | float | bool)
        or (isinstance(value, list) and all(v is None or isinstance(v, str | int | float | bool) for v in value))
    )


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _records(values: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    columns = list(dict.fromkeys(key for record in values for key in record))
    return columns, [[_cell(record.get(column)) for column in columns] for record in values]


def tables(data: Any, title: str) -> list[Table]:
    """Every table in a JSON value: {row: {column: value}} and [{column: value}] become tables, loose scalars
    of an object become a field/value table, and nested objects are searched under "title / key"."""
    if isinstance(data, list) and data and all(isinstance(v, dict) and all(map(_scalar, v.values())) for v in data):
        return [Table(title, *_records(data))]
    if not isinstance(data, dict):
        return [Table(title, ["value"], [[_cell(data)]])] if _scalar(data) else []
    inner = list(data.values())
    if inner and all(isinstance(v, dict) and v and all(map(_scalar, v.values())) for v in inner):
        columns, rows = _records(inner)
        return [Table(title, ["", *columns], [[str(name), *row] for name, row in zip(data, rows, strict=True)])]
    fields = [[str(key), _cell(value)] for key, value in data.items() if _scalar(value)]
    found = [Table(title, ["field", "value"], fields)] if fields else []
    for key, value in data.items():
        if not _scalar(value):
            found += tables(value, f"{title} / {key}")
    return found


def read_evaluations(run_dir: Path) -> list[Table]:
    """Tables of every `eval/*.json` of a run, by file name; an unreadable file becomes a one-line note."""
    found: list[Table] = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            found += tables(json.loads(path.read_text()), path.stem)
        except (OSError, json.JSONDecodeError) as error:
            found.append(Table(path.stem, ["error"], [[f"{path.name} could not be read: {error}"]]))
    return found


def _figures(out_dir: Path) -> list[Path]:
    order = {stem: i for i, stem in enumerate(CAPTIONS)}
    return sorted(out_dir.glob("*.png"), key=lambda p: (order.get(p.stem, len(order)), p.name))


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<h3>{escape(table.title)}</h3>\n<table><tr>{head}</tr>{body}</table>"


def _health_html(warnings: Sequence[Mapping[str, Any]]) -> list[str]:
    """The collapse warnings of the run (`RUN/health.json`), or a line saying there were none."""
    if not warnings:
        return ["<h2>Training health</h2>", "<p>No collapse warnings (see the health curves).</p>"]
    items = "".join(
        f"<li>step {w['since_step']}-{w['step']}: <b>{escape(w['rule'])}</b> ({escape(w['metric'])} = "
        f"{w['value']:.3f}): {escape(w['advice'])}</li>"
        for w in warnings
    )
    return ["<h2>Training health</h2>", f"<ul>{items}</ul>"]


def write_report(out_dir: Path, run_dir: Path, config_yaml: str, summary: Mapping[str, str]) -> Path:
    """Write `out_dir/index.html` with the summary, every PNG already in `out_dir`, the run's evaluation
    tables, its config and its environment; returns the file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in summary.items())
    parts = [f"<h1>mimkit run report: {escape(run_dir.name)}</h1>", f"<table>{rows}</table>"]
    figures = _figures(out_dir)
    if figures:
        parts.append("<h2>Figures</h2>")
        for path in figures:
            caption = CAPTIONS.get(path.stem, path.stem)
            parts.append(
                f'<figure><img src="{escape(path.name)}" alt="{escape(path.stem)}">'
                f"<figcaption>{escape(caption)}</figcaption></figure>"
            )
    parts += _health_html(read_health(run_dir))
    evaluations = read_evaluations(run_dir)
    parts.append("<h2>Evaluation</h2>")
    history = [
        [r["time"], r["evaluation"], r["headline"], str(r["result"].get("checkpoint", ""))]
        for r in read_history(run_dir)
    ]
    if history:
        columns = ["time", "evaluation", "result", "checkpoint"]
        parts.append(_table_html(Table("every evaluation, oldest first", columns, history)))
    parts += [_table_html(t) for t in evaluations] or ["<p>No results in eval/ yet (run <code>mimkit eval</code>).</p>"]
    parts += ["<h2>Config</h2>", f"<pre>{escape(config_yaml)}</pre>"]
    environment = run_dir / "environment.yaml"
    if environment.is_file():
        parts += ["<h2>Environment</h2>", f"<pre>{escape(environment.read_text())}</pre>"]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(run_dir.name)} - mimkit report</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    path = out_dir / "index.html"
    path.write_text(page)
    return path
