"""`python -m train [overrides]` (also the `tp-train` console script); configs live in conf/
(installed: train/conf).

Exit codes: 0 done; 2 a config error (checked before Hydra starts the job where possible); 1 a
training error; 143 (SIGTERM) or 130 (SIGINT) stopped by that signal after saving a checkpoint (the
same command continues the run). Each of these prints one line, no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from train.config import CONF_DIR, ConfigError, TrainingError, register

register()


def precheck(overrides: list[str]) -> None:
    """Compose the config as Hydra will and check the output directory, so that a bad key, type or
    path fails in one line instead of a Hydra report. Raises ConfigError."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    except Exception as e:  # Hydra's and OmegaConf's errors: report their message and cause, not their trace
        messages = [str(e)] + ([str(e.__cause__)] if e.__cause__ else [])
        lines = [m.strip().splitlines()[0] for m in messages if m.strip()]
        raise ConfigError(": ".join(lines) or type(e).__name__) from None
    out = Path(cfg.trainer.out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"trainer.out_dir = {str(out)!r} cannot be created ({e.strerror})") from None


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from train.main import run
    from train.preemption import Preempted

    try:
        run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"training error: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before training started (during it, it saves and stops: Preempted)
        print("interrupted before training started: nothing saved", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):  # plain overrides; flags (--multirun, --cfg ...) go to Hydra
        try:
            precheck(args)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
