"""`metrics.jsonl` (one JSON object per logged step) and the tracker (TensorBoard), written by rank 0.

Each record is appended whole, in one `write` on a file opened for appending; a write that fails part-way (a
full disk) is rolled back, so the file holds whole records only, and the run stops with a TrainingError
instead of a traceback. A crash mid-write (SIGKILL) can still leave a torn line, and a file written by older
versions can hold one anywhere; reading skips torn lines with one warning naming them, keeps every whole
record (also one glued to a torn line's end), and a resume rewrites the file without them.
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
                whole = os.fstat(fd).st_size
                try:
                    written = os.write(fd, line)
                except OSError:
                    os.ftruncate(fd, whole)  # a part of the record may have reached the file
                    raise
                if written != len(line):
                    os.ftruncate(fd, whole)  # roll back the part: only whole records, never a torn one
                    raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written")
            finally:
                os.close(fd)
        except OSError as e:
            raise _write_error(self.path, record["step"], e) from e
        try:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        except OSError as e:  # TensorBoard writes its events file right here
            raise _write_error(self.path.parent / "tensorboard", record["step"], e) from e

    def read(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    def continue_from(self, source_run: Path, step: int) -> None:
        """Keep the whole records up to `step`: the resumed run's own (a restart), or a copy of `source_run`'s;
        none at step 0 (a run that starts over).

        Raises:
            TrainingError: the file cannot be rewritten (a full disk).
        """
        if not self.enabled:
            return
        source = source_run / "metrics.jsonl"
        source = source if source.is_file() else self.path
        if source.is_file():
            lines = [json.dumps(r) for r in read_records(source) if r["step"] <= step]
            try:
                self.path.write_text("".join(line + "\n" for line in lines))
            except OSError as e:
                raise _write_error(self.path, step, e) from e


def _write_error(path: Path, step: int, error: OSError) -> TrainingError:
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    return TrainingError(
        f"{'disk full while writing' if full else 'cannot write'} {path} at step {step} "
        f"({error.strerror or error}); the checkpoints written so far are intact"
    )


def read_records(path: Path) -> list[dict[str, Any]]:
    """The whole records of a metrics file (none if it does not exist), in file order.

    A line that is not one JSON record (torn by a crash or a full disk) is skipped, and one warning names
    every such line; a whole record glued to a torn one's end (a writer appended after it) is kept.
    """
    if not path.is_file():
        return []
    records, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            torn.append(number)
            record = _glued_record(line)
        if record is not None:
            records.append(record)
    if torn:
        lines = ", ".join(map(str, torn))
        log.warning("%s: skipped torn records on line(s) %s (a crash or a full disk mid-write)", path, lines)
    return records


def _parse(text: str) -> dict[str, Any] | None:
    """`text` as a record (a JSON object with a step), or None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "step" in value else None


def _glued_record(line: str) -> dict[str, Any] | None:
    """The whole record a writer appended after a torn one on the same line, if there is one."""
    start = line.rfind('{"step"')
    return _parse(line[start:]) if start > 0 else None
