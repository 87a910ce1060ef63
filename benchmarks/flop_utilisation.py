"""FLOPs of a timed part and the share of the machine's matmul peak it reaches (MFU).

`torch.utils.flop_counter` counts the matrix products (linear, conv, bmm and attention, forward and backward) of
one call; the roof is what the same machine reaches on one large matrix product in the same run (CPU), and on a
GPU also the vendor's dense peak for the precision, so a ratio never mixes two machines or two moments.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten

DENSE_PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp32": 494.7},
    "H100": {"bf16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.1, "fp32": 183.0},
    "A10": {"bf16": 125.0, "fp32": 62.5},
}
"""Vendor dense tensor-core peaks (no sparsity; fp32 means TF32), by a name part of `torch.cuda.get_device_name`."""


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU kernel of `scaled_dot_product_attention`, which the counter does not know: same math as the GPU's."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(run: Callable[[], None]) -> int:
    """Matrix-product FLOPs of one call (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def matmul_roof(device: torch.device, dtype: torch.dtype, size: int | None = None, calls: int = 5) -> float:
    """FLOP/s of a square matrix product on `device` (median of `calls` after a warm-up)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)
    seconds = []
    for _ in range(calls):
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds)


def vendor_peak(device: torch.device, precision: str) -> float | None:
    """The GPU's dense peak FLOP/s for the step's matmul precision, when the device is in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = "bf16" if "bf16" in precision else "fp32"
    for part, peaks in DENSE_PEAK_TFLOPS.items():
        if part in name:
            return peaks[kind] * 1e12
    return None


def matmul_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if "bf16" in precision else torch.float32


def utilisation(flops: dict[str, int], medians_s: dict[str, float], roof: float, peak: float | None) -> dict[str, Any]:
    """Per part: FLOPs, achieved FLOP/s, and their share of the measured roof (and of the vendor peak)."""
    rows = {}
    for name, count in flops.items():
        achieved = count / medians_s[name]
        rows[name] = {
            "flops": count,
            "flop_per_s": achieved,
            "of_roof": achieved / roof,
            "of_peak": None if peak is None else achieved / peak,
        }
    return rows
