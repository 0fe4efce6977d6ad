"""The run directory: one for all ranks, its log files, the Hydra record, and room for checkpoints."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from train.config import ConfigError
from train.run.ranks import broadcast_object


def agree_on_run_dir(hydra_dir: Path) -> Path:
    """Rank 0's Hydra output dir for every rank; a stray empty dir of another rank is removed."""
    run_dir = Path(broadcast_object(str(hydra_dir.resolve())))
    if hydra_dir.resolve() != run_dir and hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
        hydra_dir.rmdir()
    return run_dir


class _AboveProgressBar(logging.StreamHandler):
    """Log lines on stdout, written above tqdm's bar; stderr keeps the errors. Progress lines are left to the
    bar when there is one (a terminal): the log file still gets them."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "progress", False) and sys.stderr.isatty():
            return
        tqdm.write(self.format(record), file=sys.stdout)


def _log_thread_failure(args: threading.ExceptHookArgs) -> None:
    thread = args.thread.name if args.thread else "?"
    logging.getLogger(__name__).warning(
        "background thread %s failed: %s: %s", thread, args.exc_type.__name__, args.exc_value
    )


def setup_logging(run_dir: Path, rank: int) -> None:
    """One log file per rank in `<run_dir>/logs/`; rank 0 also logs to stdout (above the bar)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(_AboveProgressBar())
    logging.raiseExceptions = False  # a full disk stops the run with its own message, not a logging traceback
    threading.excepthook = _log_thread_failure  # nor with TensorBoard's writer thread's traceback
    logging.basicConfig(
        level=logging.INFO, handlers=handlers, force=True, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s"
    )


def write_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """`.hydra/config.yaml` (resolved: the run id is the real one) and `overrides.yaml`, as Hydra writes them
    (call from rank 0 only)."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml", resolve=True)
    OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)), hydra_dir / "overrides.yaml")


def write_status(run_dir: Path, state: str, step: int, **info: Any) -> None:
    """`<run_dir>/status.json`: running | complete | preempted | failed, the step, and what else there is to
    say (rank 0). A scheduler script reads it to decide whether to requeue (launch/slurm.sbatch)."""
    status = {"state": state, "step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **info}
    tmp = run_dir / "status.json.tmp"
    try:
        tmp.write_text(json.dumps(status, indent=2) + "\n")
        os.replace(tmp, run_dir / "status.json")
    except OSError as e:  # a full disk must not hide the error that brought us here
        logging.getLogger(__name__).warning("cannot write %s (%s)", run_dir / "status.json", e.strerror)


def check_output_space(run_dir: Path, bytes_per_checkpoint: int, keep: int) -> None:
    """Fail before training if the run dir is not writable or cannot hold the checkpoints.

    Raises:
        ConfigError: naming the directory, the free space and what the checkpoints need.
    """
    probe = run_dir / ".write-test"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"trainer.out_dir: cannot write to {run_dir} ({e.strerror})") from e
    need, free = bytes_per_checkpoint * (keep + 1), shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(
            f"trainer.out_dir: {run_dir} has {free / 2**20:.0f} MiB free; {keep + 1} checkpoints "
            f"(trainer.keep_checkpoints + 1 while saving) need about {need / 2**20:.0f} MiB"
        )
