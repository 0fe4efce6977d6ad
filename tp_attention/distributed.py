"""Process-group helpers: who is in the tensor-parallel group, how its collectives travel, and a
`(dp, tp)` mesh builder.

Every TP layer takes its group explicitly (`tp_group`): a `torch.distributed` process group, or a
`TPGroup` that also names the transport of its collectives (shared memory, see `tp_attention.shm`).
`None` means "no tensor parallelism": tp_size 1, rank 0, and no collective is ever issued, whether
or not a process group exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

if TYPE_CHECKING:
    from tp_attention.shm import SharedMemoryCollectives

ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True, eq=False)
class TPGroup:
    """A tensor-parallel process group and the transport of its collectives.

    With `shared_memory` set, all-reduces, all-gathers and reduce-scatters of CPU tensors that fit
    its buffer go through it; everything else goes through `group`. Build one with
    `tp_attention.shm.with_shared_memory(group)`.
    """

    group: ProcessGroup
    shared_memory: SharedMemoryCollectives | None = None


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


@dataclass(frozen=True)
class ParallelGroups:
    """The `(dp, tp)` device mesh and its two process groups.

    Ranks `[d * tp, (d + 1) * tp)` form one TP group (neighbours share a node first); ranks with
    the same TP rank form one DP group. `tp_group` is a TPGroup when its collectives go through
    shared memory.
    """

    mesh: DeviceMesh
    dp_group: ProcessGroup
    tp_group: ProcessGroup | TPGroup

    @property
    def dp_size(self) -> int:
        return self.mesh.size(0)

    @property
    def tp_size(self) -> int:
        return self.mesh.size(1)

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def tp_rank(self) -> int:
        return self.mesh.get_local_rank("tp")


def default_device_type() -> str:
    """`"cuda"` when this process can see a GPU, else `"cpu"`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _elastic_store(timeout: timedelta | None) -> dist.Store | None:
    """torchrun's store, its keys prefixed by the restart attempt; None outside torchrun.

    torchrun (2.13) keeps one store across restarts, so a restarted job would read the previous
    attempt's gloo addresses and fail with "Connection refused" about half the time.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout or timedelta(minutes=30),
    )
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_parallel_groups(
    tp: int, device_type: str | None = None, timeout_s: float | None = None, shared_memory: bool = False
) -> ParallelGroups:
    """Build the `(dp, tp)` mesh over all ranks (initialising the default process group if needed).

    The backend is gloo for `device_type="cpu"` and nccl for `"cuda"`. Reads the usual
    torchrun environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, ...) when it has to initialise.
    `shared_memory`: the TP group's collectives go through shared memory where its ranks share a
    CPU host (`tp_attention.shm.with_shared_memory`; a collective over the TP group).

    Raises:
        ValueError: `tp` is not positive or does not divide the world size.
    """
    device_type = device_type or default_device_type()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        store = _elastic_store(timeout)
        where = {}
        if store is not None:
            where = dict(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        dist.init_process_group(backend, timeout=timeout, **where)
    world = dist.get_world_size()
    if tp < 1 or world % tp != 0:
        raise ValueError(f"world_size = {world} must be a positive multiple of tp = {tp}")
    mesh = init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    tp_group = mesh.get_group("tp")
    if shared_memory:
        from tp_attention.shm import with_shared_memory

        tp_group = with_shared_memory(tp_group, timeout_s or 600.0)
    return ParallelGroups(mesh, mesh.get_group("dp"), tp_group)
