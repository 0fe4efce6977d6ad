"""Trustworthy long runs, each with the real fault: signals into real processes, a real torchrun, a real lock,
a real pickle payload, a real NaN from a huge learning rate, a really full file system."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_RUN, TORCHRUN, assert_same_curve, env_for, metrics, rank0_log, records, train
from tp_attention import MultiHeadAttention
from tp_attention.model import GPT
from train.checkpoints import checkpoint
from train.config import TrainingError
from train.reporting.metrics import Metrics, read_records
from train.run.identity import differences

STEPS = ["trainer.max_steps=12", "trainer.batch_size=8", "trainer.checkpoint_interval=4"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("long_runs")


@pytest.fixture(scope="module")
def uninterrupted(workdir) -> list[dict]:
    train(workdir, "uninterrupted", STEPS)
    return metrics(workdir, "uninterrupted")


def start(
    workdir: Path,
    out: str | Path,
    overrides: list[str],
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """The training job in the background, in its own process group, outputs under workdir/out."""
    command = command or [sys.executable, "-m", "train"]
    environment = {**env_for("", workdir / "cache"), **(env or {})}
    environment.pop("TP_RUN_ID")  # the run dir comes from the config: the same command finds the same run
    args = [*command, *TINY_RUN, f"trainer.out_dir={workdir / out}", *overrides]
    return subprocess.Popen(
        args,
        env=environment,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run_dir(workdir: Path, out: str | Path) -> Path:
    (only,) = [d for d in (workdir / out).iterdir() if d.is_dir()]
    return only


def wait_for_steps(workdir: Path, out: str | Path, steps: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = list((workdir / out).glob("*/metrics.jsonl")) if (workdir / out).is_dir() else []
        if runs and runs[0].read_text().count("\n") >= steps:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"no {steps} steps in {timeout} s")


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.parametrize(
    "sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)  # SIGTERM: through the torchrun agent below
def test_a_signal_saves_the_step_and_the_same_command_continues_the_run(workdir, uninterrupted, sig):
    out = f"signal_{sig.name}"
    overrides = [*STEPS, "trainer.log_interval=1"]
    proc = start(workdir, out, overrides, env={"TP_FAULT": "slow@3-12"})  # 2 s steps from step 3
    wait_for_steps(workdir, out, 3, proc)
    os.kill(proc.pid, sig)
    code, err = finish(proc)
    run = run_dir(workdir, out)
    stopped = checkpoint.read_meta(checkpoint.checkpoint_dirs(run)[-1])["step"]
    assert code == 128 + sig, err
    assert err.strip().splitlines()[-1] == (
        f"training stopped: stopped by {sig.name} after step {stopped}; checkpoint "
        f"{run / 'checkpoints' / checkpoint.checkpoint_name(stopped)} saved: "
        "run the same command to continue"
    )
    assert "Traceback" not in err and 3 <= stopped < 12
    assert json.loads((run / "status.json").read_text())["state"] == "preempted"
    code, err = finish(start(workdir, out, overrides))  # the same command: no TP_RUN_ID invented
    assert code == 0, err
    steps = records(run)
    assert [r["step"] for r in steps] == list(range(1, 13)), "every step exactly once"
    assert_same_curve(
        [r["loss"] for r in steps if r["step"] % 4 == 0],
        [r["loss"] for r in uninterrupted if r["step"] % 4 == 0],
        "resumed after the signal",
    )
    assert (
        f"resumed from {run / 'checkpoints' / checkpoint.checkpoint_name(stopped)}"
        in (run / "logs" / "rank0.log").read_text()
    )


@pytest.mark.slow  # signals in the default suite: SIGINT to the job, the second signal
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.cp=2", "parallel.pp=2"])
def test_sigterm_to_the_torchrun_agent_reaches_every_rank_which_saves(workdir, uninterrupted, layout):
    out = f"agent_{layout[9:11]}"
    overrides = [*STEPS, "trainer.log_interval=1", layout]
    command = [*TORCHRUN, "--max-restarts=3", "-m", "train"]
    proc = start(workdir, out, overrides, command=command, env={"TP_FAULT": "slow@3-12"})
    wait_for_steps(workdir, out, 3, proc)
    os.kill(proc.pid, signal.SIGTERM)  # the agent only; it forwards the signal to its workers
    code, err = finish(proc)
    run = run_dir(workdir, out)
    stopped = checkpoint.read_meta(checkpoint.checkpoint_dirs(run)[-1])["step"]
    assert code != 0 and "stopped by SIGTERM after step" in err, err[-3000:]
    assert checkpoint.verify(checkpoint.checkpoint_dirs(run)[-1]) is None and stopped >= 3
    code, err = finish(start(workdir, out, overrides, command=command))
    assert code == 0, err[-3000:]
    losses = {r["step"]: r["loss"] for r in records(run)}
    assert sorted(losses) == list(range(1, 13))
    assert_same_curve(
        [losses[s] for s in (4, 8, 12)],
        [uninterrupted[s - 1]["loss"] for s in (4, 8, 12)],
        f"{layout} resumed after SIGTERM to the agent",
    )


def test_a_second_signal_exits_at_once_without_saving(workdir):
    out = "second_signal"
    proc = start(workdir, out, [*STEPS, "trainer.log_interval=1"], env={"TP_FAULT": "slow@3-12"})
    wait_for_steps(workdir, out, 3, proc)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(1.2)  # inside the same 2 s step
    os.kill(proc.pid, signal.SIGTERM)
    code, err = finish(proc)
    assert code == 143 and "second SIGTERM: exiting now, nothing saved" in err
    assert not checkpoint.checkpoint_dirs(run_dir(workdir, out)), "nothing saved: step 4's save never came"


def test_resume_never_continues_another_experiment(workdir, uninterrupted):
    runs = workdir / "runs"
    # the same TP_RUN_ID with another config: refused, naming what differs
    done = train(workdir, "uninterrupted", [*STEPS, "optim.lr=1e-3", "trainer.seed=7"], check=False)
    assert done.returncode == 2
    assert "holds another experiment: optim.lr: 0.002 (checkpoint) != 0.001 (now); trainer.seed: 1337" in done.stderr
    # resume=auto under an out_dir holding only another experiment's run starts fresh, in its own directory
    train(workdir, "other_seed", [*STEPS, "trainer.seed=7", "trainer.resume=auto", "trainer.max_steps=4"])
    assert [r["step"] for r in metrics(workdir, "other_seed")] == list(range(1, 5))
    assert "no intact checkpoint of this experiment" in rank0_log(workdir, "other_seed")
    # ... and with a run of the same experiment under it, continues that one (max_steps may change)
    train(workdir, "auto_same", [*STEPS, "trainer.max_steps=14", "trainer.resume=auto"])
    assert f"resumed from {runs / 'uninterrupted' / 'checkpoints' / 'step_00000012'}" in rank0_log(workdir, "auto_same")
    # an explicit path is a warm start: allowed, and the log says what differs
    step8 = runs / "uninterrupted" / "checkpoints" / "step_8"
    train(workdir, "warm", [*STEPS, "optim.lr=1e-3", f"trainer.resume={step8}"])
    assert "which is another experiment: optim.lr: 0.002 (checkpoint) != 0.001 (now)" in rank0_log(workdir, "warm")
    assert differences({"a": 1}, {"a": 1}) == []


def test_a_huge_learning_rate_never_overwrites_the_good_checkpoint(workdir, uninterrupted):
    good = workdir / "runs" / "uninterrupted" / "checkpoints" / "step_00000012"
    assert checkpoint.good_step(good.parent.parent) == 12
    done = train(
        workdir,
        "huge_lr",
        [*STEPS, "trainer.max_steps=40", "optim.lr=10", "optim.min_lr=0", f"trainer.resume={good}"],
        check=False,
    )
    run = workdir / "runs" / "huge_lr"
    assert done.returncode == 1
    assert "25 consecutive bad steps" in done.stderr and f"the last good checkpoint is {good}" in done.stderr
    assert not checkpoint.checkpoint_dirs(run), "no checkpoint of the diverged weights was written"
    assert "above trainer.spike_factor" in rank0_log(workdir, "huge_lr")  # a spike before any NaN
    # the named checkpoint, resumed with a sane learning rate, trains normally
    train(workdir, "after_huge_lr", [*STEPS, "trainer.max_steps=20", f"trainer.resume={good}"])
    records = metrics(workdir, "after_huge_lr")
    assert records[-1]["skipped_steps"] == 0 and records[-1]["loss"] < uninterrupted[0]["loss"]


def craft_payload_checkpoint(source: Path, target: Path, marker: Path) -> None:
    """A copy of a real checkpoint whose DCP .metadata runs a shell command when unpickled, with meta.json
    re-sealed so that every size and SHA-256 matches: only the unpickler stands in the way."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    target.mkdir(parents=True)
    for f in source.iterdir():
        if f.name != "meta.json":
            (target / f.name).write_bytes(f.read_bytes())
    (target / ".metadata").write_bytes(pickle.dumps(Payload()))
    meta = json.loads((source / "meta.json").read_text())
    checkpoint.Checkpointer.seal(target, {k: v for k, v in meta.items() if k != "files"} | {"files": {}})
    assert checkpoint.verify(target) is None


def test_a_checkpoint_cannot_run_code(workdir, uninterrupted, tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "run" / "checkpoints" / "step_00000012"
    craft_payload_checkpoint(workdir / "runs" / "uninterrupted" / "checkpoints" / "step_00000012", evil, marker)
    export = subprocess.run(
        [sys.executable, "-m", "train.export", str(evil), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env_for("x", workdir / "cache"),
    )
    assert export.returncode == 2 and "refers to posix.system" in export.stderr, export.stderr
    resume = train(workdir, "evil_resume", [*STEPS, f"trainer.resume={evil}"], check=False)
    assert resume.returncode == 2 and "refusing to unpickle it" in resume.stderr
    assert not marker.exists(), "the payload ran"
    # integrity: a file meta.json does not list, or meta.json listing nothing, refuses the checkpoint
    meta = json.loads((evil / "meta.json").read_text())
    (evil / "meta.json").write_text(json.dumps({**meta, "files": {}}))
    assert "holds files meta.json does not list" in checkpoint.verify(evil)


def kill_everything_of(marker: str) -> None:
    """SIGKILL every process whose command line holds `marker` (as `scancel -s KILL` kills a whole job)."""
    subprocess.run(["pkill", "-KILL", "-f", marker], check=False)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "processes survived SIGKILL"
        time.sleep(0.1)


def test_one_writer_per_run_directory_and_stale_state_of_a_killed_job(workdir):
    out = "locked"
    overrides = [*STEPS, "trainer.max_steps=30", "trainer.log_interval=1", "parallel.tp=2"]
    first = start(workdir, out, overrides, command=[*TORCHRUN, "-m", "train"], env={"TP_FAULT": "slow@2-30"})
    wait_for_steps(workdir, out, 2, first)
    run = run_dir(workdir, out)
    code, err = finish(start(workdir, out, overrides[:-1]))  # the same experiment in one process: same run dir
    assert code == 2 and f"config error: run directory {run} is in use by pid" in err, err
    os.kill(first.pid, signal.SIGKILL)  # the agent alone: its workers live on as orphans and keep training
    first.wait()
    code, err = finish(start(workdir, out, overrides[:-1]))
    assert code == 2 and "is in use by pid" in err, "an orphaned worker still writes here"
    segments = {p.name for p in Path("/dev/shm").glob("tpattn_*_*")}  # tpattn_<pid of its creator>_<random>
    kill_everything_of(str(workdir / out))
    leaked = {p.name for p in Path("/dev/shm").glob("tpattn_*_*")} & segments
    assert leaked, "a SIGKILLed job leaves its shared-memory segment behind"
    code, err = finish(
        start(workdir, out, [*overrides[:2], "trainer.max_steps=6", *overrides[3:]], command=[*TORCHRUN, "-m", "train"])
    )
    assert code == 0, err[-3000:]
    assert "took over the stale lock of pid" in (run / "logs" / "rank0.log").read_text()
    assert not leaked & {p.name for p in Path("/dev/shm").glob("tpattn_*")}, "the killed job's segment stays"


def test_bad_numbers_and_data_are_refused_up_front(workdir, tmp_path):
    many = tmp_path / "docs"
    many.mkdir()
    for i in range(40):  # names that all hash into the training split: validation falls back to a position split
        name = next(f"doc{i}_{j}.txt" for j in range(100) if not _in_validation(f"{many}/doc{i}_{j}.txt"))
        (many / name).write_text("some text to learn from. " * 20)
    train(
        workdir, "no_val_docs", ["data=text", f"data.path={many}", f"data.cache_dir={tmp_path}", "trainer.max_steps=2"]
    )
    assert "none of the 40 documents hashes into the validation split" in rank0_log(workdir, "no_val_docs")
    for overrides, message in [
        (["trainer.batch_size=100000000"], "100000000 sequences per forward pass (trainer.micro_batch, or "),
        (["data=text", "data.path=/dev/null"], "data.path = '/dev/null' is not a regular file or a directory"),
    ]:
        done = train(workdir, "refused", overrides, check=False)
        assert done.returncode == 2 and f"config error: {message}" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    one_byte = tmp_path / "one.txt"
    one_byte.write_bytes(b"x")
    done = train(workdir, "one_byte", ["data=text", f"data.path={one_byte}", f"data.cache_dir={tmp_path}"], check=False)
    assert done.returncode == 2 and "fewer than one window" in done.stderr and "Traceback" not in done.stderr


def _in_validation(name: str) -> bool:
    from train.data.corpus import _is_val

    return _is_val(name, 0.05)


def test_library_inputs_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"num_kv_heads = 0 must be a positive integer"):
        MultiHeadAttention(4, 32, 8, 16, num_kv_heads=0)
    with pytest.raises(TypeError, match=r"num_heads must be an integer, got True"):
        MultiHeadAttention(True, 32, 8, 16)
    with pytest.raises(
        TypeError,
        match=r"tp_group must be a torch.distributed ProcessGroup, a TPGroup or None, got "
        r"str 'abc'",
    ):
        MultiHeadAttention(4, 32, 8, 16, tp_group="abc")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"has no GPT config in its safetensors metadata"):
        GPT.load(tmp_path / "plain.safetensors")


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real small file system (tmpfs), mounted for the test; skipped where mounting is not allowed."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill `disk` up to `leave` free bytes."""
    with (disk / "filler").open("wb") as f:
        while shutil.disk_usage(disk).free > leave:
            try:
                f.write(b"\0" * max(4096, min(1 << 20, shutil.disk_usage(disk).free - leave)))
                f.flush()
            except OSError:
                break


def test_unexpected_pos_on_a_really_full_disk_is_a_full_disk(tmp_path, monkeypatch):
    """With 400 kB left of a real tmpfs, torch's zip writer fails a 1.4 MB save with RuntimeError
    "unexpected pos ..." (no errno of its own); the ENOSPC under it makes it a full disk, and the partial
    save is removed."""
    model = GPT(vocab_size=256, max_seq_len=32, emb_size=64, num_heads=4, head_size=16, num_layers=2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()
    optimizer.step()
    chains = []
    causes = checkpoint._causes
    monkeypatch.setattr(checkpoint, "_causes", lambda error: chains.append(causes(error)) or chains[-1])
    with tmpfs(tmp_path / "small", "4m") as disk:
        fill(disk, 400_000)
        with pytest.raises(TrainingError, match=r"^disk full while writing checkpoint step 1 .*Errno 28"):
            checkpoint.Checkpointer(disk / "run", None, keep=1).save(1, model, optimizer, {"optimizer_steps": 1})
        assert [p.name for p in (disk / "run" / "checkpoints").iterdir()] == []
    assert any(isinstance(c, RuntimeError) and "unexpected pos" in str(c) for c in chains[0]), chains


@pytest.mark.parametrize(
    "leave,overrides,failing",
    [
        (200_000, ["trainer.max_steps=12", "trainer.checkpoint_interval=4"], "checkpoint step 4"),
        (0, ["trainer.max_steps=400", "trainer.checkpoint_interval=1000"], "at step"),
    ],  # a page more of lines
    ids=["checkpoint", "metrics"],
)
def test_a_really_full_disk_stops_the_run_cleanly(workdir, tmp_path, leave, overrides, failing):
    with tmpfs(tmp_path / "small", "6m") as disk:
        proc = start(
            workdir,
            disk,
            ["trainer.batch_size=8", "trainer.log_interval=1", "trainer.keep_checkpoints=1", *overrides],
            env={"TP_FAULT": "slow@2-3"},
        )
        assert_stops_on_a_full_disk(workdir, disk, proc, leave, failing)


@pytest.mark.slow
def test_a_really_full_disk_while_saving_at_cp2_stops_every_rank_cleanly(workdir, tmp_path):
    """The checkpoint case under torchrun at parallel.cp=2: both ranks learn of the failure, one line, no partial
    save left."""
    with tmpfs(tmp_path / "small", "6m") as disk:
        overrides = ["trainer.batch_size=8", "trainer.log_interval=1", "trainer.keep_checkpoints=1", "parallel.cp=2"]
        overrides += ["trainer.max_steps=12", "trainer.checkpoint_interval=4"]
        proc = start(workdir, disk, overrides, command=[*TORCHRUN, "-m", "train"], env={"TP_FAULT": "slow@2-3"})
        assert_stops_on_a_full_disk(workdir, disk, proc, 200_000, "checkpoint step 4", ranks=2)


def assert_stops_on_a_full_disk(workdir, disk, proc, leave: int, failing: str, ranks: int = 1) -> None:
    """Fill `disk` once the run has logged a step; it must stop with one line naming what `failing` names (under
    torchrun, whose own report follows, the same line from each of the `ranks`), whole metrics lines and no partial
    save."""
    wait_for_steps(workdir, disk, 1, proc)
    fill(disk, leave)
    code, err = finish(proc)
    run = run_dir(workdir, disk)
    assert code == 1, err[-3000:]
    assert "training error: disk full while writing" in err and failing in err, err[-3000:]
    job = [line for line in err.strip().splitlines() if ranks == 1 or "training error" in line]
    assert len(job) == ranks and len(set(job)) == 1, "one line (per rank), no traceback"
    if failing.startswith("checkpoint"):  # its first save: the partial one was written, then removed
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [], "no partial save left"
        assert "the last complete checkpoint is none" in err
    else:
        assert not (run / "checkpoints").exists(), "no checkpoint was due"
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()), "whole lines"


def test_a_torn_last_metrics_line_does_not_stop_a_resume(workdir, uninterrupted):
    runs = workdir / "runs"
    shutil.copytree(runs / "uninterrupted", runs / "torn")
    (runs / "torn" / ".lock").unlink(missing_ok=True)
    with (runs / "torn" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "loss": 2.')  # a crash mid-write
    train(workdir, "torn", [*STEPS, "trainer.max_steps=14"])
    steps = [r["step"] for r in metrics(workdir, "torn")]
    assert steps == list(range(1, 15)) and "skipped torn records on line(s) 13 " in rank0_log(workdir, "torn")


def test_a_full_disk_mid_record_leaves_whole_records_only(tmp_path):
    """On a real full tmpfs the next record fits only part-way into the file's last page: the writer rolls the
    part back (the file keeps its whole records) and stops the run with a one-line TrainingError."""
    with tmpfs(tmp_path / "small", "1m") as disk:
        path = disk / "metrics.jsonl"
        record = {"step": 1, "loss": 4.123456789, "lr": 0.001, "grad_norm": 1.5, "tokens_per_s": 12345.678}
        line = json.dumps(record) + "\n"
        size = 4096 - len(line) // 2  # the file's one page then has room for half a record
        records_size = size // len(line) * len(line)
        whole = line * (size // len(line)) + " " * (size - records_size - 1) + "\n"  # a blank line pads it
        path.write_text(whole)
        fill(disk, 0)
        with pytest.raises(TrainingError, match=r"^disk full while writing .*metrics.jsonl at step 2 "):
            Metrics(disk, None, enabled=True).log(record | {"step": 2})
        assert path.read_text() == whole


def test_torn_records_anywhere_are_skipped_with_one_warning(tmp_path, caplog):
    """A file as an older writer left it after a full disk: a torn record, then the next run's records appended
    to it (the first glued to the torn one's end). Every whole record is kept; one warning names the line."""
    lines = [json.dumps({"step": s, "loss": 5.0 - s / 10}) for s in range(1, 4)]
    torn = '{"step": 4, "loss": 4.6, "grad_norm": 3.36'
    (tmp_path / "metrics.jsonl").write_text("\n".join([*lines, torn + lines[0], *lines[1:], "{not json"]) + "\n")
    with caplog.at_level("WARNING"):
        steps = [r["step"] for r in read_records(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 1, 2, 3]
    assert [r.getMessage() for r in caplog.records if "torn" in r.getMessage()] == [
        f"{tmp_path / 'metrics.jsonl'}: skipped torn records on line(s) 4, 7 (a crash or a full disk mid-write)"
    ]


def test_after_a_full_disk_during_metrics_writes_the_same_command_continues(workdir, tmp_path):
    """The reproduction of issue 24: a real 8 MiB tmpfs filled while the run logs every step, the run stops in
    one line, the filler is deleted, and the same command trains to the end (no traceback)."""
    overrides = [
        "model.num_layers=1",
        "trainer.batch_size=2",
        "trainer.eval_batches=1",
        "trainer.eval_interval=1000",
        "trainer.log_interval=1",
        "trainer.max_steps=3000",
        "trainer.checkpoint_interval=100000",
        "trainer.keep_checkpoints=1",
    ]
    with tmpfs(tmp_path / "small", "8m") as disk:
        proc = start(workdir, disk, overrides)
        wait_for_steps(workdir, disk, 12, proc)
        fill(disk, 0)
        code, err = finish(proc)
        assert code == 1 and err.strip().startswith("training error: disk full while writing"), err[-3000:]
        run = run_dir(workdir, disk)
        assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()), "whole lines"
        (disk / "filler").unlink()
        code, err = finish(start(workdir, disk, [*overrides, "trainer.max_steps=20"]))
        assert code == 0, err[-3000:]
        assert [r["step"] for r in records(run)] == list(range(1, 21))
