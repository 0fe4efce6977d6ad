"""The parallel layout when `accelerate launch` sets it: accelerate's `parallelism_config`.

An accelerate config file with a `parallelism_config` (`parallelism_config_tp_size`, `..._cp_size`,
`..._dp_shard_size`, `..._dp_replicate_size`) makes `accelerate launch` export `PARALLELISM_CONFIG_*` and
`ACCELERATE_USE_PARALLELISM_CONFIG=true` (accelerate/utils/launch.py). The job reads them into `parallel.tp`,
`parallel.cp`, `parallel.dp_shard` and `parallel.dp_replicate` before the config is checked, so the run's config records
the layout it ran at; a `parallel.*` override that says otherwise is refused by name.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig
from torch import nn

from train.checkpoints.init_from import overridden_fields
from train.config import ConfigError

SIZES = {"tp": "TP_SIZE", "cp": "CP_SIZE", "dp_shard": "DP_SHARD_SIZE", "dp_replicate": "DP_REPLICATE_SIZE"}


def accelerate_layout() -> dict[str, int] | None:
    """`{tp, cp, dp_shard, dp_replicate}` from accelerate's parallelism config, or None without one."""
    if os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() != "true":
        return None
    return {name: int(os.environ.get(f"PARALLELISM_CONFIG_{key}", "1")) for name, key in SIZES.items()}


def apply_accelerate_layout(cfg: DictConfig, overrides: list[str]) -> None:
    """Put accelerate's layout into `cfg.parallel` (in place); nothing to do without one.

    Raises:
        ConfigError: an explicit `parallel.*` override contradicts it (named).
    """
    layout = accelerate_layout()
    if layout is None:
        return
    given = overridden_fields(overrides, "parallel")
    conflicts = [
        f"parallel.{name} = {cfg.parallel[name]} (accelerate's config: {value})"
        for name, value in layout.items()
        if name in given and cfg.parallel[name] not in (value, None)
    ]
    if conflicts:
        raise ConfigError(f"accelerate's parallelism_config sets the layout; drop {', '.join(conflicts)}")
    for name, value in layout.items():
        cfg.parallel[name] = value


def check_same_layout(mesh, world_size: int) -> None:
    """accelerate's device mesh (`dp_replicate, dp_shard, cp, sp, tp`, sizes-1 dimensions left out) must put the
    ranks where ours do, row-major in the same order: our TP and DP groups are then accelerate's, and its
    `torch_device_mesh` can be handed to code that expects it.

    Raises:
        ConfigError: it does not (a layout this job cannot honour, e.g. accelerate's sequence parallelism).
    """
    extra = [name for name in mesh.mesh_dim_names if name not in ("dp_replicate", "dp_shard", "cp", "tp")]
    if extra or mesh.mesh.flatten().tolist() != list(range(world_size)):
        raise ConfigError(
            f"accelerate's device mesh {mesh} is not a (dp_replicate, dp_shard, cp, tp) layout of ranks "
            f"0..{world_size - 1} in order{f' (it has {extra}: not supported)' if extra else ''}"
        )


def prepare(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, tp: int):
    """`accelerator.prepare` of what accelerate can take as it is: `(model, optimizer)`, prepared.

    With a parallelism config (accelerate's multi-GPU path) the model goes through too, its TP shards intact:
    in accelerate 1.16, `Accelerator.prepare_model` wraps nothing when the model's `tp_size` (read by
    `get_model_tp_size`) is the config's, and `Accelerator._prepare_tp` maps the optimizer to the same
    parameters (DTensors under our FSDP2; plain ones under DDP, which it skips with a warning). Without one,
    `prepare_model` would wrap the model in DDP over all ranks and destroy the TP shards, so only the
    optimizer goes through; on CPU accelerate never has one (`ParallelismConfig._validate_accelerator`
    refuses MULTI_CPU). A config with tp_size 1 is the same as none: `prepare_model` then takes its DDP
    branch. With mixed precision, `prepare_model` also runs the model's forward under autocast (every call,
    generation included) and casts its outputs to fp32 (`convert_outputs_to_fp32`). Sets `model.tp_size`.
    """
    config = accelerator.parallelism_config
    if config is None or not config.tp_enabled:
        return model, accelerator.prepare(optimizer)
    model.tp_size = tp  # what accelerate's get_model_tp_size reads
    return accelerator.prepare(model, optimizer)
