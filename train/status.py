"""`python -m train.status [overrides]`: the state of the run these overrides name, for scripts.

Prints one word, `none` (no such run yet), `running`, `complete`, `preempted` or `failed`, from the run
directory's status.json; `launch/slurm.sbatch` requeues the job on `preempted`. Set WORLD_SIZE to the
training job's (the run directory's name depends on the global batch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from train.config import CONF_DIR, register


def run_dir_for(overrides: list[str]) -> Path:
    """The run directory the training job would use with these overrides (and this WORLD_SIZE)."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        return Path(cfg.hydra.run.dir)


def main() -> None:
    status = run_dir_for(sys.argv[1:]) / "status.json"
    print(json.loads(status.read_text())["state"] if status.is_file() else "none")


if __name__ == "__main__":
    main()
