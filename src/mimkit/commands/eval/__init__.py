"""`mimkit eval ...`: judge the encoder of a pretraining run by k-NN, linear probe, full fine-tuning or a linear
segmentation probe of its patch tokens.

Each evaluation is one module of this package with an `add(evaluations)` that builds its sub-command (found when
the parser is built): adding an evaluation is a file. Parsers are built without
importing torch or timm (fast `--help`); each command imports what it runs. Results go to
`RUN/eval/<evaluation>.json` (the latest) and `RUN/eval/history.jsonl` (every evaluation).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path

SHARED = "common"
"""The module of what every evaluation shares (not a sub-command)."""


def evaluation_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name != SHARED)


def add(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "eval", help="evaluate a run's encoder: k-NN, linear probe, fine-tuning, segmentation probe"
    )
    evaluations = p.add_subparsers(title="evaluations", metavar="EVAL", required=True)
    for name in evaluation_modules():
        importlib.import_module(f"{__package__}.{name}").add(evaluations)
