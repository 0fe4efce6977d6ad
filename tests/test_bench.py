"""The benchmark runs end to end (one step per configuration) and writes its JSON and table.

Speed itself is never asserted here: the numbers live in bench/results and the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


def run_quick_bench(out: Path, *flags: str) -> None:
    """`python -m bench --quick` with one step per configuration, results into `out`."""
    command = [sys.executable, "-m", "bench", "--quick", *flags, "--steps", "1", "--warmup", "0", "--rounds", "1"]
    subprocess.run([*command, "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=900)


@pytest.mark.slow  # the GPU check's dry run (tests/test_gpu_check.py, also slow) runs the same command
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tp=2 needs two cores")
def test_quick_benchmark_writes_results(tmp_path):
    run_quick_bench(tmp_path)
    result = json.loads((tmp_path / "latest.json").read_text())
    variants = {(r["variant"], r["ranks"]) for r in result["rows"]}
    assert variants == {("plain", 1), ("ours", 1), ("ours", 2), ("ours_sp", 2), ("ours_gloo", 2), ("dtensor", 2)}
    rows = {(r["variant"], r["ranks"]): r for r in result["rows"]}
    per_step = 6 * 4 + 4  # 4 per layer + embedding, LM head, 2 for the loss
    assert rows[("ours_gloo", 2)]["collectives_per_step"] == {"all_reduce": per_step}
    assert rows[("ours", 2)]["collectives_per_step"] == {"shm_all_reduce": per_step}
    assert set(rows[("ours_sp", 2)]["collectives_per_step"]) == {
        "shm_all_gather",
        "shm_reduce_scatter",
        "shm_all_reduce",
    }
    assert rows[("ours_sp", 2)]["activation_mib"] < rows[("ours", 2)]["activation_mib"]
    for key, row in rows.items():  # the profile splits every step by kind of work
        ms = row["profile_ms_per_step"]
        assert set(ms) == {"matmul", "attention", "communication", "optimizer", "other ops", "untracked"}
        assert ms["matmul"] > 0 and ms["attention"] > 0 and ms["optimizer"] > 0, key
        assert (ms["communication"] > 0) == (key[1] > 1), key  # collectives only where there are ranks
    assert {r["ratio"] for r in result["ratios"]} == {
        "ours tp2 / dtensor tp2",
        "ours tp2 / ideal",
        "ours tp1 / plain",
        "ours_gloo tp2 / dtensor tp2",
        "ours_gloo tp2 / ideal",
    }
    assert "| small | fp32 | ours | 2 x 1 |" in (tmp_path / "latest.md").read_text()


def test_compiled_rows_get_their_own_ratios_and_label():
    from bench.__main__ import markdown, ratios

    def row(variant, ranks, compiled, seconds):
        return {
            "variant": variant,
            "shape": "small",
            "dtype": "fp32",
            "ranks": ranks,
            "threads": 1,
            "compiled": compiled,
            "step_median_s": seconds,
            "step_min_s": seconds,
            "noise": 0.01,
            "first_step_s": 20.0,
            "tokens_per_s": 1.0,
            "gflops": 1.0,
            "mfu": 0.5,
            "peak_mem_mib": 1.0,
            "activation_mib": 1.0,
            "collectives_per_step": {},
            "collective_bytes_per_step": 0,
        }

    rows = [
        row("plain", 1, False, 1.0),
        row("plain", 1, True, 0.8),
        row("ours", 1, False, 1.0),
        row("ours", 1, True, 0.9),
        row("ours", 2, False, 1.1),
        row("ours", 2, True, 0.88),
    ]
    values = {r["ratio"]: (round(r["value"], 3), r["goal"], r["verdict"]) for r in ratios(rows, 2)}
    assert values == {
        "ours tp2 / ideal": (1.1, 1.10, "within noise"),
        "ours tp1 / plain": (1.0, 1.00, "within noise"),
        "plain+compile / plain": (0.8, None, "-"),
        "ours+compile tp1 / ours tp1": (0.9, None, "-"),
        "ours+compile tp2 / ours tp2": (0.8, None, "-"),
        "ours+compile tp2 / plain+compile": (1.1, None, "-"),
    }
    table = markdown(
        {"command": "c", "machine": "m", "date": "d", "peak_flops": {}, "rows": rows, "ratios": ratios(rows, 2)}
    )
    assert "| small | fp32 | ours+compile | 2 x 1 | 0.880 | 0.880 | 20.0 |" in table
    assert "| small | fp32 | ours+compile tp2 / plain+compile | 1.10 | +-2% | - | - |" in table


def test_verdicts_say_when_a_ratio_is_inside_its_noise_and_mfu_is_never_over_100_percent(monkeypatch):
    from bench.__main__ import parse_args, verdict
    from train.reporting.flops import mfu

    assert verdict(1.05, 0.02, 1.10) == "below goal"
    assert verdict(1.09, 0.02, 1.10) == "within noise"
    assert verdict(1.15, 0.02, 1.10) == "above goal"
    assert mfu(0.5e9, 1e9) == 0.5 and mfu(1.2e9, 1e9) is None  # faster than the measured peak: noise
    monkeypatch.setattr(sys, "argv", ["bench"])
    assert parse_args().out == Path("outputs/bench"), "python -m bench must not overwrite the cited results"
    assert "outputs/" in (ROOT / ".gitignore").read_text().split()


@pytest.mark.slow
def test_compile_benchmark_runs(tmp_path):
    run_quick_bench(tmp_path, "--compile")
    result = json.loads((tmp_path / "compile.json").read_text())
    assert {(r["variant"], r["ranks"], r["compiled"]) for r in result["rows"]} == {
        (v, n, c) for v, n in (("plain", 1), ("ours", 1), ("ours", 2)) for c in (False, True)
    }
    assert "ours+compile tp2 / plain+compile" in {r["ratio"] for r in result["ratios"]}


def test_collectives_benchmark_prints_gloo_and_shared_memory_times():
    done = subprocess.run(
        [sys.executable, "-m", "bench.collectives", "--calls", "3"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = [line for line in done.stdout.splitlines() if line.startswith("| all") or line.startswith("| reduce")]
    assert [row.split(" | ")[0] for row in rows] == ["| all-reduce", "| all-gather", "| reduce-scatter"]
    for row in rows:  # both timings and the speed-up are numbers
        gloo, shared, speedup = row.strip(" |").split(" | ")[1:]
        assert float(gloo) > 0 and float(shared) > 0 and float(speedup.rstrip("x")) > 0


@pytest.mark.slow  # a benchmark's plumbing; loading by slices is tests/test_hf.py's
def test_hf_load_benchmark_measures_each_rank(tmp_path):
    command = [sys.executable, "-m", "bench.hf_load", "--layers", "1", "--vocab", "512", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "hf_load.json").read_text())["rows"]
    assert [(r["how"], r["tp"]) for r in rows] == [("from_pretrained", 1)] + [("from_pretrained", 2)] * 2 + [
        ("full_then_shard", 2)
    ] * 2
    assert 0.49 < rows[1]["local_param_bytes"] / rows[0]["local_param_bytes"] < 0.51  # norms are replicated
    assert "peak growth MiB" in done.stdout


def test_checkpointing_benchmark_reports_each_mode(tmp_path):
    command = [sys.executable, "-m", "bench.checkpointing", "--shape", "tiny", "--tp", "1", "--steps", "1"]
    done = subprocess.run([*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = {r["activation_checkpointing"]: r for r in json.loads((tmp_path / "checkpointing.json").read_text())["rows"]}
    assert list(rows) == ["none", "full", "selective"]
    assert rows["full"]["activation_mib"] < rows["selective"]["activation_mib"] < rows["none"]["activation_mib"]


@pytest.mark.slow  # a benchmark's plumbing; the init itself is tests/test_init.py's
def test_sharded_memory_benchmark_measures_each_layout(tmp_path):
    command = [sys.executable, "-m", "bench.sharded_memory", "--model", "tiny", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "sharded_memory.json").read_text())["rows"]
    assert [(r["tp"], r["dp_shard"]) for r in rows] == [(1, 1), (2, 1), (2, 1), (2, 2), (2, 2), (2, 2), (2, 2)]
    whole = rows[0]["local_param_bytes"]
    assert all(0.2 < r["local_param_bytes"] / whole < 0.3 for r in rows[3:])  # a quarter: norms are replicated
    assert all(r["peak_growth"] > 0 and r["draw_seconds"] > 0 and r["save_peak_growth"] >= 0 for r in rows)


@pytest.mark.slow  # 20 s of benchmark plumbing; CP itself is tests/test_context.py's and the layout runs' job
def test_context_parallel_benchmark_halves_the_activations_per_rank(tmp_path):
    """`python -m bench.context_parallel` end to end at a short sequence; bytes (not times) are asserted:
    what autograd saves per rank at cp=2 is at most 0.55 of cp=1's (the issue's goal)."""
    command = [sys.executable, "-m", "bench.context_parallel", "--seq-len", "1024", "--steps", "1"]
    subprocess.run([*command, "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "context_parallel.json").read_text())
    rows = {(r["what"], r["cp"], r.get("threads"), r["rank"]) for r in result["rows"]}
    assert rows == {
        ("gpt", 1, None, 0),
        ("gpt", 2, None, 0),
        ("gpt", 2, None, 1),
        ("sdpa", 1, 1, 0),
        ("sdpa", 1, 2, 0),
        ("ring", 2, 1, 0),
        ("ring", 2, 1, 1),
    }
    saved = {r["cp"]: r["saved_bytes"] for r in result["rows"] if r["what"] == "gpt" and r["rank"] == 0}
    assert saved[2] <= 0.55 * saved[1]


@pytest.mark.slow  # nine pipelines in fresh processes
def test_pipeline_benchmark_times_every_schedule_against_one_process(tmp_path):
    """`python -m bench.pipeline` end to end at a small size: a row per rank of each schedule at pp 2 and 4, and
    one ratio line per schedule and pp (times are not asserted)."""
    command = [sys.executable, "-m", "bench.pipeline", "--layers", "8", "--microbatches", "4", "--steps", "1"]
    subprocess.run([*command, "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=900)
    result = json.loads((tmp_path / "pipeline.json").read_text())
    ranks = {(r["pp"], r["schedule"]): set() for r in result["rows"]}
    for r in result["rows"]:
        ranks[(r["pp"], r["schedule"])].add(r["rank"])
        assert r["step_ms"] > 0 and r["busy_ms"] > 0
    schedules = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble")
    assert ranks == {(1, "none"): {0}} | {(pp, s): set(range(pp)) for pp in (2, 4) for s in schedules}
    assert len(result["ratios"]) == 8


def test_loss_memory_benchmark_runs_both_losses(tmp_path):
    """A vocabulary of 20,000 and 1,024 tokens in 1 MiB chunks (13 tokens each): the chunked loss holds less."""
    command = [sys.executable, "-m", "bench.loss_memory", "--vocab", "20000", "--tokens", "1024", "--chunk-mib", "1"]
    done = subprocess.run([*command, "--steps", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "loss_memory.json").read_text())["rows"]
    assert rows["whole"]["logits_bytes"] == 1024 * 20000 * 4
    assert rows["chunked"]["peak_bytes"] < rows["whole"]["peak_bytes"]
    assert "peak memory: whole" in done.stdout
