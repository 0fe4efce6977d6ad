"""`python -m train.dry_run`: one rank of an N-rank job on the fake backend, against real runs and hand counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY_RUN, env_for, train
from train.config import ConfigError
from train.dry_run import DOES_NOT_FIT, GiB, describe_ranks, device_memory

LLAMA3_70B = 70_553_706_496  # transformers' count of Llama-3.1-70B's config (tests/test_hf.py)
ON_512 = ["model=llama3_70b", "parallel.tp=8", "parallel.dp_shard=64", "trainer.seq_len=8192", "trainer.batch_size=64"]


def dry_run(workdir: Path, args: list[str], overrides: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    """The command's result and its `--json` report."""
    out = workdir / f"dry-{len(list(workdir.glob('dry-*.json')))}.json"
    done = subprocess.run(
        [sys.executable, "-m", "train.dry_run", *args, "--json", str(out), *overrides],
        env=env_for("dry-run", workdir / "cache"),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, json.loads(out.read_text()) if out.is_file() else {}


def test_the_dry_run_measures_what_a_real_four_process_run_records(tmp_path):
    """tp=2 x dp_shard=2: every rank's bytes and the step's collectives (FSDP2's gathers and reduce-scatters, TP's
    all-reduces) equal those the real gloo run measured on its first step; fake tensors give the same bytes."""
    overrides = [*TINY_RUN, "trainer.max_steps=1", "parallel.tp=2", "parallel.dp_shard=2"]
    train(tmp_path, "real", overrides, 4)
    real = json.loads((tmp_path / "runs" / "real" / "run.json").read_text())["measured"]["ranks"]
    done, report = dry_run(tmp_path, ["--world-size", "4", "--all-ranks"], overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    played = report["ranks"]
    assert [r["rank"] for r in played] == [0, 1, 2, 3] and {r["tensors"] for r in played} == {"real"}
    for rank, (mine, theirs) in enumerate(zip(played, real, strict=True)):
        assert mine["memory"] == theirs["memory"], f"rank {rank}"
        assert mine["collectives"] == theirs["collectives"], f"rank {rank}"
    assert {"all_gather", "reduce_scatter", "all_reduce"} <= set(real[0]["collectives"])
    assert all(real[0]["memory"][part] > 0 for part in ("parameters", "gradients", "optimizer", "activations"))
    done, fake = dry_run(tmp_path, ["--world-size", "4", "--rank", "3", "--tensors", "fake"], overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    assert fake["tensors"] == "fake" and fake["memory"] == real[3]["memory"]


@pytest.mark.parametrize("rank", [0, pytest.param(511, marks=pytest.mark.slow)])
def test_llama3_70b_on_512_ranks_holds_a_512th_of_the_model_per_rank(tmp_path, rank):
    """tp=8 x dp_shard=64, 8192 tokens: built and stepped on fake tensors in seconds. Every weight splits evenly
    512 ways, except the 161 RMSNorm weights (8192 each), which TP replicates and FSDP2 splits 64 ways: so many
    fp32 parameters and gradients per rank; AdamW's state twice that plus one 4-byte step count per tensor. 80 GB
    does not hold the fp32 activations of 8192 tokens without activation checkpointing."""
    done, report = dry_run(tmp_path, ["--world-size", "512", "--rank", str(rank), "--device-memory", "80GB"], ON_512)
    assert done.returncode == DOES_NOT_FIT, done.stderr[-3000:]
    tensors = 80 * 9 + 3  # per block q, k, v, o, gate, up, down and two norms; embedding, final norm, head
    norms = (80 * 2 + 1) * 8192
    per_rank = (LLAMA3_70B - norms) // 512 + norms // 64
    assert (LLAMA3_70B - norms) % 512 == 0 and report["tensors"] == "fake"
    memory = report["memory"]
    assert memory["parameters"] == memory["gradients"] == 4 * per_rank  # 551,272,960 bytes: 70.55B x 4 / 512 + 0.01%
    assert memory["optimizer"] == 8 * per_rank + 4 * tensors
    assert len(report["layout"]["tp"]) == 8 and len(report["layout"]["fsdp"]) == 64
    assert report["layout"]["tp"] == list(range(rank // 8 * 8, rank // 8 * 8 + 8))
    assert report["layout"]["fsdp"] == list(range(rank % 8, 512, 8))
    assert "does not fit" in done.stdout and "the largest part is activations" in done.stdout


@pytest.mark.slow  # the 70B test above also checks a layout that does not fit
def test_a_layout_too_big_for_the_device_names_its_largest_part(tmp_path):
    """llama3_70b at tp=1 on 8 ranks (DDP): each rank holds all 70.55B parameters, far from an 80GB device."""
    overrides = [
        "model=llama3_70b",
        "trainer.seq_len=1024",
        "trainer.batch_size=8",
        "trainer.activation_checkpointing=full",
    ]
    done, report = dry_run(tmp_path, ["--world-size", "8", "--device-memory", "h100"], overrides)
    assert done.returncode == DOES_NOT_FIT, done.stderr[-3000:]
    memory = report["memory"]
    assert memory["parameters"] == 4 * LLAMA3_70B and memory["optimizer"] > memory["activations"]
    assert done.stdout.strip().splitlines()[-1].startswith("does not fit: ")
    assert "the largest part is optimizer, 525.67 GiB" in done.stdout
    assert any("DDP keeps its gradient buckets" in note for note in report["notes"])


def test_a_layout_that_does_not_divide_is_the_training_job_s_own_error(tmp_path):
    env = env_for("dry-run", tmp_path / "cache") | {"WORLD_SIZE": "8"}
    job = subprocess.run([sys.executable, "-m", "train", "parallel.tp=3"], env=env, capture_output=True, text=True)
    done, _ = dry_run(tmp_path, ["--world-size", "8"], ["parallel.tp=3"])
    assert done.returncode == job.returncode == 2
    assert (
        done.stderr.strip() == job.stderr.strip() == "config error: world_size = 8 must be divisible by parallel.tp = 3"
    )


@pytest.mark.slow
def test_every_rank_position_of_a_16_rank_layout_dry_runs(tmp_path):
    """tp=2 x dp_shard=4 x dp_replicate=2: the first and last TP rank of the first and last FSDP2 shard, each in
    its own process, all holding the same bytes (the tiny model splits evenly), the worst reported."""
    overrides = [*TINY_RUN, "trainer.batch_size=8", "parallel.tp=2", "parallel.dp_shard=4", "parallel.dp_replicate=2"]
    done, report = dry_run(tmp_path, ["--world-size", "16", "--all-ranks"], overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["rank"] for r in report["ranks"]] == [0, 1, 6, 7]
    assert len({json.dumps(r["memory"]) for r in report["ranks"]}) == 1
    assert report["ranks"][0]["layout"]["dp"] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert report["ranks"][0]["layout"]["fsdp"] == [0, 2, 4, 6]
    assert "worst of ranks 0, 1, 6, 7" in done.stdout


@pytest.mark.slow
def test_pipeline_stages_dry_run_as_a_real_pipeline_run_measures_them(tmp_path):
    """pp=2 x tp=2, on fake tensors (a stage alone receives nothing real): each stage's bytes equal the real gloo
    run's, and so do its collectives, less the job's one check that every rank's step was healthy (an
    all-reduce, after the step's values). The first stage sends activations and receives gradients; the last
    the reverse. The job measures its second step here (its first also infers the stages' shapes, which the dry
    run's given shapes skip)."""
    overrides = [*TINY_RUN, "trainer.max_steps=2", "parallel.pp=2", "parallel.tp=2"]
    train(tmp_path, "real", overrides, 4)
    real = json.loads((tmp_path / "runs" / "real" / "run.json").read_text())["measured"]["ranks"]
    for rank in (0, 2):
        done, fake = dry_run(tmp_path, ["--world-size", "4", "--rank", str(rank)], overrides)
        assert done.returncode == 0, done.stderr[-3000:]
        assert fake["tensors"] == "fake" and fake["stages"] == [{"index": rank // 2, "layers": [rank // 2]}]
        assert fake["memory"] == real[rank]["memory"], f"rank {rank}"
        healthy = real[rank]["collectives"]["all_reduce"]
        expected = real[rank]["collectives"] | {
            "all_reduce": {"calls": healthy["calls"] - 1, "bytes": healthy["bytes"] - 12}
        }
        assert fake["collectives"] == expected, f"rank {rank}"
        assert fake["collectives"]["send"]["calls"] == fake["collectives"]["recv"]["calls"] == 2  # micro-batches
    done, _ = dry_run(tmp_path, ["--world-size", "4", "--tensors", "real"], overrides)
    assert done.returncode == 2 and "use --tensors fake" in done.stderr


def test_device_memory_and_rank_lists_read_as_people_write_them():
    assert device_memory("80GB") == 80 * 10**9 and device_memory("40GiB") == 40 * GiB
    assert device_memory("H100") == 80 * GiB and device_memory("a100-40gb") == 40 * GiB
    with pytest.raises(ConfigError, match=r"--device-memory '80 apples' must be a size such as 80GB or 40GiB"):
        device_memory("80 apples")
    assert describe_ranks([7, 15, 23, 31, 39]) == "7, 15, ..., 39 (5 ranks, every 8th)"
    assert describe_ranks([0, 1]) == "0, 1"
