"""GPT: every sharded piece equals the unsharded model; loss, generation, save/load, errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.helpers import BF16, CASES, FP32, TINY_GPT, gpt_batch, logits_and_loss, spiky
from tp_attention import full_grads, full_state_dict, load_full_state_dict
from tp_attention.grad_norm import sync_replicated_grads
from tp_attention.model import GPT, GPTConfig
from tp_attention.testing import assert_close, assert_tp_equivalent, run_threaded
from tp_attention.vocab import VocabParallelEmbedding, vocab_parallel_cross_entropy

LOGITS = dict(rtol=1e-5, atol=1e-5)  # logits of the spiky models reach ~10: fp32 sums leave ~1e-6 on small ones


def assert_gpt_equivalent(cfg: dict, tp_sizes, seq: int = 11, dtype=torch.float32, sequence_parallel=False, **tol):
    """Logits, loss and every full gradient equal the unsharded model's at each tp."""
    idx, targets = gpt_batch(cfg, seq=seq)

    def build(group):
        model = GPT(**cfg, tp_group=group, generator=torch.Generator(), sequence_parallel=sequence_parallel)
        return model.to(dtype)

    sync = (lambda model: sync_replicated_grads(model, model.tp_group)) if sequence_parallel else None
    assert_tp_equivalent(build, (idx, targets), tp_sizes, forward=logits_and_loss, after_backward=sync, **(tol or FP32))


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_gpt_equals_unsharded(case):
    assert_gpt_equivalent(CASES[case], (1, 2, 4))  # "gqa" at tp=4 replicates each of its two KV heads on two ranks


@pytest.mark.parametrize("case", ["vocab65", "llama"])
def test_bf16_sharded_gpt_matches_unsharded(case):
    assert_gpt_equivalent(CASES[case], (2,), dtype=torch.bfloat16, **BF16)


def sharded_cross_entropy(rank, world, vocab, full_logits, target, ignore_index):
    emb = VocabParallelEmbedding(vocab, 4, tp_group=dist.group.WORLD)
    start, stop = emb.vocab_start, emb.vocab_start + emb.local_vocab
    local = torch.full((*full_logits.shape[:-1], emb.local_vocab), float("-inf"))
    real = full_logits[..., start:stop]
    local[..., : real.size(-1)] = real
    local.requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, start, ignore_index, dist.group.WORLD)
    loss.backward()
    return loss.detach(), local.grad[..., : real.size(-1)], (start, start + real.size(-1))


@pytest.mark.parametrize("vocab", [65, 3])  # 3 at tp=4: the last rank holds only padding
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_cross_entropy_equals_f_cross_entropy(tp, ignore, vocab):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, vocab, generator=gen) * 4
    target = torch.randint(0, vocab, (3, 5), generator=gen)
    if ignore:
        target[1, 2:] = -100
    full = logits.clone().requires_grad_()
    expected = F.cross_entropy(full.view(-1, vocab), target.view(-1), ignore_index=-100)
    expected.backward()
    for loss, grad, (lo, hi) in run_threaded(tp, sharded_cross_entropy, vocab, logits, target, -100):
        assert_close(loss, expected.detach(), **FP32, what="loss")
        assert_close(grad, full.grad[..., lo:hi], **FP32, what="grad of logits")


def test_vocab_parallel_cross_entropy_of_all_ignored_is_nan_like_torch():
    logits, target = torch.randn(4, 7), torch.full((4,), -100)
    assert torch.isnan(vocab_parallel_cross_entropy(logits, target)) and torch.isnan(F.cross_entropy(logits, target))


def chunked_loss(rank, world, vocab, weight, hidden, target, sequence_parallel, chunk_bytes, autocast):
    """`VocabParallelEmbedding.loss` on this rank's rows of `weight` (and, with sequence parallelism, its tokens);
    returns the loss, the gradient of its hidden states and of its real rows, and where those rows start."""
    emb = VocabParallelEmbedding(vocab, weight.size(1), tp_group=dist.group.WORLD)
    rows = weight[emb.vocab_start : emb.vocab_start + emb.local_real]
    with torch.no_grad():
        emb.weight.zero_()[: rows.size(0)] = rows
    h = (hidden.chunk(world, dim=1)[rank] if sequence_parallel else hidden).clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = emb.loss(h, target, -100, sequence_parallel, chunk_bytes)
    loss.backward()
    return loss.detach(), h.grad, emb.weight.grad[: rows.size(0)], emb.vocab_start


@pytest.mark.parametrize(
    "tp, vocab, sequence_parallel, chunks, autocast",
    [
        (1, 65, False, 1, False),
        (1, 50257, False, 7, False),
        (2, 65, True, 7, False),  # 65 at tp=2: one pad row
        (2, 50257, False, 7, False),
        (4, 65, False, 7, False),
        (4, 50257, True, 3, False),
        (4, 50257, False, 1, False),
        (2, 50257, False, 7, True),
        (1, 65, False, 7, True),
    ],
)
def test_chunked_loss_equals_cross_entropy_of_full_logits(tp, vocab, sequence_parallel, chunks, autocast):
    """Whole chunks, a ragged last one and a single one: loss and gradients equal F.cross_entropy's of the full
    logits within 1e-6 (fp32) of their largest element, or within bf16's tolerance under autocast."""
    gen = torch.Generator().manual_seed(0)
    tokens, emb = 2 * 12, 16  # [2, 12] tokens
    weight = torch.randn(vocab, emb, generator=gen) * 0.5
    hidden = torch.randn(2, 12, emb, generator=gen)
    target = torch.randint(0, vocab, (2, 12), generator=gen)
    target[0, 3:5] = -100
    local_vocab = -(-vocab // tp)
    chunk_bytes = 4 * local_vocab * -(-tokens // chunks)  # so many tokens per chunk that `chunks` chunks run
    w, h = weight.clone().requires_grad_(), hidden.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits = h @ w.t()
    expected = F.cross_entropy(logits.float().view(-1, vocab), target.view(-1))
    expected.backward()
    tol = (lambda e: BF16) if autocast else (lambda e: dict(rtol=1e-6, atol=1e-6 * e.abs().max().item()))
    for rank, (loss, grad_h, grad_w, start) in enumerate(
        run_threaded(tp, chunked_loss, vocab, weight, hidden, target, sequence_parallel, chunk_bytes, autocast)
    ):
        mine = h.grad.chunk(tp, dim=1)[rank] if sequence_parallel else h.grad
        assert_close(loss, expected.detach(), **tol(expected), what="loss")
        assert_close(grad_h, mine, **tol(mine), what="grad of hidden")
        assert_close(grad_w, w.grad[start : start + grad_w.size(0)], **tol(w.grad), what="grad of weight")


def test_chunked_gpt_loss_equals_one_chunk():
    """The GPT's loss and gradients do not depend on the chunk size (1e-6 of each tensor's largest element; a
    1e-9 floor for the tensors that are zero in exact arithmetic, which keep ~1e-11 of rounding)."""
    idx, targets = gpt_batch(CASES["vocab65"], seq=11)
    grads = []
    for chunk_bytes in (2**30, 4 * 65 * 5):  # one chunk; 5 tokens a chunk
        model = GPT(**CASES["vocab65"], generator=torch.Generator().manual_seed(0)).eval()
        model.loss_chunk_bytes = chunk_bytes
        loss = model(idx, targets)
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in model.parameters()])
    for one, chunked in zip(*grads, strict=True):
        assert_close(chunked, one, rtol=1e-6, atol=1e-6 * one.abs().max().item() + 1e-9)


def init_full(rank, world, seed):
    gen = torch.Generator().manual_seed(seed)
    return full_state_dict(GPT(**CASES["gqa"], tp_group=dist.group.WORLD, generator=gen))


def test_initialisation_does_not_depend_on_tp():
    expected = GPT(**CASES["gqa"], generator=torch.Generator().manual_seed(5)).state_dict()
    for tp in (2, 4):
        for full in run_threaded(tp, init_full, 5):
            assert full.keys() == expected.keys()
            assert all(torch.equal(full[n], expected[n]) for n in expected)


def test_nanogpt_style_initialisation():
    model = GPT(
        vocab_size=512,
        max_seq_len=64,
        emb_size=256,
        num_heads=4,
        head_size=64,
        num_layers=8,
        generator=torch.Generator().manual_seed(0),
    )
    block = model._decoders[0]
    assert abs(model._token_embeddings.weight.std().item() - 0.02) < 1e-3
    assert abs(block._attention._q.weight.std().item() - 0.02) < 1e-3
    assert abs(block._ff._up.weight.std().item() - 0.02) < 1e-3
    residual_std = 0.02 / (2 * 8) ** 0.5
    for w in (block._attention._layer.weight, block._ff._down.weight):
        assert abs(w.std().item() - residual_std) < 3e-4
    assert torch.all(block._attention._q.bias == 0) and torch.all(block._ff._down.bias == 0)


def generate_both_ways(rank, world, cfg, state, prompt):
    model = GPT(**cfg, tp_group=dist.group.WORLD, generator=torch.Generator())
    load_full_state_dict(model, state)
    with_cache = model.generate(prompt, 24)
    without = model.generate(prompt, 24, use_cache=False)
    sampled = model.generate(
        prompt,
        12,
        do_sample=True,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        generator=torch.Generator().manual_seed(100 + rank),
    )  # different RNG per rank
    return with_cache, without, sampled


@pytest.mark.parametrize("case", ["gqa", "llama"])  # llama: RoPE, so the cache holds rotated keys
@pytest.mark.parametrize("tp", [1, 2])
def test_kv_cache_generation_equals_full_recompute(tp, case):
    cfg = CASES[case]
    model = spiky(cfg)
    prompt = torch.randint(0, 65, (2, 5), generator=torch.Generator().manual_seed(3))
    results = run_threaded(tp, generate_both_ways, cfg, model.state_dict(), prompt)
    reference_tokens = model.generate(prompt, 24, use_cache=False)
    assert len(set(reference_tokens[0, 5:].tolist())) >= 3, "decoding should not collapse to one token"
    for with_cache, without, sampled in results:
        assert with_cache.shape == (2, 29)  # 5 + 24 > max_seq_len 16: the window slides
        assert torch.equal(with_cache, without)
        assert torch.equal(with_cache, reference_tokens)
        assert torch.equal(sampled, results[0][2]), "every TP rank must sample the same tokens"


def test_kv_cache_step_costs_one_position():
    model = spiky(CASES["base"]).eval()
    caches = model.new_kv_caches()
    prompt = torch.randint(0, 64, (1, 6))
    full = model(prompt)
    model(prompt[:, :5], kv_caches=caches)
    step = model(prompt[:, 5:], kv_caches=caches)
    assert step.shape == (1, 1, 64) and caches[0].length == 6
    assert_close(step[:, 0], full[:, 5], **FP32, what="cached step vs full forward")


def test_generation_options_and_errors():
    model = spiky(CASES["base"])
    prompt = torch.randint(0, 64, (2, 4))
    assert torch.equal(model.generate(prompt, 6, do_sample=True, temperature=0.0), model.generate(prompt, 6))
    out = model.generate(prompt, 8, do_sample=True, top_k=1)
    assert torch.equal(out, model.generate(prompt, 8)), "top_k=1 sampling is greedy"
    eos = int(model.generate(prompt, 1)[0, -1])
    stopped = model.generate(prompt[:1], 10, eos_token_id=eos)
    assert stopped.shape == (1, 5) and stopped[0, -1] == eos
    for kwargs, message in [
        (dict(top_k=0), "top_k must be a positive integer, got 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.generate(prompt, 3, do_sample=True, **kwargs)
    with pytest.raises(ValueError, match="non-empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    assert model.training, "generate restores the training flag"


def save_and_logits(rank, world, cfg, state, directory, idx):
    model = GPT(**cfg, tp_group=dist.group.WORLD, generator=torch.Generator())
    load_full_state_dict(model, state)
    model.save(directory)
    return model(idx).detach()


def load_and_logits(rank, world, directory, idx):
    return GPT.load(directory, tp_group=dist.group.WORLD)(idx).detach()


def test_save_at_tp2_load_at_tp1_and_tp4(tmp_path):
    cfg = dict(CASES["gqa"], num_kv_heads=4, tie_embeddings=False)
    model = spiky(cfg)
    idx = torch.randint(0, 65, (2, 9))
    saved = run_threaded(2, save_and_logits, cfg, model.state_dict(), tmp_path / "m", idx)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    single = GPT.load(tmp_path / "m")(idx).detach()
    assert_close(single, saved[0], **LOGITS, what="tp=1 load")
    for logits in run_threaded(4, load_and_logits, tmp_path / "m", idx):
        assert_close(logits, saved[0], **LOGITS, what="tp=4 load")
    assert GPT.load(tmp_path / "m" / "model.safetensors").config == GPTConfig(**cfg)


def test_load_refuses_a_file_that_does_not_fit(tmp_path):
    GPT(**CASES["base"]).save(tmp_path / "m")
    state = GPT(**dict(CASES["base"], emb_size=48)).state_dict()
    model = GPT(**CASES["base"])
    with pytest.raises(ValueError, match=r"_position_embeddings.weight: checkpoint \(16, 48\) != model \(16, 32\)"):
        load_full_state_dict(model, state)
    with pytest.raises(FileNotFoundError, match="no model file"):
        GPT.load(tmp_path / "missing")


def overfit(rank, world, cfg, state, idx, targets, steps):
    group = dist.group.WORLD if world > 1 else None
    model = GPT(**cfg, tp_group=group, generator=torch.Generator())
    load_full_state_dict(model, state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_tiny_model_overfits_a_batch_with_the_same_curve_at_tp1_and_tp2():
    cfg = CASES["vocab65"]
    ref = GPT(**cfg, generator=torch.Generator().manual_seed(0))
    idx, _ = gpt_batch(cfg, batch=2, seq=16)
    targets = idx.roll(-1, dims=1)
    single = overfit(0, 1, cfg, ref.state_dict(), idx, targets, 60)
    assert single[0] > 4.0 and single[-1] < 0.5, f"loss {single[0]:.2f} -> {single[-1]:.2f}"
    for curve in run_threaded(2, overfit, cfg, ref.state_dict(), idx, targets, 60):
        assert_close(torch.tensor(curve), torch.tensor(single), rtol=1e-4, atol=0.0, what="loss curve tp=2 vs tp=1")


def test_seed_compatible_api():
    model = GPT(100, 16, 32, 4, 8, 3)  # vocab, max_seq_len, emb, heads, head_size, layers
    assert len(model._decoders) == 3 and model.config.dropout == 0.1
    same = GPT.from_config(model.config)
    assert same.config == model.config
    assert GPT.from_config(dict(TINY_GPT)).config == GPTConfig(**TINY_GPT)
    with pytest.raises(ValueError, match="seq_len = 17 must be <= max_seq_len = 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx holds id 100 outside the vocabulary \[0, 100\)"):
        model(torch.full((1, 4), 100))
    with pytest.raises(ValueError, match=r"holds id -1 outside"):
        model(torch.full((1, 4), -1))
    with pytest.raises(TypeError, match="idx must be an integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"unknown GPTConfig keys \['heads'\]"):
        GPT(100, 16, 32, 4, 8, 3, heads=2)
    with pytest.raises(ValueError, match="num_heads = 4 must be divisible by num_kv_heads = 3"):
        GPT(100, 16, 32, 4, 8, 3, num_kv_heads=3)


def test_attention_maps_gathered_at_tp2_equal_unsharded():
    model = spiky(CASES["base"])
    idx = torch.randint(0, 64, (1, 7))
    expected = model.attention_maps(idx)
    assert expected.shape == (2, 1, 4, 7, 7)

    def maps(rank, world, state):
        sharded = GPT(**CASES["base"], tp_group=dist.group.WORLD, generator=torch.Generator())
        load_full_state_dict(sharded, state)
        return sharded.attention_maps(idx)

    for result in run_threaded(2, maps, model.state_dict()):
        assert_close(result, expected, **FP32, what="attention maps")


def test_autocast_bf16_sharded_matches_unsharded():
    """The fused f + linear keeps autocast's casts for its own backward."""
    ref = GPT(**CASES["gqa"], generator=torch.Generator().manual_seed(0))
    idx, targets = gpt_batch(CASES["gqa"])

    def run(model):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, targets)
        loss.backward()
        return loss.detach(), full_grads(model)

    def sharded(rank, world, state):
        model = GPT(**CASES["gqa"], tp_group=dist.group.WORLD, generator=torch.Generator())
        load_full_state_dict(model, state)
        return run(model)

    loss, grads = run(ref)
    for r_loss, r_grads in run_threaded(2, sharded, ref.state_dict()):
        assert_close(r_loss, loss, **BF16, what="autocast loss")
        for name in grads:
            assert r_grads[name].dtype == torch.float32
            assert_close(r_grads[name], grads[name], **BF16, what=f"autocast grad of {name}")


@pytest.mark.parametrize("case", ["vocab65", "gqa", "mqa-untied-nobias", "llama"])
@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_equals_unsharded(case, tp):
    assert_gpt_equivalent(CASES[case], (tp,), seq=12, sequence_parallel=True)


def test_sequence_parallel_refuses_a_length_tp_does_not_divide_and_generates_without_it():
    def run(rank, world):
        model = GPT(
            **CASES["base"],
            tp_group=dist.group.WORLD,
            generator=torch.Generator().manual_seed(0),
            sequence_parallel=True,
        )
        with pytest.raises(ValueError, match="seq_len = 7 must be divisible by tp_size = 2 under sequence parallel"):
            model(torch.zeros(1, 7, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long))
        out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5)
        assert model.sequence_parallel
        return out

    results = run_threaded(2, run)
    plain = GPT(**CASES["base"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(results[0], plain.generate(torch.zeros(1, 3, dtype=torch.long), 5))
