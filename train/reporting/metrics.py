"""`metrics.jsonl` (one JSON object per logged step) and the tracker (TensorBoard), written by rank 0.

Each record is appended whole, in one `write` on a file opened for appending, so a crash leaves at most a
torn last line; reading skips a torn last line with a warning (a resume then rewrites the file without
it). A full disk while appending stops the run with a TrainingError instead of a traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from train.config import TrainingError

log = logging.getLogger(__name__)


class Metrics:
    """The run's metrics file and tracker; every method is a no-op unless `enabled` (rank 0)."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, enabled: bool) -> None:
        self.path, self.accelerator, self.enabled = run_dir / "metrics.jsonl", accelerator, enabled

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` as one line and send it to the tracker.

        Raises:
            TrainingError: the disk is full (or another write error): the file keeps whole lines only.
        """
        if not self.enabled:
            return
        line = (json.dumps(record) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
            finally:
                os.close(fd)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written")
        except OSError as e:
            raise _write_error(self.path, record["step"], e) from e
        try:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        except OSError as e:  # TensorBoard writes its events file right here
            raise _write_error(self.path.parent / "tensorboard", record["step"], e) from e

    def read(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    def continue_from(self, source_run: Path, step: int) -> None:
        """Keep the records up to `step`: the resumed run's own (a restart), or a copy of `source_run`'s."""
        if not self.enabled:
            return
        source = source_run / "metrics.jsonl"
        source = source if source.is_file() else self.path
        if source.is_file():
            lines = [json.dumps(r) for r in read_records(source) if r["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in lines))


def _write_error(path: Path, step: int, error: OSError) -> TrainingError:
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    return TrainingError(
        f"{'disk full while writing' if full else 'cannot write'} {path} at step {step} "
        f"({error.strerror or error}); the checkpoints written so far are intact"
    )


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file (none if it does not exist); a torn last line is skipped with a warning.

    Raises:
        ValueError: a line before the last is not JSON (the file was damaged, not torn by a crash).
    """
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
            log.warning("%s: ignoring a torn last line (a crash mid-write?): %r", path, line[:80])
    return records
