"""Megatron's communication operators as autograd Function pairs.

Each operator's backward is its conjugate's forward:

    copy_to_tp       (f)   forward identity          backward all-reduce
    reduce_from_tp   (g)   forward all-reduce        backward identity
    scatter_to_tp          forward split(dim)        backward all-gather(dim)
    gather_from_tp         forward all-gather(dim)   backward split(dim)
    gather_from_sp         forward all-gather(dim)   backward reduce-scatter(dim)
    reduce_scatter_to_sp   forward reduce-scatter    backward all-gather(dim)

With `group=None` (or a group of one rank) every operator is the identity and issues no collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tp_attention.groups import Group, TPGroup, process_group, tp_rank, tp_size
from tp_attention.shm import SharedMemoryCollectives

# The shared-memory collectives are custom ops, opaque to torch.compile (it cannot trace their spin-wait);
# the process-group ones are plain torch.distributed calls, which torch.compile and CommDebugMode understand.
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
_OP_NAMES = {op: name for name, op in _REDUCE_OPS.items()}
# torch 2.13 renamed the tensor collectives (the old names warn); earlier versions have only the old ones
_all_gather_tensor = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
# Backends known to implement the tensor reduce-scatter; any other gets all-reduce + chunk (the same sums)
REDUCE_SCATTER_BACKENDS = {"gloo", "nccl", "threaded", "fake", "xccl"}


@torch.library.custom_op("tp_attention::shm_all_reduce_", mutates_args=("x",))
def _shm_all_reduce(x: torch.Tensor, name: str, op: str) -> None:
    SharedMemoryCollectives.by_name(name).all_reduce(x, _REDUCE_OPS[op])


@_shm_all_reduce.register_fake
def _(x, name, op):
    return None


@torch.library.custom_op("tp_attention::shm_all_gather", mutates_args=())
def _shm_all_gather(x: torch.Tensor, dim: int, name: str, world: int) -> torch.Tensor:
    return SharedMemoryCollectives.by_name(name).all_gather(x, dim)


@_shm_all_gather.register_fake
def _(x, dim, name, world):
    return torch.cat([x] * world, dim=dim)


@torch.library.custom_op("tp_attention::shm_reduce_scatter", mutates_args=())
def _shm_reduce_scatter(x: torch.Tensor, dim: int, name: str, world: int) -> torch.Tensor:
    return SharedMemoryCollectives.by_name(name).reduce_scatter(x, dim)


@_shm_reduce_scatter.register_fake
def _(x, dim, name, world):
    return x.chunk(world, dim=dim)[0].contiguous()


def shared_memory_for(group: Group, tensor: torch.Tensor) -> SharedMemoryCollectives | None:
    """The group's shared-memory transport if it has one and `tensor` (what this rank publishes) fits it."""
    shared = group.shared_memory if isinstance(group, TPGroup) else None
    return shared if shared is not None and shared.fits(tensor) else None


def all_reduce_in_place(x: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce `x` over `group` in place and return it. Here and in every collective below: through
    the group's shared memory where it has one and `x` fits, else the process group.

    Raises:
        ValueError: `op` is not SUM or MAX.
    """
    if op not in _OP_NAMES:
        raise ValueError(f"op = {op} is not supported: use dist.ReduceOp.SUM or dist.ReduceOp.MAX")
    if tp_size(group) > 1:
        shared = shared_memory_for(group, x)
        if shared is not None:
            torch.ops.tp_attention.shm_all_reduce_(x, shared.name, _OP_NAMES[op])
        else:
            dist.all_reduce(x, op=op, group=process_group(group))
    return x


def _split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim`."""
    n = tp_size(group)
    if n == 1:
        return x
    if x.size(dim) % n != 0:
        raise ValueError(f"size {x.size(dim)} of dim {dim} must be divisible by tp_size = {n}")
    return x.chunk(n, dim=dim)[tp_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`."""
    n = tp_size(group)
    if n == 1:
        return x
    shared = shared_memory_for(group, x)
    if shared is not None:
        return torch.ops.tp_attention.shm_all_gather(x, dim, shared.name, n)
    out = x.new_empty((n * x.size(0), *x.shape[1:]))  # (n * d0, ...): ranks stacked along dim 0
    _all_gather_tensor(out, x.contiguous(), group=process_group(group))
    return out if dim % x.dim() == 0 else torch.cat(out.chunk(n), dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum `x` over `group` and keep this rank's chunk along `dim`."""
    n = tp_size(group)
    if n == 1:
        return x
    if x.size(dim) % n != 0:
        raise ValueError(f"size {x.size(dim)} of dim {dim} must be divisible by tp_size = {n}")
    shared = shared_memory_for(group, x)
    if shared is not None:
        return torch.ops.tp_attention.shm_reduce_scatter(x, dim, shared.name, n)
    stacked = x.movedim(dim, 0).contiguous()  # (d, ...): the ranks' chunks along dim 0
    if dist.get_backend(process_group(group)) in REDUCE_SCATTER_BACKENDS:
        out = stacked.new_empty((stacked.size(0) // n, *stacked.shape[1:]))
        _reduce_scatter_tensor(out, stacked, group=process_group(group))
    else:
        out = all_reduce_in_place(stacked.clone(), group).chunk(n)[tp_rank(group)]
    return out.movedim(0, dim).contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_in_place(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.mark_dirty(x)
        return all_reduce_in_place(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def _needs_comm(group: Group) -> bool:
    return tp_size(group) > 1


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """f: identity forward; all-reduce of the gradient backward. Put before column-parallel layers."""
    return _CopyToTP.apply(x, group) if _needs_comm(group) else x


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """g: all-reduce forward (in place); identity backward. Put after row-parallel layers."""
    return _ReduceFromTP.apply(x, group) if _needs_comm(group) else x


def scatter_to_tp(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """Keep this rank's chunk of `dim` forward; all-gather the gradient backward."""
    return _ScatterToTP.apply(x, dim, group) if _needs_comm(group) else x


def gather_from_tp(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    """All-gather along `dim` forward; keep this rank's chunk of the gradient backward."""
    return _GatherFromTP.apply(x, dim, group) if _needs_comm(group) else x


def gather_from_sp(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """Sequence parallel, entering a TP region: all-gather tokens forward, reduce-scatter backward."""
    return _GatherFromSP.apply(x, dim, group) if _needs_comm(group) else x


def reduce_scatter_to_sp(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """Sequence parallel, leaving a TP region: reduce-scatter tokens forward, all-gather backward."""
    return _ReduceScatterToSP.apply(x, dim, group) if _needs_comm(group) else x
