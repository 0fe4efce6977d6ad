"""One writer per run directory: an exclusive lock held by global rank 0 for the whole run.

`<run_dir>/.lock` is `flock`ed (released by the kernel when its holder dies, however it dies) and holds
`{"host", "pid", "since"}` of the holder. A second run on the same directory is refused with the holder
named; a lock file left by a dead holder is taken over with a warning. Across machines this relies on the
shared file system honouring `flock` (local file systems and NFSv4 do).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from train.config import ConfigError

LOCK = ".lock"


class RunLock:
    """Hold `run_dir`'s lock until `release()` or process exit."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.file = None

    def acquire(self) -> str | None:
        """Take the lock; returns the stale holder it took over from (described), if any.

        Raises:
            ConfigError: naming the holder, when another live process holds the lock.
        """
        file = self.path.open("a+")
        file.seek(0)
        holder = _parse(file.read())
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise ConfigError(
                f"run directory {self.path.parent} is in use by {_describe(holder)}; "
                "wait for it, stop it, or set TP_RUN_ID / trainer.name for another run"
            ) from None
        here = socket.gethostname()
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"host": here, "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        file.flush()
        self.file = file
        return _describe(holder) if holder else None  # the lock was free, but its holder never released it: dead

    def release(self) -> None:
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def _parse(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (no holder recorded)"
    return f"pid {holder['pid']} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"
