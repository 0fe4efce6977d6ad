"""Column- and row-parallel linear layers (Megatron-LM, arXiv:1909.08053).

    ColumnParallelLinear   Y_local = X @ W_local^T + b_local     W: [out / tp, in]
    RowParallelLinear      Y = g(X_local @ W_local^T) + b       W: [out, in / tp]

Initialisation does not depend on tp: every rank draws the *full* weight from the same generator,
chunk by chunk, and keeps its slice (`tp_attention.init`), so one seed gives the same logical layer at
tp = 1, 2, 4, ...
`ShardSpec` (`tp_attention.sharding`) records how each parameter is sliced; `tp_attention.state_dict`
uses it to gather and scatter full tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tp_attention.groups import Group, check_group, process_group, tp_rank, tp_size
from tp_attention.init import fill_, linear_inits
from tp_attention.mappings import (
    all_reduce_in_place,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
    shared_memory_for,
)
from tp_attention.shapes import check_divisible, check_int
from tp_attention.sharding import ShardSpec


class _SumGradOverReplicas(torch.autograd.Function):
    """Identity forward; backward sums each gradient over the ranks holding the same shard.

    Every rank writes its gradients into row `index` of a zero `[num_shards, n]` buffer, one
    all-reduce over the TP group sums the replicas, and each rank reads its row back.
    """

    @staticmethod
    def forward(ctx, spec, group, *params):
        ctx.spec, ctx.group = spec, group
        return params

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([g.reshape(-1) for g in grads])
        index = ctx.spec.index(tp_rank(ctx.group), tp_size(ctx.group))
        buffer = flat.new_zeros(ctx.spec.num_shards, flat.numel())
        buffer[index] = flat
        all_reduce_in_place(buffer, ctx.group)
        summed = buffer[index].split([g.numel() for g in grads])
        return (None, None, *(s.view_as(g) for s, g in zip(summed, grads, strict=True)))


class _CopyToTPLinear(torch.autograd.Function):
    """f and a linear layer in one: `y = x @ W^T + b` forward; in backward the all-reduce of dx is
    started first and runs while dW and db are computed (Megatron's async input-gradient all-reduce)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        if torch.is_autocast_enabled(x.device.type):  # cast as autocast would, and keep the casts for backward
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.to(weight.dtype)
        dx = dy @ weight if ctx.needs_input_grad[0] else None  # (*, in)
        overlap = dx is not None and shared_memory_for(ctx.group, dx) is None  # shared memory: nothing to hide
        if overlap:  # a functional collective: started now, awaited below; torch.compile traces it, and
            # CommDebugMode counts it (it does not count the in-place all_reduce_, which would save a copy)
            dx = torch.ops._c10d_functional.all_reduce(dx, "sum", process_group(ctx.group).group_name)
        dy2d = dy.reshape(-1, dy.size(-1))
        dw = dy2d.t() @ x.reshape(-1, x.size(-1))  # (out, in): computed while dx travels
        db = dy2d.sum(0) if ctx.has_bias else None
        if overlap:
            dx = torch.ops._c10d_functional.wait_tensor(dx)
        elif dx is not None:
            all_reduce_in_place(dx, ctx.group)
        return dx, dw, db, None


def column_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: Group, sequence_parallel: bool = False
) -> torch.Tensor:
    """`copy_to_tp` then `F.linear`, with the backward all-reduce of dx overlapped with dW's matmul.

    With `sequence_parallel`, `x` holds this rank's tokens `[B, T / tp, in]`: they are all-gathered
    first (backward: reduce-scatter of dx, which also does f's sum).
    """
    if tp_size(group) == 1:
        return F.linear(x, weight, bias)
    if sequence_parallel:
        return F.linear(gather_from_sp(x, group), weight, bias)  # (B, T, out / tp)
    return _CopyToTPLinear.apply(x, weight, bias, group)


class SequenceParallelDropout(nn.Dropout):
    """nn.Dropout on an activation replicated over the TP group; under sequence parallelism (this
    rank holds tokens `[B, T / tp, E]`) it draws the full-size mask from the RNG, which TP ranks keep
    in step, and keeps its own slice, so the ranks' masks tile one full mask."""

    def __init__(self, p: float, tp_group: Group = None) -> None:
        super().__init__(p)
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        tp = tp_size(self.tp_group)
        if not (sequence_parallel and self.training and self.p > 0 and tp > 1):
            return super().forward(x)
        full = list(x.shape)
        full[1] *= tp
        keep = torch.empty(full, device=x.device).bernoulli_(1 - self.p).chunk(tp, dim=1)[tp_rank(self.tp_group)]
        return x * keep.to(x.dtype) / (1 - self.p)


class ColumnParallelLinear(nn.Module):
    """`y = x @ W^T + b` with the output features split over the TP group.

    Args:
        in_features, out_features: full (logical) sizes, as for nn.Linear.
        bias: learn an additive bias (sharded like the output).
        tp_group: the tensor-parallel group (a process group or a TPGroup), or None for no parallelism.
        gather_output: all-gather the output so every rank gets `[*, out_features]`.
        num_shards: split the output in this many chunks (default tp_size). A divisor of
            tp_size replicates each chunk on `tp_size / num_shards` ranks and sums its
            gradients over those replicas.
        init_std: None for nn.Linear's init, else N(0, init_std) weights and zero bias.
        generator: RNG for the full weight (default: torch's global RNG).

    Shapes: x `[*, in_features]` -> y `[*, out_features / num_shards]` (or full if gathered); under
    sequence parallelism (`forward(x, sequence_parallel=True)`) x is this rank's tokens `[B, T / tp, in]`
    and they are all-gathered first.

    Raises:
        TypeError: a size is not an integer, or tp_group is not a group.
        ValueError: out_features is not divisible by num_shards, or num_shards does not divide
            tp_size.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        tp_group: Group = None,
        gather_output: bool = False,
        num_shards: int | None = None,
        init_std: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_int(in_features, "in_features")
        check_int(out_features, "out_features")
        tp = tp_size(check_group(tp_group))
        num_shards = num_shards or tp
        if tp % num_shards != 0:
            raise ValueError(f"num_shards = {num_shards} must divide tp_size = {tp}")
        if num_shards != tp and gather_output:
            raise ValueError(f"gather_output needs num_shards == tp_size, got {num_shards} != {tp}")
        if out_features % num_shards != 0:
            raise ValueError(
                f"out_features = {out_features} must be divisible by the number of shards"
                f" = {num_shards} (tp_size = {tp})"
            )
        self.in_features, self.out_features = in_features, out_features
        self.tp_group, self.gather_output = tp_group, gather_output
        self.init_std = init_std
        spec = ShardSpec(dim=0, num_shards=num_shards)
        self.tp_shards = {"weight": spec, "bias": spec}
        self.weight = nn.Parameter(torch.empty(out_features // num_shards, in_features))
        self.bias = nn.Parameter(torch.empty(out_features // num_shards)) if bias else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw the full weight and bias from `generator` (default: torch's global RNG) and keep this
        rank's pieces; nothing is drawn on the meta device."""
        _reset_linear(self, self.tp_shards["weight"], self.tp_shards["bias"], generator)

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias as the forward uses them (through the replica gradient sum if any)."""
        spec = self.tp_shards["weight"]
        if spec.num_shards == tp_size(self.tp_group):
            return self.weight, self.bias
        params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        summed = _SumGradOverReplicas.apply(spec, self.tp_group, *params)
        return summed[0], (summed[1] if self.bias is not None else None)

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        weight, bias = self.params()
        y = column_parallel_linear(x, weight, bias, self.tp_group, sequence_parallel)  # f fused in
        return gather_from_tp(y, self.tp_group) if self.gather_output else y

    def extra_repr(self) -> str:
        shards = self.tp_shards["weight"].num_shards
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, num_shards={shards}, tp_size={tp_size(self.tp_group)}"
        )


def fused_column_parallel(
    x: torch.Tensor, layers: Sequence[ColumnParallelLinear], sequence_parallel: bool = False
) -> list[torch.Tensor]:
    """Each layer's output for the same input `x`, computed as one GEMM over their concatenated local
    weights (Q/K/V; SwiGLU's gate and up): f, or sequence parallelism's all-gather, happens once, and
    backward does one all-reduce of dx, overlapped with the weight-gradient matmul. The layers share one
    TP group and either all have a bias or none has.

    Shapes: x `[B, T, in]` (`[B, T / tp, in]` with `sequence_parallel`) -> `[B, T, out_i / shards_i]` each.
    """
    params = [layer.params() for layer in layers]  # through the replica gradient sum where there is one
    weight = torch.cat([w for w, _ in params])  # (sum of local outs, in)
    bias = None if params[0][1] is None else torch.cat([b for _, b in params])
    y = column_parallel_linear(x, weight, bias, layers[0].tp_group, sequence_parallel)
    return list(y.split([w.size(0) for w, _ in params], dim=-1))


class RowParallelLinear(nn.Module):
    """`y = x @ W^T + b` with the input features split over the TP group.

    Each rank multiplies its slice of the input by its `[out, in / tp]` weight slice; g
    all-reduces the partial sums, and the (replicated) bias is added once, after the reduce.

    Args:
        in_features, out_features: full (logical) sizes, as for nn.Linear.
        bias: learn an additive bias (replicated on every rank).
        tp_group: the tensor-parallel group (a process group or a TPGroup), or None for no parallelism.
        input_is_parallel: the input is already split along its last dim (the output of a
            column-parallel layer); otherwise each rank takes its chunk first.
        init_std, generator: as for ColumnParallelLinear.

    Shapes: x `[*, in_features / tp]` (or `[*, in_features]`) -> y `[*, out_features]`; under sequence
    parallelism (`forward(x, sequence_parallel=True)`) the output is reduce-scattered over tokens
    instead, `[B, T / tp, out_features]`.

    Raises:
        TypeError: a size is not an integer, or tp_group is not a group.
        ValueError: in_features is not divisible by tp_size.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        tp_group: Group = None,
        input_is_parallel: bool = False,
        init_std: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_int(out_features, "out_features")
        tp = tp_size(check_group(tp_group))
        check_divisible(check_int(in_features, "in_features"), "in_features", tp)
        self.in_features, self.out_features = in_features, out_features
        self.tp_group, self.input_is_parallel = tp_group, input_is_parallel
        self.init_std = init_std
        self.tp_shards = {"weight": ShardSpec(dim=1, num_shards=tp)}
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """As ColumnParallelLinear's: the full weight drawn, this rank's columns kept; the bias whole."""
        _reset_linear(self, self.tp_shards["weight"], None, generator)

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        if tp_size(self.tp_group) == 1:
            return F.linear(x, self.weight, self.bias)  # one fused GEMM + bias: exactly nn.Linear
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp_group)
        y = F.linear(x, self.weight)  # (B, T, out): this rank's partial sum
        y = reduce_scatter_to_sp(y, self.tp_group) if sequence_parallel else reduce_from_tp(y, self.tp_group)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # autocast: bias in y's dtype, as nn.Linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, tp_size={tp_size(self.tp_group)}"
        )


def _reset_linear(
    layer: ColumnParallelLinear | RowParallelLinear,
    weight_spec: ShardSpec,
    bias_spec: ShardSpec | None,
    generator: torch.Generator | None,
) -> None:
    """Weight, then bias, drawn in full and sliced: nn.Linear's init, or N(0, init_std²) and zero bias."""
    weight, bias = linear_inits(layer.in_features, layer.init_std)
    rank, tp = tp_rank(layer.tp_group), tp_size(layer.tp_group)
    fill_(layer.weight, (layer.out_features, layer.in_features), weight, weight_spec, rank, tp, generator)
    if layer.bias is not None:
        fill_(layer.bias, (layer.out_features,), bias, bias_spec, rank, tp, generator)
