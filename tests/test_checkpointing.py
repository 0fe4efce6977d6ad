"""Activation checkpointing recomputes each marked block in backward: the same loss and gradients (fp32, 1e-6)
as keeping the activations, dropout masks included, under TP with sequence parallelism and under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers import CASES, gpt_batch
from tp_attention import full_grads, load_full_state_dict
from tp_attention.checkpointing import apply_activation_checkpointing
from tp_attention.grad_norm import sync_replicated_grads
from tp_attention.model import GPT
from tp_attention.testing import assert_close, run_processes

CFG = dict(CASES["llama"], dropout=0.3, num_layers=3)
EXACT = dict(rtol=1e-6, atol=1e-7)


def loss_and_grads(model: GPT, idx, targets, mode: str, compiled: bool = False):
    apply_activation_checkpointing(model, mode)
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    torch.manual_seed(7)  # the same dropout masks for every mode; TP ranks (processes: one RNG each) alike
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = forward(idx, targets)
    loss.backward()
    if model.sequence_parallel:
        sync_replicated_grads(model, model.tp_group)
    grads = full_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, sum(saved)


def at_tp(rank, world, state, idx, targets):
    model = GPT(**CFG, tp_group=dist.group.WORLD, generator=torch.Generator(), sequence_parallel=True)
    load_full_state_dict(model, state)
    return {mode: loss_and_grads(model, idx, targets, mode) for mode in ("none", "full", "selective")}


def test_recomputed_blocks_give_the_same_gradients_at_tp2_with_sequence_parallelism():
    reference = GPT(**CFG, generator=torch.Generator().manual_seed(0))
    idx, targets = gpt_batch(CFG, seq=12)
    for rank, modes in enumerate(run_processes(2, at_tp, reference.state_dict(), idx, targets)):
        loss, grads, saved = modes["none"]
        for mode in ("full", "selective"):
            other_loss, other_grads, other_saved = modes[mode]
            assert_close(other_loss, loss, **EXACT, what=f"{mode} loss, rank {rank}")
            for name, grad in grads.items():
                assert_close(other_grads[name], grad, **EXACT, what=f"{mode} gradient of {name}, rank {rank}")
            assert other_saved < saved, f"{mode} keeps fewer activations"
        assert modes["full"][2] < modes["selective"][2]


def test_checkpointing_composes_with_torch_compile():
    model = GPT(**CFG, generator=torch.Generator().manual_seed(0))
    idx, targets = gpt_batch(CFG, seq=12)
    loss, grads, _ = loss_and_grads(model, idx, targets, "none")
    compiled_loss, compiled_grads, _ = loss_and_grads(model, idx, targets, "full", compiled=True)
    assert_close(compiled_loss, loss, **EXACT, what="compiled, checkpointed loss")
    for name, grad in grads.items():
        assert_close(compiled_grads[name], grad, **EXACT, what=f"compiled, checkpointed gradient of {name}")


def test_modes_are_checked():
    model = GPT(**CFG)
    assert apply_activation_checkpointing(model, "selective", every=2) == 2  # blocks 0 and 2 of 3
    assert apply_activation_checkpointing(model, "none") == 0
    with pytest.raises(ValueError, match="mode = 'some' must be one of none, full, selective"):
        apply_activation_checkpointing(model, "some")
