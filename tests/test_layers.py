"""f/g operators, parallel linears and the mesh helper, checked against their definitions."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tp_attention import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tp,
    full_grads,
    full_state_dict,
    gather_from_sp,
    gather_from_tp,
    init_parallel_groups,
    load_full_state_dict,
    mappings,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
)
from tp_attention.distributed import ParallelDims
from tp_attention.testing import assert_close, run_threaded


def per_rank_input(rank: int, shape=(2, 4, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(rank)).requires_grad_()


def apply_op(rank, world, name):
    """Run one operator on a rank-dependent input; backward a rank-dependent upstream gradient."""
    group = dist.group.WORLD
    op = {
        "copy": copy_to_tp,
        "reduce": reduce_from_tp,
        "scatter": scatter_to_tp,
        "gather": gather_from_tp,
        "gather_sp": gather_from_sp,
        "reduce_scatter_sp": reduce_scatter_to_sp,
    }[name]
    x = per_rank_input(rank)
    y = op(x.clone(), group)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(100 + rank))
    y.backward(grad)
    return y.detach(), grad, x.grad


def expected(name: str, r: int, xs: list, grads: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward output, input gradient) of rank r, from the operator's definition."""
    n = len(xs)
    if name == "copy":
        return xs[r], sum(grads)
    if name == "reduce":
        return sum(xs), grads[r]
    if name == "scatter":
        return xs[r].chunk(n, -1)[r], torch.cat(grads, -1)
    if name == "gather":
        return torch.cat(xs, -1), grads[r].chunk(n, -1)[r]
    if name == "gather_sp":
        return torch.cat(xs, 1), sum(grads).chunk(n, 1)[r]
    return sum(xs).chunk(n, 1)[r], torch.cat(grads, 1)  # reduce_scatter_sp


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["copy", "reduce", "scatter", "gather", "gather_sp", "reduce_scatter_sp"])
def test_operators_match_their_definition(name, world):
    results = run_threaded(world, apply_op, name)
    xs = [per_rank_input(r).detach() for r in range(world)]
    grads = [g for _, g, _ in results]
    for r, (y, _, dx) in enumerate(results):
        expected_y, expected_dx = expected(name, r, xs, grads)
        assert torch.allclose(y, expected_y, atol=1e-6), f"{name} forward, rank {r}"
        assert torch.allclose(dx, expected_dx, atol=1e-6), f"{name} backward, rank {r}"


@pytest.mark.parametrize("world", [2, 4])
def test_reduce_scatter_falls_back_to_all_reduce(monkeypatch, world):
    """A backend without the tensor reduce-scatter gets all-reduce + this rank's chunk (the same sums)."""

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("the tensor reduce-scatter was called on a backend said not to have it")

    monkeypatch.setattr(mappings, "REDUCE_SCATTER_BACKENDS", set())
    monkeypatch.setattr(mappings, "_reduce_scatter_tensor", must_not_be_called)
    results = run_threaded(world, apply_op, "reduce_scatter_sp")
    xs = [per_rank_input(r).detach() for r in range(world)]
    for r, (y, _, _) in enumerate(results):
        assert_close(y, sum(xs).chunk(world, 1)[r], rtol=1e-6, atol=1e-6, what=f"rank {r}")


def test_operators_are_identity_without_a_group():
    x = torch.randn(3, 4, requires_grad=True)
    for op in (copy_to_tp, reduce_from_tp, scatter_to_tp, gather_from_tp, gather_from_sp, reduce_scatter_to_sp):
        assert op(x, None) is x


def test_reduce_from_tp_does_not_corrupt_a_shared_gradient():
    def run(rank, world):
        x = per_rank_input(rank)
        y = copy_to_tp(x, dist.group.WORLD)
        (y + y * 0).sum().backward()  # both branches receive one gradient tensor
        return x.grad

    for grad in run_threaded(2, run):
        assert torch.allclose(grad, torch.full_like(grad, 2.0))


@pytest.mark.parametrize("bias", [True, False])
def test_parallel_linears_at_tp1_are_nn_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(8, 12, bias=bias)
    for layer in (ColumnParallelLinear(8, 12, bias=bias), RowParallelLinear(8, 12, bias=bias)):
        assert (layer.in_features, layer.out_features) == (8, 12)
        assert layer.weight.shape == linear.weight.shape and (layer.bias is None) == (not bias)
        layer.load_state_dict(linear.state_dict())
        x = torch.randn(5, 8)
        assert torch.equal(layer(x), linear(x))


def test_default_init_matches_nn_linear_distribution():
    torch.manual_seed(0)
    reference = nn.Linear(256, 256)
    torch.manual_seed(0)
    ours = ColumnParallelLinear(256, 256)
    bound = 1 / 16
    for p in (ours.weight, ours.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    assert abs(ours.weight.std().item() - reference.weight.std().item()) < 2e-3


def linear_case(rank, world, kind, state, x, grad_out, gen_seed):
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(gen_seed)
    layer = (
        ColumnParallelLinear(8, 12, tp_group=group, gather_output=True, generator=gen)
        if kind == "column"
        else RowParallelLinear(8, 12, tp_group=group, input_is_parallel=False, generator=gen)
    )
    full_init = full_state_dict(layer)
    load_full_state_dict(layer, state)
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(grad_out)
    return full_init, y.detach(), x.grad, full_grads(layer)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_parallel_linears_equal_nn_linear(kind, world):
    linear = (ColumnParallelLinear if kind == "column" else RowParallelLinear)(
        8, 12, generator=torch.Generator().manual_seed(3)
    )
    x, grad_out = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    xr = x.clone().requires_grad_()
    linear(xr).backward(grad_out)
    for init, y, dx, grads in run_threaded(world, linear_case, kind, linear.state_dict(), x, grad_out, 3):
        assert all(torch.equal(init[n], t) for n, t in linear.state_dict().items()), "init depends on tp"
        assert_close(y, linear(x).detach(), rtol=1e-6, atol=1e-6, what="output")
        assert_close(dx, xr.grad, rtol=1e-6, atol=1e-6, what="input grad")
        for name, p in linear.named_parameters():
            assert_close(grads[name], p.grad, rtol=1e-6, atol=1e-6, what=name)


def test_row_bias_is_added_once():
    def run(rank, world):
        layer = RowParallelLinear(8, 4, tp_group=dist.group.WORLD, input_is_parallel=True)
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.fill_(1.0)
        return layer(torch.randn(3, 4))

    for y in run_threaded(2, run):
        assert torch.equal(y, torch.ones(3, 4))


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda g: ColumnParallelLinear(8, 10, tp_group=g), r"out_features = 10 must be divisible .* = 4"),
        (lambda g: RowParallelLinear(6, 8, tp_group=g), r"in_features = 6 must be divisible by tp_size = 4"),
        (lambda g: ColumnParallelLinear(8, 12, tp_group=g, num_shards=3), r"num_shards = 3 must divide tp_size = 4"),
        (lambda g: ColumnParallelLinear(8, 12, tp_group=g, num_shards=2, gather_output=True), r"gather_output"),
    ],
)
def test_indivisible_sizes_name_both_numbers(build, message):
    def run(rank, world):
        with pytest.raises(ValueError, match=message):
            build(dist.group.WORLD)

    run_threaded(4, run)


def test_mesh_helper_builds_dp_and_tp_groups():
    def run(rank, world):
        groups = init_parallel_groups(tp=2, device_type="cpu")
        tp_peers = dist.get_process_group_ranks(groups.tp_group)
        dp_peers = dist.get_process_group_ranks(groups.dp_group)
        return groups.dp_size, groups.tp_size, groups.dp_rank, groups.tp_rank, tp_peers, dp_peers

    for rank, result in enumerate(run_threaded(4, run)):
        dp, tp = divmod(rank, 2)
        assert result == (2, 2, dp, tp, [2 * dp, 2 * dp + 1], [tp, tp + 2])


def test_mesh_helper_rejects_a_tp_that_does_not_divide_the_world():
    def run(rank, world):
        with pytest.raises(ValueError, match=r"world_size = 4 must be divisible by tp = 3"):
            init_parallel_groups(tp=3, device_type="cpu")

    run_threaded(4, run)


@pytest.mark.parametrize(
    "sizes,message",
    [
        (dict(tp=2, cp=2, pp=2), r"world_size = 12 must be divisible by pp x tp x cp = 2 x 2 x 2"),
        (dict(pp=0), r"pp = 0 must be a positive integer"),
        (dict(tp=2, dp_shard=4), r"dp_shard = 4 must divide dp = world_size / tp = 12 / 2 = 6"),
        (
            dict(pp=2, dp_shard=2, dp_replicate=2),
            r"dp_replicate x dp_shard = 2 x 2 must equal dp = world_size / \(pp x tp\) = 12 / 2 = 6",
        ),
    ],
)
def test_parallel_dims_refuse_sizes_that_do_not_fit_the_world_naming_them(sizes, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(12, **sizes)


def test_one_parallel_dims_builds_every_group_of_a_pp_dp_cp_tp_layout():
    """16 ranks = pp 2 x dp 2 x cp 2 x tp 2: stages outermost, TP innermost; a stage's (dp, tp) mesh, the CP
    pairs inside its dp, the pipeline pairs across stages (also the tied table's)."""

    def run(rank, world):
        groups = init_parallel_groups(tp=2, device_type="cpu", cp=2, pp=2)
        ranks = dist.get_process_group_ranks
        return (
            ranks(groups.tp_group),
            ranks(groups.dp_group),
            ranks(groups.cp_group),
            ranks(groups.pp_group),
            ranks(groups.embedding_group),
            (groups.pp_rank, groups.dp_size, groups.batch_ranks, groups.dims.dp_replicate),
        )

    for rank, (tp, dp, cp, pp, embedding, sizes) in enumerate(run_threaded(16, run)):
        stage, position = divmod(rank, 8)
        assert tp == [rank - rank % 2, rank - rank % 2 + 1]
        assert dp == [stage * 8 + position % 2 + 2 * d for d in range(4)]
        assert cp == [rank - rank % 4 + position % 2, rank - rank % 4 + position % 2 + 2]
        assert pp == embedding == [position, 8 + position]
        assert sizes == (stage, 4, 2, 2)


def test_the_tied_table_pairs_join_the_first_and_last_of_four_stages():
    def run(rank, world):
        groups = init_parallel_groups(tp=1, device_type="cpu", pp=4)
        ranks = dist.get_process_group_ranks
        return ranks(groups.pp_group), ranks(groups.embedding_group) if groups.embedding_group else None

    results = run_threaded(8, run)
    for rank, (pp, embedding) in enumerate(results):
        assert pp == [rank % 2 + 2 * s for s in range(4)]
        assert embedding == ([rank % 2, rank % 2 + 6] if rank // 2 in (0, 3) else None)


def test_threaded_process_group_sums_across_threads():
    """Pins the private threaded backend the single-process tests stand on."""

    def run(rank, world):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t)
        return t.item()

    assert run_threaded(4, run) == [6.0] * 4


@pytest.mark.parametrize(
    "world, sizes, expected",
    [
        (16, dict(tp=2, cp=2, pp=2, dp_shard=2), [0, 1, 6, 7, 8, 9, 14, 15]),  # FSDP2 shards over dp_shard x cp
        (8, dict(tp=2, cp=2), [0, 1]),  # no FSDP2: CP peers and replicas hold what ranks 0 and 1 hold
        (16, dict(tp=2, dp_shard=4, dp_replicate=2), [0, 1, 6, 7]),
        (512, dict(tp=8, dp_shard=64), [0, 7, 504, 511]),
    ],
)
def test_distinct_ranks_are_each_stage_s_first_and_last_tp_rank_and_fsdp_shard(world, sizes, expected):
    """The rank positions whose pieces can differ (`train.dry_run --all-ranks` plays them), in the order
    `(pp, dp_replicate, dp_shard, cp, tp)` that `ParallelDims.build` lays ranks out in."""
    assert ParallelDims(world, **sizes).distinct_ranks() == expected
