"""Sharded data parallelism (FSDP2, `fully_shard`) composed with our tensor parallelism.

    mesh = data_parallel_mesh("cpu", dp_replicate=1, dp_shard=2, tp=2)   # tp_attention.distributed
    shard_data_parallel(model, mesh)                                     # after the model is built at its tp

Our TP shards are plain tensors, so FSDP2 sees each rank's TP shard as an ordinary parameter and shards
it again, along dim 0, over the DP ranks that hold the same TP shard (Megatron-core composes
`fully_shard` with its TP shards the same way). Each block is one FSDP unit: its parameters are
all-gathered over dp_shard before its forward and backward, its gradients reduce-scattered (averaged)
after. With `dp_replicate > 1` (HSDP) the mesh is 2-D and gradients are also all-reduced across the
replicas. Parameters, gradients and AdamW moments then take `1 / dp_shard` of a TP shard per rank.
Gradients and parameters are DTensors over the DP mesh; `tp_attention.grad_norm` and
`tp_attention.state_dict` read their local pieces.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from tp_attention.vocab import VocabParallelEmbedding


def shard_data_parallel(
    model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """`fully_shard` each block (`model._decoders`), then the rest (embeddings, final norm, head) as the
    root unit; returns `model`, now sharded in place (on the meta device too: materialise it after).
    Parameters are split along dim 0, vocabulary tables along dim 1 (the embedding) when dp_shard divides
    it (FSDP2 splits other dims only evenly): a padded vocabulary's real rows then stay whole in every
    piece, so a checkpoint can say where each piece lies (else it gathers them).

    `param_dtype` (e.g. bf16): FSDP2's mixed precision. Each unit's parameters are all-gathered in that
    dtype (half the bytes on the wire and in the gathered copy); gradients are reduce-scattered, and the
    parameters and AdamW state kept, in fp32. Under autocast (the training job's `bf16`) ops that autocast
    runs in fp32 (norms, softmax, the loss) still do; what changes is that weights reach them already rounded.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shard = mesh.size(-1)  # dp_shard
    tables = {
        id(m.weight) for m in model.modules() if isinstance(m, VocabParallelEmbedding) and m.emb_size % shard == 0
    }
    options = dict(
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None),
        shard_placement_fn=lambda param: Shard(1) if id(param) in tables else Shard(0),
    )
    for block in model._decoders.values():
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of an FSDP2 DTensor (a view of its storage); any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def data_parallel_groups(model: nn.Module) -> list:
    """The process groups over which FSDP2 shards `model`'s parameters (none for an unsharded model)."""
    for p in model.parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            return [mesh.get_group(i) for i, placement in enumerate(p.placements) if placement.is_shard()]
    return []


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every FSDP2 unit of `model` holds its whole TP shard (all-gathered over the DP mesh), so methods
    other than `forward` (`generate`, `next_token_logits`) run as on an unsharded model; resharded on exit.
    A collective over the DP mesh; nothing happens for a model without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
