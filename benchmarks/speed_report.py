"""The tables of docs/benchmarks.md section 1, from the JSON files `step_throughput.py` and `speed_changes.py` wrote.

    python benchmarks/speed_report.py [--results benchmarks/results]

Prints four markdown tables: iBOT against the official code (runs with --reference), every method against its
floor, FLOP utilisation, and the before/after of each speed change. A missing result file leaves its rows out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/floors, also when this file is imported by path
import floors

ROOT = Path(__file__).resolve().parents[1]
METHOD_ROWS = (
    ("iBOT fp32 (reference head)", "ibot_{tier}_cpu.json", 0),
    ("iBOT bf16 autocast", "ibot_{tier}_cpu_bf16.json", 0),
    ("DTM (EMA teacher, L = 2)", "dtm_{tier}_cpu.json", 0),
    ("SymMIM (2 × 28 crops)", "symmim_{tier}_cpu.json", 0),
    ("CIM ResPix (generator 192/4/3, k-means 512)", "cim_{tier}_cpu.json", 0),
    ("CIM RevDet (same)", "cim_{tier}_cpu.json", 1),
)
"""Row label, result file (`{tier}` filled in) and case index."""
CHANGES = {
    "adamw": ("AdamW: per-tensor loop → fused", "yes"),
    "health": ("health measures every step → logged steps only", "yes"),
    "precision": ("fp32 → bf16 autocast", "opt-in (`train.precision`)"),
    "attention": ("bf16: fused SDPA → timm's explicit attention", "yes (CPU bf16)"),
    "packing": ("crops: one call per size → packed, block-diagonal mask", "no"),
    "compile": ("fp32: eager → `torch.compile` backbones", "opt-in (`train.compile`)"),
}
SPEED_METHODS = floors.method_names()


def method_cases(results: dict[str, Any], tier: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(row label, case) of every METHOD_ROWS entry whose result file is there."""
    for label, pattern, index in METHOD_ROWS:
        name = pattern.format(tier=tier)
        if name in results:
            yield label, results[name]["cases"][index]


def _mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def reference_table(results: dict[str, Any], tier: str) -> list[str]:
    lines = [
        "| precision | mimkit step | official step | mimkit / official | peak memory mimkit / official "
        "| memory the step adds, mimkit / official |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for label, name in (("fp32", f"ibot_{tier}_cpu.json"), ("bf16 autocast", f"ibot_{tier}_cpu_bf16.json")):
        if name not in results or "alone" not in results[name]["cases"][0]["peak_memory"]:
            continue
        case = results[name]["cases"][0]
        s, alone = case["summary"], case["peak_memory"]["alone"]
        ours, theirs = alone["step"], alone["reference"]
        added = ours["peak"] - ours["before_steps"], theirs["peak"] - theirs["before_steps"]
        seconds = f"{s['step_ms'] / 1e3:.2f} s | {s['reference_ms'] / 1e3:.2f} s"
        lines.append(
            f"| {label} | {seconds} | **{s['step_vs_reference']:.2f}x** "
            f"| {_mib(ours['peak'])} / {_mib(theirs['peak'])} MiB = {ours['peak'] / theirs['peak']:.2f}x "
            f"| {_mib(added[0])} / {_mib(added[1])} MiB = {added[0] / added[1]:.2f}x |"
        )
    return lines


def method_table(results: dict[str, Any], tier: str) -> list[str]:
    lines = [
        "| method | step ms | backbone floor ms | backbone + heads ms | step / (backbone + heads) "
        "| outside backbone + heads | morphing (DTM) / tokenizer (CIM) | images/s | views ms/img "
        "| one worker's views / step | peak RSS MiB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for label, case in method_cases(results, tier):
        s = case["summary"]
        own = s.get("morphing_share", s.get("tokenizer_share"))
        lines.append(
            f"| {label} | {s['step_ms']:.0f} | {s['backbone_ms']:.0f} | {s['backbone_heads_ms']:.0f} "
            f"| {s['step_ms'] / s['backbone_heads_ms']:.2f}x | {100 * s['outside_backbone_heads_share']:.1f}% "
            f"| {'–' if own is None else f'{100 * own:.2f}%'} | {s['images_per_s']:.1f} "
            f"| {s['view_ms_per_image']:.2f} | {100 * s['views_worker_load']:.1f}% | {s['peak_memory_mib']:.0f} |"
        )
    return lines


def flop_table(results: dict[str, Any], tier: str) -> list[str]:
    lines = [
        "| method, precision | matmul roof GFLOP/s | step GFLOP | step GFLOP/s | step of roof "
        "| backbone floor of roof |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for label, case in method_cases(results, tier):
        flops = case["flops"]
        rows = [(label, flops["step"], f"{100 * flops['backbone']['of_roof']:.0f}%")]
        if "reference" in flops:
            rows.append(
                (label.replace("iBOT", "official iBOT").replace(" (reference head)", ""), flops["reference"], "–")
            )
        for row_label, row, backbone in rows:
            lines.append(
                f"| {row_label} | {case['matmul_roof_flop_per_s'] / 1e9:.0f} | {row['flops'] / 1e9:.0f} "
                f"| {row['flop_per_s'] / 1e9:.0f} | {100 * row['of_roof']:.0f}% | {backbone} |"
            )
    return lines


def speed_table(results: dict[str, Any], tier: str) -> list[str]:
    by_change: dict[str, dict[str, Any]] = {}
    for method in SPEED_METHODS:
        for row in results.get(f"speed_changes_{method}_{tier}.json", {}).get("changes", []):
            by_change.setdefault(row["change"], {})[method] = row
    lines = [
        f"| change | {' | '.join(SPEED_METHODS)} | kept |",
        "|---|" + "--:|" * len(SPEED_METHODS) + "---|",
    ]
    for change, (label, kept) in CHANGES.items():
        cells = []
        for method in SPEED_METHODS:
            row = by_change.get(change, {}).get(method)
            if row is None:
                cells.append("–")
                continue
            spec = ".0f" if row["before_ms"] > 50 else ".1f"
            cells.append(f"{row['before_ms']:{spec}} → {row['after_ms']:{spec}} ms ({row['ratio']:.2f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {kept} |")
    return lines


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tier", default="cpu-small")
    args = parser.parse_args(argv)
    results = {path.name: json.loads(path.read_text()) for path in sorted(args.results.glob("*.json"))}
    tables = [table(results, args.tier) for table in (reference_table, method_table, flop_table, speed_table)]
    text = "\n\n".join("\n".join(table) for table in tables) + "\n"
    print(text)
    return text


if __name__ == "__main__":
    main()
