"""Every ImageNet recipe at its real shapes on this CPU: 2 steps at batch 2 on synthetic 224-px images, then a resume
for 2 more, in float32 and bf16-mixed; each recipe's parameters, step time and peak memory.

    python benchmarks/full_shapes.py --out full_shapes.json        # every recipe, both precisions (~12 min, 2 cores)
    python benchmarks/full_shapes.py --recipes cim/resnet50_imagenet_respix --precisions 32-true

DTM's OpenCLIP teacher and CIM's DALL-E tokenizer come from random-weight files of the published layouts, written
to the work folder first, so that the real loading code runs (`tests/test_full_shapes.py` runs the same through
`make test-full`). Peak memory is the run's maximum resident set; the step time the second step's wall-clock.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("32-true", "bf16-mixed")
CLIP_MODEL = "ViT-B-16-quickgelu"
MEASURED = """
import resource, sys
from mimkit.cli import main
code = main(sys.argv[1:])
print(f"peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""


SYNTHETIC = ["data.source=synthetic", "data.synthetic.size=224", "data.synthetic.images=4", "data.num_workers=0"]


def imagenet_recipes() -> list[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from mimkit.recipes import shipped_recipes

    return [r.name for r in shipped_recipes() if "_imagenet" in r.name and not r.name.startswith("tokenizers/")]


def prepare_files(work: Path) -> dict[str, list[str]]:
    """Random-weight files of the published layouts, and the overrides that point the recipes at them."""
    import open_clip
    import torch

    from mimkit.models.tokenizers.dall_e import DallETokenizer

    work.mkdir(parents=True, exist_ok=True)
    clip = work / "open_clip_vit_b16_random.bin"
    if not clip.is_file():
        torch.save(open_clip.create_model(CLIP_MODEL, pretrained=None).state_dict(), clip)
    tokenizer = work / "dall_e_random.pt"
    if not tokenizer.is_file():
        torch.manual_seed(0)
        dvae = DallETokenizer()
        files = work / "dall_e_encoder.pt", work / "dall_e_decoder.pt"
        torch.save(dvae.encoder.state_dict(), files[0])
        torch.save(dvae.decoder.state_dict(), files[1])
        fit = [sys.executable, "-m", "mimkit", "tokenizer", "fit", "-c", "tokenizers/dall_e"]
        fit += [f"tokenizer.encoder_file={files[0]}", f"tokenizer.decoder_file={files[1]}", f"output={tokenizer}"]
        fit += [*SYNTHETIC, "eval_images=4"]  # its PSNR on 4 synthetic images: the file is what matters
        subprocess.run(fit, check=True, capture_output=True, text=True)
    return {"dtm/": [f"method.teacher.weights={clip}"], "cim/": [f"method.tokenizer={tokenizer}"]}


def run_recipe(name: str, precision: str, work: Path, files: dict[str, list[str]]) -> dict[str, object]:
    """2 steps, then 2 more after a resume; what they cost. Raises with the run's stderr when either fails."""
    out = work / f"{name.replace('/', '__')}__{precision}"
    common = [
        *SYNTHETIC,
        "data.channels=3",
        "data.batch_size=2",
        "data.global_batch=null",
        "train.accelerator=cpu",
        "train.devices=1",
        "train.num_nodes=1",
        "train.strategy=auto",
        f"train.precision={precision}",
        "train.log_every_steps=1",
        "train.progress_bar=false",
        "train.loggers=[csv]",
        "train.knn_every_epochs=0",
        "train.checkpoint_every_steps=0",
        *next((extra for prefix, extra in files.items() if name.startswith(prefix)), []),
    ]
    first = _mimkit(["pretrain", "-c", name, f"output_dir={out}", *common, "train.epochs=1"])
    resumed = _mimkit(["pretrain", "-c", name, f"output_dir={out}", *common, "train.epochs=2", "--resume"])
    sys.path.insert(0, str(ROOT / "src"))
    from mimkit.engine.logs import read_metrics

    rows = [r for r in read_metrics(out) if "loss" in r]
    second = rows[1]
    shutil.rmtree(out / "checkpoints")  # up to 4 GB each (ViT-L): the logs stay
    return {
        "recipe": name,
        "precision": precision,
        "steps": len(rows),
        "losses": [r["loss"] for r in rows],
        "step_seconds": 2 / second["images_per_second"],
        "peak_mib": max(first["peak_kib"], resumed["peak_kib"]) / 1024,
        "parameters_m": _parameters(out / "train.log"),
    }


def _mimkit(argv: list[str]) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", MEASURED, *argv], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"mimkit {' '.join(argv[:3])} failed:\n{done.stderr[-4000:]}")
    peak = [line for line in done.stderr.splitlines() if line.startswith("peak_rss_kib=")]
    return {"peak_kib": float(peak[-1].split("=")[1])}


def _parameters(log: Path) -> float:
    """The trainable parameters the run's first log line names (millions)."""
    for line in log.read_text().splitlines():
        if "M trainable parameters" in line:
            return float(line.split("M trainable parameters")[0].rsplit(" ", 1)[-1])
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", help="default: every ImageNet recipe")
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS))
    parser.add_argument("--work", type=Path, help="folder for the runs and files (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mimkit-full-shapes-"))
    files = prepare_files(work)
    rows = []
    print("| recipe | precision | trainable M | step s | peak MiB | losses |\n| --- | --- | --: | --: | --: | --- |")
    for name in args.recipes or imagenet_recipes():
        for precision in args.precisions:
            row = run_recipe(name, precision, work, files)
            rows.append(row)
            losses = " ".join(f"{x:.3f}" for x in row["losses"])  # type: ignore[union-attr]
            print(
                f"| {name} | {precision} | {row['parameters_m']:.1f} | {row['step_seconds']:.1f} | "
                f"{row['peak_mib']:.0f} | {losses} |",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
