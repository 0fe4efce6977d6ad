"""Peak memory of loading a Hugging Face checkpoint at tp=2: each rank's growth against the whole model.

    python -m bench.hf_load                  # a ~540 MB Llama-shaped model (fp32); a minute or two on 2 cores
    python -m bench.hf_load --layers 1 --vocab 512   # smaller and quicker

Writes a random Llama-layout checkpoint with `save_pretrained`, then loads it in fresh processes:
  from_pretrained    tp=1 and tp=2 (torchrun): each rank reads only its slices (`safetensors` get_slice)
  full then shard    tp=2: every rank reads the whole file, then keeps its shard (what `GPT.load` did)
Memory is the process's anonymous resident memory (RSS minus file-backed pages: the safetensors file is
memory-mapped, and its pages are the page cache's, not the process's), sampled every 2 ms during the load;
the figure is its peak minus the value before loading. Results: `--out` (default outputs/bench/) gets
hf_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

PAGE = os.sysconf("SC_PAGE_SIZE")


def anonymous_bytes() -> int:
    """Resident memory that is not file-backed (statm's resident - shared pages)."""
    resident, shared = (int(n) for n in Path("/proc/self/statm").read_text().split()[1:3])
    return (resident - shared) * PAGE


class PeakSampler:
    """The largest `anonymous_bytes()` seen while the `with` block runs."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._stop = anonymous_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, anonymous_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_bytes())


def measure(directory: Path, how: str) -> dict:
    """One rank's load (`how`: from_pretrained | full_then_shard); its row. (The training job's fresh init,
    from no checkpoint, is `bench.sharded_memory`'s.)"""
    from tp_attention.model import GPT
    from tp_attention.state_dict import load_full_state_dict

    group = None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    before = anonymous_bytes()
    with PeakSampler() as sampler:
        if how == "from_pretrained":
            model = GPT.from_pretrained(directory, tp_group=group)
        else:
            full = GPT.from_pretrained(directory)  # the whole model on every rank first
            model = GPT.from_config(full.config, tp_group=group)
            load_full_state_dict(model, full.state_dict())
            del full
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    row = {"how": how, "rank": rank, "peak_growth": sampler.peak - before, "local_param_bytes": local}
    if dist.is_initialized():
        dist.destroy_process_group()
    return row


def write_checkpoint(directory: Path, layers: int, vocab: int) -> int:
    """A random Llama-layout model (emb 768, GQA 12/4 heads, SwiGLU 2048, untied); its bytes."""
    from tp_attention.model import GPT, GPTConfig

    cfg = GPTConfig(
        vocab_size=vocab,
        max_seq_len=2048,
        emb_size=768,
        num_heads=12,
        num_kv_heads=4,
        head_size=64,
        num_layers=layers,
        dropout=0.0,
        norm="rmsnorm",
        activation="swiglu",
        intermediate_size=2048,
        position="rope",
        bias=False,
        tie_embeddings=False,
    )
    model = GPT.from_config(cfg, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(directory)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_ranks(args: list[str], world: int) -> list[dict]:
    """Run `python <args>` in fresh processes (torchrun when `world > 1`); each rank's row (`write_row`),
    by rank. Rows travel in files: several ranks' stdout lines can interleave."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
    with tempfile.TemporaryDirectory() as rows:
        env = dict(os.environ, OMP_NUM_THREADS="1", TP_BENCH_ROWS=rows)
        done = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, env=env, timeout=1200)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return sorted((json.loads(f.read_text()) for f in Path(rows).glob("*.json")), key=lambda r: r["rank"])


def write_row(row: dict) -> None:
    """This rank's row, for `run_ranks`."""
    (Path(os.environ["TP_BENCH_ROWS"]) / f"rank{row['rank']}.json").write_text(json.dumps(row))


def median_ms(step, steps: int) -> float:
    """Median milliseconds of `step()` over `steps` runs, after one warm-up (this process's own)."""
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def write_result(out: Path, name: str, result: dict) -> None:
    """Print `result["ratios"]` (if any) and write `result` to `out/<name>.json`."""
    if "ratios" in result:
        print("\n".join(result["ratios"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def run_load(directory: Path, how: str, tp: int) -> list[dict]:
    """The rows of a load in fresh processes (torchrun for tp > 1)."""
    return run_ranks(["-m", "bench.hf_load", "--measure", str(directory), "--how", how], tp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--how", default="from_pretrained", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        write_row(measure(args.measure, args.how))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_bytes = write_checkpoint(Path(tmp), args.layers, args.vocab)
        rows = [
            *run_load(Path(tmp), "from_pretrained", 1),
            *run_load(Path(tmp), "from_pretrained", 2),
            *run_load(Path(tmp), "full_then_shard", 2),
        ]
    tp1 = rows[0]["peak_growth"]
    print(f"model: {model_bytes / 2**20:.0f} MiB of fp32 parameters")
    print(f"{'load':<16} {'tp':>2} {'rank':>4} {'shard MiB':>9} {'peak growth MiB':>15} {'vs tp=1':>7}")
    for row, tp in zip(rows, (1, *[2] * (len(rows) - 1)), strict=True):
        row["tp"] = tp
        print(
            f"{row['how']:<16} {tp:>2} {row['rank']:>4} {row['local_param_bytes'] / 2**20:>9.0f} "
            f"{row['peak_growth'] / 2**20:>15.0f} {row['peak_growth'] / tp1:>7.2f}"
        )
    result = {"model_bytes": model_bytes, "layers": args.layers, "rows": rows, "max_rss_kib": _max_rss()}
    write_result(args.out, "hf_load", result)


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


if __name__ == "__main__":
    main()
