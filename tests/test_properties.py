"""Property-based: over shapes, dtypes, masks and tp sizes, every call matches the unsharded reference
or raises ValueError/TypeError with a message (the same one the reference raises, where it raises)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.helpers import ATTENTION
from tp_attention import MultiHeadAttention, load_full_state_dict
from tp_attention.model import GPT
from tp_attention.testing import assert_close, run_threaded

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def outcome(fn):
    """`("ok", value)` or `("error", type name, message)`; anything but ValueError/TypeError fails the test."""
    try:
        return ("ok", fn())
    except (ValueError, TypeError) as e:
        assert str(e), f"{type(e).__name__} without a message"
        return ("error", type(e).__name__, str(e))


def same_outcome(sharded, reference, dtype) -> None:
    if reference[0] == "error" or sharded[0] == "error":
        assert sharded == reference, f"sharded {sharded[:3]} vs reference {reference[:3]}"
        return
    assert_close(sharded[1], reference[1], **TOLERANCE.get(dtype, TOLERANCE[torch.float32]), what=str(dtype))


def mostly(valid, *invalid):
    """Valid values three times as often as each invalid one."""
    return (
        st.sampled_from([valid, valid, valid, *invalid])
        if not isinstance(valid, list)
        else st.sampled_from(valid * 3 + list(invalid))
    )


@st.composite
def attention_cases(draw):
    tp = draw(st.sampled_from([1, 2, 4]))
    heads = draw(st.sampled_from([1, 2, 4, 6, 8]))
    divisors = [d for d in range(1, heads + 1) if heads % d == 0]
    max_seq = draw(st.integers(1, 12))
    cfg = dict(
        num_heads=heads,
        num_kv_heads=draw(mostly([None, *divisors], 3)),
        emb_size=draw(st.integers(1, 24)),
        head_size=draw(st.integers(1, 8)),
        max_seq_len=max_seq,
        dropout=0.0,
        causal=draw(st.booleans()),
    )
    batch = draw(mostly([1, 2, 3], 0))
    seq = draw(mostly(list(range(1, max_seq + 1)), 0, max_seq + 1))
    emb = cfg["emb_size"] + draw(mostly(0, 1))
    dtype = draw(mostly(torch.float32, torch.float64, torch.bfloat16, torch.int64))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = (torch.randn(batch, seq, emb, generator=gen) * 3).to(dtype)
    kind = draw(st.sampled_from(["none", "key_padding", "tt", "btt", "bhtt", "additive", "odd"]))
    shapes = {
        "key_padding": (batch, seq),
        "tt": (seq, seq),
        "btt": (batch, seq, seq),
        "bhtt": (batch, heads, seq, seq),
        "additive": (batch, 1, seq, seq),
        "odd": tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=5))),
    }
    mask = None
    if kind != "none":
        mask = torch.rand(shapes[kind], generator=gen)
        mask = mask.log() if kind == "additive" else mask > 0.3
    return tp, cfg, x, mask, dtype


REFUSED = (2, dict(ATTENTION, num_kv_heads=3), torch.zeros(1, 2, ATTENTION["emb_size"]), None, torch.float32)


@SETTINGS
@given(attention_cases())
@example(REFUSED)  # a layout the reference refuses: every rank must refuse it alike
def test_attention_matches_or_refuses(case):
    tp, cfg, x, mask, dtype = case
    built = outcome(lambda: MultiHeadAttention(**cfg, generator=torch.Generator().manual_seed(0)))
    if built[0] == "error":  # every rank refuses it too, with the same message
        event(f"reference refused: {built[1]}")

        def construct(rank, world):
            group = dist.group.WORLD if world > 1 else None
            return outcome(lambda: MultiHeadAttention(**cfg, tp_group=group, generator=torch.Generator()))

        for result in run_threaded(tp, construct) if tp > 1 else [construct(0, 1)]:
            assert result == built, f"sharded {result[:3]} vs reference {built}"
        return
    reference = built[1]
    if dtype == torch.bfloat16:
        reference.to(dtype)
    expected = outcome(lambda: reference(x, mask).detach())
    event(f"reference: {expected[0]} ({expected[1] if expected[0] == 'error' else 'compared'})")

    def sharded(rank, world):
        def call():
            group = dist.group.WORLD if world > 1 else None
            mha = MultiHeadAttention(**cfg, tp_group=group, generator=torch.Generator())
            mha.to(reference._q.weight.dtype)
            load_full_state_dict(mha, reference.state_dict())
            return mha(x, mask).detach()

        return outcome(call)

    results = run_threaded(tp, sharded) if tp > 1 else [sharded(0, 1)]
    for result in results:
        if result[0] == "error" and "tp_size" in result[2]:
            continue  # a layout this tp cannot split: refused by name, nothing to compare
        same_outcome(result, expected, dtype)


@st.composite
def gpt_cases(draw):
    tp = draw(st.sampled_from([1, 2, 4]))
    vocab = draw(st.integers(1, 70))
    cfg = dict(
        vocab_size=vocab,
        max_seq_len=draw(st.integers(1, 10)),
        emb_size=8,
        num_heads=4,
        head_size=2,
        num_layers=1,
        dropout=0.0,
        num_kv_heads=draw(st.sampled_from([None, 1, 2])),
        tie_embeddings=draw(st.booleans()),
    )
    batch, seq = draw(mostly([1, 2], 0)), draw(mostly(list(range(1, cfg["max_seq_len"] + 1)), 0, 12))
    dtype = draw(mostly(torch.int64, torch.int32, torch.float32, torch.bool))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    low, high = draw(st.sampled_from([(0, vocab), (0, vocab), (-2, vocab), (0, vocab + 3)]))
    idx = torch.randint(low, high, (batch, seq), generator=gen).to(dtype)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen) if draw(st.booleans()) else None
    return tp, cfg, idx, targets


@SETTINGS
@given(gpt_cases())
def test_gpt_matches_or_refuses(case):
    tp, cfg, idx, targets = case
    reference = GPT(**cfg, generator=torch.Generator().manual_seed(0))
    expected = outcome(lambda: reference(idx, targets).detach())
    event(f"reference: {expected[0]} ({expected[1] if expected[0] == 'error' else 'compared'})")

    def sharded(rank, world):
        model = GPT(**cfg, tp_group=dist.group.WORLD if world > 1 else None, generator=torch.Generator())
        load_full_state_dict(model, reference.state_dict())
        return outcome(lambda: model(idx, targets).detach())

    for result in run_threaded(tp, sharded) if tp > 1 else [sharded(0, 1)]:
        same_outcome(result, expected, torch.float32)
