"""GPT on real gloo process groups: equivalence, dropout masks and collective counts per step."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers import CASES, FP32, LAYOUTS, count_collectives, count_shared_memory_calls, gpt_batch, logits_and_loss
from tp_attention import full_grads, load_full_state_dict
from tp_attention.grad_norm import sync_replicated_grads
from tp_attention.model import GPT
from tp_attention.shm import with_shared_memory
from tp_attention.testing import assert_close, assert_results_close, forward_backward, run_processes

DROPOUT = dict(CASES["vocab65"], dropout=0.3)
EQUIVALENCE = ["vocab65", "gqa", "llama"]


def sync(model: GPT) -> None:
    sync_replicated_grads(model, model.tp_group)


def on_every_rank(rank, world, cases, shared_memory=False):
    group = with_shared_memory(dist.group.WORLD) if shared_memory else dist.group.WORLD
    out = {"equivalence": [], "sequence_parallel": []}
    for cfg, state, idx, targets in cases:
        model = GPT(**cfg, tp_group=group)
        load_full_state_dict(model, state)
        out["equivalence"].append(forward_backward(model, (idx, targets), logits_and_loss))
    with count_shared_memory_calls(group) as calls:
        for cfg, state, idx, targets in cases:
            model = GPT(**cfg, tp_group=group, sequence_parallel=True)
            load_full_state_dict(model, state)
            out["sequence_parallel"].append(
                forward_backward(model, (idx, targets), logits_and_loss, after_backward=sync)
            )
    out["sequence_parallel_shm_calls"] = calls

    cfg, state, idx, targets = cases[0]
    # CommDebugMode's module tracker fails on a second use with the same model: one model each
    training, inference = GPT(**cfg, tp_group=group), GPT(**cfg, tp_group=group)
    forward, backward = count_collectives(lambda: training(idx, targets).backward())
    out["counts"] = forward, backward, count_collectives(lambda: inference(idx))[0]

    torch.manual_seed(0)  # every TP rank seeds alike: same weights, same embedding/residual dropout masks
    model = GPT(**DROPOUT, tp_group=group)
    torch.manual_seed(1)
    loss = model(idx, targets)
    loss.backward()
    out["dropout"] = loss.detach(), full_grads(model)
    return out


def dropout_reference(idx, targets):
    torch.manual_seed(0)
    model = GPT(**DROPOUT)
    torch.manual_seed(1)
    loss = model(idx, targets)
    loss.backward()
    return loss.detach(), full_grads(model), model


@pytest.mark.parametrize("world, shared_memory", LAYOUTS, ids=["2-gloo", "2-shm", "4-gloo", "4-shm"])
def test_gpt_on_gloo(world, shared_memory):
    cases = []
    for name in EQUIVALENCE:
        ref = GPT(**CASES[name], generator=torch.Generator().manual_seed(0))
        cases.append((CASES[name], ref.state_dict(), *gpt_batch(CASES[name], seq=12)))  # sequence parallel: T % tp
    results = run_processes(world, on_every_rank, cases, shared_memory)

    for i, (cfg, state, idx, targets) in enumerate(cases):
        ref = GPT(**cfg, generator=torch.Generator())
        load_full_state_dict(ref, state)
        expected = forward_backward(ref, (idx, targets), logits_and_loss)
        for rank, r in enumerate(results):
            assert_results_close(r["equivalence"][i], expected, **FP32, where=f"{EQUIVALENCE[i]} rank {rank}")
            assert_results_close(
                r["sequence_parallel"][i], expected, **FP32, where=f"{EQUIVALENCE[i]} sequence parallel rank {rank}"
            )

    layers = CASES["vocab65"]["num_layers"]
    for r in results:
        forward, backward, inference = r["counts"]
        if shared_memory:  # every collective went through shared memory: no c10d all-reduce at all
            assert (forward, backward, inference) == ({}, {}, {})
            assert set(r["sequence_parallel_shm_calls"]) == {"all_gather", "reduce_scatter", "all_reduce"}
            continue
        assert forward == {"all_reduce": 1 + 2 * layers + 2}  # embedding, 2 per block, loss max + sums
        assert backward == {"all_reduce": 2 * layers + 1}  # 2 per block, LM-head input
        assert inference == {"all_reduce": 1 + 2 * layers, "all_gather": 1}  # + gather of the logits

    _, _, idx, targets = cases[0]
    loss, grads, model = dropout_reference(idx, targets)
    with torch.no_grad():
        assert model.eval()(idx, targets) != loss, "dropout should change the loss"
    for r in results:
        assert_close(r["dropout"][0], loss, **FP32, what="loss with dropout")
        for name in grads:
            assert_close(r["dropout"][1][name], grads[name], **FP32, what=f"grad of {name} with dropout")


def sequence_parallel_dropout_loss(rank, world, idx, targets):
    torch.manual_seed(0)
    model = GPT(**DROPOUT, tp_group=dist.group.WORLD, sequence_parallel=True)
    torch.manual_seed(1)  # the same stream on every rank: each keeps its slice of one full mask
    return model(idx, targets).item()


def test_sequence_parallel_dropout_masks_tile_one_full_mask():
    idx, targets = gpt_batch(CASES["vocab65"], seq=12)
    at_tp2 = run_processes(2, sequence_parallel_dropout_loss, idx, targets)
    at_tp4 = run_processes(4, sequence_parallel_dropout_loss, idx, targets)
    assert len(set(at_tp2)) == 1 and len(set(at_tp4)) == 1, "every TP rank must see the same loss"
    assert abs(at_tp2[0] - at_tp4[0]) <= 1e-5 * abs(at_tp2[0]), (at_tp2, at_tp4)
    with torch.no_grad():
        torch.manual_seed(0)
        assert GPT(**DROPOUT).eval()(idx, targets).item() != at_tp2[0], "dropout should change the loss"
