"""`python -m train [overrides]` (also the `tp-train` console script); configs live in conf/
(installed: train/conf). `python -m train --help` describes every config field.

Exit codes: 0 done; 2 a config error (checked before Hydra starts the job where possible); 1 a
training error; 143 (SIGTERM) or 130 (SIGINT) stopped by that signal after saving a checkpoint (the
same command continues the run). Each of these prints one line, no traceback.

A sweep (`-m`, Hydra's multirun) runs every job even when some fail: each failed job's error is in
its directory (`error.txt`) and in the sweep's `summary.json`, and the exit code is the number of
failed jobs. `parallel.nproc_per_node=N` makes each job start its own `torchrun` of N processes, which
is how a sweep of multi-process jobs runs (a sweep inside one torchrun is refused).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from train.config import CONF_DIR, ConfigError, TrainingError, check_known_keys, register

register()
JOBS: list[dict[str, Any]] = []  # the jobs of a sweep run in this process: overrides, state, error


def fail_message(error: BaseException) -> tuple[int, str]:
    """The exit code and one-line message of an error a person can act on; (1, traceback) otherwise."""
    from train.run.preemption import Preempted

    if isinstance(error, ConfigError):
        return 2, f"config error: {error}"
    if isinstance(error, TrainingError):
        return 1, f"training error: {error}"
    if isinstance(error, Preempted):
        return error.exit_code, f"training stopped: {error}"
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C before training started (during it: Preempted)
        return 130, "interrupted before training started: nothing saved"
    return 1, "".join(traceback.format_exception(error)).rstrip()


def precheck(overrides: list[str]) -> None:
    """Compose the config as Hydra will and check the keys and the output directory, so that a bad key,
    type or path fails in one line instead of a Hydra report. Raises ConfigError."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose(config_name="config", overrides=overrides)
        check_known_keys(composed)
        cfg = OmegaConf.to_object(composed)
    except ConfigError:
        raise
    except Exception as e:  # Hydra's and OmegaConf's errors: report their message and cause, not their trace
        messages = [str(e)] + ([str(e.__cause__)] if e.__cause__ else [])
        lines = [m.strip().splitlines()[0] for m in messages if m.strip()]
        raise ConfigError(": ".join(lines) or type(e).__name__) from None
    out = Path(cfg.trainer.out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"trainer.out_dir = {str(out)!r} cannot be created ({e.strerror})") from None


def run_in_torchrun(cfg: DictConfig) -> None:
    """This job as `torchrun --standalone --nproc_per_node N -m train <its overrides>` in its own directory.

    Raises:
        TrainingError: the job failed (its last stderr line says why; the job printed it all).
    """
    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("parallel.nproc_per_node")]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.parallel.nproc_per_node}",
        "-m",
        "train",
        *overrides,
        f"hydra.run.dir='{hydra_cfg.runtime.output_dir}'",  # quoted: a sweep job's name holds '='
    ]
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    done = subprocess.run(command, env=env, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.startswith(("config error", "training error"))]
        raise TrainingError(
            f"torchrun of this job exited with {done.returncode}: "
            f"{lines[-1] if lines else done.stderr.strip().splitlines()[-1:]}"
        )


def _record_job(state: str, **extra: Any) -> None:
    """Note this sweep job's outcome for the sweep's summary."""
    hydra_cfg = HydraConfig.get()
    JOBS.append(
        {
            "job": hydra_cfg.job.num,
            "overrides": list(hydra_cfg.overrides.task),
            "state": state,
            "dir": hydra_cfg.runtime.output_dir,
            **extra,
        }
    )


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from train.main import run

    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        check_known_keys(cfg)
        if cfg.parallel.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
            run_in_torchrun(cfg)
        else:
            run(cfg)
    except (Exception, KeyboardInterrupt) as e:
        code, message = fail_message(e)
        if not sweep or code in (130, 143):  # a signal stops the whole sweep
            print(message, file=sys.stderr)
            sys.exit(code)
        out = Path(hydra_cfg.runtime.output_dir)
        (out / "error.txt").write_text(message + "\n")
        (out / ".hydra").mkdir(exist_ok=True)  # the overrides, so that train.compare can tell the jobs apart
        OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), out / ".hydra" / "overrides.yaml")
        print(f"job {hydra_cfg.job.num} failed: {message.splitlines()[-1]}", file=sys.stderr)
        _record_job("failed", error=message.splitlines()[-1])
        return
    if sweep:
        _record_job("done")


def finish_sweep() -> None:
    """Write the sweep's summary.json and exit with the number of failed jobs."""
    if not JOBS:
        return
    failed = [j for j in JOBS if j["state"] == "failed"]
    sweep_dir = Path(JOBS[0]["dir"]).parent
    (sweep_dir / "summary.json").write_text(json.dumps({"jobs": JOBS, "failed": len(failed)}, indent=2) + "\n")
    print(
        f"sweep: {len(JOBS) - len(failed)} of {len(JOBS)} jobs done, {len(failed)} failed "
        f"(summary: {sweep_dir / 'summary.json'})",
        file=sys.stderr,
    )
    sys.exit(len(failed))


def main() -> None:
    args = sys.argv[1:]
    if any(a in ("--help", "-h") for a in args):
        from train.help import print_help

        print_help()
        return
    sweep = any(a in ("-m", "--multirun") for a in args)
    if sweep and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(
            "config error: a sweep (-m) inside torchrun would run every job in one process group; run "
            "`python -m train -m ... parallel.nproc_per_node=N` instead: each job starts its own torchrun",
            file=sys.stderr,
        )
        sys.exit(2)
    if not any(a.startswith("-") for a in args):  # plain overrides; flags (--multirun, --cfg ...) go to Hydra
        try:
            precheck(args)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            sys.exit(2)
    _hydra_main()
    if sweep:
        finish_sweep()


if __name__ == "__main__":
    main()
