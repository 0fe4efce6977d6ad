"""`trainer.profile_steps=A-B`: a torch.profiler trace of steps A to B, one file per rank.

`<run dir>/profile/rank<r>_steps_A-B.json` is a Chrome trace: open it in Perfetto (ui.perfetto.dev) or
chrome://tracing, or load the `profile/` directory in TensorBoard's profiler plugin.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    """Starts before step A, stops after step B (1-based, inclusive); does nothing without a window."""

    def __init__(self, window: str | None, run_dir: Path, rank: int, device: torch.device) -> None:
        self.first, _, last = (window or "0-0").partition("-")
        self.first, self.last = int(self.first), int(last or self.first)
        self.path = run_dir / "profile" / f"rank{rank}_steps_{self.first}-{self.last}.json"
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]
        self.profiler = profile(activities=activities) if window else None

    def before(self, step: int) -> None:
        """Called before (1-based) step `step`."""
        if self.profiler is not None and step == self.first:
            self.profiler.__enter__()

    def after(self, step: int) -> None:
        if self.profiler is not None and step == self.last:
            self.profiler.__exit__(None, None, None)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(self.path))
            self.profiler = None
