"""What gets installed: a lean library, and a wheel that trains from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import ROOT

TRAINING_DEPENDENCIES = {"matplotlib", "hydra", "omegaconf", "accelerate", "tqdm", "tokenizers", "tensorboard"}

IMPORT_EVERY_MODULE = f"""
import importlib, importlib.abc, importlib.util, pkgutil, sys
BLOCKED = {sorted(TRAINING_DEPENDENCIES)!r}

class Refuse(importlib.abc.Loader):  # found but unusable: an import of it raises, a probe for it does not
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError(module.__name__ + " is a training dependency")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, Refuse()) if name.split(".")[0] in BLOCKED else None

sys.meta_path.insert(0, Block())
import tp_attention
names = [m.name for m in pkgutil.iter_modules(tp_attention.__path__)]
for name in names:
    importlib.import_module("tp_attention." + name)
print(len(names), sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_the_library_imports_no_training_dependency(tmp_path):
    """Every tp_attention module imports with the training packages made unimportable (torch.hub's own
    optional `import tqdm` fails quietly, as where tqdm is not installed)."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_MODULE],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    count, imported = done.stdout.split(" ", 1)
    assert int(count) >= 10 and imported.strip() == "[]"


def test_a_wheel_ships_the_configs_and_tp_train_runs_from_any_directory(tmp_path):
    source = tmp_path / "source"  # a copy, so that setuptools' build/ lands there, not in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "build", "__pycache__"))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip_wheel, "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300
    )
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"train/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)

    target = tmp_path / "installed"  # a plain (non-editable) install, first on the path
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(
        os.environ,
        PYTHONPATH=str(target),
        TP_RUN_ID="from-wheel",
        OMP_NUM_THREADS="1",
        TP_ATTENTION_CACHE=str(tmp_path / "cache"),
    )
    where = subprocess.run(
        [sys.executable, "-c", "import train.config as c; print(c.__file__, c.CONF_DIR)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.split() == [str(target / "train" / "config.py"), str(target / "train" / "conf")]
    run = subprocess.run(
        [
            str(target / "bin" / "tp-train"),
            "model=tiny",
            "trainer.max_steps=5",
            "trainer.progress=false",
            "trainer.sample_tokens=4",
            "data.max_bytes=200000",
            "trainer.out_dir=out",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (elsewhere / "out" / "from-wheel" / "export" / "model.safetensors").is_file()
    assert Path(elsewhere / "out" / "from-wheel" / "metrics.jsonl").read_text().count("\n") == 1  # step 5
