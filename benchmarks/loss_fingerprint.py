"""Every shipped Fashion-MNIST recipe trained a few steps with its own seed: the logged losses, for a refactor's
before/after (a restructuring changes no number).

    python benchmarks/loss_fingerprint.py --out before.json          # on the old commit
    python benchmarks/loss_fingerprint.py --out after.json           # on the new one
    python benchmarks/loss_fingerprint.py --compare before.json after.json

Each recipe runs `--steps` optimizer steps on the first `--images` training images, logging every step; CIM's
k-means tokenizer is fitted once (on `--tokenizer-images` images) into the work folder, and the DTM recipe that
distils an iBOT teacher reads the iBOT recipe's run from the same folder. `--set KEY=VALUE` adds an override to
every run (e.g. a renamed field when the old commit spells it differently).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST = "ibot/vit_tiny_fmnist"
"""Runs first: the DTM recipe with a mimkit teacher reads its run."""


def fmnist_recipes() -> list[str]:
    """The shipped recipes that train on Fashion-MNIST (method recipes, not tokenizers), FIRST first."""
    sys.path.insert(0, str(ROOT / "src"))
    from mimkit.recipes import shipped_recipes

    names = [r.name for r in shipped_recipes() if "_fmnist" in r.name and not r.name.startswith("tokenizers/")]
    return sorted(names, key=lambda n: (n != FIRST, n))


def run_recipe(name: str, work: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    out = work / name.replace("/", "__")
    overrides = [
        f"output_dir={out}",
        f"data.limit={args.images}",
        f"data.batch_size={args.batch}",
        "data.num_workers=0",
        "train.epochs=1",
        "train.log_every_steps=1",
        "train.progress_bar=false",
        "train.loggers=[csv]",
        "train.knn_every_epochs=0",
        "train.checkpoint_every_steps=0",
        *args.set,
    ]
    if name.startswith("cim/"):
        overrides += [
            f"method.tokenizer={work / 'kmeans_fmnist.pt'}",
            f"method.tokenizer_overrides=[data.limit={args.tokenizer_images},data.num_workers=0]",
        ]
    if name == "dtm/vit_tiny_fmnist_ibot_teacher":
        overrides.append(f"method.teacher.checkpoint={work / FIRST.replace('/', '__')}")
    command = [sys.executable, "-m", "mimkit", "pretrain", "-c", name, *overrides]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return read_losses(out / "metrics.csv")


def read_losses(path: Path) -> dict[str, list[float]]:
    """Every loss column (loss, loss_*) of a metrics.csv, in step order."""
    import csv

    rows = [r for r in csv.DictReader(path.open()) if r.get("loss")]
    columns = [c for c in rows[0] if c == "loss" or c.startswith("loss_")] if rows else []
    return {c: [float(r[c]) for r in rows if r.get(c)] for c in columns}


def compare(before: dict, after: dict, tolerance: float) -> int:
    """Every recipe of `after` against `before`, column by column; recipes only in `before` are listed."""
    worst = 0.0
    for recipe, columns in after.items():
        if recipe not in before:
            print(f"{recipe}: not in the 'before' file")
            worst = math.inf
            continue
        for column, values in before[recipe].items():
            other = columns.get(column, [])
            if len(other) != len(values):
                print(f"{recipe} {column}: {len(values)} steps before, {len(other)} after")
                worst = math.inf
                continue
            diff = max((abs(a - b) / max(abs(a), 1e-12) for a, b in zip(values, other, strict=True)), default=0.0)
            worst = max(worst, diff)
            print(f"{recipe:<40} {column:<16} {len(values):>3} steps  max relative difference {diff:.1e}")
    for recipe in sorted(set(before) - set(after)):
        print(f"{recipe}: not run after (not compared)")
    print(f"worst: {worst:.1e} (tolerance {tolerance:.0e})")
    return 0 if worst <= tolerance else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the losses here (JSON)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--tolerance", type=float, default=0.0, help="largest relative difference allowed")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokenizer-images", type=int, default=2000)
    parser.add_argument("--recipes", nargs="*", help="only these recipes (default: every Fashion-MNIST recipe)")
    parser.add_argument("--work", type=Path, help="run folders here (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        return compare(before, after, args.tolerance)
    if args.out is None:
        parser.error("give --out FILE (or --compare BEFORE AFTER)")
    work = args.work or Path(tempfile.mkdtemp(prefix="mimkit-fingerprint-"))
    results = {}
    for name in args.recipes or fmnist_recipes():
        print(f"{name} ...", flush=True)
        results[name] = run_recipe(name, work, args)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"{len(results)} recipes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
