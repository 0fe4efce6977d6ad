"""Activation checkpointing: activation memory per rank and step time of each mode, side by side in one run.

    python -m bench.checkpointing                 # small shape, tp=1 and tp=2 (sequence parallel), fp32
    python -m bench.checkpointing --shape tiny --tp 1 --steps 1

Each mode runs in a fresh process (torchrun for tp > 1) through bench.worker: `ours` (or `ours_sp` at tp > 1)
with `--activation-checkpointing none | full | selective` (every 2nd block). Activation memory is what
autograd keeps for backward during one forward (parameters excluded); step time the median step. Ratios are
against `none` at the same tp. Results: `--out` (default outputs/bench/) gets checkpointing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tp_attention.checkpointing import MODES


def run_mode(shape: str, tp: int, mode: str, steps: int) -> dict:
    """One worker run: its result row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        variant = "ours_sp" if tp > 1 else "ours"
        worker = ["-m", "bench.worker", "--variant", variant, "--shape", shape, "--device", "cpu"]
        worker += ["--steps", str(steps), "--warmup", "1", "--activation-checkpointing", mode, "--out", str(out)]
        launcher = [sys.executable]
        if tp > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}"]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // tp)))
        subprocess.run([*launcher, *worker], check=True, capture_output=True, text=True, env=env, timeout=900)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args()
    rows = [run_mode(args.shape, tp, mode, args.steps) | {"tp": tp} for tp in args.tp for mode in MODES]
    print(f"{'tp':>2} {'mode':<10} {'activations MiB':>15} {'vs none':>7} {'step ms':>8} {'vs none':>7}")
    for row in rows:
        base = next(r for r in rows if r["tp"] == row["tp"] and r["activation_checkpointing"] == "none")
        row["activation_ratio"] = row["activation_mib"] / base["activation_mib"]
        row["step_ratio"] = row["step_median_s"] / base["step_median_s"]
        print(
            f"{row['tp']:>2} {row['activation_checkpointing']:<10} {row['activation_mib']:>15.1f} "
            f"{row['activation_ratio']:>7.2f} {1e3 * row['step_median_s']:>8.1f} {row['step_ratio']:>7.2f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checkpointing.json").write_text(json.dumps({"shape": args.shape, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
