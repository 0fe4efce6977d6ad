"""The README and docs/ say only what runs: every Python snippet runs as written, every link resolves."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [
    (page, i, code)
    for page in PAGES
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


@pytest.mark.parametrize("page,index,code", SNIPPETS, ids=[f"{p.name}-{i}" for p, i, _ in SNIPPETS])
def test_python_snippets_run_as_written(page, index, code, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, f"{page.name} snippet {index} failed:\n{done.stderr[-3000:]}"


def test_every_relative_link_points_to_a_file():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_the_readme_fits_on_a_few_screens():
    assert len((ROOT / "README.md").read_bytes()) <= 12_000
