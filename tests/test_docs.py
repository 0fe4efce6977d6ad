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


COMMAND_MODULES = sorted(
    path.stem
    for path in (ROOT / "train").glob("*.py")
    if "def main(" in path.read_text() and path.stem not in ("__main__", "main")
)


def test_help_names_every_command_and_each_has_a_script():
    from train.help import USAGE

    assert len(COMMAND_MODULES) >= 8
    assert sorted(re.findall(r"python -m train\.(\w+) ", USAGE)) == COMMAND_MODULES
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', section, flags=re.M))
    assert scripts == {"tp-train": "train.__main__:main"} | {
        f"tp-{c.replace('_', '-')}": f"train.{c}:main" for c in COMMAND_MODULES
    }
    readme = (ROOT / "README.md").read_text()
    assert all(c in readme for c in COMMAND_MODULES)


def test_the_docs_list_every_model_preset():
    presets = sorted(path.stem for path in (ROOT / "conf" / "model").glob("*.yaml"))
    listed = re.search(r"`model=([\w|]+)`", (ROOT / "docs" / "training.md").read_text()).group(1)
    assert sorted(listed.split("|")) == presets


def test_the_attention_reference_names_every_argument():
    import inspect

    from tp_attention import MultiHeadAttention

    page = (ROOT / "docs" / "attention.md").read_text()
    for method, shown in (
        (MultiHeadAttention.__init__, "MultiHeadAttention("),
        (MultiHeadAttention.forward, "forward("),
    ):
        signature = page[page.index(f"`{shown}") : page.index(")`", page.index(f"`{shown}"))]
        names = [n for n in inspect.signature(method).parameters if n != "self"]
        assert [n for n in names if not re.search(rf"\b{n}\b", signature)] == [], shown
