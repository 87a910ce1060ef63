"""Before and after of each speed change of the training step, every pair timed in one process, alternating.

For one method's case of a tier (built as `step_throughput.py` builds it), each change is a pair of callables run
in turn (`--repeats` rounds of `--steps` calls each, after `--warmup`), so load drift hits both alike:

  adamw       AdamW's update of the method's parameters: torch's per-tensor loop (its CPU default) / fused
  health      the engine's step on a logged step (health measures) / on an unlogged one (all but 1 in log_every)
  precision   the step in fp32 / under bf16 autocast (CPU: needs AVX-512 BF16 or AMX to pay)
  attention   the bf16 step with fused SDPA in the transformer blocks / with timm's explicit path (mimkit's choice
              on a CPU under bf16)
  packing     (methods with crops of two sizes) the student's blocks, forward + backward: one call per crop size /
              every crop of an image packed in one sequence with a block-diagonal attention mask (as DINOv2 packs)
  compile     (with --compile) the fp32 step eager / with `train.compile=true`

    python benchmarks/speed_changes.py --method ibot --tier cpu-small
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import step_throughput as st
from mimkit.engine.checkpoint import package_versions
from mimkit.engine.runtime import machine
from mimkit.models.families.transformer import TransformerEncoder

Pair = tuple[Callable[[], None], Callable[[], None]]
CPU = torch.device("cpu")


def case_bench(method: str, tier: str, precision: str, compile_backbones: bool = False) -> st.Bench:
    case = st.method_file(method).CASES[tier][0]
    return st.build(st.CONFIGS / case.recipe, st.overrides_for(case, "cpu", precision, compile_backbones))


def adamw_pair(bench: st.Bench) -> Pair:
    params = [p for p in bench.method.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    loop = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04, foreach=False)
    fused = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04, fused=True)
    return loop.step, fused.step


def health_pair(bench: st.Bench) -> Pair:
    return (lambda: bench.step(logged=True)), bench.step


@contextlib.contextmanager
def fused_attention(_encoder: TransformerEncoder, _tokens: torch.Tensor) -> Any:
    yield


def attention_pair(bench: st.Bench) -> Pair:
    def fused() -> None:
        explicit = TransformerEncoder.attention_path
        TransformerEncoder.attention_path = fused_attention  # type: ignore[method-assign]
        try:
            bench.step()
        finally:
            TransformerEncoder.attention_path = explicit  # type: ignore[method-assign]

    return fused, bench.step


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=st.METHODS)
    parser.add_argument("--tier", default="cpu-small", choices=["cpu-small", "test"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time train.compile (minutes of compiling)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=st.ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fp32 = case_bench(args.method, args.tier, "32-true")
    bf16 = case_bench(args.method, args.tier, "bf16-mixed")
    changes: dict[str, tuple[str, str, Pair]] = {
        "adamw": ("per-tensor loop", "fused", adamw_pair(case_bench(args.method, args.tier, "32-true"))),
        "health": ("measured every step", "on logged steps only", health_pair(fp32)),
        "precision": ("fp32", "bf16 autocast", (fp32.step, bf16.step)),
        "attention": ("bf16, fused SDPA", "bf16, explicit attention", attention_pair(bf16)),
    }
    timing = st.method_file(args.method)
    if hasattr(timing, "packing"):
        changes["packing"] = ("one call per crop size", "packed, block-diagonal mask", timing.packing(fp32))
    if args.compile:
        compiled = case_bench(args.method, args.tier, "32-true", compile_backbones=True)
        changes["compile"] = ("fp32 eager", "fp32 compiled backbones", (fp32.step, compiled.step))
    rows = []
    for name, (before, after, pair) in changes.items():
        times, _ = st.measure(
            dict(zip(("before", "after"), pair, strict=True)), CPU, args.warmup, args.steps, args.repeats
        )
        medians = st.medians_s(times)
        ms_a, ms_b = 1e3 * medians["before"], 1e3 * medians["after"]
        rows.append(
            {
                "change": name,
                "before": before,
                "after": after,
                "before_ms": ms_a,
                "after_ms": ms_b,
                "ratio": ms_b / ms_a,
                "times_s": times,
            }
        )
        print(f"{name}: {before} {ms_a:.1f} ms -> {after} {ms_b:.1f} ms ({ms_b / ms_a:.2f}x)", flush=True)
    result = {
        "benchmark": "speed_changes",
        "method": args.method,
        "tier": args.tier,
        "case": st.method_file(args.method).CASES[args.tier][0].name,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "command": ["benchmarks/speed_changes.py", *map(str, sys.argv[1:] if argv is None else argv)],
        "machine": machine(),
        "versions": package_versions(),
        "changes": rows,
    }
    path = args.out / f"speed_changes_{args.method}_{args.tier}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    info = result["machine"]
    lines = [
        f"### Speed changes: {args.method}, {args.tier} ({result['case']})",
        "",
        f"{info['cpu']} ({info['cpu_count']} logical CPUs, {result['threads']} torch threads); medians over "
        f"{args.repeats} x {args.steps} calls of each side, alternating, after {args.warmup}.",
        "",
        "| change | before | ms | after | ms | after / before |",
        "|---|---|--:|---|--:|--:|",
        *(
            f"| {r['change']} | {r['before']} | {r['before_ms']:.1f} | {r['after']} | {r['after_ms']:.1f} "
            f"| {r['ratio']:.2f}x |"
            for r in rows
        ),
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


if __name__ == "__main__":
    main()
