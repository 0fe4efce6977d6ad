"""tp_attention.testing on user-written layers: a correct one passes, subtly wrong ones fail by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tp_attention import ColumnParallelLinear, RowParallelLinear, ShardSpec, reduce_from_tp
from tp_attention.groups import tp_rank, tp_size
from tp_attention.testing import assert_close, assert_tp_equivalent


class ParallelMLP(nn.Module):
    """Column-parallel up-projection, row-parallel down-projection: one all-reduce each way."""

    def __init__(self, width: int, tp_group=None) -> None:
        super().__init__()
        self.up = ColumnParallelLinear(width, 4 * width, tp_group=tp_group)
        self.down = RowParallelLinear(4 * width, width, tp_group=tp_group, input_is_parallel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class BiasOnEveryRank(nn.Module):
    """A classic TP bug: the row-parallel bias added on every rank before the all-reduce (tp times)."""

    def __init__(self, width: int, tp_group=None) -> None:
        super().__init__()
        self.tp_group = tp_group
        tp = tp_size(tp_group)
        self.tp_shards = {"weight": ShardSpec(dim=1, num_shards=tp)}
        self.weight = nn.Parameter(torch.randn(width, width // tp))
        self.bias = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = x.chunk(tp_size(self.tp_group), dim=-1)[tp_rank(self.tp_group)]
        return reduce_from_tp(F.linear(local, self.weight, self.bias), self.tp_group)


class ForgetsF(ParallelMLP):
    """Another: the up-projection without f, so each rank's input gradient holds only its own shard's part."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.up.params()
        return self.down(F.gelu(F.linear(x, weight, bias)))


def mlp16(group) -> ParallelMLP:  # a module-level builder, so it pickles into real processes
    return ParallelMLP(16, group)


def test_a_correct_user_layer_passes_at_every_tp_on_threads_and_on_processes():
    x = torch.randn(2, 5, 16, requires_grad=True)
    assert_tp_equivalent(lambda group: ParallelMLP(16, group), (x,), tp_sizes=(1, 2, 4))
    assert_tp_equivalent(mlp16, (x,), tp_sizes=(2,), processes=True)


@pytest.mark.parametrize(
    "layer,message",
    [
        (BiasOnEveryRank, r"tp=2 rank 0 output 0: \d+ of 160 elements differ; worst at index \(\d, \d, \d+\)"),
        (ForgetsF, r"tp=2 rank 0 gradient of input 0: \d+ of 160 elements differ"),
    ],
    ids=["bias-added-tp-times", "missing-f"],
)
def test_a_subtly_wrong_layer_fails_naming_the_tensor_and_its_worst_element(layer, message):
    x = torch.randn(2, 5, 16, requires_grad=True)
    with pytest.raises(AssertionError, match=message):
        assert_tp_equivalent(lambda group: layer(16, group), (x,), tp_sizes=(1, 2))


def test_assert_close_is_element_wise():
    big_and_small = torch.tensor([1000.0, 1e-3])
    assert_close(big_and_small * (1 + 1e-6), big_and_small, rtol=1e-5, atol=0.0)
    with pytest.raises(AssertionError, match=r"1 of 2 elements differ; worst at index \(1,\)"):
        # a 10% error in the small element: a tolerance relative to the largest element would not see it
        assert_close(torch.tensor([1000.0, 1.1e-3]), big_and_small, rtol=1e-5, atol=0.0)
    with pytest.raises(AssertionError, match=r"shape \(3,\) != \(2,\)"):
        assert_close(torch.zeros(3), big_and_small, rtol=0, atol=0)
    assert_close(torch.tensor([float("nan"), float("inf")]), torch.tensor([float("nan"), float("inf")]), rtol=0, atol=0)
