"""Graceful preemption: SIGTERM or SIGINT finishes the current step, saves a checkpoint, and exits.

SLURM and Kubernetes send SIGTERM and, after a grace period, SIGKILL; people press Ctrl-C. The torchrun
agent forwards both to its workers (then waits `--shutdown-timeout`, 30 s by default, before SIGKILL).
The first signal only sets a flag; after each step every rank reports its flag in the step's one tiny
all-reduce, so all ranks stop after the same step, save a checkpoint and exit with 128 + the signal
(143 for SIGTERM, 130 for SIGINT). A second signal, a second or more after the first, exits at once with
the same code, saving nothing; one that follows within a second is the same request delivered twice (Ctrl-C
reaches the workers both from the terminal and forwarded by torchrun) and is ignored.

torchrun also sends SIGTERM when it tears a group down because one rank died; the others then cannot
finish their step (they wait in a collective for the dead rank). So the step must end within
`step_grace_s` of the signal (3x the slowest step so far, at least 5 s), or the process exits at once,
saving nothing, instead of waiting for torchrun's SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_S = 1.0  # a signal within this of the first is the same request


class Preempted(Exception):
    """The run stopped on a signal after saving its checkpoint at `step`."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} saved: "
            "run the same command to continue"
        )
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopFlag:
    """Set by the first SIGTERM/SIGINT; a second one (a second or more later) exits the process at once, and so
    does the first one if the step it arrived in does not end within `step_grace_s`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.step_grace_s = 5.0
        self._first = 0.0
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        self.step_finished()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if time.monotonic() - self._first < REPEAT_S:
                return
            os.write(2, f"second {signal.Signals(signum).name}: exiting now, nothing saved\n".encode())
            os._exit(128 + signum)
        self.signum, self._first = signum, time.monotonic()
        self._watchdog = threading.Timer(self.step_grace_s, self._give_up)
        self._watchdog.daemon = True
        self._watchdog.start()
        log.warning(
            "%s received: finishing this step, then saving a checkpoint and stopping (send it again to exit at once)",
            signal.Signals(signum).name,
        )

    def step_finished(self) -> None:
        """The step the signal arrived in is done: the save may take its time (its collectives have deadlines)."""
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _give_up(self) -> None:
        name = signal.Signals(self.signum).name
        os.write(
            2,
            f"{name}: the step did not finish within {self.step_grace_s:.0f} s (a peer is gone?): exiting "
            "now, nothing saved\n".encode(),
        )
        os._exit(128 + self.signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None
