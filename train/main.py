"""The training job: data x tensor parallel GPT training with accelerate, configured by Hydra.

    python -m train [overrides]                                  one process (CPU or one GPU)
    torchrun --nproc_per_node 4 -m train parallel.tp=2            dp=2 x tp=2

`run(cfg)` is the whole job: check the config, set up (`train.trainer.Trainer`), train, finish.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from train.checkpoints.init_from import apply_init_from
from train.config import TrainConfig, TrainingError, validate
from train.run.directory import write_status
from train.run.layout import apply_accelerate_layout
from train.run.phases import phase
from train.run.preemption import Preempted
from train.trainer import Trainer


def prepare(cfg: DictConfig, world_size: int) -> TrainConfig:
    """The job's typed config: accelerate's layout and `model.init_from`'s shape read into `cfg` (in place), then
    every rule checked for `world_size` ranks (also what `train.dry_run` plays).

    Raises:
        ConfigError: naming the bad value and the rule.
    """
    overrides = list(HydraConfig.get().overrides.task)
    apply_accelerate_layout(cfg, overrides)
    apply_init_from(cfg, overrides)
    conf: TrainConfig = OmegaConf.to_object(cfg)
    validate(conf, world_size)
    return conf


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; returns a summary (final losses and where the outputs are).

    Raises:
        ConfigError: an invalid configuration, data or checkpoint (before training where possible).
        TrainingError: a collective timed out (naming the timeout and what was running), too many bad
            steps in a row, a full disk.
        Preempted: SIGTERM or SIGINT; the checkpoint of the last step was saved first.
    """
    conf = prepare(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    timeout_s = conf.parallel.timeout_s
    trainer = None
    try:
        with phase("start-up", timeout_s):
            trainer = Trainer(conf, cfg, Path(HydraConfig.get().runtime.output_dir))
        if conf.trainer.eval_only:
            return trainer.evaluate_only()
        trainer.train()
        with phase("export and sampling", timeout_s):
            return trainer.finish()
    except (Preempted, TrainingError) as e:
        if trainer is not None and trainer.is_main:
            state = "preempted" if isinstance(e, Preempted) else "failed"
            write_status(trainer.run_dir, state, trainer.step, message=str(e))
        raise
    finally:
        if trainer is not None:
            trainer.close()
