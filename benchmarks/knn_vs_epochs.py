"""k-NN accuracy against pretraining epochs for one or more runs (BENCHMARKS.md section 2, the accuracy plot).

Every run's epoch checkpoints (`checkpoints/epoch_*.ckpt`) are scored by the weighted k-NN classifier on [CLS]
features of the run's own labelled splits (whole splits, whatever the pretraining `data.limit`), and so is the
run's initialisation (epoch 0, `load_run(..., random_init=True)`). Raw pixels are scored once, as the line to
beat. Output: a JSON file with every point, the machine and the command, a markdown table and a PNG plot.

    python benchmarks/knn_vs_epochs.py runs/demo runs/dtm_vit_tiny_fmnist_ibot_teacher

A run keeps its last `train.keep_epoch_checkpoints` epoch files (3 by default): train the runs of a curve with
`train.keep_epoch_checkpoints=0` to keep every epoch.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from mimkit.engine.checkpoint import checkpoint_dir, package_versions
from mimkit.engine.runtime import machine
from mimkit.eval.features import RawPixels, encoder_image_size, extract_features
from mimkit.eval.knn import knn_accuracy
from mimkit.runs import LoadedRun, load_run

ROOT = Path(__file__).resolve().parents[1]
EPOCH_FILE = re.compile(r"epoch_(\d+)\.ckpt")


def epoch_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(epochs trained, file) for each epoch checkpoint, in order; `epoch_0000.ckpt` holds 1 trained epoch."""
    found = [(m, p) for p in checkpoint_dir(run_dir).glob("epoch_*.ckpt") if (m := EPOCH_FILE.fullmatch(p.name))]
    if not found:
        raise FileNotFoundError(f"no epoch checkpoints in {checkpoint_dir(run_dir)} (train.checkpoint_every_epochs)")
    return sorted((int(m.group(1)) + 1, path) for m, path in found)


def score(encoder: nn.Module, run: LoadedRun, args: argparse.Namespace) -> float:
    """Top-1 k-NN accuracy (a fraction) of `encoder` on the run's train/eval splits."""
    data = run.cfg.data
    train_source, test_source = (run.source(split, limit=args.limit) for split in (data.split, data.eval_split))
    classes = train_source.info.num_classes
    if not classes:
        raise ValueError(f"k-NN needs labelled data; {data.source} at {data.root} has no labels")
    size = encoder_image_size(encoder, train_source)
    train, test = (
        extract_features(encoder, source, size, "cls", args.batch_size, description=f"{label} features")
        for source, label in ((train_source, "train"), (test_source, "test"))
    )
    accuracy = knn_accuracy(
        train.features, train.labels, test.features, test.labels, classes, (args.k,), args.temperature
    )
    return accuracy[args.k]


def curve(run_dir: Path, args: argparse.Namespace) -> dict:
    """Accuracy at initialisation and after each checkpointed epoch of one run."""
    checkpoints = epoch_checkpoints(run_dir)
    initial = load_run(checkpoints[-1][1], random_init=True)
    points = [{"epoch": 0, "checkpoint": None, "knn_top1": score(initial.encoder(), initial, args)}]
    for epoch, path in checkpoints:
        run = load_run(path)
        points.append({"epoch": epoch, "checkpoint": str(path), "knn_top1": score(run.encoder(), run, args)})
        print(f"{run_dir.name} epoch {epoch}: k-NN top-1 {100 * points[-1]['knn_top1']:.2f}%")
    return {"run": str(run_dir), "method": initial.cfg.method.name, "points": points}


def markdown(result: dict) -> str:
    epochs = sorted({p["epoch"] for c in result["curves"] for p in c["points"]})
    lines = [
        f"k-NN top-1 (%) on [CLS], k = {result['k']}, T = {result['temperature']}; epoch 0 is the initialisation; "
        f"raw pixels {100 * result['raw_pixels']:.2f}",
        "",
        "| run | method | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
        "|---|---|" + "--:|" * len(epochs),
    ]
    for c in result["curves"]:
        by_epoch = {p["epoch"]: f"{100 * p['knn_top1']:.2f}" for p in c["points"]}
        row = " | ".join(by_epoch.get(e, "") for e in epochs)
        lines.append(f"| {Path(c['run']).name} | {c['method']} | {row} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    for c in result["curves"]:
        epochs = [p["epoch"] for p in c["points"]]
        label = f"{Path(c['run']).name} ({c['method']})"
        ax.plot(epochs, [100 * p["knn_top1"] for p in c["points"]], marker="o", label=label)
    ax.axhline(100 * result["raw_pixels"], color="grey", linestyle="--", label="raw pixels")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("pretraining epochs (0: initialisation)")
    ax.set_ylabel(f"k-NN top-1 (%), k = {result['k']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders with epoch checkpoints")
    p.add_argument("--k", type=int, default=20, help="neighbours (%(default)s)")
    p.add_argument("--temperature", type=float, default=0.07, help="T of the exp(sim/T) votes (%(default)s)")
    p.add_argument("--limit", type=int, help="first N train and test images only (default: whole splits)")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch (%(default)s)")
    p.add_argument("--name", default="knn_vs_epochs", help="stem of the output files (%(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output folder")
    return p.parse_args(argv)


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> Path:
    """Score every run; returns the JSON file (the markdown table and the PNG lie next to it)."""
    args = parse_args(argv)
    curves = [curve(run_dir, args) for run_dir in args.runs]
    first = load_run(epoch_checkpoints(args.runs[0])[-1][1])
    result = {
        "benchmark": "knn_vs_epochs",
        "k": args.k,
        "temperature": args.temperature,
        "limit": args.limit,
        "command": ["benchmarks/knn_vs_epochs.py", *map(str, sys.argv[1:] if argv is None else argv)],
        "machine": machine(),
        "versions": package_versions(),
        "raw_pixels": score(RawPixels(), first, args),
        "curves": curves,
    }
    path = args.out / f"{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    path.with_suffix(".md").write_text(table)
    plot(result, path.with_suffix(".png"))
    print(table)
    return path


if __name__ == "__main__":
    main()
