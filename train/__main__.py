"""`python -m train [overrides]` (also the `tp-train` console script); configs live in conf/."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from train.config import ConfigError, register

register()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from train.main import run

    try:
        run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
