"""Context parallelism (`tp_attention.context`): ring attention equals one process's attention, forward
and backward, and a GPT whose sequences are split over CP ranks (alone, with TP, sequence parallelism,
activation checkpointing, GQA and RoPE) has one process's loss and gradients."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from tp_attention.attention import MultiHeadAttention
from tp_attention.checkpointing import apply_activation_checkpointing
from tp_attention.context import attend, attend_backward, local_positions, ring_attention, shard_sequence
from tp_attention.grad_norm import sync_replicated_grads
from tp_attention.model import GPT
from tp_attention.state_dict import full_grads, full_state_dict, load_full_state_dict
from tp_attention.testing import assert_close, run_processes, run_threaded


def test_each_rank_holds_an_early_and_a_late_chunk():
    assert local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert torch.cat([local_positions(16, 4, r) for r in range(4)]).sort().values.tolist() == list(range(16))
    assert local_positions(6, 1, 0).tolist() == list(range(6))
    with pytest.raises(ValueError, match=r"seq_len = 12 must be a multiple of 2 \* cp = 8"):
        local_positions(12, 4, 0)


def test_the_unfused_kernels_equal_the_fused_ones():
    """The math path (devices without torch's CPU flash kernel) against the kernel, block by block."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 3, 6, 8, generator=gen) for _ in range(4))
    for causal, keys in ((True, slice(None)), (False, slice(0, 3))):
        kb, vb = k[:, :, keys].contiguous(), v[:, :, keys].contiguous()
        fused, unfused = attend(q, kb, vb, causal, 0.3, True), attend(q, kb, vb, causal, 0.3, False)
        for a, b in zip(unfused, fused, strict=True):
            assert_close(a, b, rtol=1e-5, atol=1e-6, what=f"forward causal={causal}")
        out, lse = fused
        grads = [attend_backward(grad, q, kb, vb, out, lse, causal, 0.3, f) for f in (False, True)]
        for a, b in zip(*grads, strict=True):
            assert_close(a, b, rtol=1e-5, atol=1e-6, what=f"backward causal={causal}")


def ring_against_one_process(rank, world, heads, kv_heads, seq_len, causal, dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, seq_len, 8, generator=gen).to(dtype)
    k, v = (torch.randn(2, kv_heads, seq_len, 8, generator=gen).to(dtype) for _ in range(2))
    grad = torch.randn(2, heads, seq_len, 8, generator=gen).to(dtype)
    mine = local_positions(seq_len, world, rank)
    local = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, dist.group.WORLD, causal)
    out.backward(grad[:, :, mine])
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*full, is_causal=causal, enable_gqa=heads != kv_heads)
    expected.backward(grad)
    return [out.detach()] + [t.grad for t in local], [expected[:, :, mine].detach()] + [
        t.grad[:, :, mine] for t in full
    ]


@pytest.mark.parametrize(
    "cp, heads, kv_heads, causal",
    [(2, 4, 4, True), (2, 4, 2, True), (4, 4, 1, True), (4, 4, 4, False), (2, 2, 1, False)],
    ids=["cp2", "cp2-gqa", "cp4-mqa", "cp4-full", "cp2-full-mqa"],
)
def test_ring_attention_is_attention_over_the_whole_sequence(cp, heads, kv_heads, causal):
    for rank, (got, want) in enumerate(
        run_threaded(cp, ring_against_one_process, heads, kv_heads, 16, causal, torch.float32)
    ):
        for name, a, b in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
            assert_close(a, b, rtol=1e-5, atol=2e-6, what=f"cp={cp} rank {rank} {name}")


def test_ring_attention_in_bf16_and_over_real_processes():
    for rank, (got, want) in enumerate(run_threaded(2, ring_against_one_process, 4, 2, 16, True, torch.bfloat16)):
        for name, a, b in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
            assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, what=f"bf16 rank {rank} {name}")
    for rank, (got, want) in enumerate(run_processes(2, ring_against_one_process, 4, 4, 16, True, torch.float32)):
        for name, a, b in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
            assert_close(a, b, rtol=1e-5, atol=2e-6, what=f"gloo rank {rank} {name}")


def test_ring_attention_refuses_what_it_cannot_split():
    def odd(rank, world):
        q = torch.randn(1, 2, 3, 4)
        with pytest.raises(ValueError, match="3 tokens on this CP rank"):
            ring_attention(q, q, q, dist.group.WORLD)
        with pytest.raises(ValueError, match="3 query heads cannot share 2"):
            ring_attention(torch.randn(1, 3, 4, 4), q[:, :, :2], q[:, :, :2], dist.group.WORLD)

    run_threaded(2, odd)


GPT2_LIKE = dict(vocab_size=61, max_seq_len=32, emb_size=32, num_heads=4, head_size=8, num_layers=2, dropout=0.0)
LLAMA_LIKE = GPT2_LIKE | dict(
    num_kv_heads=2, norm="rmsnorm", activation="swiglu", position="rope", bias=False, tie_embeddings=False
)


def gpt_under_cp(rank, world, config, state, idx, targets, tp, sequence_parallel, checkpointing):
    """This rank's loss and full gradients, both averaged over its CP group (what DDP / FSDP2 do)."""
    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("cp", "tp"))
    tp_group, cp_group = mesh.get_group("tp") if tp > 1 else None, mesh.get_group("cp")
    model = GPT.from_config(config, tp_group=tp_group, sequence_parallel=sequence_parallel, cp_group=cp_group)
    load_full_state_dict(model, state)
    if checkpointing:
        apply_activation_checkpointing(model, "full")
    loss = model(idx, targets)
    loss.backward()
    if sequence_parallel:
        sync_replicated_grads(model, tp_group)
    grads = full_grads(model)
    for tensor in [loss.detach(), *grads.values()]:
        dist.all_reduce(tensor, group=cp_group)
        tensor /= world // tp
    return loss.detach(), grads


@pytest.mark.parametrize(
    "config, world, tp, sequence_parallel, checkpointing",
    [
        (GPT2_LIKE, 2, 1, False, False),
        (LLAMA_LIKE, 2, 1, False, True),
        (LLAMA_LIKE, 4, 2, True, False),
        (GPT2_LIKE, 4, 2, False, True),
        (LLAMA_LIKE | dict(num_kv_heads=1), 4, 2, False, False),
    ],
    ids=["gpt2-cp2", "llama-cp2-checkpointed", "llama-cp2xtp2-sp", "gpt2-cp2xtp2-checkpointed", "mqa-cp2xtp2"],
)
def test_a_gpt_split_over_cp_ranks_has_one_process_loss_and_gradients(
    config, world, tp, sequence_parallel, checkpointing
):
    torch.manual_seed(0)
    reference = GPT(**config)
    idx, targets = torch.randint(0, 61, (2, 32)), torch.randint(0, 61, (2, 32))
    expected = reference(idx, targets)
    expected.backward()
    expected_grads = {n: p.grad for n, p in reference.named_parameters()}
    state = full_state_dict(reference)
    results = run_threaded(world, gpt_under_cp, config, state, idx, targets, tp, sequence_parallel, checkpointing)
    for rank, (loss, grads) in enumerate(results):
        assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6, what=f"rank {rank} loss")
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, what=f"rank {rank} gradient of {name}")


def test_logits_and_generation_run_on_whole_sequences_and_bad_lengths_are_named():
    def on_rank(rank, world, state):
        model = GPT(**GPT2_LIKE, cp_group=dist.group.WORLD)
        load_full_state_dict(model, state)
        idx = torch.arange(12).reshape(2, 6)
        with pytest.raises(ValueError, match=r"idx's seq_len = 6 must be a multiple of 2 \* cp = 4"):
            model(idx, idx)
        with pytest.raises(ValueError, match="attention_mask is not supported"):
            model(idx[:, :4], idx[:, :4], attention_mask=torch.ones(2, 4))
        assert torch.equal(shard_sequence(idx[:, :4], dist.group.WORLD), idx[:, local_positions(4, 2, rank)])
        return model(idx), model.generate(idx[:1], 4, temperature=0.0)

    torch.manual_seed(0)
    reference = GPT(**GPT2_LIKE)
    idx = torch.arange(12).reshape(2, 6)
    for logits, tokens in run_threaded(2, on_rank, full_state_dict(reference)):
        assert_close(logits, reference(idx).detach(), rtol=1e-5, atol=1e-6, what="logits")
        assert torch.equal(tokens, reference.generate(idx[:1], 4, temperature=0.0))


def test_attention_alone_rotates_each_token_to_its_own_position():
    """`MultiHeadAttention(..., cp_group)` given this rank's tokens: RoPE positions default to the tokens' own."""

    def on_rank(rank, world, state, x):
        attention = MultiHeadAttention(4, 16, 4, 16, 0.0, num_kv_heads=2, rope_theta=10000.0, cp_group=dist.group.WORLD)
        attention.load_state_dict(state)
        mine = local_positions(x.size(1), world, rank)
        return mine, attention(x[:, mine], context_parallel=True).detach()

    torch.manual_seed(0)
    reference = MultiHeadAttention(4, 16, 4, 16, 0.0, num_kv_heads=2, rope_theta=10000.0)
    x = torch.randn(2, 16, 16)
    expected = reference(x).detach()
    for mine, out in run_threaded(2, on_rank, reference.state_dict(), x):
        assert_close(out, expected[:, mine], rtol=1e-5, atol=1e-6, what="attention rows")
