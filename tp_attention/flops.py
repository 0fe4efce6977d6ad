"""Model FLOPs (nanoGPT's estimate) and a measured matmul peak, for MFU."""

from __future__ import annotations

import time

import torch

from tp_attention.model import GPTConfig


def flops_per_token(cfg: GPTConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: `6 N + 12 L H D T` (nanoGPT / PaLM appendix B).

    N is the parameter count without the position embedding; the second term is attention's
    `QK^T` and `AV` matmuls, which have no parameters.
    """
    return 6.0 * num_params + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len


def measure_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       size: int | None = None, seconds: float = 0.5) -> float:
    """FLOP/s of repeated square matmuls in this process (its threads), the best of a few rounds."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best
