"""Initialisation that is the same at every layout, without the whole model on any rank.

One generator draws every parameter's full (logical) tensor, parameter after parameter, in chunks of
rows (about 4 Mi numbers each); each rank copies only its piece out of each chunk: its TP shard (the
parameter's `ShardSpec`) and, when FSDP2 has made the parameter a DTensor over the data-parallel mesh,
its rows (a vocabulary table's columns) of that shard. So one seed gives the same logical weights at
every (tp, dp_shard), and a rank holds its pieces plus one chunk, never a full tensor. The stream is
sequential, so every rank still draws every number: init time grows with the whole model (about a second
per 10^8 parameters on one CPU core), init memory does not.

    with torch.device("meta"):
        model = GPT.from_config(cfg, tp_group=group)     # shapes only, nothing drawn
    shard_data_parallel(model, mesh)                     # optional: FSDP2 shards the meta parameters
    model.to_empty(device="cpu")
    model.reset_parameters(torch.Generator().manual_seed(0))

Every chunk but the last holds a multiple of 16 numbers and the last at least 16, so the chunks hold
exactly what one whole-tensor draw would (CPU `normal_` transforms blocks of 16 and redraws a short tail):
chunking changes no weight (pinned by tests/test_init.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from tp_attention.sharding import ShardSpec

CHUNK_NUMEL = 2**22  # numbers per drawn chunk: 16 MiB in fp32


@dataclass(frozen=True)
class Init:
    """How a full tensor is drawn: `normal` N(0, value²), `uniform` U(-value, value), or `constant` value
    (which uses no random numbers)."""

    kind: Literal["normal", "uniform", "constant"]
    value: float

    def draw(self, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        out = torch.empty(shape, device="cpu")  # the CPU generator's numbers, whatever the default device
        if self.kind == "normal":
            return out.normal_(0.0, self.value, generator=generator)
        if self.kind == "uniform":
            return out.uniform_(-self.value, self.value, generator=generator)
        return out.fill_(self.value)


def linear_inits(in_features: int, std: float | None) -> tuple[Init, Init]:
    """Weight and bias init of a linear layer: nn.Linear's (both uniform in ±1/sqrt(in)) for `std=None`,
    else N(0, std²) weights and zero bias (GPT-2, nanoGPT)."""
    if std is None:
        bound = Init("uniform", 1.0 / math.sqrt(in_features))
        return bound, bound
    return Init("normal", std), Init("constant", 0.0)


def rows_per_chunk(row_numel: int) -> int:
    """Rows of `row_numel` numbers drawn at a time: about `CHUNK_NUMEL` numbers (at least 16 / gcd(row_numel,
    16) rows), a multiple of 16."""
    step = 16 // math.gcd(row_numel, 16)
    return max(step, CHUNK_NUMEL // row_numel // step * step)


def fill_(
    param: torch.Tensor,
    full_shape: tuple[int, ...],
    init: Init,
    spec: ShardSpec | None = None,
    tp_rank: int = 0,
    tp: int = 1,
    generator: torch.Generator | None = None,
) -> None:
    """Draw the `full_shape` tensor from `generator` chunk by chunk and copy this rank's piece into
    `param`: TP chunk `spec.index(tp_rank, tp)` along `spec.dim` (all of it without a spec; rows past
    `full_shape[0]`, a padded vocabulary's, are zero), and of that only the local piece of an FSDP2 DTensor.
    On the meta device nothing is drawn."""
    piece, offset = param, (0,) * param.dim()  # the piece's offset within the TP shard
    if isinstance(param, DTensor):
        piece = param.to_local()
        offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)[1]
    if piece.is_meta:
        if _DRAW_META.get() and init.kind != "constant":  # not this rank's: keep the stream where others have it
            for _ in _chunks(full_shape, init, generator):
                pass
        return
    with torch.no_grad():
        if init.kind == "constant":
            piece.fill_(init.value)
            return
        piece.zero_()
        rows, columns = offset[0], None  # the piece's first logical row; its logical columns (2-D)
        if piece.dim() > 1:
            first = offset[1]
            if spec is not None and spec.dim == 1:
                first += spec.index(tp_rank, tp) * (full_shape[1] // spec.num_shards)
            columns = slice(first, first + piece.size(1))
        if spec is not None and spec.dim == 0:
            rows += spec.index(tp_rank, tp) * (spec.padded_size(full_shape[0]) // spec.num_shards)
        end = rows + piece.size(0)
        for start, chunk in _chunks(full_shape, init, generator):
            lo, hi = max(start, rows), min(start + chunk.size(0), end)
            if lo < hi:
                part = chunk[lo - start : hi - start]
                piece[lo - rows : hi - rows].copy_(part if columns is None else part[:, columns])


def _chunks(
    full_shape: tuple[int, ...], init: Init, generator: torch.Generator | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """The `full_shape` tensor drawn from `generator` as `(first row, chunk)` pairs of `rows_per_chunk` rows."""
    row_numel = math.prod(full_shape[1:])
    step, start = rows_per_chunk(row_numel), 0
    while start < full_shape[0]:
        stop = min(start + step, full_shape[0])
        if (full_shape[0] - stop) * row_numel < 16:  # a last chunk under 16 numbers would draw differently
            stop = full_shape[0]
        yield start, init.draw((stop - start, *full_shape[1:]), generator)
        start = stop


_DRAW_META: ContextVar[bool] = ContextVar("draw_meta", default=False)


@contextmanager
def drawing_meta_tensors() -> Iterator[None]:
    """Inside, `fill_` of a tensor on the meta device still draws its numbers (and keeps none): a pipeline
    stage initialises the whole model's modules in order, its own real and the other stages' on meta, so
    its weights are the ones one process draws (`GPT.reset_parameters(generator, order)`)."""
    token = _DRAW_META.set(True)
    try:
        yield
    finally:
        _DRAW_META.reset(token)
