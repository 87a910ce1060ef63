"""k-NN at ImageNet size: time and peak memory of the weighted k-NN (`mimkit.eval.knn`) over a bank of 1,281,167
features of 768 dimensions (ImageNet-1k's training set, ViT-B), synthetic, 1000 classes.

Each configuration runs in a child process, so its peak resident memory (`ru_maxrss`) is its own: the bank's
features as extraction hands them over (float32, or float16 with `bank_dtype=float16`), their normalised copy, and
the similarities of `--chunk` queries against `--bank-chunk` bank rows. Normalising the bank is timed on its own;
the rest of the k-NN grows linearly with the queries and is scaled to ImageNet's 50,000 validation images.

    python benchmarks/knn_scale.py                       # float32 and float16 banks, 1000 queries
    python benchmarks/knn_scale.py --queries 5000 --bank-chunk 262144
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


def measure(bank: int, dim: int, queries: int, dtype: str, chunk: int, bank_chunk: int) -> dict[str, float]:
    """One configuration, in this process: seconds to build and normalise the bank, to answer the queries, and the
    peak resident memory in GiB."""
    import torch

    from mimkit.eval.knn import knn_predict, normalised_bank

    storage = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)
    features = torch.empty(bank, dim, dtype=storage)
    for start in range(0, bank, 65536):  # filled in chunks: no full-size float32 temporary for a float16 bank
        rows = min(65536, bank - start)
        features[start : start + rows] = torch.randn(rows, dim, generator=generator).to(storage)
    labels = torch.randint(0, 1000, (bank,), generator=generator)
    test = torch.randn(queries, dim, generator=generator)
    start = time.perf_counter()
    normalised = normalised_bank(features, storage)  # what knn_predict does first, timed on its own
    normalising = time.perf_counter() - start
    del normalised  # peak memory counts the k-NN's own copy, not this one
    start = time.perf_counter()
    predictions = knn_predict(
        features, labels, test, 1000, ks=(20,), chunk_size=chunk, bank_chunk_size=bank_chunk, bank_dtype=storage
    )
    seconds = time.perf_counter() - start
    assert predictions[20].shape == (queries,)
    return {
        "seconds": seconds,
        "normalising_seconds": normalising,
        "seconds_per_1000_queries": 1000 * max(seconds - normalising, 0.0) / queries,
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=int, default=IMAGENET_TRAIN, help="bank rows (%(default)s)")
    parser.add_argument("--dim", type=int, default=768, help="feature dimension (%(default)s)")
    parser.add_argument("--queries", type=int, default=1000, help="timed queries (%(default)s)")
    parser.add_argument("--chunk", type=int, default=1000, help="queries per product (%(default)s)")
    parser.add_argument("--bank-chunk", type=int, default=131072, help="bank rows per product (%(default)s)")
    parser.add_argument("--dtypes", default="float32,float16", help="bank storage dtypes (%(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.bank, args.dim, args.queries, args.child, args.chunk, args.bank_chunk)))
        return args.out
    rows = {}
    for dtype in args.dtypes.split(","):
        command = [sys.executable, __file__, "--child", dtype, "--bank", str(args.bank), "--dim", str(args.dim)]
        command += ["--queries", str(args.queries), "--chunk", str(args.chunk), "--bank-chunk", str(args.bank_chunk)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows[dtype] = json.loads(done.stdout.strip().splitlines()[-1])
    lines = [
        f"bank {args.bank:,} x {args.dim}, {args.queries:,} queries in chunks of {args.chunk} against "
        f"{args.bank_chunk:,} bank rows, k = 20, {rows[next(iter(rows))]['threads']} threads",
        "",
        "| bank stored as | k-NN s | of which normalising the bank | s per 1000 queries | 50,000 queries "
        "(extrapolated) | peak memory GiB |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for dtype, row in rows.items():
        val = (row["normalising_seconds"] + row["seconds_per_1000_queries"] * IMAGENET_VAL / 1000) / 60
        lines.append(
            f"| {dtype} | {row['seconds']:.1f} | {row['normalising_seconds']:.1f} | "
            f"{row['seconds_per_1000_queries']:.1f} | {val:.0f} min | {row['peak_gib']:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "knn_scale.json"
    path.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "results": rows}, indent=1))
    print("\n".join(lines))
    return path


if __name__ == "__main__":
    main()
