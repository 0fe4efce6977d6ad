"""Gradient-norm clipping that knows which gradients are shards and which are replicas."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.distributed as dist
from torch import nn

from tp_attention.fsdp import data_parallel_groups, local
from tp_attention.groups import Group, tp_size
from tp_attention.mappings import all_reduce_in_place
from tp_attention.state_dict import sharded_parameters


def grad_norm(
    model: nn.Module, tp_group: Group = None, pp_group: dist.ProcessGroup | None = None, skip: Collection[str] = ()
) -> torch.Tensor:
    """The global L2 norm of the unsharded model's gradients (a collective over `tp_group`, and `pp_group`).

    Each rank adds `|g|^2 * num_shards / tp` per gradient, so after the all-reduce a gradient
    split over the group counts once in full and a replicated one (LayerNorm, row-parallel bias,
    position embedding, replicated KV heads) counts once, not tp times. With pipeline parallelism `model` is
    one stage: the squares are summed over the stages (`pp_group`) too, leaving out the parameters in `skip`
    (a tied table's second copy, `tp_attention.pipeline.counted_elsewhere`).
    """
    tp = tp_size(tp_group)
    specs = sharded_parameters(model)
    total = None
    for name, p in model.named_parameters():
        if p.grad is None or name in skip:
            continue
        share = (specs[name][0].num_shards if name in specs else 1) / tp
        sq = local(p.grad).detach().float().pow(2).sum() * share  # FSDP2: this rank's rows of the TP shard
        total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros(())
        if pp_group is None:
            return total
    total = all_reduce_in_place(total, tp_group)
    for group in data_parallel_groups(model):  # FSDP2: each DP rank holds other rows
        dist.all_reduce(total, group=group)
    if pp_group is not None:  # each stage holds other layers
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grad_norm_(
    model: nn.Module,
    max_norm: float,
    tp_group: Group = None,
    pp_group: dist.ProcessGroup | None = None,
    skip: Collection[str] = (),
) -> torch.Tensor:
    """Scale all gradients so their global norm (`grad_norm`) is at most `max_norm`; returns the norm before."""
    norm = grad_norm(model, tp_group, pp_group, skip)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            local(p.grad).mul_(scale.to(p.grad.device))
    return norm


def sync_replicated_grads(model: nn.Module, tp_group: Group) -> None:
    """Sequence parallel: sum the gradients of replicated parameters over the TP group, in one all-reduce.

    With sequence parallelism each rank's LayerNorms, position embedding and row-parallel biases see
    only its own tokens, so their gradients are partial sums. Call after backward, before clipping.
    """
    if tp_size(tp_group) == 1:
        return
    specs = sharded_parameters(model)
    grads = [local(p.grad) for n, p in model.named_parameters() if n not in specs and p.grad is not None]
    _reduce_flat(grads, lambda flat: all_reduce_in_place(flat, tp_group))


def average_gradients(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Average every gradient over `group` (data-parallel replicas), in one all-reduce: DDP's result, for
    modules DDP cannot wrap (a pipeline stage runs several forwards before their backwards)."""

    def mean(flat: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(flat, group=group)
        return flat.div_(dist.get_world_size(group))

    _reduce_flat([local(p.grad) for p in model.parameters() if p.grad is not None], mean)


def _reduce_flat(grads: list[torch.Tensor], reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """`reduce` the gradients as one flat tensor (one collective), the results copied back in place."""
    if grads:
        flat = reduce(torch.cat([g.reshape(-1) for g in grads]))
        for g, reduced in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(reduced.view_as(g))
