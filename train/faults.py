"""Fault injection for the reliability tests, driven by one environment variable.

    TP_FAULT="kind@step[:rank][,kind@step...]"     kinds: kill, hang, raise, nan, crash_in_save, enospc_in_save

`step` is a completed-step count (or a range `a-b`); `rank` a global rank (default: every rank).
Faults fire only in the first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT unset or 0),
so a restarted job runs clean. Unset in normal runs: every check is one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time


def _parse(spec: str) -> list[tuple[str, int, int, int | None]]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, where = item.partition("@")
        steps, _, rank = where.partition(":")
        first, _, last = steps.partition("-")
        faults.append((kind, int(first), int(last or first), int(rank) if rank else None))
    return faults


def active(kind: str, step: int, rank: int) -> bool:
    """Whether fault `kind` is set for this step and rank in this attempt."""
    spec = os.environ.get("TP_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    return any(k == kind and lo <= step <= hi and r in (None, rank) for k, lo, hi, r in _parse(spec))


def inject(kind: str, step: int, rank: int) -> None:
    """Act out `kill`, `hang`, `raise`, `crash_in_save` or `enospc_in_save` if it is set here."""
    if not active(kind, step, rank):
        return
    if kind in ("kill", "crash_in_save"):
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        time.sleep(3600)
    if kind == "raise":
        raise RuntimeError(f"injected failure at step {step} on rank {rank}")
    if kind == "enospc_in_save":
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
