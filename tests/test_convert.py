"""nanoGPT names: our GPT and a plain nanoGPT with converted weights compute the same thing."""

from __future__ import annotations

import pytest
import torch

from bench.nanogpt import NanoGPT
from tp_attention.convert import from_nanogpt, to_nanogpt
from tp_attention.model import GPT, GPTConfig
from tp_attention.testing import assert_close

CFG = GPTConfig(vocab_size=70, max_seq_len=16, emb_size=32, num_heads=4, head_size=8, num_layers=2, dropout=0.0)


def test_exported_weights_run_in_plain_nanogpt():
    ours = GPT.from_config(CFG, generator=torch.Generator().manual_seed(0))
    plain = NanoGPT(70, 16, 32, 4, 2)
    plain.load_state_dict(to_nanogpt(ours.state_dict(), CFG))
    idx = torch.randint(0, 70, (2, 12))
    with torch.no_grad():
        assert_close(plain(idx), ours(idx), rtol=1e-5, atol=1e-6, what="nanoGPT logits vs ours")
        assert_close(plain(idx, idx), ours(idx, idx), rtol=1e-5, atol=1e-6, what="loss")


def test_import_from_nanogpt_round_trips():
    plain = NanoGPT(70, 16, 32, 4, 2)
    state = {f"_orig_mod.{k}": v for k, v in plain.state_dict().items()}  # as torch.compile saves it
    cfg, ours_state = from_nanogpt(state, num_heads=4)
    assert cfg == CFG
    ours = GPT.from_config(cfg)
    ours.load_state_dict(ours_state)
    back = to_nanogpt(ours.state_dict(), cfg)
    assert all(torch.equal(back[k], v) for k, v in plain.state_dict().items())


def test_configs_nanogpt_cannot_express_are_refused():
    cfg = GPTConfig(num_kv_heads=2, ffn_mult=2)
    with pytest.raises(ValueError, match=r"num_kv_heads = 2 .*ffn_mult = 2"):
        to_nanogpt(GPT.from_config(cfg).state_dict(), cfg)


def test_import_skips_causal_mask_buffers_and_keeps_an_untied_head():
    """nanoGPT without flash attention (and older GPT-2 exports) store `attn.bias`, the causal mask, per
    block; a fine-tuned checkpoint may carry an `lm_head.weight` of its own."""
    plain = NanoGPT(70, 16, 32, 4, 2)
    plain.lm_head.weight = torch.nn.Parameter(torch.randn(70, 32))  # untied from wte
    state = dict(plain.state_dict())
    for layer in range(2):
        state[f"transformer.h.{layer}.attn.bias"] = torch.ones(16, 16).tril().view(1, 1, 16, 16)
        state[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    cfg, ours_state = from_nanogpt(state, num_heads=4)
    assert not cfg.tie_embeddings
    ours = GPT.from_config(cfg)
    ours.load_state_dict(ours_state)  # strict: nothing missing, nothing extra
    idx = torch.randint(0, 70, (2, 12))
    with torch.no_grad():
        assert_close(ours(idx), plain(idx), rtol=1e-5, atol=1e-6, what="untied head logits")
