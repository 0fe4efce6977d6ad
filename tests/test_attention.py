"""MultiHeadAttention: the sharded layer equals the unsharded one, masks mean what they say, errors are clear."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers import ATTENTION, BF16, FP32, MASKS, attention_case, naive_attention
from tp_attention import MultiHeadAttention, full_state_dict, load_full_state_dict
from tp_attention.testing import assert_close, assert_tp_equivalent, forward_backward, run_processes, run_threaded

CFG = ATTENTION
ODD = dict(num_heads=6, emb_size=36, head_size=8, max_seq_len=16, dropout=0.0)  # 6 heads at tp=3, E != H*D


def assert_sharded_equals_unsharded(cfg: dict, mask_kind: str, tp_sizes, batch: int = 3, seq: int = 7, **tol):
    _, x, mask = attention_case(cfg, mask_kind, batch, seq)
    assert_tp_equivalent(
        lambda group: MultiHeadAttention(**cfg, tp_group=group, generator=torch.Generator()),
        (x.requires_grad_(),),
        tp_sizes,
        forward=lambda mha, x: mha(x, mask),
        **(tol or FP32),
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_sharded_equals_unsharded(mask_kind, causal):
    assert_sharded_equals_unsharded(dict(CFG, causal=causal), mask_kind, (1, 2, 4))


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "bhtt_bool"])
def test_odd_shape_tp3(mask_kind):
    assert_sharded_equals_unsharded(ODD, mask_kind, (3,), batch=2, seq=13)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,tp",
    [(4, 2, 2), (4, 2, 4), (8, 4, 2), (4, 1, 2), (4, 1, 4), (8, 2, 4)],
    ids=["gqa-split", "gqa-replicated", "gqa-split-2per", "mqa-tp2", "mqa-tp4", "gqa-2kv-tp4"],
)
@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "additive"])
def test_gqa_and_mqa(num_heads, num_kv_heads, tp, mask_kind):
    assert_sharded_equals_unsharded(dict(CFG, num_heads=num_heads, num_kv_heads=num_kv_heads), mask_kind, (tp,))


def test_replicated_kv_heads_stay_identical_after_an_update():
    cfg = dict(CFG, num_heads=4, num_kv_heads=1)
    ref, x, _ = attention_case(cfg, "none")

    def step(rank, world, state):
        mha = MultiHeadAttention(**cfg, tp_group=dist.group.WORLD, generator=torch.Generator())
        load_full_state_dict(mha, state)
        mha(x).square().sum().backward()
        torch.optim.SGD(mha.parameters(), lr=0.1).step()
        return mha._k.weight.detach().clone(), mha._v.bias.detach().clone()

    results = run_threaded(4, step, ref.state_dict())
    for k_weight, v_bias in results[1:]:
        assert torch.equal(k_weight, results[0][0]) and torch.equal(v_bias, results[0][1])


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [True, False])
def test_masks_mean_what_they_say(mask_kind, causal):
    ref, x, mask = attention_case(dict(CFG, causal=causal), mask_kind)
    with torch.no_grad():
        assert_close(ref(x, mask), naive_attention(ref, x, mask), **FP32, what="vs longhand attention")


@pytest.mark.parametrize("mask_kind", ["key_padding_bool", "additive", "bhtt_bool"])
def test_fully_masked_rows_give_no_nan(mask_kind):
    ref, x, mask = attention_case(CFG, mask_kind)
    mask = mask.clone()
    if mask_kind == "key_padding_bool":
        mask[1] = False  # every key of sequence 1 ignored: all its query rows see nothing
    else:
        mask[1, :, 3, :] = False if mask.dtype == torch.bool else float("-inf")  # query 3 of seq 1
    (y,), (dx,), grads = forward_backward(ref, (x.requires_grad_(),), lambda mha, x: mha(x, mask))
    assert not y.isnan().any() and not dx.isnan().any()
    assert not any(g.isnan().any() for g in grads.values())
    weights = ref.get_attention_weights(x, mask)
    assert not weights.isnan().any()
    assert torch.all(weights[1, :, 3] == 0)
    with torch.no_grad():  # a row that attends to nothing leaves only the output bias
        bias_only = ref._layer.bias.expand(4, 32) if mask_kind == "key_padding_bool" else None
        if bias_only is not None:
            assert torch.allclose(ref(x, mask)[1, :4], bias_only)


def test_get_attention_weights_are_the_weights_forward_uses():
    cfg = dict(CFG, num_kv_heads=2)
    ref, x, mask = attention_case(cfg, "btt_bool")
    weights = ref.get_attention_weights(x, mask)  # (B, H, T, T)
    assert weights.shape == (3, 4, 7, 7)
    per_head = torch.stack([head.get_attention_weights(x, mask) for head in ref._heads], dim=1)
    assert torch.equal(per_head, weights)
    with torch.no_grad():
        v = ref._v(x).view(3, 7, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)  # (B, H, T, D)
        heads_out = (weights @ v).transpose(1, 2).reshape(3, 7, 32)
        assert_close(ref._layer(heads_out), ref(x, mask), **FP32, what="weights @ V -> forward")
    assert torch.allclose(weights.sum(-1), torch.ones(3, 4, 7))


def test_gathered_attention_weights_at_tp2():
    ref, x, mask = attention_case(CFG, "key_padding_bool")
    expected = ref.get_attention_weights(x, mask)

    def weights(rank, world, state):
        mha = MultiHeadAttention(**CFG, tp_group=dist.group.WORLD, generator=torch.Generator())
        load_full_state_dict(mha, state)
        local = torch.stack([h.get_attention_weights(x, mask) for h in mha._heads], dim=1)
        return local, mha.get_attention_weights(x, mask, gather=True), [h.global_index for h in mha._heads]

    for rank, (local, gathered, indices) in enumerate(run_threaded(2, weights, ref.state_dict())):
        assert indices == [2 * rank, 2 * rank + 1]
        assert_close(local, expected[:, 2 * rank : 2 * rank + 2], **FP32, what="local heads")
        assert_close(gathered, expected, **FP32, what="gathered heads")


def test_bf16_sharded_matches_unsharded():
    _, x, mask = attention_case(CFG, "key_padding_bool")
    assert_tp_equivalent(
        lambda g: MultiHeadAttention(**CFG, tp_group=g, generator=torch.Generator()).bfloat16(),
        (x.bfloat16().requires_grad_(),),
        (2,),
        forward=lambda mha, x: mha(x, mask),
        **BF16,
    )


def test_autocast_bf16_runs_and_stays_close_to_fp32():
    ref, x, mask = attention_case(CFG, "additive")
    with torch.no_grad():
        y32 = ref(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = ref(x, mask)
    assert y16.dtype == torch.bfloat16
    assert_close(y16.float(), y32, **BF16, what="autocast bf16 vs fp32")


def init_full_weights(rank, world, seed):
    mha = MultiHeadAttention(**CFG, tp_group=dist.group.WORLD, generator=torch.Generator().manual_seed(seed))
    return full_state_dict(mha)


def test_initialisation_does_not_depend_on_tp():
    single = run_processes(1, init_full_weights, 7)[0]
    for tp in (2, 4):
        for full in run_threaded(tp, init_full_weights, 7):
            assert full.keys() == single.keys()
            for name in single:
                assert torch.equal(full[name], single[name]), name
    plain = MultiHeadAttention(**CFG, generator=torch.Generator().manual_seed(7)).state_dict()
    assert all(torch.equal(plain[n], single[n]) for n in plain)


def test_seed_document_example_runs_as_written():
    from tp_attention.transformer import MultiHeadAttention as SeedImport

    mha = SeedImport(num_heads=8, emb_size=512, head_size=64, max_seq_len=1024)
    x = torch.randn(1, 50, 512)  # [batch_size, seq_len, emb_size]
    output = mha(x)
    assert output.shape == (1, 50, 512)
    weights = [head.get_attention_weights(x) for head in mha._heads]
    assert len(weights) == 8 and all(w.shape == (1, 50, 50) for w in weights)
    assert all(torch.all(w.triu(1) == 0) for w in weights)  # causal
    assert isinstance(mha._dropout, torch.nn.Dropout) and mha._dropout.p == 0.1
    assert mha._layer.in_features == 512 and mha._layer.out_features == 512
    assert tuple(mha._q.weight.shape) == (512, 512)


def test_the_seed_idiom_costs_one_computation_and_no_memory_of_its_own(monkeypatch):
    """`[h.get_attention_weights(x) for h in mha._heads]`: the views are built once, all heads' weights
    computed once and shared while a result lives; any change to the input, mask or weights recomputes."""
    import copy
    import gc
    import pickle

    mha = MultiHeadAttention(**CFG, generator=torch.Generator().manual_seed(0))
    computed = []
    real = MultiHeadAttention.get_attention_weights
    monkeypatch.setattr(
        MultiHeadAttention, "get_attention_weights", lambda *a, **k: computed.append(1) or real(*a, **k)
    )
    x, mask = torch.randn(2, 5, CFG["emb_size"]), torch.ones(2, 5, dtype=torch.bool)
    assert mha._heads is mha._heads and len(mha._heads) == CFG["num_heads"]
    weights = [head.get_attention_weights(x) for head in mha._heads]
    assert len(computed) == 1
    full = real(mha, x)
    assert all(torch.equal(w, full[:, i]) for i, w in enumerate(weights))

    def heads_cost(*args) -> int:
        computed.clear()
        [head.get_attention_weights(*args) for head in mha._heads]
        return len(computed)

    assert heads_cost(x) == 0  # the results above are still alive
    assert heads_cost(x, mask) == 1  # another mask
    assert heads_cost(x.clone()) == 1  # another tensor, the same numbers
    x[0, 0, 0] += 1.0
    assert heads_cost(x) == 1  # changed in place
    with torch.no_grad():
        mha._q.weight[0, 0] += 1.0
    assert heads_cost(x) == 1  # new weights
    kept = [head.get_attention_weights(x) for head in mha._heads]
    assert torch.equal(torch.stack(kept, dim=1), real(mha, x))
    del weights, kept
    gc.collect()
    assert heads_cost(x) == 1  # nothing kept once the results are gone: the cache holds no memory
    copied = copy.deepcopy(mha)
    assert copied._heads[0]._mha is copied and pickle.loads(pickle.dumps(mha))._heads[1].index == 1


def test_seed_attributes_at_tp2():
    def attributes(rank, world):
        mha = MultiHeadAttention(6 * 2, 40, 8, 32, tp_group=dist.group.WORLD, generator=torch.Generator())
        return (
            len(mha._heads),
            tuple(mha._q.weight.shape),
            mha._layer.in_features,
            mha._layer.out_features,
            tuple(mha._layer.weight.shape),
            mha._q.out_features,
        )

    for result in run_threaded(2, attributes):
        assert result == (6, (48, 40), 96, 40, (40, 48), 96)


BAD_INPUTS = [
    (lambda m: m(torch.randn(2, 17, 32)), ValueError, r"seq_len = 17 must be <= max_seq_len = 16"),
    (lambda m: m(torch.randn(2, 5, 31)), ValueError, r"last dim of x must equal emb_size = 32, got 31"),
    (lambda m: m(torch.randn(5, 32)), ValueError, r"x must be 3-D .* got shape \(5, 32\)"),
    (lambda m: m(torch.randn(2, 0, 32)), ValueError, r"at least one sequence of one token"),
    (lambda m: m(torch.ones(2, 5, 32, dtype=torch.long)), TypeError, r"floating-point .* torch.int64"),
    (lambda m: m(torch.randn(2, 5, 32).double()), TypeError, r"torch.float64 but the weights are torch.float32"),
    (lambda m: m([[0.0]]), TypeError, r"must be a torch.Tensor, got list"),
    (lambda m: m(torch.randn(2, 5, 32), torch.ones(2, 6, dtype=torch.bool)), ValueError, r"mask of shape \(2, 6\)"),
    (
        lambda m: m(torch.randn(2, 5, 32), torch.ones(3, 5, 5, dtype=torch.bool)),
        ValueError,
        r"mask of shape \(3, 5, 5\) does not match batch = 2",
    ),
    (lambda m: m(torch.randn(2, 5, 32), torch.ones(2, 3, 5, 5, dtype=torch.bool)), ValueError, r"num_heads = 4"),
    (lambda m: m(torch.randn(2, 5, 32), torch.ones(1, 1, 1, 2, 5, 5, dtype=torch.bool)), ValueError, r"not understood"),
    (lambda m: m(torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.complex64)), ValueError, r"complex64"),
    (lambda m: m(torch.randn(2, 5, 32), torch.full((2, 5), 0.5)), ValueError, r"key-padding mask holds 1/True"),
    (lambda m: m(torch.randn(4, 4, 32), torch.ones(4, 4, dtype=torch.bool)), ValueError, r"ambiguous"),
    (lambda m: m(torch.randn(2, 5, 32), "causal"), TypeError, r"mask must be a torch.Tensor or None, got str"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(call, error, message):
    mha = MultiHeadAttention(**CFG)
    with pytest.raises(error, match=message):
        call(mha)


BAD_CONSTRUCTIONS = [
    (dict(num_heads=0), ValueError, r"num_heads = 0 must be a positive integer"),
    (dict(head_size=-1), ValueError, r"head_size = -1 must be a positive integer"),
    (dict(num_kv_heads=3), ValueError, r"num_heads = 4 must be divisible by num_kv_heads = 3"),
    (dict(dropout=1.0), ValueError, r"dropout = 1.0 must be in \[0, 1\)"),
]


@pytest.mark.parametrize("override,error,message", BAD_CONSTRUCTIONS)
def test_bad_constructions_raise_clear_errors(override, error, message):
    with pytest.raises(error, match=message):
        MultiHeadAttention(**dict(CFG, **override))


@pytest.mark.parametrize(
    "override,tp,message",
    [
        (dict(num_heads=6), 4, r"num_heads = 6 must be divisible by tp_size = 4"),
        (dict(num_heads=12, num_kv_heads=6), 4, r"num_kv_heads = 6 must be divisible by tp_size = 4 or divide it"),
    ],
)
def test_bad_tp_layouts_raise_clear_errors(override, tp, message):
    def build(rank, world):
        with pytest.raises(ValueError, match=message):
            MultiHeadAttention(**dict(CFG, **override), tp_group=dist.group.WORLD, generator=torch.Generator())

    run_threaded(tp, build)
