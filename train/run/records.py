"""The run record: everything needed to repeat a run, in `<run dir>/run.json` (written by rank 0 at start).

command        the exact command line (and the world size it ran at)
overrides      the Hydra overrides, and the Hydra group choices (model=tiny, ...)
config         the resolved config (run id included): every value, so a rerun does not depend on conf/
config_dirs    any extra --config-dir, copied into <run dir>/config_dirs/ with its yaml files
git            commit and dirty flag of the checkout the code ran from (when it is one)
versions       python, torch, accelerate, hydra-core, numpy and this package
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

PACKAGES = ("torch", "accelerate", "hydra-core", "omegaconf", "numpy", "tp-attention")
TRAIN_PACKAGE = Path(__file__).resolve().parents[1]  # train/, this file is train/run/records.py
CHECKOUT = TRAIN_PACKAGE.parent


def git_state(root: Path) -> dict[str, Any] | None:
    """`{"commit", "dirty"}` of the git checkout at `root`, or None when it is not one."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0 or not (root / ".git").exists():
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def command_line() -> list[str]:
    """How this process was started: `python -m train ...` for the module, else argv as it is (tp-train ...)."""
    if Path(sys.argv[0]).resolve() == TRAIN_PACKAGE / "__main__.py":
        return [sys.executable, "-m", "train", *sys.argv[1:]]
    return list(sys.argv)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_run_record(run_dir: Path, cfg: DictConfig, world_size: int) -> dict[str, Any]:
    """Write `run.json` (and copy extra config dirs); returns the record."""
    hydra_cfg = HydraConfig.get()
    config_dirs = []
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            target = run_dir / "config_dirs" / Path(source.path).name
            shutil.copytree(source.path, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.pyc"))
            config_dirs.append({"path": source.path, "copy": str(target)})
    record = {
        "command": command_line(),
        "world_size": world_size,
        "overrides": list(hydra_cfg.overrides.task),
        "choices": {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/")},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_dirs": config_dirs,
        "git": git_state(CHECKOUT),
        "versions": versions(),
    }
    (run_dir / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def add_to_run_record(run_dir: Path, **entries: Any) -> None:
    """Add top-level entries to `run.json` (what is known only once the model is built)."""
    path = run_dir / "run.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps(record | entries, indent=2, default=str) + "\n")


def overrides_for(config: dict[str, Any], prefix: str = "") -> list[str]:
    """Hydra overrides that set every leaf of a resolved config (`section.key=value`), quoted for Hydra."""
    out = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += overrides_for(value, f"{name}.")
        else:
            out.append(f"{name}={_hydra_value(value)}")
    return out


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"
