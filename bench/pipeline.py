"""The pipeline's bubble: step time and idle fraction of each schedule at pp=2 and pp=4, against one process.

    python -m bench.pipeline                    # 8 layers, 8 micro-batches: a few minutes on 2 cores
    python -m bench.pipeline --microbatches 4 --out bench/results

Every configuration runs in fresh processes (torchrun for pp > 1; one thread per rank), side by side in this
one invocation. Per rank:
  step ms    median of `--steps` schedule steps (forward and backward of `--microbatches` micro-batches), after one
             warm-up; for pp=1, the whole model's forward and backward over the same micro-batches, accumulated
  busy ms    the same stage's forward and backward of those micro-batches with no pipeline around it (its inputs
             made up locally): the work, without waiting
  idle       1 - busy / step: the fraction of the step this stage waited, against GPipe's and 1F1B's bubble
             (p - 1) / (m + p - 1), and the interleaved schedules' (2 stages per rank), that divided by 2
With more ranks than cores (pp=4 on 2 cores) ranks also wait for a core, which the idle fraction counts too.
Results: `--out` (default outputs/bench/) gets pipeline.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from bench.hf_load import median_ms, run_ranks, write_result, write_row
from tp_attention.pipeline import SCHEDULES

WIDTH, HEADS, HEAD_SIZE, VOCAB, SEQ_LEN, MICRO_BATCH = 128, 4, 32, 256, 128, 2
VIRTUAL_STAGES = 2  # per rank, for the interleaved schedules


def measure(layers: int, microbatches: int, schedule: str, steps: int) -> dict:
    """This rank's row: its stage's step time in the pipeline, and its busy time alone."""
    from tp_attention.model import GPT
    from tp_attention.pipeline import (
        VIRTUAL,
        build_schedule,
        rank_part,
        rank_stages,
        split_model,
        stage_layers,
        stage_views,
    )

    pp = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(VOCAB, SEQ_LEN, WIDTH, HEADS, HEAD_SIZE, layers, dropout=0.0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (microbatches * MICRO_BATCH, SEQ_LEN + 1), generator=gen)
    x, y = ids[:, :-1], ids[:, 1:]
    row = {"pp": pp, "schedule": schedule if pp > 1 else "none", "microbatches": microbatches}
    if pp == 1:
        model.to_empty(device="cpu")
        model.reset_parameters(torch.Generator().manual_seed(0))

        def accumulate() -> None:
            for xs, ys in zip(x.chunk(microbatches), y.chunk(microbatches), strict=True):
                (model(xs, ys) / microbatches).backward()

        row |= {"rank": 0, "virtual": 1, "step_ms": median_ms(accumulate, steps)}
        row["busy_ms"] = row["step_ms"]
        return row
    dist.init_process_group("gloo")
    rank, virtual = dist.get_rank(), VIRTUAL_STAGES if schedule in VIRTUAL else 1
    stages = rank_stages(rank, pp, virtual, stage_layers(layers, pp * virtual))
    part = rank_part(stages)
    order = split_model(model, part)
    model.to_empty(device="cpu")
    model.reset_parameters(torch.Generator().manual_seed(0), order)
    views = stage_views(model, stages)
    pipe = build_schedule(views, model, stages, schedule, microbatches, dist.group.WORLD, torch.device("cpu"))

    def pipeline_step() -> None:
        pipe.step(*((x,) if part.first else ()), target=y if part.last else None, losses=[])
        dist.barrier()

    row |= {"rank": rank, "virtual": virtual, "step_ms": median_ms(pipeline_step, steps)}
    hidden = torch.randn(MICRO_BATCH, SEQ_LEN, WIDTH)

    def alone() -> None:
        for stage, view in zip(stages, views, strict=True):
            for ids in x.chunk(microbatches):
                out = view(ids if stage.index == 0 else hidden.clone().requires_grad_())
                out.float().pow(2).mean().backward()

    row["busy_ms"] = median_ms(alone, steps)
    dist.destroy_process_group()
    return row


def ratio_lines(rows: list[dict]) -> list[str]:
    """Per schedule and pp: step time against one process, and the mean idle fraction against the formula."""
    one = next(r for r in rows if r["pp"] == 1)
    lines = []
    for pp, schedule in sorted({(r["pp"], r["schedule"]) for r in rows if r["pp"] > 1}):
        ranks = [r for r in rows if (r["pp"], r["schedule"]) == (pp, schedule)]
        m, v = ranks[0]["microbatches"], ranks[0]["virtual"]
        idle = statistics.mean(1 - r["busy_ms"] / r["step_ms"] for r in ranks)
        step = max(r["step_ms"] for r in ranks)
        formula = "(p - 1) / (m + p - 1)" + (f" / v, v = {v}" if v > 1 else "")
        lines.append(
            f"pp={pp} {schedule}: step / one process {step / one['step_ms']:.3f}; idle fraction {idle:.3f} "
            f"measured, {(pp - 1) / (m + pp - 1) / v:.3f} by {formula}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--measure", choices=SCHEDULES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = ["--layers", str(args.layers), "--microbatches", str(args.microbatches), "--steps", str(args.steps)]
    if args.measure:
        write_row(measure(args.layers, args.microbatches, args.measure, args.steps))
        return
    common = ["-m", "bench.pipeline", *sizes]
    runs = [("1f1b", 1), *((schedule, pp) for pp in (2, 4) for schedule in SCHEDULES)]
    rows = [row for schedule, pp in runs for row in run_ranks([*common, "--measure", schedule], pp)]
    print(f"{args.layers} layers x width {WIDTH}, {args.microbatches} micro-batches of {MICRO_BATCH} x {SEQ_LEN}")
    print(f"{'pp':>2} {'schedule':>8} {'rank':>4} {'step ms':>9} {'busy ms':>9} {'idle':>6}")
    for r in rows:
        idle = 1 - r["busy_ms"] / r["step_ms"]
        print(f"{r['pp']:>2} {r['schedule']:>8} {r['rank']:>4} {r['step_ms']:9.1f} {r['busy_ms']:9.1f} {idle:6.3f}")
    result = {"layers": args.layers, "microbatches": args.microbatches, "rows": rows, "ratios": ratio_lines(rows)}
    write_result(args.out, "pipeline", result)


if __name__ == "__main__":
    main()
