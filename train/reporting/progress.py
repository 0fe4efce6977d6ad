"""How a run shows its progress: a bar on a terminal, plain lines in a file.

On a terminal (stderr is a TTY) tqdm's bar, as always. Redirected to a file (every cluster job) the bar
would write a carriage-return line per update; there, every `trainer.log_interval` steps, one plain line
goes to stdout instead: step, loss, lr, tokens/s, MFU and ETA. The same line always goes to the rank-0 log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm import tqdm

log = logging.getLogger("train.progress")


def _eta(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Rank 0's view of the run's progress (`enabled` False elsewhere: everything is a no-op)."""

    def __init__(self, total: int, initial: int, tokens_per_step: int, enabled: bool, show: bool) -> None:
        self.total, self.tokens_per_step, self.enabled = total, tokens_per_step, enabled
        self.interactive = show and sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=min(initial, total),
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (enabled and self.interactive),
        )

    def update(self) -> None:
        self.bar.update(1)

    def report(self, record: dict[str, Any]) -> None:
        """The line of a metrics record: on the bar (a terminal) or as a line of its own (a file)."""
        if not self.enabled or record.get("loss") is None:
            return
        mfu = "noisy" if record["mfu"] is None else f"{record['mfu']:.1%}"
        eta = (self.total - record["step"]) * self.tokens_per_step / record["tokens_per_s"]
        line = (
            f"step {record['step']}/{self.total} | loss {record['loss']:.4f} | lr {record['lr']:.3g} | "
            f"{record['tokens_per_s']:,.0f} tok/s | MFU {mfu} | ETA {_eta(eta)}"
        )
        if self.interactive:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", mfu=mfu)
        log.info(line, extra={"progress": True})

    def close(self) -> None:
        self.bar.close()
