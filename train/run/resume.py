"""Which checkpoint a run starts from; a resume never continues another experiment.

the run dir has checkpoints   continue from its newest intact one (a restart, or the same command again);
                              refused if it was trained with another experiment config
trainer.resume=none           start fresh
trainer.resume=auto           the newest intact checkpoint of this experiment under trainer.out_dir, if any
trainer.resume=PATH           a warm start from that checkpoint or run dir, whatever its config (the
                              fields that differ are logged); the model shape must fit
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from train.checkpoints import checkpoint
from train.config import ConfigError
from train.run.identity import differences

log = logging.getLogger(__name__)


def _mismatch(path: Path, experiment: dict[str, Any]) -> str | None:
    """None if checkpoint `path` is of this experiment, else the fields that differ."""
    saved = checkpoint.read_meta(path).get("experiment")
    if saved is None:
        return "it records no experiment config (saved by an older version)"
    diff = differences(saved, experiment)
    return None if not diff else "another experiment: " + "; ".join(diff)


def resolve_resume(resume: str, run_dir: Path, out_dir: Path, experiment: dict[str, Any]) -> Path | None:
    """The checkpoint to start from (see the module docstring).

    Raises:
        ConfigError: checkpoints exist where asked but none is intact (each problem listed), or the run
            dir holds another experiment's checkpoints (the differing fields listed).
    """
    if checkpoint.checkpoint_dirs(run_dir):
        found, problems = checkpoint.latest_valid([run_dir])
        if found is None:
            raise ConfigError(f"no intact checkpoint left in {run_dir / 'checkpoints'}: " + "; ".join(problems))
        mismatch = _mismatch(found, experiment)
        if mismatch is not None and not mismatch.startswith("it records no"):
            raise ConfigError(
                f"{run_dir} holds {mismatch}: use another TP_RUN_ID or trainer.name, or "
                f"trainer.resume={found} to warm-start from it"
            )
        return found
    if resume == "none":
        return None
    if resume == "auto":
        runs = [d for d in out_dir.iterdir() if d.is_dir()] if out_dir.is_dir() else []
        found, _ = checkpoint.latest_valid(runs, accept=lambda c: _mismatch(c, experiment))
        if found is None:
            log.info(
                "trainer.resume = auto: no intact checkpoint of this experiment under %s; starting at step 0", out_dir
            )
        return found
    found, problems = checkpoint.find_intact(checkpoint.normalize_path(Path(resume).expanduser()))
    if found is None:
        raise ConfigError(
            f"trainer.resume = {resume!r} holds no intact checkpoint" + (": " + "; ".join(problems) if problems else "")
        )
    mismatch = _mismatch(found, experiment)
    if mismatch is not None:
        log.info("warm start from %s, which is %s", found, mismatch)
    return found
