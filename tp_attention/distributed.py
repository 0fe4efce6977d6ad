"""The `(dp, tp)` device mesh over all ranks and its process groups, and the context-parallel groups inside
dp (initialising torch.distributed under torchrun). What a group is, and how its collectives travel, is
`tp_attention.groups`; a TP group whose collectives go through shared memory is made from this one by
`tp_attention.shm.with_shared_memory`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tp_attention.context import cp_rank, cp_size
from tp_attention.groups import ProcessGroup, TPGroup


@dataclass(frozen=True)
class ParallelGroups:
    """The `(dp, tp)` device mesh, its two process groups, and the CP groups within dp.

    Ranks `[d * tp, (d + 1) * tp)` form one TP group (neighbours share a node first); ranks with
    the same TP rank form one DP group: every rank that holds the same TP shard of the parameters, so
    gradients and losses are averaged over it. `tp_group` is a TPGroup when its collectives go through
    shared memory (`tp_attention.shm.with_shared_memory_groups`).

    With context parallelism (cp > 1) the dp ranks are `batch_ranks x cp` (the mesh `(batch, cp, tp)`,
    accelerate's and torchtitan's order): `cp` consecutive DP ranks hold pieces of the same sequences
    (`cp_group`), and there are `batch_ranks` distinct batches.
    """

    mesh: DeviceMesh
    dp_group: ProcessGroup
    tp_group: ProcessGroup | TPGroup
    cp_group: ProcessGroup | None = None
    pp_group: ProcessGroup | None = None
    embedding_group: ProcessGroup | None = None  # the first and last stage at this (dp, tp) position

    @property
    def pp_size(self) -> int:
        return 1 if self.pp_group is None else dist.get_world_size(self.pp_group)

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return 0 if self.pp_group is None else dist.get_rank(self.pp_group)

    @property
    def dp_size(self) -> int:
        """Ranks holding the same TP shard: data-parallel ranks x cp."""
        return self.mesh.size(0)

    @property
    def cp_size(self) -> int:
        return cp_size(self.cp_group)

    @property
    def cp_rank(self) -> int:
        return cp_rank(self.cp_group)

    @property
    def batch_ranks(self) -> int:
        """Ranks that see different batches: `dp_size / cp`."""
        return self.dp_size // self.cp_size

    @property
    def batch_rank(self) -> int:
        """Which of those this rank is (its CP group's index)."""
        return self.dp_rank // self.cp_size

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
    tp: int, device_type: str | None = None, timeout_s: float | None = None, cp: int = 1, pp: int = 1
) -> ParallelGroups:
    """Build the `(dp, tp)` mesh over all ranks (initialising the default process group if needed), and with
    `cp > 1` the context-parallel groups: ranks `(b * cp + c) * tp + t` for `c < cp` form one. With `pp > 1`
    the world is `(pp, dp, tp)`, stages outermost (torchtitan's order: a stage's ranks are neighbours): `mesh`
    is this stage's `(dp, tp)`, `pp_group` the ranks at this position on every stage.

    The backend is gloo for `device_type="cpu"` and nccl for `"cuda"`. Reads the usual
    torchrun environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, ...) when it has to initialise.

    Raises:
        ValueError: `pp`, `tp` or `cp` is not positive, or `pp x tp x cp` does not divide the world size.
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
    if tp < 1 or cp < 1 or pp < 1 or world % (pp * tp * cp) != 0:
        axes = [(name, size) for name, size in (("pp", pp), ("tp", tp), ("cp", cp)) if name == "tp" or size != 1]
        sizes = f"{' x '.join(n for n, _ in axes)} = {' x '.join(str(s) for _, s in axes)}"
        raise ValueError(f"world_size = {world} must be a positive multiple of {sizes}")
    stage = world // pp  # ranks per pipeline stage
    if pp == 1:
        mesh = init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
        pp_group = embedding_group = None
    else:
        layout = init_device_mesh(device_type, (pp, stage // tp, tp), mesh_dim_names=("pp", "dp", "tp"))
        mesh, pp_group = layout["dp", "tp"], layout.get_group("pp")
        embedding_group = pp_group if pp == 2 else _first_and_last_stages(pp, stage)
    cp_group = None
    if cp > 1:
        shape, names = (pp, stage // (tp * cp), cp, tp), ("pp", "batch", "cp", "tp")
        cp_group = init_device_mesh(device_type, shape, mesh_dim_names=names).get_group("cp")
    return ParallelGroups(mesh, mesh.get_group("dp"), mesh.get_group("tp"), cp_group, pp_group, embedding_group)


def _first_and_last_stages(pp: int, stage: int) -> ProcessGroup:
    """This rank's group of two: the same position on the first and on the last of `pp` stages of `stage`
    ranks each (every rank builds every group, in the same order, as `new_group` asks)."""
    mine = None
    for position in range(stage):
        group = dist.new_group([position, (pp - 1) * stage + position])
        if dist.get_rank() % stage == position:
            mine = group
    return mine
