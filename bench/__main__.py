"""Benchmark: our TP GPT against PyTorch-native DTensor TP, the same model in one process, and nanoGPT.

    python -m bench                      # small + medium, fp32 + bf16 (a few minutes on 2 cores)
    python -m bench --quick              # small, fp32 only
    python -m bench --compile            # torch.compile (inductor) against eager: plain, ours tp=1, ours tp=N

Every configuration runs in a fresh process (or torchrun job), side by side in this one invocation, in
`--rounds` passes (forward, then backward order, so that drift of the machine cancels); the faster
median of a configuration's passes is reported, and their spread is its noise:
  plain      nanoGPT-style model, no TP code, one process using all cores  (the "ideal")
  ours       tp_attention.GPT at tp=1, one process using all cores
  ours       tp_attention.GPT at tp=N under torchrun, one thread per rank, collectives in shared memory
  ours_sp    the same with sequence parallelism (LayerNorm, dropout, residual on T / tp tokens)
  ours_gloo  the same as ours with every all-reduce through gloo
  dtensor    the same model parallelized with torch.distributed.tensor.parallel, tp=N, one thread per rank
Activations/rank: bytes of the tensors autograd saves during one forward (parameters excluded).
MFU = model FLOPs (nanoGPT's 6N + 12LHDT per token) / step time / the machine's measured matmul peak
(all cores, same dtype; never shown above 100%: that is noise in the peak, marked "noisy").
A ratio's verdict is "within noise" when the goal lies inside its noise band (the sum of both
configurations' noise). Results: `--out` (default outputs/bench/, untracked) gets latest.json and latest.md
(compile.json and compile.md with --compile, whose rows `+compile` report the first step, which compiles,
apart); `--out bench/results` refreshes the files the docs cite.

On a machine with CUDA GPUs the same runs on GPU: NCCL for tp > 1 across the GPUs there are, and on a
single GPU the one-process rows, including GPT-2 124M's MFU against the measured bf16/fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from bench.worker import PROFILE_KINDS, SHAPES, gpt_config
from tp_attention.flops import flops_per_token
from tp_attention.model import GPT
from train.reporting.flops import measure_peak_flops, mfu

GOALS = {  # ratio of step times, {tp} filled in: {dtype: goal}
    "ours tp{tp} / dtensor tp{tp}": {"fp32": 0.75, "bf16": 0.75},
    "ours tp{tp} / ideal": {"fp32": 1.10, "bf16": 1.25},
    "ours tp1 / plain": {"fp32": 1.00, "bf16": 1.00},
    "ours_gloo tp{tp} / dtensor tp{tp}": {"fp32": 0.75, "bf16": 0.75},
    "ours_gloo tp{tp} / ideal": {"fp32": 1.10, "bf16": 1.25},
}


def device_of(args: argparse.Namespace) -> str:
    """`--device`, with auto resolved: cuda when there is one."""
    return args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"


def run_worker(variant: str, shape: str, dtype: str, ranks: int, compiled: bool, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        worker = [
            "-m",
            "bench.worker",
            "--variant",
            variant,
            "--shape",
            shape,
            "--dtype",
            dtype,
            "--steps",
            str(args.steps),
            "--warmup",
            str(max(args.warmup, int(compiled))),
            "--out",
            str(out),
            "--device",
            device_of(args),
            *(["--compile"] if compiled else []),
        ]
        env = dict(os.environ)
        if ranks == 1:
            command = [sys.executable, *worker]
            env.pop("OMP_NUM_THREADS", None)  # one process: all cores
        else:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={ranks}",
                *worker,
            ]
            if device_of(args) == "cpu":
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def model_flops(shape: str) -> float:
    """Model FLOPs of one training step at `shape`."""
    *_, seq, batch = SHAPES[shape]
    cfg = gpt_config(shape)
    return flops_per_token(cfg, GPT.from_config(cfg).num_parameters(), seq) * batch * seq


def label(row: dict) -> str:
    return row["variant"] + ("+compile" if row.get("compiled") else "")


RATIOS = {  # name ({tp} filled in): (variant, ranks, variant, ranks); ranks "tp" means the tp of the row
    "ours tp{tp} / dtensor tp{tp}": ("ours", "tp", "dtensor", "tp"),
    "ours tp{tp} / ideal": ("ours", "tp", "plain", 1),
    "ours tp1 / plain": ("ours", 1, "plain", 1),
    "ours_gloo tp{tp} / dtensor tp{tp}": ("ours_gloo", "tp", "dtensor", "tp"),
    "ours_gloo tp{tp} / ideal": ("ours_gloo", "tp", "plain", 1),
    "plain+compile / plain": ("plain+compile", 1, "plain", 1),
    "ours+compile tp1 / ours tp1": ("ours+compile", 1, "ours", 1),
    "ours+compile tp{tp} / ours tp{tp}": ("ours+compile", "tp", "ours", "tp"),
    "ours+compile tp{tp} / plain+compile": ("ours+compile", "tp", "plain+compile", 1),
}


def verdict(value: float, noise: float, goal: float | None) -> str:
    """ "below goal", "above goal" or "within noise" (the goal inside value * (1 +- noise))."""
    if goal is None:
        return "-"
    if abs(value - goal) <= noise * value:
        return "within noise"
    return "below goal" if value < goal else "above goal"


def ratios(rows: list[dict], tp: int) -> list[dict]:
    """The step-time ratios measured in `rows` (with their goals and noise), for one tp."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            by = {(label(r), r["ranks"]): r for r in rows if (r["shape"], r["dtype"]) == (shape, dtype)}
            if ("ours", tp) not in by:
                continue
            for name, (a, ranks_a, b, ranks_b) in RATIOS.items():
                ra, rb = (
                    by.get((a, tp if ranks_a == "tp" else ranks_a)),
                    by.get((b, tp if ranks_b == "tp" else ranks_b)),
                )
                if ra is None or rb is None:
                    continue
                value, noise = ra["step_median_s"] / rb["step_median_s"], ra["noise"] + rb["noise"]
                goal = GOALS.get(name, {}).get(dtype)
                out.append(
                    {
                        "shape": shape,
                        "dtype": dtype,
                        "ratio": name.format(tp=tp),
                        "value": value,
                        "noise": noise,
                        "goal": goal,
                        "verdict": verdict(value, noise, goal),
                    }
                )
    return out


def markdown(result: dict) -> str:
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Date: {result['date']}",
        "",
        "| shape | dtype | variant | ranks x threads | median s | min s | first step s | tokens/s | GFLOP/s "
        "| MFU | peak mem/rank MiB | activations/rank MiB | collectives/step | MB/step |",
        "|" + "---|" * 14,
    ]
    for r in result["rows"]:
        calls = ", ".join(f"{n} {c}" for n, c in sorted(r["collectives_per_step"].items())) or "-"
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {label(r)} | {r['ranks']} x {r['threads']} "
            f"| {r['step_median_s']:.3f} | {r['step_min_s']:.3f} | {r['first_step_s']:.1f} "
            f"| {r['tokens_per_s']:,.0f} "
            f"| {r['gflops']:.1f} | {'noisy' if r['mfu'] is None else format(r['mfu'], '.1%')} "
            f"| {r['peak_mem_mib']:.0f} | {r['activation_mib']:.0f} "
            f"| {calls} | {r['collective_bytes_per_step'] / 1e6:.1f} |"
        )
    lines += ["", "| shape | dtype | ratio (step time) | value | noise | goal | verdict |", "|" + "---|" * 7]
    for r in result["ratios"]:
        goal = "-" if r["goal"] is None else f"<= {r['goal']:.2f}"
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['ratio']} | {r['value']:.2f} | +-{r['noise']:.0%} "
            f"| {goal} | {r['verdict']} |"
        )
    profiled = [r for r in result["rows"] if r.get("profile_ms_per_step")]
    if profiled:
        lines += [
            "",
            "Where a step's time goes (torch.profiler, rank 0, ms per step: each op's own CPU time by kind "
            "(on CUDA, its kernels' time); untracked = wall time no op accounts for: Python, DTensor "
            "dispatch, waiting on gloo's thread (on CUDA, the GPU idle)):",
            "",
            "| shape | dtype | variant | ranks | " + " | ".join(PROFILE_KINDS) + " | total |",
            "|" + "---|" * (len(PROFILE_KINDS) + 5),
        ]
        for r in profiled:
            ms = r["profile_ms_per_step"]
            lines.append(
                f"| {r['shape']} | {r['dtype']} | {label(r)} | {r['ranks']} | "
                + " | ".join(f"{ms[k]:.0f}" for k in PROFILE_KINDS)
                + f" | {sum(ms.values()):.0f} |"
            )
    peaks = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in result["peak_flops"].items())
    lines += ["", f"Measured matmul peak (one process, all cores): {peaks}."]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shape, fp32 only")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of every configuration; the faster is kept")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="eager against torch.compile for plain, ours tp=1 and ours tp=N (instead of the rest)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if there is one")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/bench"),
        help="results directory (default outputs/bench; bench/results holds the cited ones)",
    )
    return parser.parse_args()


def plan(args: argparse.Namespace, device: str, units: int) -> tuple[list[int], list[str], list[tuple]]:
    """The tp sizes, dtypes and configurations `(variant, shape, dtype, ranks, compiled)` to run."""
    tps = [tp for tp in (2, 4, 8) if tp <= units and (device == "cuda" or tp <= 4)]
    shapes = ["small"] if args.quick else ["small", "medium", *(["gpt2"] if device == "cuda" else [])]
    dtypes = ["fp32"] if args.quick else ["fp32", "bf16"]
    if args.compile:
        variants = [
            (v, ranks, compiled)
            for v, ranks in [("plain", 1), ("ours", 1), *[("ours", tp) for tp in tps]]
            for compiled in (False, True)
        ]
    else:
        variants = [
            ("plain", 1, False),
            ("ours", 1, False),
            *[
                (v, tp, False)
                for tp in tps
                for v in ("ours", "ours_sp", "ours_gloo", "dtensor")
                if device == "cpu" or v != "ours_gloo"
            ],
        ]
    jobs = [
        (variant, shape, dtype, ranks, compiled)
        for shape in shapes
        for dtype in dtypes
        for variant, ranks, compiled in variants
    ]
    return tps, dtypes, jobs


def measure(jobs: list[tuple], args: argparse.Namespace, peak: dict[str, float]) -> list[dict]:
    """Run every job `args.rounds` times (ABC..CBA: drift cancels); one row per job: its faster pass,
    with `noise` = the relative spread of its passes' medians (or, with one pass, median over min)."""
    passes: dict[tuple, list[dict]] = {}
    runs = [job for r in range(args.rounds) for job in (jobs if r % 2 == 0 else jobs[::-1])]
    for job in tqdm(runs, desc="bench", unit="config"):
        passes.setdefault(job, []).append(run_worker(*job, args))
    rows = []
    for job in jobs:
        medians = [p["step_median_s"] for p in passes[job]]
        row = min(passes[job], key=lambda p: p["step_median_s"])
        spread = max(medians) / min(medians) - 1 if len(medians) > 1 else row["step_median_s"] / row["step_min_s"] - 1
        flops = model_flops(job[1])
        row.update(
            noise=spread,
            tokens_per_s=row["tokens_per_step"] / row["step_median_s"],
            gflops=flops / row["step_median_s"] / 1e9,
            mfu=mfu(flops / row["step_median_s"], peak[job[2]]),
        )
        rows.append(row)
    return rows


def machine(device: str, cores: int) -> str:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    accelerator = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, nccl" if device == "cuda" else "gloo"
    return f"{cpu}, {cores} cores, torch {torch.__version__}, {accelerator}"


def main() -> None:
    args = parse_args()
    cores = os.cpu_count() or 1
    device = device_of(args)
    tps, dtypes, jobs = plan(args, device, torch.cuda.device_count() if device == "cuda" else cores)
    torch.set_num_threads(cores)
    peak = {
        d: measure_peak_flops(
            device,
            torch.float32 if d == "fp32" else torch.bfloat16,
            size=2048 if device == "cpu" else 8192,
            seconds=2.0,
        )
        for d in dtypes
    }
    rows = measure(jobs, args, peak)
    command = "python -m bench" + (" --quick" if args.quick else "") + (" --compile" if args.compile else "")
    command += "".join(f" --{k} {getattr(args, k)}" for k, d in (("steps", 5), ("rounds", 2)) if getattr(args, k) != d)
    result = {
        "command": command,
        "machine": machine(device, cores),
        "date": datetime.date.today().isoformat(),
        "peak_flops": peak,
        "rows": rows,
        "ratios": [r for tp in tps for r in ratios(rows, tp)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "compile" if args.compile else "latest"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
