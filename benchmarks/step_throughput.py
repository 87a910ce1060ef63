"""Step throughput of a pretraining method against the cost of its networks (BENCHMARKS.md section 1).

For each case of a tier, one process builds the method from a shipped recipe plus the tier's overrides, makes one
real batch with the method's own `views()` + `collate` from synthetic images, moves it to the device once, then
times (medians over repeated steps after warm-up, CUDA synchronised around each step):

  step            the engine's own `train_step` (lr/wd schedules, autocast, forward, loss, backward, finiteness
                  check, unscale, clip, before_optimizer_step, AdamW step, after_step) on one device
  backbone        the same backbone(s) on exactly the student inputs (forward + backward) and the teacher inputs
                  (forward, no grad), without method logic: the floor no implementation can beat
  backbone_heads  the backbone floor plus the heads on the tokens the method uses
  ...             a method's own parts (DTM: morphing, drawing the schedules and morphing student and targets;
                  CIM: tokenizer, encoding the batch and rendering a token grid)
  reference       with --reference PATH: the official implementation's step at the same shapes, from that
                  checkout (iBOT: benchmarks/reference/ibot_official.py), timed in the same rounds

Each part's matrix-product FLOPs are counted once (torch.utils.flop_counter) and set against a large matmul timed in
the same run (and a GPU's dense peak): achieved FLOP/s and the share of the roof. With --reference on a CPU, the
step and the reference also run alone in two child processes for their peak memory.

This file knows no method: each method's file in benchmarks/floors/ lists its cases per tier, its floor (which
mirrors its `training_step`) and its own parts; mimkit knows nothing about the benchmark.

    python benchmarks/step_throughput.py --method ibot --tier cpu-small
    python benchmarks/step_throughput.py --method dtm --tier gpu-base --compile
    python benchmarks/step_throughput.py --method ibot --tier cpu-small --reference ~/src/ibot
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from lightning.fabric import Fabric

from mimkit.config import to_dict
from mimkit.data.loader import collate, seeded
from mimkit.data.sources import ImageSource, build_source
from mimkit.data.views import Views
from mimkit.engine.checkpoint import package_versions
from mimkit.engine.optim import Hyperparameters, build_optimizer
from mimkit.engine.runtime import machine, setup_for_training
from mimkit.engine.step import train_step
from mimkit.methods.base import Method, method_class
from mimkit.runs import RunConfig, load_run_config
from mimkit.schedules import Progress

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/floors, also when this file is imported by path
import floors
from floors.shapes import Case
from flop_utilisation import count_flops, matmul_dtype, matmul_roof, utilisation, vendor_peak

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "mimkit" / "configs"  # the shipped recipes (configs/ links here)
STEPS_PER_EPOCH = 1000
"""Nominal epoch length for the schedules: only the step's cost is measured, not an epoch."""

Timed = Callable[[], None]


# ---------------------------------------------------------------------------------------------------
# Tiers: where and at which precision; each method's file in floors/ lists its cases per tier


@dataclass(frozen=True)
class Tier:
    device: str
    precision: str


TIERS: dict[str, Tier] = {
    "test": Tier("cpu", "32-true"),
    "cpu-small": Tier("cpu", "32-true"),
    "gpu-base": Tier("cuda", "bf16-mixed"),
}
METHODS = floors.method_names()
"""Methods with a file in benchmarks/floors/."""


def method_file(name: str) -> ModuleType:
    """benchmarks/floors/<name>.py: the method's CASES, floor and optional parts."""
    return importlib.import_module(f"floors.{name}")


# ---------------------------------------------------------------------------------------------------
# One case, built like the engine builds a run


@dataclass
class Bench:
    """A method set up as `Trainer` sets it up (Fabric, AdamW on `param_groups()`), with one batch on its device."""

    cfg: RunConfig
    fabric: Fabric
    method: Method
    module: Any
    """The Fabric-wrapped method, through which the engine calls `training_step`."""
    optimizer: Any
    batch: dict[str, Any]
    view_seconds: list[float]
    epoch: int
    hyperparameters: Hyperparameters
    steps_done: int = 0
    last_loss: float = math.nan

    def step(self, logged: bool = False) -> None:
        """One optimizer step through the engine's own `train_step` (what `Trainer` runs), on one device; by default
        a step whose metrics are not logged, as all but one in `train.log_every_steps` are (no health measures)."""
        step = self.epoch * STEPS_PER_EPOCH + self.steps_done
        progress = Progress(self.epoch, step, STEPS_PER_EPOCH, self.cfg.train.epochs, logged=logged)
        result = train_step(
            self.fabric, self.module, self.method, self.optimizer, self.hyperparameters, [self.batch], progress
        )
        if result.norms is None:
            raise FloatingPointError(f"non-finite loss {float(result.loss)} at benchmark step {self.steps_done}")
        self.steps_done += 1
        self.last_loss = float(result.loss)

    def backward(self, outputs: Sequence[torch.Tensor]) -> None:
        """Backward from a trivial scalar of every output, then drop the gradients as the optimizer step would
        (what the floors call after their forwards)."""
        self.fabric.backward(sum(output.float().mean() for output in outputs))
        self.method.zero_grad(set_to_none=True)


def overrides_for(
    case: Case, device: str, precision: str, compile_backbones: bool, extra: Sequence[str] = ()
) -> list[str]:
    return [
        *case.overrides,
        *extra,
        f"train.accelerator={device}",
        f"train.precision={precision}",
        f"train.compile={str(compile_backbones).lower()}",
    ]


def make_batch(
    source: ImageSource, transform: Views, seed: int, epoch: int, size: int
) -> tuple[dict[str, Any], list[float]]:
    """One batch of the method's views, seeded like `ViewDataset`; each image's view time, taken single-threaded
    as in a DataLoader worker (decoding is excluded: the synthetic images are drawn before the clock starts)."""
    images = [source.load(index) for index in range(size)]
    samples, seconds = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for index, (image, label) in enumerate(images):
            with seeded(seed, epoch, index):
                start = time.perf_counter()
                views = transform(image, epoch)
                seconds.append(time.perf_counter() - start)
            samples.append((views, label, index))
    finally:
        torch.set_num_threads(threads)
    return collate(samples), seconds


def build(recipe: Path, overrides: Sequence[str]) -> Bench:
    """The method, optimizer, schedules and batch of one case, mid-training (past frozen layers and warm-ups)."""
    cfg = load_run_config(recipe, overrides)
    fabric = Fabric(accelerator=cfg.train.accelerator, devices=1, precision=cfg.train.precision)
    torch.manual_seed(cfg.seed)
    source = build_source(cfg.data)
    method_cls = method_class(cfg.method.name)
    method_cls.prepare(cfg.method, source)  # files the method reads (CIM: its tokenizer), as the Trainer does
    torch.manual_seed(cfg.seed)
    method = method_cls(cfg.method, source.info)
    epoch = cfg.train.epochs // 2
    batch, view_seconds = make_batch(source, method.views(), cfg.seed, epoch, cfg.data.batch_size)
    module, optimizer = setup_for_training(
        fabric, method, build_optimizer(method, cfg.optim, cfg.train.precision), cfg.train.compile
    )
    method.on_train_start()
    return Bench(
        cfg,
        fabric,
        method,
        module,
        optimizer,
        fabric.to_device(batch),
        view_seconds,
        epoch,
        Hyperparameters.from_config(cfg.optim, cfg.data.batch_size),
    )


# ---------------------------------------------------------------------------------------------------
# Parts: the step, and the method's own floors and parts from its file in floors/


CORE_PARTS = ("step", "backbone", "backbone_heads", "reference")


def parts(bench: Bench, method_name: str, reference: Path | None, only: Sequence[str] | None) -> dict[str, Timed]:
    """The timed callables, in the order they alternate; `only`: the names kept (the memory runs)."""
    timing = method_file(method_name)
    timed = {"step": bench.step, "backbone": timing.floor(bench, False), "backbone_heads": timing.floor(bench, True)}
    if hasattr(timing, "parts"):
        timed |= timing.parts(bench)
    if reference is not None:
        timed["reference"] = timing.reference(bench, reference)
    return {name: run for name, run in timed.items() if only is None or name in only}


# ---------------------------------------------------------------------------------------------------
# Timing


def measure(
    timed: dict[str, Timed], device: torch.device, warmup: int, steps: int, repeats: int
) -> tuple[dict[str, list[list[float]]], dict[str, int]]:
    """Seconds of every call, [repeat][step] per part; parts alternate per repeat so drift hits all of them.

    Also the peak CUDA memory allocated by each part (empty on CPU, where only the process RSS is known).
    """
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for run in timed.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[list[float]]] = {name: [] for name in timed}
    peaks: dict[str, int] = {}
    for _ in range(repeats):
        for name, run in timed.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            samples = []
            for _ in range(steps):
                sync()
                start = time.perf_counter()
                run()
                sync()
                samples.append(time.perf_counter() - start)
            times[name].append(samples)
            if cuda:
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
    return times, peaks


def _proc_status(field: str) -> int | None:
    """A memory field of /proc/self/status in bytes (Linux), else None."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def rss_bytes() -> int | None:
    """Resident memory now (Linux): what the process holds once the case is built, before any step."""
    return _proc_status("VmRSS")


def max_rss_bytes() -> int:
    """Peak resident memory of this process so far (all cases and parts together).

    Linux: VmHWM of /proc/self/status, the peak of this program alone; `ru_maxrss` would carry over the parent's
    peak into a child started by fork and exec (the memory runs of --reference)."""
    peak = _proc_status("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def medians_s(times: dict[str, list[list[float]]]) -> dict[str, float]:
    return {name: statistics.median(s for samples in runs for s in samples) for name, runs in times.items()}


def summarize(
    times: dict[str, list[list[float]]],
    batch_size: int,
    view_seconds: list[float],
    peak_bytes: int,
    flops: dict[str, dict[str, Any]],
) -> dict[str, float | None]:
    medians = medians_s(times)
    step = medians["step"]
    extra = {name: value for name, value in medians.items() if name not in CORE_PARTS}
    reference = medians.get("reference")
    return {
        "step_ms": 1e3 * step,
        "backbone_ms": 1e3 * medians["backbone"],
        "backbone_heads_ms": 1e3 * medians["backbone_heads"],
        "overhead": step / medians["backbone"],
        "outside_backbone_heads_share": (step - medians["backbone_heads"]) / step,
        "images_per_s": batch_size / step,
        "view_ms_per_image": 1e3 * statistics.median(view_seconds),
        "views_worker_load": statistics.median(view_seconds) * batch_size / step,
        "peak_memory_mib": peak_bytes / 2**20,
        "step_gflop": flops["step"]["flops"] / 1e9 if flops else None,
        "step_of_roof": flops["step"]["of_roof"] if flops else None,
        "backbone_of_roof": flops["backbone"]["of_roof"] if flops else None,
        "reference_ms": None if reference is None else 1e3 * reference,
        "step_vs_reference": None if reference is None else step / reference,
        **{f"{name}_ms": 1e3 * value for name, value in extra.items()},
        **{f"{name}_share": value / step for name, value in extra.items()},
    }


def run_case(method_name: str, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    overrides = overrides_for(case, args.device, args.precision, args.compile, args.set)
    if hasattr(method_file(method_name), "prepare"):
        method_file(method_name).prepare(case)  # what a case needs on disk (CIM's GPU tier: a dVAE file)
    bench = build(CONFIGS / case.recipe, overrides)
    device = bench.fabric.device
    timed = parts(bench, method_name, args.reference, args.parts)
    built = rss_bytes()
    times, peaks = measure(timed, device, args.warmup, args.steps, args.repeats)
    if device.type == "cuda":
        memory: dict[str, Any] = {"kind": "cuda_max_allocated", "bytes": peaks["step"], "by_part": peaks}
    else:
        memory = {"kind": "cpu_max_rss_process", "bytes": max_rss_bytes(), "before_steps": built}
        if args.reference is not None and args.parts is None:
            memory["alone"] = {part: memory_alone(method_name, case, part, args) for part in ("step", "reference")}
    profile = profile_table(timed["step"], device) if args.profile and "step" in timed else None
    roof = matmul_roof(device, matmul_dtype(args.precision))
    flops = {} if args.no_flops else flop_rows(timed, times, roof, vendor_peak(device, args.precision))
    parameters = list(bench.method.parameters())
    return {
        "case": case.name,
        "recipe": f"configs/{case.recipe}",
        "overrides": overrides,
        "config": to_dict(bench.cfg),
        "batch_size": bench.cfg.data.batch_size,
        "epoch": bench.epoch,
        "parameters": {
            "trainable": sum(p.numel() for p in parameters if p.requires_grad),
            "total": sum(p.numel() for p in parameters),
        },
        "final_loss": bench.last_loss,
        "view_seconds_per_image": bench.view_seconds,
        "times_s": times,
        "peak_memory": memory,
        "matmul_roof_flop_per_s": roof,
        "profile": profile,
        "flops": flops,
        "summary": (
            summarize(times, bench.cfg.data.batch_size, bench.view_seconds, memory["bytes"], flops)
            if args.parts is None
            else {"peak_memory_mib": memory["bytes"] / 2**20}
        ),
    }


def profile_table(step: Timed, device: torch.device, rows: int = 25) -> str:
    """torch.profiler's operators of one step, most self time first: where a step's time goes."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=rows)


def flop_rows(
    timed: dict[str, Timed], times: dict[str, list[list[float]]], roof: float, peak: float | None
) -> dict[str, dict[str, Any]]:
    """Each part's FLOPs (one more call, counted) against its median time, the roof and the peak."""
    return utilisation({name: count_flops(run) for name, run in timed.items()}, medians_s(times), roof, peak)


def memory_alone(method_name: str, case: Case, part: str, args: argparse.Namespace) -> dict[str, int | None]:
    """Peak RSS of a child process that builds the case and runs only `part` (CPU: the process is the unit), and
    its RSS once built, before the first step."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            *("--method", method_name, "--tier", args.tier, "--case", case.name, "--parts", part),
            *("--steps", "2", "--warmup", "1", "--repeats", "1", "--no-flops", "--threads", str(args.threads)),
            *("--device", args.device, "--precision", args.precision, "--out", folder),
            *(["--reference", str(args.reference)] if part == "reference" else []),
            *(f"--set={override}" for override in args.set),
            *(["--compile"] if args.compile else []),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        (result,) = Path(folder).glob("*.json")
        memory = json.loads(result.read_text())["cases"][0]["peak_memory"]
        return {"peak": memory["bytes"], "before_steps": memory.get("before_steps")}


# ---------------------------------------------------------------------------------------------------
# Report


def _cell(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "–" if value is None else f"{value * scale:{spec}}{suffix}"


def markdown(result: dict[str, Any]) -> str:
    info, versions = result["machine"], result["versions"]
    extra = list(
        dict.fromkeys(k[: -len("_share")] for c in result["cases"] for k in c["summary"] if k.endswith("_share"))
    )
    if "outside_backbone_heads" in extra:
        extra.remove("outside_backbone_heads")
    gpus = ", ".join(info["gpus"]) or "none"
    lines = [
        f"### Step throughput: {result['method']}, tier {result['tier']}, {result['device']}",
        "",
        f"{info['cpu']} ({info['cpu_count']} logical CPUs, {result['threads']} torch threads); GPUs: {gpus}; "
        f"torch {versions['torch']}, timm {versions['timm']}; precision {result['precision']}, "
        f"compile {'on' if result['compile'] else 'off'}; medians over {result['repeats']} x {result['steps']} "
        f"timed steps after {result['warmup']} warm-up steps.",
        "",
        "| case | batch | step ms | backbone ms | backbone+heads ms | overhead | outside backbone+heads "
        + "".join(f"| {name} " for name in extra)
        + "| images/s | views ms/img | one worker's views / step | peak MiB |",
        "|---|" + "--:|" * (10 + len(extra)),
    ]
    for case in result["cases"]:
        s = case["summary"]
        if "step_ms" not in s:
            continue
        cells = [
            case["case"],
            str(case["batch_size"]),
            _cell(s["step_ms"], ".1f"),
            _cell(s["backbone_ms"], ".1f"),
            _cell(s["backbone_heads_ms"], ".1f"),
            _cell(s["overhead"], ".2f", suffix="x"),
            _cell(s["outside_backbone_heads_share"], ".1f", 100, "%"),
            *(_cell(s.get(f"{name}_share"), ".2f", 100, "%") for name in extra),
            _cell(s["images_per_s"], ".1f"),
            _cell(s["view_ms_per_image"], ".2f"),
            _cell(s["views_worker_load"], ".1f", 100, "%"),
            _cell(s["peak_memory_mib"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    memory = "max allocated CUDA memory of the step" if result["device"] == "cuda" else "max RSS of the process"
    lines += ["", f"Peak memory: {memory}. Raw times of every step: the JSON file next to this table."]
    lines += utilisation_table(result) + reference_table(result)
    return "\n".join(lines) + "\n"


def utilisation_table(result: dict[str, Any]) -> list[str]:
    cases = [case for case in result["cases"] if case["flops"]]
    if not cases:
        return []
    lines = [
        "",
        "FLOP utilisation: matrix-product FLOPs of one call (forward and backward) over its median time, against a "
        f"{'8192' if result['device'] == 'cuda' else '2048'}-square matmul timed in the same run (roof) and, on a GPU, "
        "the dense peak.",
        "",
        "| case | part | GFLOP | ms | GFLOP/s | of roof | of peak |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for case in cases:
        roof = case["matmul_roof_flop_per_s"]
        lines.append(f"| {case['case']} | matmul roof | – | – | {roof / 1e9:.0f} | 100% | – |")
        for part, row in case["flops"].items():
            ms = 1e3 * row["flops"] / row["flop_per_s"]
            lines.append(
                f"| {case['case']} | {part} | {row['flops'] / 1e9:.1f} | {ms:.1f} | {row['flop_per_s'] / 1e9:.0f} "
                f"| {_cell(row['of_roof'], '.1f', 100, '%')} | {_cell(row['of_peak'], '.1f', 100, '%')} |"
            )
    return lines


def reference_table(result: dict[str, Any]) -> list[str]:
    cases = [case for case in result["cases"] if case["summary"].get("reference_ms") is not None]
    if not cases:
        return []
    lines = [
        "",
        "Against the official implementation at the same shapes (same rounds; memory: each alone in a child process).",
        "",
        "| case | mimkit step ms | reference step ms | mimkit / reference | peak MiB mimkit | peak MiB reference "
        "| peak mimkit / reference | above the build, MiB mimkit / reference |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for case in cases:
        s, memory = case["summary"], case["peak_memory"]
        mine, theirs = memory_pair(memory, "step"), memory_pair(memory, "reference")
        ratio = None if not (mine[0] and theirs[0]) else mine[0] / theirs[0]
        above = "–"
        if None not in (*mine, *theirs):
            above = f"{(mine[0] - mine[1]) / 2**20:.0f} / {(theirs[0] - theirs[1]) / 2**20:.0f}"
        ours, reference = _cell(mine[0], ".0f", 2**-20), _cell(theirs[0], ".0f", 2**-20)
        lines.append(
            f"| {case['case']} | {s['step_ms']:.1f} | {s['reference_ms']:.1f} | {s['step_vs_reference']:.2f}x "
            f"| {ours} | {reference} | {_cell(ratio, '.2f', suffix='x')} | {above} |"
        )
    return lines


def memory_pair(memory: dict[str, Any], part: str) -> tuple[int | None, int | None]:
    """(peak, before the first step) of one part: its own child process on a CPU, its CUDA peak on a GPU."""
    if "alone" in memory:
        alone = memory["alone"][part]
        return alone["peak"], alone["before_steps"]
    return memory.get("by_part", {}).get(part), 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--tier", required=True, choices=sorted(TIERS))
    parser.add_argument("--case", help="run only this case of the tier (e.g. vit_base of gpu-base)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat (>= 5 for reported numbers)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each part first (compilation)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all parts, interleaved against drift")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: the tier's")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], help="default: the tier's")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbones, as train.compile")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--reference", type=Path, help="a checkout of the method's official code: time its step at the same shapes"
    )
    parser.add_argument("--parts", type=lambda text: text.split(","), help="time only these parts (comma-separated)")
    parser.add_argument("--no-flops", action="store_true", help="skip counting FLOPs")
    parser.add_argument("--profile", action="store_true", help="write torch.profiler's table of one step")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="one more config override (repeatable)"
    )
    args = parser.parse_args(argv)
    tier = TIERS[args.tier]
    cases = method_file(args.method).CASES
    if args.tier not in cases:
        parser.error(f"tier {args.tier} has no cases for {args.method}")
    names = [case.name for case in cases[args.tier]]
    if args.case is not None and args.case not in names:
        parser.error(f"--case: tier {args.tier} has {', '.join(names)} for {args.method}; got {args.case!r}")
    if min(args.steps, args.repeats, args.threads) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats and --threads must be >= 1, --warmup >= 0")
    if args.reference is not None and not hasattr(method_file(args.method), "reference"):
        parser.error(f"--reference: there is no adapter for the official {args.method} code (benchmarks/reference/)")
    args.device = args.device or tier.device
    args.precision = args.precision or tier.precision
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; pass --device cpu to run this tier on the CPU")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the benchmark; returns the JSON file (the markdown table lies next to it)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [c for c in method_file(args.method).CASES[args.tier] if args.case in (None, c.name)]
    results = []
    for case in cases:
        results.append(run_case(args.method, case, args))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    result = {
        "benchmark": "step_throughput",
        "method": args.method,
        "tier": args.tier,
        "device": args.device,
        "precision": args.precision,
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "command": ["benchmarks/step_throughput.py", *map(str, sys.argv[1:] if argv is None else argv)],
        "machine": machine(),
        "versions": package_versions(),
        "cases": results,
    }
    precision = None if args.precision == TIERS[args.tier].precision else args.precision.split("-")[0]
    suffix = "".join(f"_{part}" for part in (args.case, precision, "compile" if args.compile else None) if part)
    path = args.out / f"{args.method}_{args.tier}_{args.device}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    path.with_suffix(".md").write_text(table)
    for case in results:
        if case["profile"]:
            path.with_name(f"{path.stem}_{case['case']}_profile.txt").write_text(case["profile"])
    print(table)
    return path


if __name__ == "__main__":
    main()
