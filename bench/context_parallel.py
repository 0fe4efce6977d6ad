"""Context parallelism at a long sequence: the GPT at cp=1 and cp=2, and ring attention against one-process SDPA.

    python -m bench.context_parallel                  # seq_len 4096, a minute or two on 2 cores
    python -m bench.context_parallel --seq-len 8192 --out bench/results

Every configuration runs in fresh processes (torchrun for cp=2; one thread per rank), side by side in this one
invocation. Per rank:
  step ms       median of `--steps` forward+backward passes of one `[1, seq_len]` sequence (after one warm-up)
  saved MiB     bytes of the tensors autograd saves in one forward (parameters excluded): the activations
  peak MiB      growth of the process's anonymous resident memory during those steps (bench.hf_load's sampler)
The model is 2 layers of width 128, 4 heads of 32 (the attention-dominated shape of the goal: activations per
rank at cp=2 <= 0.55 x cp=1). The attention rows time forward+backward of attention alone on `[1, 4, seq_len, 32]`:
ring attention over 2 ranks against `scaled_dot_product_attention` in one process with one thread (the same
work per core would make the ring 0.5x of it; the excess is the ring's overhead) and with two.
Results: `--out` (default outputs/bench/) gets context_parallel.json.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.hf_load import PeakSampler, anonymous_bytes, median_ms, run_ranks, write_result, write_row

WIDTH, HEADS, HEAD_SIZE, LAYERS = 128, 4, 32, 2


def timed(step, steps: int) -> float:
    """Median milliseconds of `step()` over `steps` runs after one warm-up (the slowest rank's, under torchrun)."""
    median = torch.tensor(median_ms(step, steps))
    if dist.is_initialized():
        dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return median.item()


def saved_bytes(forward, exclude: set[int]) -> int:
    """Bytes of the storages autograd saves during `forward()`, those in `exclude` (parameters) left out."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(n for ptr, n in saved.items() if ptr not in exclude)


def measure_model(seq_len: int, steps: int) -> dict:
    """This rank's row for the GPT: step time, saved activations, peak memory growth."""
    from tp_attention.model import GPT

    cp_group = None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        cp_group = dist.group.WORLD
    torch.manual_seed(0)
    model = GPT(256, seq_len, WIDTH, HEADS, HEAD_SIZE, LAYERS, dropout=0.0, cp_group=cp_group)
    idx, targets = torch.randint(0, 256, (1, seq_len)), torch.randint(0, 256, (1, seq_len))

    def step() -> None:
        model(idx, targets).backward()

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = saved_bytes(lambda: model(idx, targets), parameters)
    before = anonymous_bytes()
    with PeakSampler() as sampler:
        step_ms = timed(step, steps)
    rank = dist.get_rank() if dist.is_initialized() else 0
    row = {"what": "gpt", "cp": 1 if cp_group is None else dist.get_world_size(), "rank": rank, "step_ms": step_ms}
    row |= {"saved_bytes": activations, "peak_growth": sampler.peak - before, "tokens_per_rank": seq_len // row["cp"]}
    if dist.is_initialized():
        dist.destroy_process_group()
    return row


def measure_attention(seq_len: int, steps: int, threads: int) -> dict:
    """This rank's row for attention alone: ring over all ranks under torchrun, else one-process SDPA."""
    from tp_attention.context import local_positions, ring_attention

    torch.set_num_threads(threads)
    group = None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    cp = 1 if group is None else dist.get_world_size()
    rank = 0 if group is None else dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, HEADS, seq_len, HEAD_SIZE, generator=gen) for _ in range(4))
    if group is not None:
        mine = local_positions(seq_len, cp, rank)
        q, k, v, grad = (t[:, :, mine].contiguous() for t in (q, k, v, grad))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step() -> None:
        out = (
            ring_attention(q, k, v, group)
            if group is not None
            else F.scaled_dot_product_attention(q, k, v, is_causal=True)
        )
        out.backward(grad)

    row = {"what": "ring" if group is not None else "sdpa", "cp": cp, "threads": threads, "rank": rank}
    row["step_ms"] = timed(step, steps)
    if dist.is_initialized():
        dist.destroy_process_group()
    return row


def ratio_lines(rows: list[dict]) -> list[str]:
    """The ratios the goals are stated in, from rank 0's rows."""
    first = {(r["what"], r["cp"], r.get("threads")): r for r in rows if r["rank"] == 0}
    one, two = first[("gpt", 1, None)], first[("gpt", 2, None)]
    ring, sdpa1, sdpa2 = first[("ring", 2, 1)], first[("sdpa", 1, 1)], first[("sdpa", 1, 2)]
    saved = two["saved_bytes"] / one["saved_bytes"]
    return [
        f"saved activations per rank, cp2 / cp1: {saved:.3f} (goal <= 0.55: {'met' if saved <= 0.55 else 'missed'})",
        f"peak memory growth per rank, cp2 / cp1: {two['peak_growth'] / max(one['peak_growth'], 1):.3f}",
        f"GPT step time, cp2 (2 ranks) / cp1 (1 rank): {two['step_ms'] / one['step_ms']:.3f}",
        f"ring attention over 2 ranks / SDPA in one process, 1 thread: {ring['step_ms'] / sdpa1['step_ms']:.3f} "
        "(0.5 would be no overhead)",
        f"ring attention over 2 ranks / SDPA in one process, 2 threads: {ring['step_ms'] / sdpa2['step_ms']:.3f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--measure", choices=("gpt", "attention"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure == "gpt":
        write_row(measure_model(args.seq_len, args.steps))
        return
    if args.measure == "attention":
        write_row(measure_attention(args.seq_len, args.steps, args.threads))
        return
    common = ["-m", "bench.context_parallel", "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    runs = [
        (["--measure", "gpt"], 1),
        (["--measure", "gpt"], 2),
        (["--measure", "attention", "--threads", "1"], 1),
        (["--measure", "attention", "--threads", "2"], 1),
        (["--measure", "attention", "--threads", "1"], 2),
    ]
    rows = [row for extra, world in runs for row in run_ranks([*common, *extra], world)]
    mib = 2**20
    print(f"seq_len {args.seq_len}, model {LAYERS} layers x width {WIDTH}, {HEADS} heads of {HEAD_SIZE}")
    print(f"{'what':>5} {'cp':>2} {'rank':>4} {'threads':>7} {'step ms':>9} {'saved MiB':>9} {'peak MiB':>8}")
    for r in rows:
        saved = f"{r['saved_bytes'] / mib:9.1f}" if "saved_bytes" in r else " " * 9
        peak = f"{r['peak_growth'] / mib:8.1f}" if "peak_growth" in r else " " * 8
        print(f"{r['what']:>5} {r['cp']:>2} {r['rank']:>4} {r.get('threads', 1):>7} {r['step_ms']:9.1f} {saved} {peak}")
    result = {"seq_len": args.seq_len, "steps": args.steps, "rows": rows, "ratios": ratio_lines(rows)}
    write_result(args.out, "context_parallel", result)


if __name__ == "__main__":
    main()
