"""Every axis of a layout in one object (`ParallelDims`: pp, dp_replicate, dp_shard, cp, tp, checked against the
world size) and what it builds once: the device meshes and process groups of `ParallelGroups` (initialising
torch.distributed under torchrun). What a group is, and how its collectives travel, is
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
from tp_attention.shapes import check_int


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
    fsdp_mesh: DeviceMesh | None = None  # FSDP2's (dp_replicate, dp_shard x cp), when dp_shard > 1
    dims: ParallelDims | None = None  # the sizes these were built from

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


@dataclass(frozen=True)
class ParallelDims:
    """The size of every axis, checked once against the world size (torchtitan's `ParallelDims`): the world is
    `pp x dp_replicate x dp_shard x cp x tp` ranks, stages outermost and TP innermost, `dp = dp_replicate x
    dp_shard` distinct batches, each sequence split over cp ranks. `dp_replicate=None`: what the others leave.
    `build` makes every device mesh and process group of the layout, once (`ParallelGroups`).

    Raises:
        ValueError: a size that is not a positive integer, model-parallel sizes that do not divide the world,
            or a dp that is not dp_replicate x dp_shard; naming the sizes and the world size (each name after
            `prefix`, e.g. "parallel.").
    """

    world_size: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp_shard: int = 1
    dp_replicate: int | None = None
    prefix: str = ""

    def __post_init__(self) -> None:
        for axis in ("tp", "cp", "pp", "dp_shard", "dp_replicate"):
            if getattr(self, axis) is not None:
                check_int(getattr(self, axis), self.prefix + axis)
        names, sizes = self.model_parallel_names()
        if self.world_size % self.model_parallel_size != 0:
            raise ValueError(f"world_size = {self.world_size} must be divisible by {names} = {sizes}")
        dp = self.world_size // self.model_parallel_size
        ranks = f"{self.dp_formula} = {self.world_size} / {self.model_parallel_size} = {dp}"
        if dp % self.dp_shard != 0:
            raise ValueError(f"{self.prefix}dp_shard = {self.dp_shard} must divide dp = {ranks}")
        replicate = self.dp_replicate or dp // self.dp_shard
        if replicate * self.dp_shard != dp:
            raise ValueError(
                f"{self.prefix}dp_replicate x {self.prefix}dp_shard = {replicate} x {self.dp_shard} must equal dp = "
                f"{ranks}"
            )
        object.__setattr__(self, "dp_replicate", replicate)

    def model_parallel_names(self) -> tuple[str, str]:
        """How one model replica's ranks are named in messages: `("tp", "2")`, or e.g. `("pp x tp x cp",
        "2 x 2 x 4")` (each name after `prefix`)."""
        axes = [(a, getattr(self, a)) for a in ("pp", "tp", "cp") if a == "tp" or getattr(self, a) > 1]
        return " x ".join(self.prefix + a for a, _ in axes), " x ".join(str(size) for _, size in axes)

    @property
    def dp_formula(self) -> str:
        """What dp is, for messages: `world_size / tp`, or e.g. `world_size / (pp x tp)`."""
        names = self.model_parallel_names()[0]
        return f"world_size / {names if ' x ' not in names else f'({names})'}"

    @property
    def model_parallel_size(self) -> int:
        """Ranks of one model replica: pp x tp x cp."""
        return self.pp * self.tp * self.cp

    @property
    def dp(self) -> int:
        """Ranks that see different batches: dp_replicate x dp_shard."""
        return self.world_size // self.model_parallel_size

    @property
    def fsdp_shards(self) -> int:
        """How many pieces FSDP2 splits each parameter into: dp_shard x cp (torchtitan's dp_shard_cp), or 1."""
        return self.dp_shard * self.cp if self.dp_shard > 1 else 1

    def distinct_ranks(self) -> list[int]:
        """One rank of every position whose pieces can differ in size: each pipeline stage, its first and last TP
        rank (a padded vocabulary's last rows), its first and last FSDP2 shard (FSDP2 pads the last; it shards
        over dp_shard x cp, so CP ranks hold different shards). Without FSDP2, CP ranks and replicas hold what
        the first of them holds. Ranks are laid out `(pp, dp_replicate, dp_shard x cp, tp)`, as `build` does."""
        shards = self.fsdp_shards
        grid = torch.arange(self.world_size).reshape(self.pp, -1, shards, self.tp)
        picked = {int(grid[s, 0, d, t]) for s in range(self.pp) for d in {0, shards - 1} for t in {0, self.tp - 1}}
        return sorted(picked)

    def build(self, device_type: str) -> ParallelGroups:
        """Every mesh and group of this layout: a collective (every rank calls it, the process group up).

        The stage's `(dp, tp)` mesh (dp = batches x cp) with its DP and TP groups; the CP groups
        (`(pp, batch, cp, tp)`); the pipeline groups (`(pp, dp, tp)`) and the pairs of first and last stage
        that share a tied table; FSDP2's `(dp_replicate, dp_shard x cp)` mesh when dp_shard > 1."""
        stage, tp, cp, pp = self.world_size // self.pp, self.tp, self.cp, self.pp
        if pp == 1:
            mesh = init_device_mesh(device_type, (stage // tp, tp), mesh_dim_names=("dp", "tp"))
            pp_group = embedding_group = None
        else:
            layout = init_device_mesh(device_type, (pp, stage // tp, tp), mesh_dim_names=("pp", "dp", "tp"))
            mesh, pp_group = layout["dp", "tp"], layout.get_group("pp")
            embedding_group = pp_group if pp == 2 else _first_and_last_stages(pp, stage)
        cp_group = None
        if cp > 1:
            shape, names = (pp, stage // (tp * cp), cp, tp), ("pp", "batch", "cp", "tp")
            cp_group = init_device_mesh(device_type, shape, mesh_dim_names=names).get_group("cp")
        fsdp_mesh = None
        if self.dp_shard > 1:  # FSDP2 shards over dp_shard x cp together (torchtitan's dp_shard_cp)
            fsdp_mesh = data_parallel_mesh(device_type, self.dp_replicate, self.dp_shard * cp, tp, pp)
        groups = (mesh.get_group("dp"), mesh.get_group("tp"), cp_group, pp_group, embedding_group)
        return ParallelGroups(mesh, *groups, fsdp_mesh=fsdp_mesh, dims=self)


def init_process_group(device_type: str, timeout_s: float | None = None) -> None:
    """The default process group, under torchrun's environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, ...), if
    it is not up yet: gloo for `device_type="cpu"`, nccl for `"cuda"`."""
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store = _elastic_store(timeout)
    where = {}
    if store is not None:
        where = dict(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend, timeout=timeout, **where)


def init_parallel_groups(
    tp: int,
    device_type: str | None = None,
    timeout_s: float | None = None,
    cp: int = 1,
    pp: int = 1,
    dp_shard: int = 1,
    dp_replicate: int | None = None,
) -> ParallelGroups:
    """`ParallelDims(world_size, tp, cp, pp, dp_shard, dp_replicate).build(...)` over all ranks, initialising
    the default process group if needed: ranks `(b * cp + c) * tp + t` for `c < cp` form one CP group, and with
    `pp > 1` the world is `(pp, dp, tp)`, stages outermost (a stage's ranks are neighbours).

    Raises:
        ValueError: sizes that do not fit the world size (`ParallelDims`).
    """
    device_type = device_type or default_device_type()
    init_process_group(device_type, timeout_s)
    dims = ParallelDims(dist.get_world_size(), tp, cp, pp, dp_shard, dp_replicate)
    return dims.build(device_type)


def _first_and_last_stages(pp: int, stage: int) -> ProcessGroup | None:
    """This rank's group of two: the same position on the first and on the last of `pp` stages of `stage`
    ranks each (every rank builds every group, in the same order, as `new_group` asks); None on the others."""
    mine = None
    for position in range(stage):
        pair = [position, (pp - 1) * stage + position]
        group = dist.new_group(pair)
        if dist.get_rank() in pair:
            mine = group
    return mine


def data_parallel_mesh(device_type: str, dp_replicate: int, dp_shard: int, tp: int, pp: int = 1) -> DeviceMesh:
    """The DP part of the `(pp, dp_replicate, dp_shard, tp)` mesh: 1-D `dp_shard`, or 2-D
    `(dp_replicate, dp_shard)` for HSDP, within this rank's pipeline stage. Rank
    `((p * dp_replicate + r) * dp_shard + s) * tp + t` sits at `(p, r, s, t)`, the layout of
    `init_parallel_groups`' mesh with `dp = r * dp_shard + s`. A collective."""
    mesh = init_device_mesh(
        device_type, (pp, dp_replicate, dp_shard, tp), mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp")
    )
    return mesh["dp_shard"] if dp_replicate == 1 else mesh["dp_replicate", "dp_shard"]
