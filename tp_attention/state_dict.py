"""Full (unsharded) state dicts from sharded models and back.

Parameter names are the same at every tp; only shapes differ. Modules that hold shards declare
`tp_shards = {param_name: ShardSpec}` and `tp_group`; everything else is replicated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from tp_attention.groups import Group, process_group, tp_rank, tp_size
from tp_attention.sharding import ShardSpec

# Modules renamed since checkpoints were first written, old name -> new: a name in a state dict, export or DCP
# checkpoint written before is read as today's (`Decoder._heads`, the attention module, was confused with
# `MultiHeadAttention._heads`, the seed's list of heads).
RENAMED_MODULES = {"_heads": "_attention"}


def current_name(name: str) -> str:
    """A tensor's name as today's model calls it: `_decoders.0._heads._q.weight` -> `..._attention._q.weight`."""
    return ".".join(RENAMED_MODULES.get(part, part) for part in name.split("."))


def rename_old_keys(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """A `load_state_dict` pre-hook: `module`'s keys in `state_dict` under their current names."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + current_name(key[len(prefix) :])
        if new != key:
            state_dict[new] = state_dict.pop(key)


def sharded_parameters(model: nn.Module) -> dict[str, tuple[ShardSpec, Group]]:
    """`{qualified name: (spec, tp_group)}` for every sharded tensor of `model`."""
    found = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, spec in getattr(module, "tp_shards", {}).items():
            if getattr(module, name, None) is not None:
                found[f"{prefix}.{name}" if prefix else name] = (spec, module.tp_group)
    return found


def gather_shard(local: torch.Tensor, spec: ShardSpec, group: Group) -> torch.Tensor:
    """The full tensor from every rank's `local` chunk (a collective over `group`)."""
    tp = tp_size(group)
    if tp == 1:
        return spec.trim(local)
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=process_group(group))
    first_holders = [i * tp // spec.num_shards for i in range(spec.num_shards)]
    return spec.trim(torch.cat([parts[r] for r in first_holders], dim=spec.dim))


def gather_full(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather each sharded entry of `tensors` (keyed like `model`'s parameters) into its full tensor.

    A collective: every rank of each TP group must call it with the same keys.
    """
    specs = sharded_parameters(model)
    tensors = {name: unshard_data_parallel(t.detach()) for name, t in tensors.items()}
    return {name: gather_shard(t, *specs[name]) if name in specs else t for name, t in tensors.items()}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict, identical on every rank (a collective)."""
    return gather_full(model, model.state_dict())


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded gradients of every parameter that has one (a collective)."""
    return gather_full(model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def full_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """The shape each state-dict entry has in the unsharded model."""
    specs = sharded_parameters(model)
    shapes = {}
    for name, t in model.state_dict().items():
        shape = list(t.shape)
        if name in specs:
            spec = specs[name][0]
            shape[spec.dim] = spec.full_size or shape[spec.dim] * spec.num_shards
        shapes[name] = torch.Size(shape)
    return shapes


def load_full_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Load an unsharded state dict into a (possibly sharded) model: each rank keeps its slice.

    Raises:
        ValueError: listing every parameter whose full shape differs, and (with `strict`) every
            missing or unexpected key.
    """
    state_dict = {current_name(name): tensor for name, tensor in state_dict.items()}
    expected = full_shapes(model)
    problems = [
        f"{name}: checkpoint {tuple(state_dict[name].shape)} != model {tuple(shape)}"
        for name, shape in expected.items()
        if name in state_dict and state_dict[name].shape != shape
    ]
    if strict:
        problems += [f"{name}: missing from checkpoint" for name in expected if name not in state_dict]
        problems += [f"{name}: not a parameter of the model" for name in state_dict if name not in expected]
    if problems:
        raise ValueError("state dict does not fit the model:\n  " + "\n  ".join(problems))
    specs = sharded_parameters(model)
    local = {}
    for name, full in state_dict.items():
        if name in specs:
            spec, group = specs[name]
            full = spec.slice(full, tp_rank(group), tp_size(group))
        local[name] = full
    model.load_state_dict(local, strict=strict)


def _contiguous_strides(shape: list[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def dcp_state_dict(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], mesh: DeviceMesh | None
) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
    """Wrap local tensors keyed like `model`'s parameters as DTensors for torch.distributed.checkpoint.

    `mesh` is the `(dp, tp)` mesh (None in a single process: the tensors are returned as they are).
    A shard becomes `Shard(dim)` over tp (uneven for a padded vocabulary: only the real rows),
    everything else `Replicate()`; all are zero-copy views, so `dcp.load` fills the model in place.
    An FSDP2 piece (this rank's part of its TP shard) is described as such (`_fsdp_pieces`) and written
    and read in place too, so saving never gathers a TP shard. Shards replicated on several ranks (KV
    heads when tp > num_kv_heads) are stored gathered in full; call the returned `finish()` after
    `dcp.load` to copy their slices back.
    """
    specs = sharded_parameters(model)
    wrapped = _fsdp_pieces(tensors, specs, mesh)
    tensors, finish_data_parallel = _unshard_for_load({n: t for n, t in tensors.items() if n not in wrapped})
    if mesh is None:
        return dict(tensors), finish_data_parallel
    replicate = [Replicate()] * mesh.ndim
    copy_back = []
    for name, local in tensors.items():
        if name not in specs:
            wrapped[name] = DTensor.from_local(local, mesh, replicate, run_check=False)
            continue
        spec, group = specs[name]
        tp, rank = tp_size(group), tp_rank(group)
        if spec.num_shards < tp:
            full = gather_shard(local, spec, group)
            wrapped[name] = DTensor.from_local(full, mesh, replicate, run_check=False)
            copy_back.append((full, spec, local, rank, tp))
            continue
        shape = list(local.shape)
        shape[spec.dim], real = spec.extent(local.size(spec.dim), rank, tp)
        wrapped[name] = DTensor.from_local(
            local.narrow(spec.dim, 0, real),
            mesh,
            [*replicate[:-1], Shard(spec.dim)],
            run_check=False,
            shape=torch.Size(shape),
            stride=_contiguous_strides(shape),
        )

    def finish() -> None:
        with torch.no_grad():
            for full, spec, local, rank, tp in copy_back:
                local.copy_(spec.slice(full, rank, tp))
        finish_data_parallel()

    return wrapped, finish


def _fsdp_pieces(
    tensors: Mapping[str, torch.Tensor], specs: Mapping[str, tuple[ShardSpec, Group]], mesh: DeviceMesh | None
) -> dict[str, DTensor]:
    """The FSDP2 DTensors of `tensors` as DCP DTensors of the logical tensor, each a zero-copy view of this
    rank's piece, on a `(dp_replicate, tp, dp_shard)` view of `mesh`: `[Replicate(), TP placement, FSDP2
    placement]`. When both split dim 0 (a column-parallel weight), the rows go over tp first and then each
    TP shard's over dp_shard, which is the order of that view's dims; FSDP2's chunks are `torch.chunk`'s, as
    DTensor's. A padded vocabulary split by FSDP2 along dim 1 gives only its real rows. Left out, to be
    gathered: pieces of TP shards replicated on several ranks (num_shards < tp), and of a padded vocabulary
    that FSDP2 split along its rows (its embedding dim not divisible by dp_shard). All pieces share one DP
    mesh (`shard_data_parallel`'s)."""
    pieces = {n: t for n, t in tensors.items() if isinstance(t, DTensor)}
    if mesh is None or not pieces:
        return {}
    shard = next(iter(pieces.values())).device_mesh.size(-1)
    ranks = mesh.mesh.reshape(mesh.size(0) // shard, shard, mesh.size(1)).permute(0, 2, 1)
    names = ("dp_replicate", "tp", "dp_shard")
    view = DeviceMesh(mesh.device_type, ranks, mesh_dim_names=names, _init_backend=False)  # DCP needs no groups
    out = {}
    for name, tensor in pieces.items():
        spec, group = specs.get(name, (None, None))
        shape, local, tp_placement = list(tensor.shape), tensor.to_local(), Replicate()  # shape: the TP shard's
        if spec is not None:
            tp, rank = tp_size(group), tp_rank(group)
            if spec.num_shards < tp:
                continue
            tp_placement, rows = Shard(spec.dim), shape[spec.dim]
            shape[spec.dim], real = spec.extent(rows, rank, tp)  # rows past the vocabulary are padding
            if real < rows and tensor.placements[-1] == Shard(spec.dim):
                continue  # FSDP2 split those rows too: this piece's real ones are not a prefix of the shard's
            if real < rows:
                local = local.narrow(spec.dim, 0, real)
        out[name] = DTensor.from_local(
            local,
            view,
            [Replicate(), tp_placement, tensor.placements[-1]],
            run_check=False,
            shape=torch.Size(shape),
            stride=_contiguous_strides(shape),
        )
    return out


def unshard_data_parallel(tensor: torch.Tensor) -> torch.Tensor:
    """An FSDP2 DTensor (sharded over the DP mesh) gathered into this rank's whole TP shard (a collective
    over that mesh); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _unshard_for_load(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
    """FSDP2 DTensors gathered (copies) for DCP, and `finish()` that puts what was loaded into them back
    into their DP pieces (each rank's rows, no communication)."""
    out, back = {}, []
    for name, tensor in tensors.items():
        out[name] = unshard_data_parallel(tensor)
        if out[name] is not tensor:
            back.append((tensor, out[name]))

    def finish() -> None:
        with torch.no_grad():
            for sharded, full in back:
                piece = distribute_tensor(full, sharded.device_mesh, sharded.placements, src_data_rank=None)
                sharded.to_local().copy_(piece.to_local())

    return out, finish
