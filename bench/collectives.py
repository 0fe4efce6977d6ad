"""Time one TP collective through gloo and through shared memory, side by side, on this host.

    python -m bench.collectives                  # 2 ranks, a 4 x 256 x 384 fp32 activation (1.5 MB)
    python -m bench.collectives --ranks 4 --shape 4 256 512

Each rank runs one thread; every collective is timed over `--calls` back-to-back calls after a
warm-up, on rank 0. Prints milliseconds per call for all-reduce, all-gather (dim 1) and
reduce-scatter (dim 1).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tp_attention.mappings import _all_gather, _reduce_scatter, all_reduce_in_place
from tp_attention.shm import with_shared_memory

COLLECTIVES = {
    "all-reduce": lambda x, group: all_reduce_in_place(x, group),
    "all-gather": lambda x, group: _all_gather(x, 1, group),
    "reduce-scatter": lambda x, group: _reduce_scatter(x, 1, group),
}


def time_calls(fn, calls: int) -> float:
    """Milliseconds per call of `fn()` over `calls` calls, after a warm-up, started together on every rank."""
    for _ in range(10):
        fn()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def worker(rank: int, ranks: int, init_file: str, shape: list[int], calls: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    group = dist.group.WORLD
    shared_group = with_shared_memory(group)
    x = torch.randn(shape)
    rows = []
    for name, collective in COLLECTIVES.items():
        gloo = time_calls(lambda collective=collective: collective(x, group), calls)
        shared = time_calls(lambda collective=collective: collective(x, shared_group), calls)
        rows.append(f"| {name} | {gloo:.2f} | {shared:.2f} | {gloo / shared:.1f}x |")
    if rank == 0:
        megabytes = x.numel() * x.element_size() / 1e6
        print(f"{ranks} ranks, fp32 tensor {tuple(shape)} ({megabytes:.1f} MB), {calls} calls each\n")
        print("| collective | gloo ms | shared memory ms | speed-up |\n|---|---|---|---|")
        print("\n".join(rows))
    shared_group.shared_memory.close()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 256, 384])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args.ranks, os.path.join(tmp, "init"), args.shape, args.calls), nprocs=args.ranks)


if __name__ == "__main__":
    main()
