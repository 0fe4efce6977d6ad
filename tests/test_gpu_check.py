"""The GPU check (bench/gpu_check.sh) cannot rot: its dry run, every stage on the CPU with tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.gpu import dense_bf16_peak
from tests.helpers import ROOT


@pytest.mark.slow  # two minutes on 2 cores: --runslow (before an issue is resolved) keeps it from rotting
def test_the_dry_run_passes_every_stage_and_writes_its_report(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, TP_ATTENTION_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(
        [str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    result = json.loads((tmp_path / "gpu.json").read_text())
    stages = result["stages"]
    assert done.returncode == 0, {k: v.get("error") for k, v in stages.items()}
    assert [s["status"] for s in stages.values()] == ["passed"] * 5, stages
    assert "passed" in stages["tests"]["summary"] and "skipped" not in stages["tests"]["summary"]
    assert stages["train"]["eager"]["tokens_per_s"] > 0 and stages["train"]["compiled"]["steps"] == 4
    for mode in ("eager", "compiled"):
        assert stages["step"][mode]["ours_over_plain_step_time"] > 0
        assert stages["step"][mode]["ours"]["mfu"] is None, "no bf16 peak for a CPU: no MFU"
    variants = {(r["variant"], r["ranks"]) for r in stages["cpu_bench"]["rows"]}
    assert variants == {("plain", 1), ("ours", 1), ("ours", 2), ("ours_sp", 2), ("ours_gloo", 2), ("dtensor", 2)}
    report = (tmp_path / "gpu.md").read_text()
    assert "## step: passed" in report and "ours / plain step time" in report


def test_the_mfu_peak_is_the_data_sheet_s_dense_bf16():
    assert dense_bf16_peak("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989e12)
    assert dense_bf16_peak("NVIDIA H100 PCIe") == ("H100 PCIe", 756e12)
    assert dense_bf16_peak("NVIDIA H200") == ("H200", 989e12)
    assert dense_bf16_peak("NVIDIA GeForce RTX 4090") is None
