"""torch.compile: a transformer block traces into one graph (no graph break) at tp 1 and 2, with the
process group's collectives and with the shared-memory ones, with and without sequence parallelism;
the compiled model's loss and gradients equal eager's."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers import CASES, FP32
from tp_attention import full_grads
from tp_attention.model import GPT
from tp_attention.shm import with_shared_memory
from tp_attention.testing import assert_close, run_processes

CFG = dict(CASES["vocab65"], max_seq_len=16)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, CFG["vocab_size"], (2, 12), generator=gen),
        torch.randint(0, CFG["vocab_size"], (2, 12), generator=gen),
    )


def eager_and_compiled(model: GPT, backend: str) -> dict:
    """Graph breaks inside block 0, then loss and full gradients eager and compiled."""
    idx, targets = batch()
    sp = model.sequence_parallel
    tokens = idx.size(1) // (dist.get_world_size() if sp else 1)
    x = torch.randn(2, tokens, CFG["emb_size"], requires_grad=True)
    explained = torch._dynamo.explain(model._decoders[0])(x, None, sp)
    out = {"block_graph_breaks": explained.graph_break_count, "block_graphs": explained.graph_count}
    for name, run in (("eager", model), ("compiled", torch.compile(model, backend=backend))):
        model.zero_grad()
        loss = run(idx, targets)
        loss.backward()
        out[name] = loss.detach(), full_grads(model)
    torch._dynamo.reset()
    return out


def on_every_rank(rank, world, shared_memory):
    group = with_shared_memory(dist.group.WORLD) if shared_memory else dist.group.WORLD
    results = []
    for sequence_parallel in (False, True):
        model = GPT(
            **CFG, tp_group=group, generator=torch.Generator().manual_seed(0), sequence_parallel=sequence_parallel
        )
        results.append(eager_and_compiled(model, "aot_eager"))  # AOTAutograd: fake kernels, functionalization
    return results


def assert_same(result: dict) -> None:
    assert (result["block_graph_breaks"], result["block_graphs"]) == (0, 1)
    loss, grads = result["eager"]
    assert_close(result["compiled"][0], loss, **FP32, what="compiled loss")
    for name in grads:
        assert_close(result["compiled"][1][name], grads[name], **FP32, what=f"compiled grad of {name}")


@pytest.mark.parametrize("shared_memory", [pytest.param(False, marks=pytest.mark.slow), True], ids=["gloo", "shm"])
def test_a_block_compiles_without_graph_breaks_at_tp2(shared_memory):
    for rank_results in run_processes(2, on_every_rank, shared_memory):
        for result in rank_results:  # sequence parallel off, on
            assert_same(result)


def test_inductor_at_tp1_matches_eager_and_still_refuses_bad_ids():
    model = GPT(**CFG, generator=torch.Generator().manual_seed(0))
    assert_same(eager_and_compiled(model, "inductor"))
    compiled = torch.compile(model)
    idx, targets = batch()
    with pytest.raises(ValueError, match=r"idx holds id 65 outside the vocabulary \[0, 65\)"):
        compiled(idx.clamp(max=64) + 1, targets)
    torch._dynamo.reset()
