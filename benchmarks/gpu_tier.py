"""Every GPU measurement of the step benchmark in one command, for a machine with no package index.

    python benchmarks/gpu_tier.py --wheels wheelhouse --out $OUT

Installs what the machine lacks from the wheel folder (`make wheelhouse` fills it with omegaconf;
torch, timm and lightning must be there already), puts this checkout's `src/` on the path instead of installing
mimkit, records the GPU, then runs `step_throughput.py` for each (method, compile) in priority order, iBOT first,
until the time budget is spent: each run gets what is left, and a run that fails or times out is recorded and the
next one starts. Everything lands in OUT: each run's JSON, table and log, and `gpu_tier.md` with all the tables
and a list of what ran, failed or was skipped.

Checked on a CPU with `--tier test --device cpu` (tests/test_gpu_tier.py). Standard library only: it runs before
the packages it installs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/floors, also when this file is imported by path
import floors

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(floors.method_names(), key=lambda name: name != "ibot")
"""Every benchmarked method, iBOT first (the one with a reference implementation to compare against)."""
NEEDED = {"omegaconf": "omegaconf"}
"""Modules mimkit imports that the GPU image lacks (it has torch, torchvision, timm, lightning with PyYAML, rich,
matplotlib, safetensors), and the distribution to install for each."""


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
    return lines + ("\n" + smi.stdout.strip() if smi and smi.returncode == 0 else "")


def _has(program: str) -> bool:
    return any((Path(folder) / program).is_file() for folder in os.environ.get("PATH", "").split(os.pathsep))


def runs(methods: Sequence[str], compile_too: bool) -> list[tuple[str, bool]]:
    """iBOT plain and compiled first (the issue's headline), then every other method plain, then compiled."""
    order = [(methods[0], False), *([(methods[0], True)] if compile_too else [])]
    order += [(m, False) for m in methods[1:]]
    order += [(m, True) for m in methods[1:]] if compile_too else []
    return order


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, default=ROOT / "wheelhouse")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting runs after this many seconds")
    parser.add_argument("--tier", default="gpu-base")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    log = [f"# GPU tier: {args.tier} on {args.device}", "", "## What ran", ""]
    install(python, args.wheels, log)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    log.append(f"- machine:\n\n```\n{describe_machine(python, env)}\n```\n")
    tables = []
    for method, compiled in runs(args.methods, not args.no_compile):
        name = f"{method}{' --compile' if compiled else ''}"
        left = args.budget_s - (time.monotonic() - started)
        if left < 30:
            log.append(f"- {name}: skipped, {left:.0f} s of the budget left")
            continue
        command = [
            python,
            str(ROOT / "benchmarks" / "step_throughput.py"),
            *("--method", method, "--tier", args.tier, "--device", args.device, "--out", str(args.out)),
            *("--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats)),
            *(["--compile"] if compiled else []),
        ]
        stem = f"{method}_{args.tier}_{args.device}{'_compile' if compiled else ''}"
        begun = time.monotonic()
        with (args.out / f"{stem}.log").open("w") as output:
            try:
                code = subprocess.run(
                    command, stdout=output, stderr=subprocess.STDOUT, env=env, timeout=left
                ).returncode
            except subprocess.TimeoutExpired:
                code = None
        seconds = time.monotonic() - begun
        if code == 0:
            log.append(f"- {name}: done in {seconds:.0f} s")
            tables.append((args.out / f"{stem}.md").read_text())
        else:
            outcome = "timed out" if code is None else f"failed (exit {code})"
            log.append(f"- {name}: {outcome} after {seconds:.0f} s; see {stem}.log")
    report = args.out / "gpu_tier.md"
    report.write_text("\n".join(log) + "\n\n## Tables\n\n" + "\n".join(tables))
    print(report.read_text())
    return report


if __name__ == "__main__":
    main()
