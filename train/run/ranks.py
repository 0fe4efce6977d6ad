"""Small collectives the job uses to keep every rank on the same branch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from train.config import ConfigError


def is_main_process() -> bool:
    """Global rank 0, or no process group at all."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (itself without a process group)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn` on rank 0 only and hand its result, or its ConfigError, to every rank."""
    result, error = None, None
    if is_main_process():
        try:
            result = fn(*args)
        except ConfigError as e:
            error = str(e)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise ConfigError(error)
    return result


def any_rank(*flags: torch.Tensor | bool) -> list[bool]:
    """For each flag, whether it is true on any rank: one tiny all-reduce for all of them, so that every
    rank takes the same branch. Tensor flags are 0-dim; the result is on the first tensor's device."""
    device = next((f.device for f in flags if isinstance(f, torch.Tensor)), torch.device("cpu"))
    packed = torch.stack([torch.as_tensor(f, device=device).to(torch.int32).reshape(()) for f in flags])
    if dist.is_initialized():
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return [bool(v) for v in packed.tolist()]
