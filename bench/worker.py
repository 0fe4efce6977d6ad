"""One benchmark configuration in this process (or this torchrun rank): time a full training step.

    python -m bench.worker --variant ours --shape small --dtype fp32 --out result.json
    torchrun --nproc_per_node 2 -m bench.worker --variant dtensor ...

A step is forward, loss, backward and AdamW on the same random tokens for every variant. Step time
is the slowest rank's. With `--compile` the model runs through `torch.compile` (inductor); the first
step, which compiles forward and backward, is reported apart as `first_step_s`. Collectives are
counted (calls and bytes) over one extra eager step. Peak memory is the process's peak RSS on CPU,
`torch.cuda.max_memory_allocated` on GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from contextlib import nullcontext, suppress

import torch
import torch.distributed as dist

from bench.nanogpt import NanoGPT, parallelize_with_dtensor
from tp_attention.checkpointing import MODES, apply_activation_checkpointing
from tp_attention.distributed import init_parallel_groups
from tp_attention.grad_norm import sync_replicated_grads
from tp_attention.model import GPT, GPTConfig
from tp_attention.shm import with_shared_memory_groups
from train.reporting.measure import CollectiveCounter

SHAPES = {  # name: (layers, heads, width, seq_len, micro-batch)
    "small": (6, 6, 384, 256, 4),  # nanoGPT shakespeare-char
    "medium": (8, 8, 512, 256, 4),
    "gpt2": (12, 12, 768, 1024, 8),  # GPT-2 124M (GPU only)
    "tiny": (2, 2, 64, 64, 2),  # the GPU check's CPU dry run
}
VOCAB = 256
PROFILE_KINDS = ("matmul", "attention", "communication", "optimizer", "other ops", "untracked")


COMMUNICATION = (
    "c10d",
    "tp_attention::",
    "gloo",
    "wait_tensor",
    "allreduce",
    "all_reduce",
    "allgather",
    "all_gather",
    "reduce_scatter",
)


def kind_of(names: list[str]) -> str:
    """The kind of work an op's own time is, from its name and its callers' (`names`: the op first):
    anything inside the optimizer step or inside a collective (its copies, its sums) counts as that."""
    if any(n.startswith("Optimizer.step") for n in names):
        return "optimizer"
    if any(k in n for n in names for k in COMMUNICATION):
        return "communication"
    if "scaled_dot_product" in names[0] or "flash_attention" in names[0]:
        return "attention"
    return (
        "matmul" if names[0].split("::")[-1] in ("mm", "addmm", "bmm", "baddbmm", "_addmm_activation") else "other ops"
    )


def profile(step, device: torch.device, steps: int = 2) -> dict[str, float]:
    """Milliseconds per step by kind of work: the self time of this thread's profiled ops (on CUDA,
    of the kernels each op launched), summed by kind (`kind_of`); `untracked` is wall time no op
    accounts for (Python, DTensor's sharding propagation, waiting for gloo's thread; on CUDA, the
    GPU idle)."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for _ in range(steps):
            with record_function("bench.step"):
                step()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    thread = next(e.thread for e in prof.events() if e.name == "bench.step")  # this thread (backward's too on CPU)
    ms = dict.fromkeys(PROFILE_KINDS, 0.0)
    for e in prof.events():
        if e.thread != thread or e.name == "bench.step":
            continue
        names, parent = [e.name], e.cpu_parent
        while parent is not None:
            names.append(parent.name)
            parent = parent.cpu_parent
        ms[kind_of(names)] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps
    ms["untracked"] = max(0.0, wall_ms - sum(ms.values()))
    return ms


def gpt_config(shape: str, vocab: int = VOCAB) -> GPTConfig:
    """Our GPT at one of the benchmark's shapes (byte vocabulary unless `vocab`, no dropout)."""
    layers, heads, width, seq, _ = SHAPES[shape]
    return GPTConfig(
        vocab_size=vocab,
        max_seq_len=seq,
        emb_size=width,
        num_heads=heads,
        head_size=width // heads,
        num_layers=layers,
        dropout=0.0,
    )


def build(variant: str, shape: str, tp_group, mesh, sequence_parallel: bool, vocab: int = VOCAB) -> torch.nn.Module:
    layers, heads, width, seq, _ = SHAPES[shape]
    torch.manual_seed(0)
    if variant in ("ours", "ours_sp", "ours_gloo"):
        return GPT.from_config(gpt_config(shape, vocab), tp_group=tp_group, sequence_parallel=sequence_parallel)
    model = NanoGPT(vocab, seq, width, heads, layers, split_qkv=variant == "dtensor")
    return parallelize_with_dtensor(model, mesh["tp"]) if variant == "dtensor" else model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=["ours", "ours_sp", "ours_gloo", "plain", "dtensor"], required=True)
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size (GPT-2: 50304, padded)")
    parser.add_argument("--activation-checkpointing", choices=MODES, default="none", help="ours: recompute blocks")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", "0")) if args.device == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shared_memory = args.variant in ("ours", "ours_sp") and device.type == "cpu"  # same-host TP collectives
    groups = init_parallel_groups(world, device.type) if world > 1 else None
    if groups and shared_memory:
        groups = with_shared_memory_groups(groups)
    tp_group, mesh = (groups.tp_group, groups.mesh) if groups else (None, None)
    sequence_parallel = args.variant == "ours_sp"
    model = build(args.variant, args.shape, tp_group, mesh, sequence_parallel, args.vocab).to(device)
    if args.activation_checkpointing != "none":
        apply_activation_checkpointing(model, args.activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model, backend=args.compile_backend) if args.compile else model
    _, _, _, seq, batch = SHAPES[args.shape]
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (batch, seq), generator=gen).to(device)
    y = torch.randint(0, args.vocab, (batch, seq), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    def step(run: torch.nn.Module = forward) -> float:
        with autocast:
            loss = run(x, y)
        loss.backward()
        if sequence_parallel:
            sync_replicated_grads(model, tp_group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # also waits for the device

    times = []
    for _ in range(args.warmup + args.steps):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    first_step_s = times[0]
    times = torch.tensor(times[args.warmup :], device=device)
    if world > 1:  # the step ends when the slowest rank ends
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    saved: dict[int, int] = {}  # activation memory: bytes of the tensors autograd saves in one forward

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = getattr(t, "_local_tensor", t)  # a DTensor's own piece
        with suppress(RuntimeError):  # a wrapper without storage of its own: its local piece is saved too
            saved[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(x, y)
    params = {getattr(p, "_local_tensor", p).untyped_storage().data_ptr() for p in model.parameters()}
    activation_mib = sum(n for ptr, n in saved.items() if ptr not in params) / 2**20
    profile_ms = None if args.compile else profile(step, device)  # inductor's fused kernels have no per-op kinds
    counter = CollectiveCounter(by_transport=True)
    with counter:  # eager: a dispatch mode around a compiled model would make it recompile
        step(model)
    result = {
        "variant": args.variant,
        "shape": args.shape,
        "dtype": args.dtype,
        "ranks": world,
        "compiled": args.compile,
        "activation_checkpointing": args.activation_checkpointing,
        "first_step_s": first_step_s,
        "threads": torch.get_num_threads(),
        "device": device.type,
        "activation_mib": activation_mib,
        "step_median_s": statistics.median(times.tolist()),
        "step_min_s": min(times.tolist()),
        "tokens_per_step": batch * seq,
        "peak_mem_mib": (
            torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        / 2**20,
        "collectives_per_step": dict(counter.calls),
        "collective_bytes_per_step": counter.bytes,
        "profile_ms_per_step": profile_ms,
    }
    if world == 1 or dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
