"""Every GPU measurement of the data path and of the step benchmark in one command, for a machine with no package
index.

    python benchmarks/gpu_tier.py --wheels wheelhouse --out $OUT

Installs what the machine lacks from the wheel folder (`make wheelhouse` fills it with omegaconf;
torch, timm and lightning must be there already), puts this checkout's `src/` on the path instead of installing
mimkit and records the machine (GPU, CPU cores, /dev/shm). Then, within `--data-budget-s` of the budget, the data
path (issue 26), where the GPU's appetite meets the CPU cores:

  training feed     real training runs (`mimkit pretrain`, iBOT ViT-S/16 on an image folder of generated
                    ImageNet-like JPEGs, bf16, all cores but one as workers), one per `data.augment_on` mode, worker
                    then device: the median images/s and `data_wait_fraction` of metrics.csv over the logged windows
                    after the first (start-up); at most `FEED_SHARE` of the data budget
  data_throughput   `data_throughput.py --device cuda --workers 1,4,8,16 --rounds 2`, one recipe at a time
                    (`--append`): each recipe's per-image worker cost in both modes, the batched device part timed on
                    the GPU, and the DataLoader's images/s per worker count with each batch copied to the GPU

and then `step_throughput.py` for each (method, compile) in priority order, iBOT first, until the time budget is
spent. Every stage is bounded (a data stage by its share of the data budget, a step run by what is left), and one
that fails or times out is recorded and the next one starts. Everything lands in OUT: each stage's JSON, table and
log, the feed runs' metrics.csv and train.log (their checkpoints are deleted), and `gpu_tier.md` with all the tables
and a list of what ran, failed or was skipped.

`--tier test` also shrinks the data stages (`DATA_SIZES`: a few small images, a tiny model in the feed runs):
checked on a CPU with `--tier test --device cpu` (tests/test_gpu_tier.py). Standard library only: it runs before
the packages it installs (the image generation runs in a subprocess, after them).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/floors, also when this file is imported by path
import floors

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
METHODS = sorted(floors.method_names(), key=lambda name: name != "ibot")
"""Every benchmarked method, iBOT first (the one with a reference implementation to compare against)."""
NEEDED = {"omegaconf": "omegaconf"}
"""Modules mimkit imports that the GPU image lacks (it has torch, torchvision, timm, lightning with PyYAML, rich,
matplotlib, safetensors), and the distribution to install for each."""
MODES = ("worker", "device")
"""`data.augment_on` modes of the training feed, in the order they run."""
MIN_STAGE_S = 10.0
"""A data stage whose share of the budget is smaller than this is skipped (recorded as such)."""
FEED_SHARE = 0.55
"""The share of `--data-budget-s` that the training feed may take (it runs first); data_throughput.py gets the
rest."""


@dataclass(frozen=True)
class DataSizes:
    """The data stages' sizes; each has a `--data-*` or `--feed-*` option of the same name."""

    data_recipes: str
    """data_throughput.py --recipes (comma-separated)."""
    data_images: int
    data_side: int
    """Generated images' typical long side, of data_throughput.py and of the feed's folder."""
    data_workers: str
    data_batch: int
    data_rounds: int
    data_loader_epochs: int
    feed_recipe: str
    feed_images: int
    """Files per epoch of the feed runs' folder (data.limit)."""
    feed_unique: int
    """Distinct JPEGs among them (generated; the rest are links to them)."""
    feed_batch: int
    feed_epochs: int
    feed_log_every: int
    """train.log_every_steps: a divisor of the steps per epoch gives whole windows."""
    feed_precision: str
    feed_set: tuple[str, ...]
    """More overrides of the feed runs (the test tier's tiny model)."""


GPU_SIZES = DataSizes(
    data_recipes="ibot/vit_small_imagenet,dtm/vit_small_imagefolder,symmim/vit_small_imagefolder",
    data_images=32,
    data_side=500,
    data_workers="1,4,8,16",
    data_batch=32,
    data_rounds=2,
    data_loader_epochs=2,
    feed_recipe="ibot/vit_small_imagefolder",
    feed_images=1536,
    feed_unique=512,
    feed_batch=64,
    feed_epochs=2,
    feed_log_every=4,
    feed_precision="bf16-mixed",
    feed_set=(),
)
DATA_SIZES = {
    "test": DataSizes(
        data_recipes="ibot/vit_small_imagefolder",
        data_images=4,
        data_side=96,
        data_workers="0,1",
        data_batch=2,
        data_rounds=1,
        data_loader_epochs=1,
        feed_recipe="ibot/vit_small_imagefolder",
        feed_images=16,
        feed_unique=8,
        feed_batch=4,
        feed_epochs=2,
        feed_log_every=2,
        feed_precision="32-true",
        feed_set=(
            "method.backbone.img_size=32",
            "method.backbone.embed_dim=32",
            "method.backbone.depth=2",
            "method.backbone.num_heads=2",
            "method.backbone.drop_path_rate=0.0",
            "method.views.local_size=16",
            "method.views.num_local=2",
            "method.out_dim=64",
            "method.patch_out_dim=64",
            "method.head_hidden_dim=32",
            "method.head_bottleneck_dim=16",
        ),
    ),
}
"""Tier -> the data stages' sizes (any other tier: `GPU_SIZES`): ImageNet-like 500-px JPEGs and ViT-S/16 at 224 on a
GPU; a few small images and a tiny ViT for the CPU check of this script."""


def missing_modules(python: str) -> list[str]:
    return [
        dist
        for module, dist in NEEDED.items()
        if subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode != 0
    ]


def install(python: str, wheels: Path, log: list[str]) -> None:
    missing = missing_modules(python)
    if not missing:
        log.append("- packages: all present, nothing installed")
        return
    if not wheels.is_dir():
        raise SystemExit(
            f"missing {', '.join(missing)} and no wheel folder {wheels}: run `make wheelhouse` and carry it"
        )
    command = [python, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *missing]
    subprocess.run(command, check=True)
    log.append(f"- packages: installed {', '.join(missing)} from {wheels}")


def describe_machine(python: str, env: dict[str, str]) -> str:
    probe = (
        "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', "
        "platform.python_version()); [print(torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]"
    )
    lines = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env).stdout.strip()
    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True) if _has("nvidia-smi") else None
    lines += "\n" + smi.stdout.strip() if smi and smi.returncode == 0 else ""
    shm = f"{shutil.disk_usage('/dev/shm').total / 2**30:.1f} GiB" if Path("/dev/shm").is_dir() else "none"
    return lines + f"\nCPU cores: {os.cpu_count()} ({cores()} usable); /dev/shm: {shm}"


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _has(program: str) -> bool:
    return any((Path(folder) / program).is_file() for folder in os.environ.get("PATH", "").split(os.pathsep))


def runs(methods: Sequence[str], compile_too: bool) -> list[tuple[str, bool]]:
    """iBOT plain and compiled first (the issue's headline), then every other method plain, then compiled."""
    order = [(methods[0], False), *([(methods[0], True)] if compile_too else [])]
    order += [(m, False) for m in methods[1:]]
    order += [(m, True) for m in methods[1:]] if compile_too else []
    return order


def run_stage(command: Sequence[str], log_file: Path, env: dict[str, str], timeout: float) -> tuple[int | None, float]:
    """Runs `command` in a session of its own, its output in `log_file`: (its exit status, or None when it ran past
    `timeout` and its whole process group, DataLoader workers included, was killed; the seconds it took)."""
    begun = time.monotonic()
    with log_file.open("w") as output:
        process = subprocess.Popen(
            [str(part) for part in command], stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code: int | None = process.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if process.poll() is None:  # timed out, or this driver was interrupted
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return code, time.monotonic() - begun


def outcome(code: int | None, seconds: float, log_name: str) -> str:
    if code == 0:
        return f"done in {seconds:.0f} s"
    failed = "timed out" if code is None else f"failed (exit {code})"
    return f"{failed} after {seconds:.0f} s; see {log_name}"


# ---------------------------------------------------------------------------------------------------
# The data stages (issue 26)


def make_images(folder: str, unique: int, total: int, side: int, processes: int) -> None:
    """`unique` ImageNet-like JPEGs under `folder` (class folders class_0 .. class_3) made by data_throughput.py's
    generator in `processes` parallel chunks (chunk i seeded i), then symbolic links to them up to `total` files,
    so that an epoch has enough steps for several logged windows. Runs in a subprocess, after the installs: the
    generator imports numpy, PIL, torch and mimkit."""
    import data_throughput  # noqa: F401 (imported once here, before the fork, not in every chunk)

    root = Path(folder)
    counts = [n for i in range(processes) if (n := unique // processes + (i < unique % processes))]
    if len(counts) == 1:
        _image_chunk(root, 0, counts[0], side)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(len(counts), mp_context=context) as pool:
            list(pool.map(_image_chunk, [root] * len(counts), range(len(counts)), counts, [side] * len(counts)))
    made = sorted(root.glob("class_*/*.jpg"))
    for copy in range(total - len(made)):
        original = made[copy % len(made)]
        (original.parent / f"link{copy:06d}_{original.name}").symlink_to(original.name)


def _image_chunk(root: Path, chunk: int, count: int, side: int) -> None:
    import data_throughput

    part = root / f".part_{chunk}"
    for path in data_throughput.generate_images(part, count, side, seed=chunk):
        target = root / path.parent.name / f"{chunk:02d}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    shutil.rmtree(part)


def feed_overrides(sizes: DataSizes, folder: Path, mode: str, workers: int, device: str, run_dir: Path) -> list[str]:
    """The feed run's overrides of its recipe: the generated folder, every image, no k-NN, no epoch checkpoints,
    metrics.csv only, the test tier's tiny model last."""
    accelerator = device.split(":")[0] if device.split(":")[0] in ("cpu", "cuda") else "auto"
    return [
        f"data.root={folder}",
        f"data.augment_on={mode}",
        f"data.num_workers={workers}",
        f"data.batch_size={sizes.feed_batch}",
        f"data.limit={sizes.feed_images}",
        f"train.precision={sizes.feed_precision}",
        f"train.epochs={sizes.feed_epochs}",
        f"train.log_every_steps={sizes.feed_log_every}",
        "train.progress_bar=false",
        "train.knn_every_epochs=0",
        "train.checkpoint_every_epochs=0",
        "train.loggers=[csv]",
        f"train.accelerator={accelerator}",
        f"output_dir={run_dir}",
        *sizes.feed_set,
    ]


def feed_summary(run_dir: Path) -> dict[str, object]:
    """From the run's metrics.csv: the medians of `images_per_second` and `data_wait_fraction` over the logged
    windows after the first (the first holds the start-up: workers starting, the first step's kernels), the first
    window's figures, and whether the run logged `data_wait_fraction` at all."""
    path = run_dir / "metrics.csv"
    rows: list[dict[str, str]] = []
    columns: list[str] = []
    if path.is_file():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = [row for row in reader if _number(row.get("images_per_second")) is not None]

    def median(key: str, chosen: list[dict[str, str]]) -> float | None:
        values = [value for row in chosen if (value := _number(row.get(key))) is not None]
        return statistics.median(values) if values else None

    return {
        "windows": len(rows[1:]),
        "steps": [int(float(row["step"])) for row in rows],
        "images_per_second": median("images_per_second", rows[1:]),
        "data_wait_fraction": median("data_wait_fraction", rows[1:]),
        "first_images_per_second": median("images_per_second", rows[:1]),
        "first_data_wait_fraction": median("data_wait_fraction", rows[:1]),
        "wait_logged": "data_wait_fraction" in columns,
    }


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def feed_table(sizes: DataSizes, workers: int, results: dict[str, dict[str, object]]) -> str:
    plural = "s" if workers != 1 else ""
    lines = [
        f"### Training feed: {sizes.feed_recipe}, `data.augment_on` worker and device",
        "",
        f"`mimkit pretrain` on generated ImageNet-like JPEGs: {sizes.feed_images} files per epoch "
        f"({sizes.feed_unique} distinct, long side about {sizes.data_side} px, the rest links to them), "
        f"batch {sizes.feed_batch}, {workers} DataLoader worker{plural}, {sizes.feed_precision}, "
        f"{sizes.feed_epochs} epochs, a window every {sizes.feed_log_every} steps; medians over the windows after "
        "the first (the first: start-up). `data_wait_fraction`: the share of the loop's time spent waiting for the "
        "next batch (n/a: this mimkit does not log it).",
        "",
        "| augment_on | outcome | windows | images/s | data_wait_fraction | first window: images/s | wait |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for mode, result in results.items():
        wait = "n/a" if result.get("steps") and not result.get("wait_logged") else None
        cells = [
            mode,
            str(result["outcome"]),
            str(result.get("windows", 0)),
            _cell(result.get("images_per_second"), ".1f"),
            wait or _cell(result.get("data_wait_fraction"), ".3f"),
            _cell(result.get("first_images_per_second"), ".1f"),
            wait or _cell(result.get("first_data_wait_fraction"), ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: object, spec: str) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:{spec}}"


class Report:
    """gpu_tier.md, written anew after every stage: a driver stopped from outside leaves what ran so far."""

    def __init__(self, path: Path, title: str) -> None:
        self.path, self.log = path, [f"# GPU tier: {title}", "", "## What ran", ""]
        self.data: dict[str, str] = {}
        """The data stages' tables: the feed's, then data_throughput.py's (all its recipes so far)."""
        self.steps: list[str] = []

    def save(self) -> None:
        data = "\n".join(self.data.values()) or "No data stage finished.\n"
        sections = [
            "\n".join(self.log),
            "## Data path (issue 26)\n\n" + data,
            "## Step throughput\n\n" + "\n".join(self.steps),
        ]
        self.path.write_text("\n\n".join(sections))


def data_stages(
    args: argparse.Namespace, sizes: DataSizes, env: dict[str, str], deadline: float, report: Report
) -> None:
    """The training feed in each mode, then data_throughput.py recipe by recipe, all by `deadline`."""
    feed_deadline = time.monotonic() + FEED_SHARE * (deadline - time.monotonic())
    report.data["feed"] = feed_stage(args, sizes, env, feed_deadline, report.log)
    report.save()
    data_throughput_stage(args, sizes, env, deadline, report)


def feed_stage(args: argparse.Namespace, sizes: DataSizes, env: dict[str, str], deadline: float, log: list[str]) -> str:
    """Generated images, then one `mimkit pretrain` run per mode, the worker mode's given half the time left so
    that it cannot eat the device mode's; the feed table (and feed.json)."""
    workers = args.feed_workers if args.feed_workers is not None else max(1, cores() - 1)
    results: dict[str, dict[str, object]] = {mode: {"outcome": "not run"} for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="mimkit_feed_") as scratch:  # the images do not come back in OUT
        folder = Path(scratch) / "images"
        left = deadline - time.monotonic()
        code_text = (
            f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import gpu_tier; "
            f"gpu_tier.make_images({str(folder)!r}, {sizes.feed_unique}, {sizes.feed_images}, {sizes.data_side}, "
            f"{min(cores(), 16)})"
        )
        if left < MIN_STAGE_S * (1 + len(MODES)):
            log.append(f"- training feed: skipped, {left:.0f} s of the data budget for it")
            code = None
        else:
            code, seconds = run_stage([sys.executable, "-c", code_text], args.out / "feed_images.log", env, left / 4)
            log.append(f"- feed images: {outcome(code, seconds, 'feed_images.log')}")
        for number, mode in enumerate(MODES if code == 0 else ()):
            allowed = (deadline - time.monotonic()) / (len(MODES) - number)
            name = f"feed_{mode}"
            if allowed < MIN_STAGE_S:
                log.append(f"- {name}: skipped, {allowed:.0f} s of the data budget for it")
                results[mode] = {"outcome": "skipped"}
                continue
            run_dir = args.out / name
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run refuses a folder with checkpoints
            overrides = feed_overrides(sizes, folder, mode, workers, args.device, run_dir)
            command = [sys.executable, "-m", "mimkit", "pretrain", "-c", sizes.feed_recipe, *overrides]
            code, seconds = run_stage(command, args.out / f"{name}.log", env, allowed)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # hundreds of MB that nobody reads
            said = outcome(code, seconds, f"{name}.log")
            log.append(f"- {name}: {said}")
            results[mode] = {"outcome": said.split(";")[0], **feed_summary(run_dir), "overrides": overrides}
    record = {"sizes": {f.name: getattr(sizes, f.name) for f in fields(DataSizes)}, "workers": workers}
    (args.out / "feed.json").write_text(json.dumps({**record, "results": results}, indent=1) + "\n")
    return feed_table(sizes, workers, results)


def data_throughput_stage(
    args: argparse.Namespace, sizes: DataSizes, env: dict[str, str], deadline: float, report: Report
) -> None:
    """data_throughput.py once per recipe, in the order given, each adding its rows to the result in OUT
    (`--append`) and given all the time left: a recipe stopped by the deadline loses only its own rows."""
    log = report.log
    for stale in ("data_throughput.json", "data_throughput.md"):  # of an earlier run into the same OUT
        (args.out / stale).unlink(missing_ok=True)
    for recipe in (part.strip() for part in sizes.data_recipes.split(",") if part.strip()):
        name = f"data_throughput {recipe}"
        left = deadline - time.monotonic()
        if left < MIN_STAGE_S:
            log.append(f"- {name}: skipped, {left:.0f} s of the data budget left")
            continue
        command = [
            sys.executable,
            BENCHMARKS / "data_throughput.py",
            *("--recipes", recipe, "--device", args.device, "--workers", sizes.data_workers),
            *("--rounds", sizes.data_rounds, "--images", sizes.data_images, "--image-side", sizes.data_side),
            *("--batch", sizes.data_batch, "--loader-epochs", sizes.data_loader_epochs, "--out", args.out),
            "--append",
        ]
        log_name = f"data_throughput_{recipe.replace('/', '_')}.log"
        code, seconds = run_stage(command, args.out / log_name, env, left)
        log.append(f"- {name}: {outcome(code, seconds, log_name)}")
        if code == 0:
            report.data["data_throughput"] = (args.out / "data_throughput.md").read_text()
        report.save()


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, default=ROOT / "wheelhouse")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting runs after this many seconds")
    parser.add_argument(
        "--data-budget-s",
        type=float,
        default=200.0,
        help="of the budget, the seconds the data stages may take, first (0: skip them)",
    )
    parser.add_argument("--tier", default="gpu-base")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--feed-workers", type=int, help="DataLoader workers of the feed runs (default: cores - 1)")
    for field in fields(DataSizes):
        default = getattr(GPU_SIZES, field.name)
        option = "--" + field.name.replace("_", "-")
        if isinstance(default, tuple):
            overrides = "an override of the feed runs (repeat; replaces the tier's)"
            parser.add_argument(option, action="append", metavar="KEY=VALUE", help=overrides)
        else:
            test = getattr(DATA_SIZES["test"], field.name)
            parser.add_argument(option, type=type(default), help=f"default {default} (--tier test: {test})")
    args = parser.parse_args(argv)
    sizes = replace(
        DATA_SIZES.get(args.tier, GPU_SIZES),
        **{
            f.name: tuple(value) if isinstance(value, list) else value
            for f in fields(DataSizes)
            if (value := getattr(args, f.name)) is not None
        },
    )
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    report = Report(args.out / "gpu_tier.md", f"{args.tier} on {args.device}")
    log = report.log
    install(python, args.wheels, log)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    log.append(f"- machine:\n\n```\n{describe_machine(python, env)}\n```\n")
    report.save()
    if args.data_budget_s > 0:
        data_stages(args, sizes, env, started + min(args.data_budget_s, args.budget_s), report)
    else:
        log.append("- data stages: skipped (--data-budget-s 0)")
    for method, compiled in runs(args.methods, not args.no_compile):
        name = f"{method}{' --compile' if compiled else ''}"
        left = args.budget_s - (time.monotonic() - started)
        if left < 30:
            log.append(f"- {name}: skipped, {left:.0f} s of the budget left")
            continue
        command = [
            python,
            BENCHMARKS / "step_throughput.py",
            *("--method", method, "--tier", args.tier, "--device", args.device, "--out", str(args.out)),
            *("--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats)),
            *(["--compile"] if compiled else []),
        ]
        stem = f"{method}_{args.tier}_{args.device}{'_compile' if compiled else ''}"
        code, seconds = run_stage(command, args.out / f"{stem}.log", env, left)
        log.append(f"- {name}: {outcome(code, seconds, f'{stem}.log')}")
        if code == 0:
            report.steps.append((args.out / f"{stem}.md").read_text())
        report.save()
    report.save()
    print(report.path.read_text())
    return report.path


if __name__ == "__main__":
    main()
