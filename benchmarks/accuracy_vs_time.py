"""Accuracy against CPU wall-clock on Fashion-MNIST for each method's recipes (BENCHMARKS.md section 2).

Each point of STUDY is a shipped recipe plus overrides. The script trains the points whose run folder is not
complete (`mimkit pretrain ... resume=auto`, one after the other: run it on a quiet machine, the minutes are the
measurement), evaluates each once (`mimkit eval knn --baselines`, `mimkit eval linear`), and writes a JSON file
with every point, the machine and the commands, a markdown table and a plot. Training minutes are the run's own
clock (`train_minutes` of metrics.csv: the training loop, summed over resumes, without epoch-end evaluations).

    python benchmarks/accuracy_vs_time.py                      # everything (about 1.5 hours on 2 cores)
    python benchmarks/accuracy_vs_time.py --only cim_resnet_60k_3ep --report-only
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from mimkit.engine.checkpoint import package_versions
from mimkit.engine.logs import read_metrics
from mimkit.engine.runtime import machine
from mimkit.runs import load_run_config

ROOT = Path(__file__).resolve().parents[1]
QUIET = ("train.knn_every_epochs=0", "train.progress_bar=false")
"""Every point trains without online k-NN (the evaluations below score it once) and without a live bar."""
LINEAR = ("--cache", "--val-fraction", "0.1", "--epochs", "30")
HEALTH = ("loss_cls", "health_teacher_entropy", "health_feature_rank")
"""Training-health values of metrics.csv kept with each point, averaged over its last HEALTH_ROWS logged steps."""
HEALTH_ROWS = 5
"""The linear probe of docs/benchmarks.md: lr chosen on 6,000 held-out training images."""


@dataclass(frozen=True)
class Point:
    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    linear_variant: str = "last4"  # last-4 [CLS] for a ViT, as DINO/iBOT; a CNN has one pooled feature ("cls")


CNN = "cls"
IBOT_ON_RESNET = (
    "method.backbone.name=resnet18",
    "method.backbone.model_args={layers: [1, 1, 1, 1], channels: [32, 64, 128, 128], output_stride: 8}",
    "method.backbone.patch_size=null",
    "method.backbone.embed_dim=null",
    "method.backbone.depth=null",
    "method.backbone.num_heads=null",
    "method.backbone.drop_path_rate=0.0",
    "method.mask.ratios=[[0.0,0.0]]",
)
"""iBOT's demo recipe on CIM's small ResNet-18; masks off (a CNN takes none): DINO on a CNN."""
STUDY: tuple[Point, ...] = (
    Point("ibot_vit_24k_3ep", "configs/ibot/vit_tiny_fmnist.yaml"),
    Point("ibot_vit_center099_24k_3ep", "configs/ibot/vit_tiny_fmnist.yaml", ("method.center_momentum=0.99",)),
    Point("ibot_vit_nolocal_60k_2ep", "configs/ibot/vit_tiny_fmnist.yaml",
          ("method.views.num_local=0", "data.limit=null", "train.epochs=2")),
    Point("symmim_vit_24k_3ep", "configs/symmim/vit_tiny_fmnist.yaml"),
    Point("dtm_ema_vit_24k_3ep", "configs/dtm/vit_tiny_fmnist_ema.yaml"),
    Point("cim_vit_respix_24k_3ep", "configs/cim/vit_tiny_fmnist_respix.yaml"),
    Point("cim_resnet_respix_24k_3ep", "configs/cim/resnet_tiny_fmnist_respix.yaml", linear_variant=CNN),
    Point("cim_resnet_respix_60k_3ep", "configs/cim/resnet_tiny_fmnist_respix.yaml", ("data.limit=null",), CNN),
    Point("cim_resnet_respix_60k_12ep", "configs/cim/resnet_tiny_fmnist_respix.yaml",
          ("data.limit=null", "train.epochs=12"), CNN),
    Point("cim_resnet_respix_60k_20ep", "configs/cim/resnet_tiny_fmnist_respix.yaml",
          ("data.limit=null", "train.epochs=20"), CNN),
    Point("ibot_resnet_24k_3ep", "configs/ibot/vit_tiny_fmnist.yaml", IBOT_ON_RESNET, CNN),
)  # fmt: skip


def mimkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "mimkit", *args]


def commands(point: Point, run_dir: Path) -> list[list[str]]:
    """The commands that make one point: pretrain (resumable), k-NN with its baselines, the linear probe."""
    return [
        mimkit("pretrain", "-c", point.recipe, f"output_dir={run_dir}", "resume=auto", *point.overrides, *QUIET),
        mimkit("eval", "knn", str(run_dir), "--k", "20", "--baselines"),
        mimkit("eval", "linear", str(run_dir), *LINEAR, "--variant", point.linear_variant),
    ]


def evaluated(run_dir: Path) -> bool:
    return (run_dir / "eval" / "knn.json").is_file() and (run_dir / "eval" / "linear.json").is_file()


def measure(point: Point, run_dir: Path) -> dict:
    """One row: what was trained, for how long, and its accuracies against its own initialisation."""
    cfg = load_run_config(run_dir / "config.yaml")
    rows = read_metrics(run_dir)
    minutes = [row["train_minutes"] for row in rows if "train_minutes" in row]
    last = [row for row in rows if "loss" in row][-HEALTH_ROWS:]
    if len(minutes) != cfg.train.epochs:
        raise RuntimeError(f"{run_dir}: {len(minutes)} of {cfg.train.epochs} epochs logged train_minutes")
    knn = json.loads((run_dir / "eval" / "knn.json").read_text())["accuracy"]
    linear = json.loads((run_dir / "eval" / "linear.json").read_text())
    return {
        "name": point.name,
        "method": cfg.method.name,
        "backbone": getattr(getattr(cfg.method, "backbone", None), "name", "-"),
        "images": cfg.data.limit,
        "epochs": cfg.train.epochs,
        "train_minutes": minutes[-1],
        "log_k": math.log(cfg.method.out_dim) if hasattr(cfg.method, "out_dim") else None,
        "knn": knn["pretrained"]["20"],
        "knn_random_init": knn["random init"]["20"],
        "knn_raw_pixels": knn["raw pixels"]["20"],
        "linear": linear["best_top1"],
        **{key: statistics.fmean(r[key] for r in last) for key in HEALTH if last and key in last[-1]},
        "commands": [shlex.join(c) for c in commands(point, run_dir)],
    }


def markdown(rows: list[dict], raw_linear: float | None) -> str:
    lines = [
        "| point | method | encoder | images × epochs | training minutes | k-NN | k-NN at init | linear probe "
        "| [CLS] loss / log K | feature rank |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        images = f"{r['images']:,}" if r["images"] else "60,000"
        lines.append(
            f"| {r['name']} | {r['method']} | {r['backbone']} | {images} × {r['epochs']} | {r['train_minutes']:.1f} "
            f"| {100 * r['knn']:.2f} | {100 * r['knn_random_init']:.2f} | {100 * r['linear']:.2f} "
            f"| {_ratio(r, 'loss_cls', r.get('log_k'))} | {_ratio(r, 'health_feature_rank')} |"
        )
    pixels = f"{100 * rows[0]['knn_raw_pixels']:.2f}" if rows else "-"
    linear = f"{100 * raw_linear:.2f}" if raw_linear is not None else "-"
    lines.append(f"| raw pixels | – | – | – | – | {pixels} | – | {linear} | – | – |")
    return "\n".join(lines)


def _ratio(row: dict, key: str, scale: float | None = 1.0) -> str:
    return f"{row[key] / scale:.2f}" if key in row and scale else "–"


def plot(rows: list[dict], raw_linear: float | None, out: Path) -> None:
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, 2, sharex=True)
    methods = sorted({r["method"] for r in rows})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, key, title, line in (
        (axes[0], "knn", "k-NN top-1 (k = 20)", rows[0]["knn_raw_pixels"] if rows else None),
        (axes[1], "linear", "linear probe top-1", raw_linear),
    ):
        for r in rows:
            marker = "s" if r["backbone"].startswith("resnet") else "o"
            ax.scatter(r["train_minutes"], 100 * r[key], color=colours[r["method"]], marker=marker, s=40)
            ax.annotate(r["name"], (r["train_minutes"], 100 * r[key]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        if line is not None:
            ax.axhline(100 * line, color="grey", linestyle="--", linewidth=1, label="raw pixels")
        ax.set(title=title, xlabel="training minutes (2 CPU cores)", ylabel="top-1 (%)")
    for method in methods:
        axes[0].scatter([], [], color=colours[method], label=method)
    axes[0].legend(fontsize=7, loc="lower right")
    figure.suptitle("Fashion-MNIST: accuracy against wall-clock (squares: ResNet encoder, circles: ViT)")
    figure.savefig(out, dpi=130)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "study", help="run folders go here")
    parser.add_argument("--only", nargs="+", help="these points (names of STUDY) instead of all")
    parser.add_argument("--report-only", action="store_true", help="train and evaluate nothing; report what is there")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where the report goes")
    parser.add_argument("--name", default="fmnist_accuracy_vs_time")
    args = parser.parse_args(argv)
    known = {p.name: p for p in STUDY}
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"unknown point(s) {', '.join(unknown)}; the study has {', '.join(known)}")
    points = [known[n] for n in args.only] if args.only else list(STUDY)
    rows = []
    for point in points:
        run_dir = args.runs / point.name
        if not args.report_only and not evaluated(run_dir):
            for command in commands(point, run_dir):
                print("+", shlex.join(command), flush=True)
                subprocess.run(command, check=True, cwd=ROOT)
        if evaluated(run_dir):
            rows.append(measure(point, run_dir))
    raw_linear = None
    if rows:  # logistic regression on the pixels, once, in the folder of the first point that has it
        found = [p for r in rows if (p := args.runs / r["name"] / "eval" / "linear_raw_pixels.json").is_file()]
        if not found and not args.report_only:
            first = args.runs / rows[0]["name"]
            subprocess.run(mimkit("eval", "linear", str(first), *LINEAR, "--raw-pixels"), check=True, cwd=ROOT)
            found = [first / "eval" / "linear_raw_pixels.json"]
        if found:
            raw_linear = json.loads(found[0].read_text())["best_top1"]
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, raw_linear)
    result = {"machine": machine(), "versions": package_versions(), "points": rows, "raw_pixels_linear": raw_linear}
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(table + "\n")
    if rows:
        plot(rows, raw_linear, args.out / f"{args.name}.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
