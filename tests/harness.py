"""Run a function on every rank of a small process group: threads in this process or real processes.

`fn(rank, world_size, *args)` runs with the default process group initialised; its return values
come back as a list indexed by rank.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing._internal.distributed.multi_threaded_pg import (
    ProcessLocalGroup,
    _install_threaded_pg,
    _uninstall_threaded_pg,
)


def run_threaded(world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 120) -> list[Any]:
    """Run `fn` as `world_size` threads over torch's in-process "threaded" process group."""
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []
    store = dist.HashStore()

    def worker(rank: int) -> None:
        try:
            dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store)
            results[rank] = fn(rank, world_size, *args)
        except BaseException as e:
            errors.append(e)
            ProcessLocalGroup.exception_handle(e)

    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    _install_threaded_pg()
    try:
        threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s)
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"threaded ranks still running after {timeout_s}s")
    finally:
        ProcessLocalGroup.reset()
        _uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    if errors:
        raise errors[0]
    return results


def _gloo_worker(rank: int, world_size: int, init_file: str, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_gloo(world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Run `fn` on a real gloo group: in this process for one rank, else in spawned processes."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        if world_size == 1:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
            try:
                return [fn(0, 1, *args)]
            finally:
                dist.destroy_process_group()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(_gloo_worker, args=(world_size, init_file, tmp, fn, args), nprocs=world_size)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor, atol: float = 0.0) -> float:
    """max |actual - expected| / max |expected|, ignoring differences below `atol`.

    The floor matters for gradients that are zero in exact arithmetic (the key bias: softmax
    ignores a shift shared by a whole row), where fp32 leaves ~1e-7 of noise and nothing to
    be relative to.
    """
    actual, expected = actual.double(), expected.double()
    diff = ((actual - expected).abs() - atol).clamp(min=0).max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_rel_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "", atol: float = 1e-6
) -> None:
    """Shapes equal and `max_rel_err(actual, expected, atol) <= tol`."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = max_rel_err(actual, expected, atol)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"
