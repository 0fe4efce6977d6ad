"""Peak host memory per rank of the training job's fresh init and of a checkpoint save, at tp=1, tp=2 and
tp=2 x dp_shard=2.

    python -m bench.sharded_memory                      # model=gpt2 (124M parameters); a minute on 2 cores
    python -m bench.sharded_memory --model llama_tiny   # any conf/model

Init is the job's own sequence: the model built on the meta device, FSDP2 applied there (dp_shard > 1),
`to_empty`, then `reset_parameters(one seed)`: each rank draws every full tensor chunk by chunk
(`tp_attention.init`) and keeps only its pieces. Save is the job's DCP state (parameters and both AdamW
moments, `train.checkpoints.checkpoint`) written with `dcp.save`: under FSDP2 from each rank's pieces. Each layout runs
in fresh processes (torchrun); memory is the process's anonymous resident memory (bench.hf_load's sampler,
every 2 ms), each figure its peak minus the value before that phase; time is the seconds to draw.
Results: `--out` (default outputs/bench/) gets sharded_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.hf_load import PeakSampler, anonymous_bytes, run_ranks, write_row

LAYOUTS = ((1, 1), (2, 1), (2, 2))  # (tp, dp_shard)


def measure(model_name: str, tp: int, dp_shard: int) -> dict:
    """This rank's row: local parameter bytes, peak growth while building and drawing, seconds to draw, and
    peak growth while saving a checkpoint of the parameters and AdamW moments."""
    import torch.distributed.checkpoint as dcp

    from tp_attention.distributed import data_parallel_mesh, init_parallel_groups
    from tp_attention.fsdp import local, shard_data_parallel
    from tp_attention.init import CHUNK_NUMEL
    from tp_attention.model import GPT
    from train.checkpoints.checkpoint import _state, init_optimizer_state
    from train.config import compose_config

    model_conf = compose_config([f"model={model_name}"]).model
    cfg = model_conf.gpt_config(model_conf.vocab_size or 256)  # null: the byte tokenizer's
    tp_group, mesh, groups = None, None, None
    if "WORLD_SIZE" in os.environ:
        groups = init_parallel_groups(tp, "cpu")
        tp_group = groups.tp_group if tp > 1 else None
        mesh = data_parallel_mesh("cpu", 1, dp_shard, tp) if dp_shard > 1 else None
    before = anonymous_bytes()
    with PeakSampler() as sampler:
        with torch.device("meta"):
            model = GPT.from_config(cfg, tp_group=tp_group)
        if mesh is not None:
            shard_data_parallel(model, mesh)
        model.to_empty(device="cpu")
        start = time.perf_counter()
        model.reset_parameters(torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
    with torch.device("meta"):
        largest = max(p.numel() * p.element_size() for p in GPT.from_config(cfg).parameters())
    optimizer = torch.optim.AdamW(model.parameters())
    init_optimizer_state(optimizer, 1)
    with tempfile.TemporaryDirectory() as directory:
        before_save = anonymous_bytes()
        with PeakSampler() as save_sampler:
            state, _ = _state(model, optimizer, groups.mesh if groups else None)
            dcp.save(state, checkpoint_id=directory, no_dist=groups is None)
        del state
    row = {
        "tp": tp,
        "dp_shard": dp_shard,
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "local_param_bytes": sum(local(p).numel() * p.element_size() for p in model.parameters()),
        "peak_growth": sampler.peak - before,
        "draw_seconds": seconds,
        "save_peak_growth": save_sampler.peak - before_save,
        "chunk_bytes": CHUNK_NUMEL * 4,
        "largest_full_param_bytes": largest,
    }
    if dist.is_initialized():
        dist.destroy_process_group()
    return row


def run_layout(model_name: str, tp: int, dp_shard: int) -> list[dict]:
    """The rows of one layout, measured in fresh processes (torchrun when more than one rank)."""
    args = ["-m", "bench.sharded_memory", "--measure", model_name, "--tp", str(tp), "--dp-shard", str(dp_shard)]
    return run_ranks(args, tp * dp_shard)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dp-shard", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        write_row(measure(args.measure, args.tp, args.dp_shard))
        return
    rows = [row for tp, dp_shard in LAYOUTS for row in run_layout(args.model, tp, dp_shard)]
    mib = 2**20
    print(f"model={args.model}: largest full parameter {rows[0]['largest_full_param_bytes'] / mib:.0f} MiB, ", end="")
    print(f"chunk {rows[0]['chunk_bytes'] / mib:.0f} MiB")
    header = f"{'tp':>2} {'dp_shard':>8} {'rank':>4} {'pieces MiB':>10} {'init peak MiB':>13} {'over pieces':>11}"
    print(f"{header} {'draw s':>6} {'save peak MiB':>13}")
    for r in rows:
        over = (r["peak_growth"] - r["local_param_bytes"]) / mib
        print(
            f"{r['tp']:>2} {r['dp_shard']:>8} {r['rank']:>4} {r['local_param_bytes'] / mib:>10.0f} "
            f"{r['peak_growth'] / mib:>13.0f} {over:>11.0f} {r['draw_seconds']:>6.1f} "
            f"{r['save_peak_growth'] / mib:>13.0f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharded_memory.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
