"""Pipeline parallelism: a GPT split by layers into stages, run by `torch.distributed.pipelining`'s schedules.

    with torch.device("meta"):
        model = GPT.from_config(cfg, tp_group=tp_group)
    stages = rank_stages(pp_rank, pp, 1, stage_layers(cfg.num_layers, pp))   # 2 or more: interleaved
    order = split_model(model, rank_part(stages))      # this rank's modules only, under their full names
    model.to_empty(device="cpu")
    model.reset_parameters(generator, order)           # the same weights as one process draws
    schedule = build_schedule(stage_views(model, stages), model, stages, "1f1b", microbatches, pp_group, device)
    schedule.step(*([idx] if model.stage.first else []), target=targets if model.stage.last else None, losses=[])

torchtitan's split: the first stage holds the token (and position) embedding, the last the final norm and the
LM head; every stage its consecutive blocks. The last stage returns its final-norm hidden states and the
schedule's `loss_fn` applies the LM head and the vocab-parallel cross-entropy chunk by chunk, so no more than one
chunk of tokens' logits is ever built. A tied LM head is
the token embedding: the first and the last stage then each hold the table, and `sync_tied_embeddings` sums
their gradients over the group of those two stages before the optimizer step (Megatron-core's embedding
group), so both copies stay equal. Parameter names are the whole model's (`_decoders.5...` on the stage that
holds block 5), so a checkpoint's keys do not depend on the layout.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from tp_attention.fsdp import local
from tp_attention.model import GPT
from tp_attention.shapes import check_int
from tp_attention.state_dict import full_state_dict

SCHEDULES = {  # torch's: one stage per rank, or (interleaved) parallel.pp_virtual_stages of them
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
}
VIRTUAL = {"interleaved_1f1b", "interleaved_zero_bubble"}  # schedules of several stages per rank


@dataclass(frozen=True)
class Stage:
    """Pipeline stage `index` of `num_stages`: the blocks `layers` (global layer numbers). What one rank holds
    of an interleaved pipeline is its stages together: `held` their indices (`rank_part`)."""

    index: int
    num_stages: int
    layers: Sequence[int]
    held: tuple[int, ...] = ()

    @property
    def indices(self) -> tuple[int, ...]:
        return self.held or (self.index,)

    @property
    def first(self) -> bool:
        return 0 in self.indices

    @property
    def last(self) -> bool:
        return self.num_stages - 1 in self.indices


def rank_stages(rank: int, pp: int, virtual: int, layers: list[range]) -> list[Stage]:
    """The stages rank `rank` of `pp` holds: `rank`, `rank + pp`, ... (`virtual` of them, torch's looped
    order for interleaved schedules), of `pp x virtual` stages with blocks `layers` (`stage_layers`)."""
    return [Stage(rank + v * pp, pp * virtual, layers[rank + v * pp]) for v in range(virtual)]


def rank_part(stages: list[Stage]) -> Stage:
    """All of one rank's stages as one part: their blocks together (what the rank's model keeps)."""
    if len(stages) == 1:
        return stages[0]
    layers = tuple(i for stage in stages for i in stage.layers)
    return Stage(stages[0].index, stages[0].num_stages, layers, held=tuple(s.index for s in stages))


def stage_views(model: GPT, stages: list[Stage]) -> list[GPT]:
    """One module per stage of `model`'s rank (split by `split_model(model, rank_part(stages))`), each the
    blocks, embeddings or head of its own stage: views sharing `model`'s parameters, for torch's
    `PipelineStage`s (each scales only its own stage's gradients). One stage: `[model]`."""
    if len(stages) == 1:
        return [model]
    views = []
    for stage in stages:
        view = copy.copy(model)  # the same config, groups and parameters; a table of modules of its own
        view.__dict__["_modules"] = dict(model._modules)
        view._decoders = type(model._decoders)(dict(model._decoders.items()))
        split_model(view, stage)
        views.append(view)
    return views


def stage_layers(
    num_layers: int, pp: int, layers: Sequence[int] | None = None, names: tuple[str, str] = ("num_layers", "pp")
) -> list[range]:
    """The blocks of each of `pp` stages: `layers[s]` consecutive blocks for stage s, or `num_layers / pp` each.

    Raises:
        ValueError: pp exceeds the layers, they do not divide evenly without `layers`, or `layers` does not
            give every one of pp stages at least one block, summing to num_layers.
    """
    layers_name, pp_name = names
    check_int(pp, pp_name)
    if layers is None:
        if num_layers % pp != 0:
            raise ValueError(
                f"{layers_name} = {num_layers} must be divisible by {pp_name} = {pp} (or give each stage's "
                "layers: parallel.pp_layers)"
            )
        layers = [num_layers // pp] * pp
    layers = list(layers)
    if len(layers) != pp or any(not isinstance(n, int) or n < 1 for n in layers) or sum(layers) != num_layers:
        raise ValueError(
            f"parallel.pp_layers = {layers} must give each of {pp_name} = {pp} stages at least one layer, "
            f"{layers_name} = {num_layers} in all"
        )
    starts = [sum(layers[:s]) for s in range(pp)]
    return [range(start, start + n) for start, n in zip(starts, layers, strict=True)]


def split_model(model: GPT, stage: Stage) -> list[nn.Module]:
    """Keep only `stage`'s part of `model` (in place; best on the meta device, before anything is allocated):
    its blocks, the embeddings on the first stage, the final norm and LM head on the last, the token
    embedding also on the last when it is the tied LM head. Returns every module of the whole model in the
    constructor's order, for `GPT.reset_parameters(generator, order)`: one seed, the same weights at any pp."""
    order = list(model.modules())
    for key in list(model._decoders.keys()):
        if int(key) not in stage.layers:
            del model._decoders[key]
    if not stage.first:
        model._position_embeddings = None
        if not (stage.last and model.config.tie_embeddings):
            model._token_embeddings = None
    if not stage.last:
        model._norm, model._lm_head = None, None
    model.stage = stage
    return order


def stage_loss(model: GPT, ignore_index: int = -100) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The last stage's loss: `loss_fn(hidden, targets [B, T])` is `model(hidden, targets)`, the LM head and
    vocab-parallel cross-entropy chunk by chunk (`GPT._stage_loss`), the mean over the micro-batch's tokens;
    `hidden` is `[B, T / cp, E]` (`/ tp` more under sequence parallelism). A call of the module, so that FSDP2
    gathers the head's weight for it."""

    def loss_fn(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return model(hidden, targets, ignore_index=ignore_index)

    return loss_fn


def in_flight(schedule: str, stage: Stage, microbatches: int) -> float:
    """Micro-batches whose activations `stage` (a rank's part) holds at once, in units of the whole part: GPipe
    runs every forward before the first backward (all of them); 1F1B starts backward after `num_stages - index`
    forwards and then alternates; interleaved schedules, after about `(v - 1) pp + 2 (pp - 1 - rank) + 1`
    forwards of one of the rank's `v` stages each (torch's warm-up), so that many `1 / v` parts."""
    if schedule == "gpipe":
        return microbatches
    virtual = len(stage.indices)
    if virtual == 1:
        return min(stage.num_stages - stage.index, microbatches)
    pp = stage.num_stages // virtual
    chunks = min(microbatches * virtual, (virtual - 1) * pp + 2 * (pp - 1 - stage.index) + 1)
    return chunks / virtual


def build_schedule(
    modules: list[nn.Module],
    model: GPT,
    stages: list[Stage],
    schedule: str,
    microbatches: int,
    group: dist.ProcessGroup,
    device: torch.device,
    examples: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """torch's schedule `schedule` (`SCHEDULES`) over `microbatches` for this rank's `stages`: `modules` are
    what runs, one per stage (`stage_views`, or the stage's GPT itself), `model` the rank's GPT. Gradients are
    the mean over the micro-batches (`scale_grads`), as one process accumulating them computes.

    torch's stages infer the shapes they exchange from the first micro-batch, with their neighbours. `examples`,
    one micro-batch's token ids `[B, T]` and hidden states between stages `[B, T / cp, E]` (`/ tp` more under
    sequence parallelism), give them instead: the first stage takes the ids, the others the hidden states, and
    every stage returns hidden states; nothing is exchanged before the first step (what a rank played alone,
    `train.dry_run`, needs).

    Raises:
        ValueError: an unknown schedule, or one stage for an interleaved one (several for the others).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule = {schedule!r} must be one of {', '.join(SCHEDULES)}")
    if (schedule in VIRTUAL) != (len(stages) > 1):
        raise ValueError(f"pipeline schedule = {schedule!r} cannot run {len(stages)} stage(s) per rank")
    pipeline_stages = []
    for module, stage in zip(modules, stages, strict=True):
        shapes = {}
        if examples is not None:
            ids, hidden = examples  # gradients have the hidden states' shape: received unless last, sent unless first
            shapes = dict(input_args=ids if stage.first else hidden, output_args=hidden)
            shapes |= dict(output_grads=None if stage.last else hidden, input_grads=None if stage.first else hidden)
        pipeline_stages.append(PipelineStage(module, stage.index, stage.num_stages, device, group=group, **shapes))
    held = pipeline_stages if schedule in VIRTUAL else pipeline_stages[0]
    return SCHEDULES[schedule](held, microbatches, loss_fn=stage_loss(model), scale_grads=True)


def gather_stages(model: GPT, pp_group: dist.ProcessGroup) -> dict[str, torch.Tensor] | None:
    """The whole model's full state on global rank 0 (None elsewhere): each stage's TP-gathered tensors
    (`full_state_dict`, a collective over TP) sent to it over the pipeline group of rank 0's position."""
    state = full_state_dict(model)
    if dist.get_global_rank(pp_group, 0) != 0:  # not at rank 0's position: its stage-mates send
        return None
    pieces: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size(pp_group)
    dist.gather_object(state, pieces if dist.get_rank() == 0 else None, dst=0, group=pp_group)
    return {name: tensor for piece in pieces or [] for name, tensor in (piece or {}).items()}


def holds_tied_copy(model: GPT) -> bool:
    """This rank holds one of two copies of a tied embedding table: the first or last of two or more stages."""
    stage = model.stage
    tied = model.config.tie_embeddings
    return stage is not None and stage.num_stages > 1 and tied and (stage.first or stage.last)


def sync_tied_embeddings(model: GPT, group: dist.ProcessGroup | None) -> None:
    """Sum the tied table's gradient over `group`, the first and last stage of this (dp, tp, cp) position:
    each stage's gradient is one use of it (lookup, LM head), one process's is their sum. Call after
    backward, before clipping; a no-op on the middle stages and without a tied table."""
    if group is None or not holds_tied_copy(model):
        return
    grad = model._token_embeddings.weight.grad
    if grad is not None:
        dist.all_reduce(local(grad), group=group)


def tied_copies_equal(model: GPT, group: dist.ProcessGroup | None) -> bool:
    """Whether the first and the last stage hold bitwise the same tied table (a collective over `group`,
    the pair of them; True where this rank holds no copy)."""
    if group is None or not holds_tied_copy(model):
        return True
    table = local(model._token_embeddings.weight).detach()
    high, low = table.clone(), table.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    return bool(torch.equal(high, low))


def counted_elsewhere(model: GPT) -> set[str]:
    """Parameters whose gradient another stage counts in the global norm: the last stage's tied table copy."""
    return {"_token_embeddings.weight"} if holds_tied_copy(model) and not model.stage.first else set()
