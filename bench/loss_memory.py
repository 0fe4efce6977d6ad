"""Peak memory and time of the LM head + loss (forward and backward) at a Llama 3 vocabulary: chunked against
the whole logits.

    python -m bench.loss_memory                       # V = 128,256, 4,096 tokens, emb 128, tp = 1 (about a minute)
    python -m bench.loss_memory --out bench/results   # refresh the figures docs/performance.md cites

Each variant runs in a fresh process, side by side in this one invocation: `whole` is the loss before
chunking (`VocabParallelEmbedding.logits`, then `vocab_parallel_cross_entropy`: the `[tokens, V]` logits and
their gradient at once), `chunked` is `VocabParallelEmbedding.loss` (one chunk of `--chunk-mib` of fp32 logits
at a time). Peak memory is the growth of the process's peak RSS over what it held before the loss (CPU), or of
`torch.cuda.max_memory_allocated` (CUDA), through one forward and backward; time is the median of `--steps`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from bench.hf_load import median_ms, write_result
from tp_attention.vocab import VocabParallelEmbedding, vocab_parallel_cross_entropy

VARIANTS = ("whole", "chunked")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(variant: str, vocab: int, tokens: int, emb: int, chunk_mib: int, steps: int, device: str) -> dict:
    """One variant's row: peak growth of one forward and backward (first), then its median time."""
    generator = torch.Generator().manual_seed(0)
    head = VocabParallelEmbedding(vocab, emb, generator=generator).to(device)
    hidden = torch.randn(1, tokens, emb, generator=generator).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (1, tokens), generator=generator).to(device)

    def step() -> None:
        if variant == "whole":
            loss = vocab_parallel_cross_entropy(head.logits(hidden), targets)
        else:
            loss = head.loss(hidden, targets, chunk_bytes=chunk_mib * 2**20)
        loss.backward()
        hidden.grad, head.weight.grad = None, None

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.max_memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = rss_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    logits = tokens * vocab * 4
    return {"variant": variant, "peak_bytes": peak, "logits_bytes": logits, "ms": median_ms(step, steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--emb", type=int, default=128)
    parser.add_argument("--chunk-mib", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    args = parser.parse_args()
    shape = (args.vocab, args.tokens, args.emb, args.chunk_mib, args.steps, args.device)
    if args.measure:
        print(json.dumps(measure(args.measure, *shape)))
        return
    rows = {}
    for variant in VARIANTS:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("out", "measure")]
        command = [sys.executable, "-m", "bench.loss_memory", "--measure", variant, *flags]
        done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1200)
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    whole, chunked = rows["whole"], rows["chunked"]
    gib = 2**30
    ratios = [
        f"loss forward + backward, V={args.vocab:,}, {args.tokens:,} tokens, emb {args.emb}, tp=1, {args.device}: "
        f"one fp32 logits tensor is {whole['logits_bytes'] / gib:.2f} GiB",
        f"  peak memory: whole {whole['peak_bytes'] / gib:.2f} GiB, chunked ({args.chunk_mib} MiB) "
        f"{chunked['peak_bytes'] / gib:.2f} GiB: {chunked['peak_bytes'] / whole['peak_bytes']:.3f} x",
        f"  time: whole {whole['ms']:.0f} ms, chunked {chunked['ms']:.0f} ms: {chunked['ms'] / whole['ms']:.2f} x",
    ]
    result = {"command": "python -m bench.loss_memory", "args": {k: str(v) for k, v in vars(args).items()}}
    write_result(args.out, "loss_memory", result | {"rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
