"""Which checkpoint a run starts from."""

from __future__ import annotations

from pathlib import Path

from train import checkpoint
from train.config import ConfigError


def resolve_resume(resume: str, run_dir: Path, out_dir: Path) -> Path | None:
    """The checkpoint to start from.

    A run dir that already has checkpoints always continues from its newest intact one (an elastic
    restart, or the same run id again). Otherwise `none` starts fresh, `auto` takes the newest
    intact checkpoint of any run under `out_dir`, and a path names a checkpoint (`step_N` or
    `step_0000000N`) or a run dir. Broken checkpoints are skipped with a warning.

    Raises:
        ConfigError: checkpoints exist where asked but none is intact (each problem listed).
    """
    if checkpoint.checkpoint_dirs(run_dir):
        found, problems = checkpoint.latest_valid([run_dir])
        if found is None:
            raise ConfigError(f"no intact checkpoint left in {run_dir / 'checkpoints'}: " + "; ".join(problems))
        return found
    if resume == "none":
        return None
    if resume == "auto":
        runs = [d for d in out_dir.iterdir() if d.is_dir()] if out_dir.is_dir() else []
        found, problems = checkpoint.latest_valid(runs)
        if found is None and problems:
            raise ConfigError(f"trainer.resume = auto: no intact checkpoint under {out_dir}: " + "; ".join(problems))
        return found
    path = checkpoint.normalize_path(Path(resume).expanduser())
    if (path / checkpoint.META).is_file():
        problem = checkpoint.verify(path)
        if problem:
            raise ConfigError(f"trainer.resume = {resume!r} is not a usable checkpoint: {problem}")
        return path
    found, problems = checkpoint.latest_valid([path])
    if found is None:
        raise ConfigError(
            f"trainer.resume = {resume!r} holds no intact checkpoint" + (": " + "; ".join(problems) if problems else "")
        )
    return found
