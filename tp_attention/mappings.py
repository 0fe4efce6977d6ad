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

from tp_attention.distributed import ProcessGroup, tp_rank, tp_size
from tp_attention.shm import communicator_for


def all_reduce_in_place(
    x: torch.Tensor, group: ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM
) -> torch.Tensor:
    """Reduce `x` over `group` in place and return it. Here and in every collective below: through
    shared memory where enabled for the group (see `tp_attention.shm`), else the process group."""
    if tp_size(group) > 1:
        communicator = communicator_for(group, x)
        if communicator is not None:
            communicator.all_reduce(x, op)
        else:
            dist.all_reduce(x, op=op, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim`."""
    n = tp_size(group)
    if n == 1:
        return x
    if x.size(dim) % n != 0:
        raise ValueError(f"size {x.size(dim)} of dim {dim} must be divisible by tp_size = {n}")
    return x.chunk(n, dim=dim)[tp_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`."""
    n = tp_size(group)
    if n == 1:
        return x
    communicator = communicator_for(group, x)
    if communicator is not None:
        return communicator.all_gather(x, dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """Sum `x` over `group` and keep this rank's chunk along `dim`."""
    n = tp_size(group)
    if n == 1:
        return x
    if x.size(dim) % n != 0:
        raise ValueError(f"size {x.size(dim)} of dim {dim} must be divisible by tp_size = {n}")
    communicator = communicator_for(group, x)
    if communicator is not None:
        return communicator.reduce_scatter(x, dim)
    chunks = [c.contiguous() for c in x.chunk(n, dim=dim)]
    out = torch.empty_like(chunks[0])
    try:
        dist.reduce_scatter(out, chunks, group=group)
    except (RuntimeError, NotImplementedError):  # backends without reduce_scatter
        out = all_reduce_in_place(x.clone(), group).chunk(n, dim=dim)[tp_rank(group)].contiguous()
    return out


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


def _needs_comm(group: ProcessGroup | None) -> bool:
    return tp_size(group) > 1


def copy_to_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """f: identity forward; all-reduce of the gradient backward. Put before column-parallel layers."""
    return _CopyToTP.apply(x, group) if _needs_comm(group) else x


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """g: all-reduce forward (in place); identity backward. Put after row-parallel layers."""
    return _ReduceFromTP.apply(x, group) if _needs_comm(group) else x


def scatter_to_tp(x: torch.Tensor, group: ProcessGroup | None, dim: int = -1) -> torch.Tensor:
    """Keep this rank's chunk of `dim` forward; all-gather the gradient backward."""
    return _ScatterToTP.apply(x, dim, group) if _needs_comm(group) else x


def gather_from_tp(x: torch.Tensor, group: ProcessGroup | None, dim: int = -1) -> torch.Tensor:
    """All-gather along `dim` forward; keep this rank's chunk of the gradient backward."""
    return _GatherFromTP.apply(x, dim, group) if _needs_comm(group) else x


def gather_from_sp(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Sequence parallel, entering a TP region: all-gather tokens forward, reduce-scatter backward."""
    return _GatherFromSP.apply(x, dim, group) if _needs_comm(group) else x


def reduce_scatter_to_sp(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Sequence parallel, leaving a TP region: reduce-scatter tokens forward, all-gather backward."""
    return _ReduceScatterToSP.apply(x, dim, group) if _needs_comm(group) else x
