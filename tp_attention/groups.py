"""Who is in a tensor-parallel group, and how its collectives travel.

Every TP layer takes its group explicitly (`tp_group`): a `torch.distributed` process group, or a
`TPGroup` that also carries a transport of its own for its collectives (shared memory:
`tp_attention.shm.with_shared_memory`). `None` means "no tensor parallelism": tp_size 1, rank 0, and
no collective is ever issued, whether or not a process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


class Transport(Protocol):
    """A group's own way to run collectives on the tensors that `fits` accepts (the rest go through the
    process group). `name` identifies it to the compiled custom ops (`tp_attention.mappings`), which
    cannot take Python objects. `tp_attention.shm.SharedMemoryCollectives` is the one we have."""

    name: str

    def fits(self, tensor: torch.Tensor) -> bool: ...

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = ...) -> torch.Tensor: ...

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor: ...

    def reduce_scatter(self, tensor: torch.Tensor, dim: int) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class TPGroup:
    """A tensor-parallel process group and the transport of its collectives.

    With `shared_memory` set, all-reduces, all-gathers and reduce-scatters of CPU tensors that fit
    its buffer go through it; everything else goes through `group`. Build one with
    `tp_attention.shm.with_shared_memory(group)`.
    """

    group: ProcessGroup
    shared_memory: Transport | None = None


Group = ProcessGroup | TPGroup | None


def process_group(group: Group) -> ProcessGroup | None:
    """The `torch.distributed` process group behind `group`."""
    return group.group if isinstance(group, TPGroup) else group


def tp_size(group: Group) -> int:
    """Number of ranks in `group`; 1 for `None`."""
    return 1 if group is None else dist.get_world_size(process_group(group))


def tp_rank(group: Group) -> int:
    """This process's rank inside `group`; 0 for `None`."""
    return 0 if group is None else dist.get_rank(process_group(group))


def check_group(group: object, name: str = "tp_group") -> Group:
    """`group` if it is a process group, a TPGroup or None; else a TypeError naming what it is."""
    if group is not None and not isinstance(group, ProcessGroup | TPGroup):
        raise TypeError(
            f"{name} must be a torch.distributed ProcessGroup, a TPGroup or None, got {type(group).__name__} {group!r}"
        )
    return group
