"""The benchmark runs end to end (one step per configuration) and writes its JSON and table.

Speed itself is never asserted here: the numbers live in bench/results and the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tp=2 needs two cores")
def test_quick_benchmark_writes_results(tmp_path):
    subprocess.run([sys.executable, "-m", "bench", "--quick", "--steps", "1", "--warmup", "0", "--rounds", "1",
                    "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "latest.json").read_text())
    variants = {(r["variant"], r["ranks"]) for r in result["rows"]}
    assert variants == {("plain", 1), ("ours", 1), ("ours", 2), ("ours_sp", 2), ("ours_gloo", 2), ("dtensor", 2)}
    rows = {(r["variant"], r["ranks"]): r for r in result["rows"]}
    per_step = 6 * 4 + 4  # 4 per layer + embedding, LM head, 2 for the loss
    assert rows[("ours_gloo", 2)]["collectives_per_step"] == {"allreduce": per_step}
    assert rows[("ours", 2)]["collectives_per_step"] == {"shm_all_reduce": per_step}
    assert set(rows[("ours_sp", 2)]["collectives_per_step"]) == {"shm_all_gather", "shm_reduce_scatter",
                                                                  "shm_all_reduce"}
    assert rows[("ours_sp", 2)]["activation_mib"] < rows[("ours", 2)]["activation_mib"]
    assert {r["ratio"] for r in result["ratios"]} == {"ours tp2 / dtensor tp2", "ours tp2 / ideal", "ours tp1 / plain",
                                                      "ours_gloo tp2 / dtensor tp2", "ours_gloo tp2 / ideal"}
    assert "| small | fp32 | ours | 2 x 1 |" in (tmp_path / "latest.md").read_text()
