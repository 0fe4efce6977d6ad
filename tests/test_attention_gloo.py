"""MultiHeadAttention on real gloo process groups (one OS process per rank)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

from tests.harness import assert_rel_close, run_gloo
from tests.test_attention import (
    CFG,
    FP32_TOL,
    check_against_reference,
    forward_backward,
    reference_case,
)
from tp_attention import MultiHeadAttention, full_state_dict, load_full_state_dict
from tp_attention.shm import enable_shared_memory_collectives

GQA = dict(CFG, num_heads=4, num_kv_heads=1)


def comm_counts(counts) -> dict[str, int]:
    """Counts by collective; c10d's in-place and the functional (async) all-reduce count alike."""
    out: dict[str, int] = {}
    for op, n in counts.items():
        name = str(op).split(".")[-1]
        name = {"allreduce_": "all_reduce", "_allgather_base_": "all_gather"}.get(name, name)
        out[name] = out.get(name, 0) + n
    return {name: n for name, n in out.items() if n}


def count_collectives(step) -> tuple[dict[str, int], dict[str, int]]:
    """Collectives issued by `step()` (which runs forward and backward), split forward/backward."""
    with CommDebugMode() as mode:
        step()
    per_pass = mode.comm_module_counts["Global"]
    return comm_counts(per_pass["forward"]), comm_counts(per_pass["backward"])


def on_every_rank(rank, world, cases, shared_memory=False):
    """Everything the gloo tests check, in one spawn to pay the start-up once."""
    group = dist.group.WORLD
    if shared_memory:
        assert enable_shared_memory_collectives(group)
    out = {"equivalence": [], "counts": {}}
    for cfg, state, x, mask, grad_out in cases:
        mha = MultiHeadAttention(**cfg, tp_group=group)
        load_full_state_dict(mha, state)
        out["equivalence"].append(forward_backward(mha, x, mask, grad_out))

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


@pytest.mark.parametrize("shared_memory", [False, True], ids=["gloo", "shm"])
@pytest.mark.parametrize("world", [2, 4])
def test_attention_on_gloo(world, shared_memory):
    references = [reference_case(CFG, "key_padding_bool"), reference_case(GQA, "additive")]
    cases = [(cfg, ref.state_dict(), x, mask, g) for cfg, (ref, x, mask, g) in zip([CFG, GQA], references, strict=True)]
    results = run_gloo(world, on_every_rank, cases, shared_memory)

    for i, (ref, x, mask, grad_out) in enumerate(references):
        check_against_reference([r["equivalence"][i] for r in results], ref, x, mask, grad_out)

    for r in results:  # one all-reduce forward (g), one backward (f); replicated KV heads add one per K, V
        expected = ({}, {}) if shared_memory else ({"all_reduce": 1}, {"all_reduce": 1})  # shm: no c10d calls
        assert r["counts"]["mha"] == expected
        assert r["counts"]["mqa"] == (({}, {}) if shared_memory else ({"all_reduce": 1}, {"all_reduce": 3}))

    state, y_ref = dropout_reference()
    for r in results:
        assert all(torch.equal(r["full_weights"][n], state[n]) for n in state), "init depends on tp"
        assert_rel_close(r["dropout_output"], y_ref, FP32_TOL, "dropout output vs unsharded")
    assert (y_ref == 0).float().mean() > 0.3  # dropout really dropped
