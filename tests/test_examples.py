"""The example scripts run and draw their pictures, in one process and under torchrun at tp=2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.parametrize(
    "script, ranks",
    [
        ("attention_heatmap.py", 1),
        pytest.param("attention_heatmap.py", 2, marks=pytest.mark.slow),  # tp=2: gpt_attention_maps' run
        pytest.param("gpt_attention_maps.py", 1, marks=pytest.mark.slow),
        ("gpt_attention_maps.py", 2),
    ],
)
def test_example_writes_a_png(script, ranks, tmp_path):
    out = tmp_path / "maps.png"
    launcher = (
        [sys.executable]
        if ranks == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [*launcher, str(ROOT / "examples" / script), "--out", str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
