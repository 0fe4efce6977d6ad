"""The GPU check: one command that proves and measures the CUDA path, in under ~8 minutes on one H100.

    bench/gpu_check.sh                 # on the GPU machine (sets up the packages it lacks, then this)
    python -m bench.gpu --dry-run      # every stage on the CPU with tiny shapes (a test in the suite)

Stages, each recorded as passed / failed / skipped (with why) and its figures; one failing does not stop
the rest, and the exit status is the number of failed stages:
  environment   device name, driver, torch and CUDA versions, the dense bf16 peak the MFU is against
  tests         tests/test_device.py on the device: attention and GPT equivalence at tp=1 and at tp=2
                (two processes sharing the GPU over gloo), fp32 and bf16, sequence parallelism on and off,
                KV-cache generation, a tp=2 save loaded at tp=1
  train         the training job, `model=gpt2` (124M) at T=1024 in bf16, eager and compiled: tokens/s
                from its own metrics, then a resume from its checkpoint
  step          one training step of ours against the plain nanoGPT-style model, same shape, in one run
                (bench.worker): tokens/s, MFU against the peak above, peak memory, ours / plain
  cpu_bench     if time remains: `python -m bench --quick --device cpu` on that machine's cores
                (tp=2 and 4), reported apart from the GPU figures
Writes `gpu.json` and `gpu.md` to `--out` (default bench/results; the dry run's: outputs/gpu_dry_run).
The dry run compiles with the aot_eager backend (inductor's CPU code generation is tests/test_compile.py's).
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
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DENSE_BF16_PEAKS = {  # FLOP/s without sparsity, from the vendors' data sheets
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "A100": 312e12,
}
GPT2_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT trains it


def dense_bf16_peak(name: str) -> tuple[str, float] | None:
    """`(which, FLOP/s)` of the GPU called `name` (torch.cuda.get_device_name), or None if unknown."""
    if "H100" in name:
        kind = "H100 PCIe" if "PCIe" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
        return kind, DENSE_BF16_PEAKS[kind]
    for kind, peak in DENSE_BF16_PEAKS.items():
        if kind in name:
            return kind, peak
    return None


class Check:
    """The stages' results and the time left."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.start, self.stages = args, time.monotonic(), {}
        self.device = "cpu" if args.dry_run else "cuda"
        self.out = args.out or (ROOT / "outputs" / "gpu_dry_run" if args.dry_run else ROOT / "bench" / "results")
        self.compile_backend = "aot_eager" if args.dry_run else "inductor"  # the dry run checks plumbing, not codegen

    def left_s(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def stage(self, name: str, needs_s: float, fn) -> None:
        """Run stage `name` if `needs_s` seconds are left; record its figures, or why it failed."""
        if self.left_s() < needs_s:
            self.stages[name] = {"status": "skipped", "why": f"{self.left_s():.0f} s left, needs ~{needs_s:.0f} s"}
            return
        began = time.monotonic()
        try:
            self.stages[name] = {"status": "passed", **fn(self)}
        except Exception as e:  # a stage's failure is a result: record it and go on
            self.stages[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[-4000:]}
        self.stages[name]["seconds"] = round(time.monotonic() - began, 1)
        print(f"[gpu check] {name}: {self.stages[name]['status']} ({self.stages[name]['seconds']} s)", flush=True)
        self.write()  # after every stage: a run cut short keeps what it measured

    def write(self) -> dict[str, Any]:
        """gpu.json and gpu.md as they stand; returns the result."""
        result = {
            "command": "python -m bench.gpu" + (" --dry-run" if self.args.dry_run else ""),
            "date": datetime.date.today().isoformat(),
            "dry_run": self.args.dry_run,
            "stages": self.stages,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (self.out / "gpu.md").write_text(markdown(result))
        return result

    def timeout_s(self, most: float = 300.0) -> float:
        """A subprocess's timeout: at most `most`, and never past the budget (a minute's grace)."""
        return max(30.0, min(most, self.left_s() + 60.0))


def run(command: list[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `command` in the checkout; raises with the tail of its output if it fails."""
    base = {k: v for k, v in os.environ.items() if k != "TP_RUN_ID"}  # each run its own directory
    env = {**base, **(env or {})}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return done


def environment(check: Check) -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    if check.device == "cpu":
        return info | {"device": "cpu (dry run)"}
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device (torch.cuda.is_available() is False)")
    name = torch.cuda.get_device_name()
    driver = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    )
    peak = dense_bf16_peak(name)
    return info | {
        "device": name,
        "driver": driver.stdout.strip() or "unknown",
        "peak": {"which": peak[0], "bf16_flops": peak[1]} if peak else None,
    }


def tests(check: Check) -> dict[str, Any]:
    done = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py"],
        timeout_s=check.timeout_s(240.0),
        env={"TP_TEST_DEVICE": check.device, "OMP_NUM_THREADS": "1"},
    )
    return {"summary": done.stdout.strip().splitlines()[-1]}


def _train_overrides(check: Check, out: Path, compiled: bool) -> list[str]:
    if check.args.dry_run:
        shape = ["model=tiny", "trainer.seq_len=64", "trainer.batch_size=2", "trainer.max_steps=4"]
    else:
        shape = ["model=gpt2", "trainer.seq_len=1024", "trainer.batch_size=8", "trainer.max_steps=30"]
    return [
        *shape,
        "trainer.mixed_precision=bf16",
        f"trainer.compile={str(compiled).lower()}",
        f"trainer.compile_backend={check.compile_backend}",
        "trainer.log_interval=5" if not check.args.dry_run else "trainer.log_interval=1",
        "trainer.eval_interval=1000",
        "trainer.eval_batches=1",
        "trainer.checkpoint_interval=1000",
        "trainer.sample_tokens=8",
        "trainer.progress=false",
        "trainer.log_with=[]",
        f"parallel.device={check.device}",
        "data.max_bytes=2000000",
        f"trainer.out_dir={out}",
        f"trainer.name={'compiled' if compiled else 'eager'}",
    ]


def train(check: Check) -> dict[str, Any]:
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for compiled in (False, True):
            overrides = _train_overrides(check, Path(tmp), compiled)
            run([sys.executable, "-m", "train", *overrides], timeout_s=check.timeout_s())
            (run_dir,) = Path(tmp).glob(f"{'compiled' if compiled else 'eager'}-*")
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            steady = [r["tokens_per_s"] for r in records[1:] if "tokens_per_s" in r] or [records[-1]["tokens_per_s"]]
            figures["compiled" if compiled else "eager"] = {
                "tokens_per_s": sorted(steady)[len(steady) // 2],
                "final_loss": records[-1]["loss"],
                "steps": records[-1]["step"],
            }
        resumed = run(
            [sys.executable, "-m", "train", *overrides, "trainer.max_steps=" + str(records[-1]["step"] + 2)],
            timeout_s=check.timeout_s(),
        )
        if "resumed from" not in resumed.stdout + resumed.stderr:
            raise RuntimeError("the second run did not resume from the first run's checkpoint")
    return figures


def _step(check: Check, variant: str, compiled: bool) -> dict[str, Any]:
    shape, vocab = ("tiny", 256) if check.args.dry_run else ("gpt2", GPT2_VOCAB)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "bench.worker", "--variant", variant, "--shape", shape]
        command += ["--dtype", "bf16", "--vocab", str(vocab), "--device", check.device, "--out", str(out)]
        command += ["--steps", "2" if check.args.dry_run else "20", "--warmup", "1" if check.args.dry_run else "5"]
        run(
            command + (["--compile", "--compile-backend", check.compile_backend] if compiled else []), check.timeout_s()
        )
        return json.loads(out.read_text())


def step(check: Check) -> dict[str, Any]:
    from bench.worker import SHAPES, gpt_config
    from tp_attention.flops import flops_per_token
    from tp_attention.model import GPT

    shape, vocab = ("tiny", 256) if check.args.dry_run else ("gpt2", GPT2_VOCAB)
    cfg = gpt_config(shape, vocab)
    with torch.device("meta"):
        params = GPT.from_config(cfg).num_parameters()
    per_token = flops_per_token(cfg, params, SHAPES[shape][3])
    peak = (check.stages.get("environment", {}).get("peak") or {}).get("bf16_flops")
    figures: dict[str, Any] = {"shape": shape, "vocab": vocab, "parameters": params, "flops_per_token": per_token}
    for compiled in (False, True):
        rows = {variant: _step(check, variant, compiled) for variant in ("plain", "ours")}
        mode = {}
        for variant, row in rows.items():
            tokens_per_s = row["tokens_per_step"] / row["step_median_s"]
            mode[variant] = {
                "tokens_per_s": tokens_per_s,
                "step_ms": 1e3 * row["step_median_s"],
                "peak_mem_mib": row["peak_mem_mib"],
                "mfu": tokens_per_s * per_token / peak if peak else None,
            }
        mode["ours_over_plain_step_time"] = rows["ours"]["step_median_s"] / rows["plain"]["step_median_s"]
        figures["compiled" if compiled else "eager"] = mode
    return figures


def cpu_bench(check: Check) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--out", tmp]
        if check.args.dry_run:
            command += ["--steps", "1", "--warmup", "0", "--rounds", "1"]
        run(command, timeout_s=check.timeout_s(600.0))
        result = json.loads((Path(tmp) / "latest.json").read_text())
    return {"machine": result["machine"], "ratios": result["ratios"], "rows": result["rows"]}


def markdown(result: dict[str, Any]) -> str:
    """gpu.md: what ran, and each stage's figures."""
    lines = [f"# GPU check, {result['date']}", "", f"`{result['command']}`", ""]
    env = result["stages"].get("environment", {})
    lines += [f"- {k}: {v}" for k, v in env.items() if k not in ("status", "seconds")]
    for name, stage in result["stages"].items():
        if name == "environment":
            continue
        lines += ["", f"## {name}: {stage['status']} ({stage.get('seconds', 0)} s)", ""]
        if stage["status"] != "passed":
            lines += ["```", stage.get("error") or stage.get("why", ""), "```"]
            continue
        if name == "step":
            lines += ["| mode | model | tokens/s | step ms | MFU | peak MiB |", "|---|---|---|---|---|---|"]
            for mode in ("eager", "compiled"):
                for variant in ("plain", "ours"):
                    row = stage[mode][variant]
                    mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
                    lines.append(
                        f"| {mode} | {variant} | {row['tokens_per_s']:,.0f} | {row['step_ms']:.1f} | {mfu} | "
                        f"{row['peak_mem_mib']:,.0f} |"
                    )
                ratio = stage[mode]["ours_over_plain_step_time"]
                lines.append(f"| {mode} | ours / plain step time | {ratio:.3f} | | | |")
        else:
            shown = {k: v for k, v in stage.items() if k not in ("status", "seconds", "rows")}
            lines += ["```json", json.dumps(shown, indent=2), "```"]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU with tiny shapes")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stages that would not fit are skipped")
    parser.add_argument("--out", type=Path, help="default: bench/results (dry run: outputs/gpu_dry_run)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    check = Check(args)
    for name, fn, needs_s in [
        ("environment", environment, 0),
        ("tests", tests, 60),
        ("train", train, 120),
        ("step", step, 90),
        ("cpu_bench", cpu_bench, 90),
    ]:
        check.stage(name, needs_s, fn)
    print(markdown(check.write()))
    failed = sum(stage["status"] == "failed" for stage in check.stages.values())
    sys.exit(min(failed, 100))


if __name__ == "__main__":
    main()
