"""MultiHeadAttention on real gloo process groups (one OS process per rank)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers import ATTENTION, FP32, LAYOUTS, attention_case, count_collectives
from tp_attention import MultiHeadAttention, full_state_dict, load_full_state_dict
from tp_attention.shm import with_shared_memory
from tp_attention.testing import assert_close, assert_results_close, forward_backward, run_processes

CFG = ATTENTION
GQA = dict(CFG, num_heads=4, num_kv_heads=1)
CASES = [(CFG, "key_padding_bool"), (GQA, "additive")]


def attend(mha: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return mha(x, mask)


def on_every_rank(rank, world, cases, shared_memory=False):
    """Everything the gloo tests check, in one spawn to pay the start-up once."""
    group = with_shared_memory(dist.group.WORLD) if shared_memory else dist.group.WORLD
    if shared_memory:
        assert group.shared_memory is not None
    out = {"equivalence": [], "counts": {}}
    for cfg, state, x, mask in cases:
        mha = MultiHeadAttention(**cfg, tp_group=group)
        load_full_state_dict(mha, state)
        out["equivalence"].append(forward_backward(mha, (x.requires_grad_(), mask), attend))

    for name, cfg in [("mha", CFG), ("mqa", GQA)]:
        mha = MultiHeadAttention(**cfg, tp_group=group)
        x = torch.randn(2, 8, cfg["emb_size"], requires_grad=True)
        out["counts"][name] = count_collectives(lambda: mha(x).sum().backward())  # noqa: B023

    torch.manual_seed(0)  # every rank seeds alike: the same full weights, the same dropout mask
    mha = MultiHeadAttention(**dict(CFG, dropout=0.5), tp_group=group)
    out["full_weights"] = full_state_dict(mha)
    torch.manual_seed(1)
    out["dropout_output"] = mha(torch.ones(2, 8, 32)).detach()
    return out


def dropout_reference():
    torch.manual_seed(0)
    ref = MultiHeadAttention(**dict(CFG, dropout=0.5))
    torch.manual_seed(1)
    return ref.state_dict(), ref(torch.ones(2, 8, 32)).detach()


@pytest.mark.parametrize("world, shared_memory", LAYOUTS, ids=["2-gloo", "2-shm", "4-gloo", "4-shm"])
def test_attention_on_gloo(world, shared_memory):
    references = [attention_case(cfg, kind) for cfg, kind in CASES]
    cases = [(cfg, ref.state_dict(), x, mask) for (cfg, _), (ref, x, mask) in zip(CASES, references, strict=True)]
    results = run_processes(world, on_every_rank, cases, shared_memory)

    for i, (ref, x, mask) in enumerate(references):
        expected = forward_backward(ref, (x.requires_grad_(), mask), attend)
        for rank, r in enumerate(results):
            assert_results_close(r["equivalence"][i], expected, **FP32, where=f"case {i} rank {rank}")

    for r in results:  # one all-reduce forward (g), one backward (f); replicated KV heads add one per K, V
        expected = ({}, {}) if shared_memory else ({"all_reduce": 1}, {"all_reduce": 1})  # shm: no c10d calls
        assert r["counts"]["mha"] == expected
        assert r["counts"]["mqa"] == (({}, {}) if shared_memory else ({"all_reduce": 1}, {"all_reduce": 3}))

    state, y_ref = dropout_reference()
    for r in results:
        assert all(torch.equal(r["full_weights"][n], state[n]) for n in state), "init depends on tp"
        assert_close(r["dropout_output"], y_ref, **FP32, what="dropout output vs unsharded")
    assert (y_ref == 0).float().mean() > 0.3  # dropout really dropped
