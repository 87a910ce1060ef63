"""One module per method for the step benchmark: `CASES` (tier -> its cases) and `floor(bench, heads)`, optionally
`parts(bench)` for method-specific timings. Adding a method adds a file here; `step_throughput.py` stays as it is."""

from pathlib import Path

NOT_METHODS = ("__init__", "shapes")
"""Modules of this folder that hold shared code, not a method."""


def method_names() -> list[str]:
    """Every method with a file here: what the benchmarks run and report (standard library only, so the GPU tier's
    launcher can read it before installing anything)."""
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in NOT_METHODS)
