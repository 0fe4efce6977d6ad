"""Fault injection for the reliability tests, driven by one environment variable.

    TP_FAULT="kind@step[:rank][,kind@step...]"     kinds: kill, hang, raise, slow, nan, crash_in_save, enospc_in_save

`step` is a completed-step count (or a range `a-b`); `rank` a global rank (default: every rank).
Faults fire only in the first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT unset or 0),
so a restarted job runs clean. `install(trainer)` wraps the trainer's methods where a fault is set;
with TP_FAULT unset it does nothing, and the training loop holds no fault code at all.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from functools import wraps
from typing import Any


def parse(spec: str) -> list[tuple[str, int, int, int | None]]:
    """`[(kind, first_step, last_step, rank or None)]` from a TP_FAULT value."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, where = item.partition("@")
        steps, _, rank = where.partition(":")
        first, _, last = steps.partition("-")
        faults.append((kind, int(first), int(last or first), int(rank) if rank else None))
    return faults


def install(trainer: Any) -> None:
    """Wrap `trainer.train_step` (kill, hang, raise, slow: 2 s, before the step), `trainer.loss` (nan) and
    `trainer.checkpointer.write` (enospc before writing, crash after) where TP_FAULT sets a fault."""
    spec = os.environ.get("TP_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    faults, rank = parse(spec), trainer.rank
    current = {"step": 0}  # the step being trained or saved (1-based)

    def active(kind: str) -> bool:
        return any(k == kind and lo <= current["step"] <= hi and r in (None, rank) for k, lo, hi, r in faults)

    def wrap(
        owner: Any, name: str, before: Callable[..., None] | None = None, after: Callable[[Any], Any] | None = None
    ) -> None:
        original = getattr(owner, name)

        @wraps(original)
        def wrapper(*args: Any) -> Any:
            if before:
                before(*args)
            result = original(*args)
            return after(result) if after else result

        setattr(owner, name, wrapper)

    def before_step(step: int) -> None:
        current["step"] = step + 1
        if active("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        if active("hang"):
            time.sleep(3600)
        if active("slow"):  # a long step, so that a test's signal surely arrives inside one
            time.sleep(2)
        if active("raise"):
            raise RuntimeError(f"injected failure at step {step + 1} on rank {rank}")

    def before_write(*_: Any) -> None:
        if active("enospc_in_save"):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def after_write(result: Any) -> Any:
        if active("crash_in_save"):  # every rank has written its shards; nothing is sealed yet
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    wrap(trainer, "train_step", before=before_step)
    wrap(trainer, "loss", after=lambda loss: loss * float("nan") if active("nan") else loss)
    wrap(trainer.checkpointer, "write", before=before_write, after=after_write)
