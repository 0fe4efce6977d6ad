"""Faults the training job must survive, and bad input it must refuse clearly (faults injected by TP_FAULT)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import CASES, ROOT, TORCHRUN, assert_same_curve, losses, metrics, rank0_log, train
from tp_attention.model import GPT
from train.checkpoints import checkpoint
from train.config import ConfigError
from train.run.directory import check_output_space

REFERENCE = ["trainer.max_steps=10", "trainer.batch_size=8"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def reference(workdir) -> list[float]:
    """An uninterrupted single-process run: 10 steps, checkpoints at 5 and 10."""
    train(workdir, "reference", REFERENCE)
    return losses(workdir, "reference")


@pytest.mark.slow  # a crash mid-save and resume stay in the default suite
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.cp=2", "parallel.pp=2"])
def test_killed_rank_restarts_and_resumes(workdir, reference, layout):
    command = [*TORCHRUN, "--max-restarts=1", "-m", "train"]
    run = f"killed_{layout[9:11]}"
    train(workdir, run, [*REFERENCE, layout], command=command, env={"TP_FAULT": "kill@8:1"})
    assert [r["step"] for r in metrics(workdir, run)] == list(range(1, 11))
    assert "checkpoints/step_00000005 at step 5" in rank0_log(workdir, run)
    assert_same_curve(losses(workdir, run), reference, f"{layout}: SIGKILL at step 8, restart from step 5")


@pytest.mark.parametrize(
    "layout",
    ["parallel.tp=2", *(pytest.param(layout, marks=pytest.mark.slow) for layout in ("parallel.cp=2", "parallel.pp=2"))],
)
def test_killed_while_saving_keeps_the_previous_checkpoint(workdir, reference, layout):
    command = [*TORCHRUN, "--max-restarts=1", "-m", "train"]
    run = f"crash_save_{layout[9:11]}"
    train(workdir, run, [*REFERENCE, layout], command=command, env={"TP_FAULT": "crash_in_save@10:0"})
    log = rank0_log(workdir, run)
    assert "checkpoints/step_00000005 at step 5" in log, "the half-written step 10 must not be used"
    kept = checkpoint.checkpoint_dirs(workdir / "runs" / run)
    assert [p.name for p in kept] == ["step_00000005", "step_00000010"]
    assert all(checkpoint.verify(p) is None for p in kept)
    assert not list((workdir / "runs" / run / "checkpoints").glob(".tmp-*"))
    assert_same_curve(losses(workdir, run), reference, f"{layout}: killed mid-save, resumed")


def test_corrupted_latest_checkpoint_falls_back_then_refuses(workdir, reference):
    run = workdir / "runs" / "corrupt"
    shutil.copytree(workdir / "runs" / "reference", run)
    shard = next((run / "checkpoints" / "step_00000010").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    train(workdir, "corrupt", REFERENCE)
    log = rank0_log(workdir, "corrupt")
    assert "skipping checkpoint" in log and "step_00000010" in log and "at step 5" in log
    assert_same_curve(losses(workdir, "corrupt"), reference, "fell back to step 5")

    for ckpt in checkpoint.checkpoint_dirs(run):
        meta = ckpt / "meta.json"
        meta.write_text(meta.read_text().replace('"sha256": "', '"sha256": "0'))
    result = train(workdir, "corrupt", REFERENCE, check=False)
    assert result.returncode == 2
    assert "config error: no intact checkpoint left in" in result.stderr and "SHA-256" in result.stderr


def test_hung_peer_ends_the_job_with_a_timeout_error(workdir):
    start = time.monotonic()
    result = train(
        workdir,
        "hung",
        ["trainer.max_steps=10", "parallel.tp=2", "parallel.timeout_s=5"],
        command=[*TORCHRUN, "-m", "train"],
        env={"TP_FAULT": "hang@3:1"},
        check=False,
    )
    assert result.returncode != 0
    assert (
        "training error: a collective timed out after 5 s (parallel.timeout_s) during training step 3" in result.stderr
    )
    assert time.monotonic() - start < 90


def test_a_rank_that_raises_stops_every_rank_promptly(workdir):
    start = time.monotonic()
    result = train(
        workdir,
        "raises",
        ["trainer.max_steps=10", "parallel.tp=2", "parallel.timeout_s=300"],
        command=[*TORCHRUN, "-m", "train"],
        env={"TP_FAULT": "raise@3:1"},
        check=False,
    )
    assert result.returncode != 0 and "injected failure at step 3 on rank 1" in result.stderr
    assert time.monotonic() - start < 60, "must not wait for the 300 s collective timeout"


def test_non_finite_steps_are_skipped_and_counted(workdir):
    train(workdir, "nan", [*REFERENCE, "trainer.checkpoint_interval=10"], env={"TP_FAULT": "nan@3-4"})
    records = metrics(workdir, "nan")
    assert records[1]["skipped_steps"] == 0 and records[3]["skipped_steps"] == 2 and records[-1]["skipped_steps"] == 2
    assert records[2]["loss"] is None and records[4]["loss"] is not None
    meta = checkpoint.read_meta(workdir / "runs" / "nan" / "checkpoints" / "step_00000010")
    assert meta["optimizer_steps"] == 8, "the two bad steps must not update the weights"


def test_too_many_bad_steps_stop_the_run_with_the_last_good_checkpoint_intact(workdir):
    overrides = [*REFERENCE, "trainer.checkpoint_interval=2", "trainer.max_bad_steps=3"]
    result = train(workdir, "nan_stop", overrides, env={"TP_FAULT": "nan@5-10"}, check=False)
    assert result.returncode == 1
    run = workdir / "runs" / "nan_stop"
    # the weights after step 4 gave a bad step 5, so checkpoint 4 is not known good; 2 is (step 3 was healthy)
    assert (
        "training error: 3 consecutive bad steps (last: non-finite loss or gradients; trainer.max_bad_steps = 3), "
        f"stopped at step 7; the last good checkpoint is {run / 'checkpoints' / 'step_00000002'}"
    ) in result.stderr
    kept = checkpoint.checkpoint_dirs(run)
    assert [p.name for p in kept] == ["step_00000002", "step_00000004"], "no save during the bad streak"
    assert checkpoint.good_step(run) == 2 and all(checkpoint.verify(p) is None for p in kept)


def test_disk_full_while_saving_is_a_clear_error(workdir):
    result = train(workdir, "enospc", REFERENCE, env={"TP_FAULT": "enospc_in_save@10"}, check=False)
    assert result.returncode == 1
    assert "training error: disk full while writing checkpoint step 10" in result.stderr
    assert "the last complete checkpoint is" in result.stderr and "step_00000005" in result.stderr
    assert [p.name for p in checkpoint.checkpoint_dirs(workdir / "runs" / "enospc")] == ["step_00000005"]
    assert not list((workdir / "runs" / "enospc" / "checkpoints").glob(".tmp-*"))


def test_output_dir_problems_are_caught_before_training(workdir, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = train(workdir, "unwritable", [f"trainer.out_dir={blocker / 'runs'}"], check=False)
    assert result.returncode == 2 and "cannot be created (Not a directory)" in result.stderr

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 2**20, 2**20))
    with pytest.raises(ConfigError, match=r"has 1 MiB free; 3 checkpoints .* need about 300 MiB"):
        check_output_space(tmp_path, 100 * 2**20, keep=2)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer.max_stepz=3"], "config error: Could not override 'trainer.max_stepz'.: Key 'max_stepz' not in"),
        (["trainer.max_steps=many"], "Value 'many' of type 'str' could not be converted to Integer"),
        (["model=huge"], "Could not find 'model/huge'"),
        (["trainer.seq_len=999"], "config error: trainer.seq_len = 999 must be <= model.max_seq_len = 128"),
        (
            ["data=text", "data.path=/nonexistent/corpus.txt"],
            "config error: data.path = '/nonexistent/corpus.txt' does",
        ),
    ],
)
def test_bad_command_lines_fail_in_one_line(workdir, overrides, message):
    result = train(workdir, "badcli", overrides, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "corpus is empty"),
        (b"tiny", "fewer than one window of trainer.seq_len + 1 = 33"),
    ],
)
def test_bad_data_files_fail_clearly(workdir, tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    result = train(workdir, "baddata", ["data=text", f"data.path={path}", f"data.cache_dir={tmp_path}"], check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_binary_text_trains_with_the_byte_tokenizer(workdir, tmp_path):
    path = tmp_path / "blob.bin.txt"
    path.write_bytes(bytes(range(256)) * 200 + b"\xff\xfe\x00 not utf-8 \xc3\x28")
    train(workdir, "binary", ["data=text", f"data.path={path}", f"data.cache_dir={tmp_path}", "trainer.max_steps=3"])
    assert len(losses(workdir, "binary")) == 3


def test_checkpoint_of_another_model_shape_is_refused(workdir, reference, tmp_path):
    step5 = workdir / "runs" / "reference" / "checkpoints" / "step_00000005"
    result = train(
        workdir,
        "othershape",
        [*REFERENCE, "model.emb_size=96", "model.head_size=24", f"trainer.resume={step5}"],
        check=False,
    )
    assert result.returncode == 2
    assert "was saved from another model shape" in result.stderr
    assert "_token_embeddings.weight: checkpoint (256, 64) != model (256, 96)" in result.stderr
    model = GPT(**CASES["base"])
    with pytest.raises(ConfigError, match=r"_token_embeddings.weight: checkpoint \(256, 64\) != model \(64, 32\)"):
        checkpoint.check_compatible(step5, model)


@pytest.mark.slow
def test_same_seed_and_layout_give_bitwise_identical_curves(workdir, reference):
    for run_id in ("det_a", "det_b"):
        train(workdir, run_id, [*REFERENCE, "trainer.max_steps=6", "parallel.tp=2"], command=[*TORCHRUN, "-m", "train"])
    a, b = metrics(workdir, "det_a"), metrics(workdir, "det_b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["grad_norm"] for r in a] == [
        r["grad_norm"] for r in b
    ]
    train(workdir, "det_c", REFERENCE)
    assert losses(workdir, "det_c") == reference, "single process: bitwise identical to the reference run"


def test_launch_scripts_are_valid_bash():
    for script in [*(ROOT / "launch").glob("*.sh"), ROOT / "launch" / "slurm.sbatch"]:
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-new-tokens", "-1"], "max_new_tokens must be >= 0, got -1"),
        (["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),  # was accepted
        (["--temperature", "inf"], "temperature must be a finite number >= 0, got inf"),
        (["--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
        (["--top-k", "0"], "top_k must be a positive integer, got 0"),
        (["--num-samples", "0"], "--num-samples must be a positive integer, got 0"),
    ],
)
def test_the_sample_command_refuses_bad_options_before_it_prints_anything(options, message):
    export = ROOT / "tests" / "data" / "before_attention_rename" / "export"
    done = subprocess.run(
        [sys.executable, "-m", "train.sample", str(export), *options], capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stderr.strip(), done.stdout) == (2, f"sample error: {message}", "")


def test_compare_refuses_a_damaged_status_file_in_one_line_and_writes_nothing(tmp_path):
    for name, status in (("good", '{"state": "complete", "step": 2}'), ("damaged", '{"state": ')):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
        (run / "status.json").write_text(status)
    done = subprocess.run(
        [sys.executable, "-m", "train.compare", str(tmp_path / "good"), str(tmp_path / "damaged")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    damaged = tmp_path / "damaged" / "status.json"
    expected = f"compare error: {damaged} is damaged (not a JSON object with a state): remove it or the run"
    assert (done.returncode, done.stderr.strip(), done.stdout) == (2, expected, "")
    assert not (tmp_path / "good" / "compare.png").exists()


@pytest.mark.parametrize(
    "content, message",
    [(b"", "has 0 tokens, fewer than one window"), (bytes(range(256)) * 20, "outside the model's vocabulary of 32")],
    ids=["empty", "binary"],
)
def test_evaluate_refuses_text_it_cannot_score_in_one_line_and_writes_nothing(tmp_path, content, message):
    """An empty file has no window; a binary one has bytes the fixture's 32-token model never saw (that was a
    message about `targets`)."""
    export = ROOT / "tests" / "data" / "before_attention_rename" / "export"
    (tmp_path / "data.txt").write_bytes(content)
    command = [sys.executable, "-m", "train.evaluate", str(export), "--data", str(tmp_path / "data.txt")]
    done = subprocess.run([*command, "--out", str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert done.stderr.startswith("evaluate error: ") and message in done.stderr, done.stderr
    assert not (tmp_path / "eval.json").exists()
