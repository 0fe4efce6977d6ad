"""`metrics.jsonl` (one JSON object per logged step) and the tracker (TensorBoard), written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator


class Metrics:
    """The run's metrics file and tracker; every method is a no-op unless `enabled` (rank 0)."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, enabled: bool) -> None:
        self.path, self.accelerator, self.enabled = run_dir / "metrics.jsonl", accelerator, enabled

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def read(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    def continue_from(self, source_run: Path, step: int) -> None:
        """Keep the records up to `step`: the resumed run's own (a restart), or a copy of `source_run`'s."""
        if not self.enabled:
            return
        source = source_run / "metrics.jsonl"
        source = source if source.is_file() else self.path
        if source.is_file():
            lines = [line for line in source.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in lines))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file (none if it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
