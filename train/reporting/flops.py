"""The machine's matmul peak, measured here, for MFU (model FLOPs utilisation)."""

from __future__ import annotations

import time

import torch


def measure_peak_flops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    repeats: int = 5,
    seconds: float = 0.5,
) -> float:
    """FLOP/s of square matmuls in this process (its threads): the best of `repeats` rounds, each timing
    back-to-back matmuls for about `seconds / repeats`. The best round is the one least disturbed by
    whatever else the machine was doing."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        calls, deadline = 0, time.perf_counter() + seconds / repeats
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        while calls == 0 or time.perf_counter() < deadline:
            a @ b
            calls += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        best = max(best, calls * 2 * size**3 / (time.perf_counter() - start))
    return best


def mfu(model_flops_per_s: float, peak_flops: float) -> float | None:
    """Model FLOP/s over the peak; None when above 1 (the peak was measured under another load: a window
    that fast is noise, not a figure)."""
    value = model_flops_per_s / peak_flops
    return value if value <= 1.0 else None
