"""The divergence guard: bad steps are skipped, and only healthy states become known-good checkpoints.

A step is *bad* when its loss or gradients are not finite on some rank, or when its loss is more than
`trainer.spike_factor` times the median loss of the last 50 applied steps, or, before there are 10 of
those, times ln(vocab_size), a model's loss when it guesses uniformly (a divergence that has not reached
NaN yet: in the default run the largest loss over the median of the 50 before it is 1.2x). A bad step's
update is skipped on every rank; `trainer.max_bad_steps` of them in a row stop the run. The recent
losses travel in every checkpoint, so a resumed run judges spikes from its first step.

The loss of step N+1 is the first evidence about the weights step N produced, so a checkpoint saved
after step N is *known good* only once step N+1 came back healthy. No checkpoint is written during a
streak of bad steps, the newest known-good one is recorded in `checkpoints/good.json` and is never
rotated away, and the stop message names it.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from pathlib import Path

from train.config import TrainingError

log = logging.getLogger(__name__)
HISTORY = 50  # applied steps the median is taken over
MIN_HISTORY = 10  # no spike is called before this many


class DivergenceGuard:
    """Tracks bad steps and which checkpoint is known good."""

    def __init__(self, max_bad_steps: int, spike_factor: float, vocab_size: int) -> None:
        self.max_bad_steps, self.spike_factor, self.uniform_loss = max_bad_steps, spike_factor, math.log(vocab_size)
        self.skipped = self.streak = 0
        self.losses: deque[float] = deque(maxlen=HISTORY)
        self.good: Path | None = None  # the newest checkpoint known good
        self.pending: Path | None = None  # saved (or resumed from), waiting for a healthy step to confirm it

    def spike_limit(self) -> float:
        """The loss above which this step is a spike (infinity when spike detection is off)."""
        if self.spike_factor <= 0:
            return float("inf")
        reference = statistics.median(self.losses) if len(self.losses) >= MIN_HISTORY else self.uniform_loss
        return self.spike_factor * reference

    def healthy(self) -> bool:
        """Whether a checkpoint may be written now: no bad streak in progress."""
        return self.streak == 0

    def record(self, done: int, loss: float, reason: str | None) -> Path | None:
        """Account for step `done` (`reason`: why it was bad, None if its update was applied); returns the
        checkpoint this step confirmed as good, if any.

        Raises:
            TrainingError: `max_bad_steps` bad steps in a row, naming the known-good checkpoint.
        """
        if reason is None:
            self.streak = 0
            self.losses.append(loss)
            confirmed, self.pending = self.pending, None
            if confirmed is not None:
                self.good = confirmed
            return confirmed
        self.skipped, self.streak, self.pending = self.skipped + 1, self.streak + 1, None
        log.warning("step %d: %s, update skipped (%d in a row)", done, reason, self.streak)
        if self.streak >= self.max_bad_steps:
            raise TrainingError(
                f"{self.streak} consecutive bad steps (last: {reason}; trainer.max_bad_steps = {self.max_bad_steps}), "
                f"stopped at step {done}; {self.good_description()}"
            )
        return None

    def good_description(self) -> str:
        if self.good is None:
            return "no checkpoint is known good: start again (with a lower optim.lr)"
        return f"the last good checkpoint is {self.good}: resume from it (trainer.resume=...) with a lower optim.lr"
