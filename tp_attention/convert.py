"""Convert full (unsharded) GPT state dicts to and from nanoGPT's parameter names.

nanoGPT fuses Q, K and V into `attn.c_attn` (`[Q | K | V]` along the output dim) and always ties the
LM head to the token embedding; it has no GQA and a 4x MLP with `emb == heads * head_size`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tp_attention.config import GPTConfig
from tp_attention.state_dict import current_name

_BLOCK = {  # ours (inside _decoders.{i}.) -> nanoGPT (inside transformer.h.{i}.)
    "_norm1": "ln_1",
    "_attention._layer": "attn.c_proj",
    "_norm2": "ln_2",
    "_ff._up": "mlp.c_fc",
    "_ff._down": "mlp.c_proj",
}
_TOP = {"_token_embeddings": "transformer.wte", "_position_embeddings": "transformer.wpe", "_norm": "transformer.ln_f"}


def _check_nanogpt_shape(cfg: GPTConfig) -> None:
    problems = []
    if cfg.num_kv_heads not in (None, cfg.num_heads):
        problems.append(f"num_kv_heads = {cfg.num_kv_heads} (nanoGPT has no GQA)")
    if cfg.emb_size != cfg.num_heads * cfg.head_size:
        problems.append(f"emb_size = {cfg.emb_size} != num_heads * head_size = {cfg.num_heads * cfg.head_size}")
    if cfg.ffn_mult != 4:
        problems.append(f"ffn_mult = {cfg.ffn_mult} (nanoGPT uses 4)")
    if not cfg.tie_embeddings:
        problems.append("tie_embeddings = False (nanoGPT ties them)")
    if problems:
        raise ValueError("not expressible in nanoGPT's layout: " + "; ".join(problems))


def to_nanogpt(state: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """nanoGPT-named copy of a full state dict (from `full_state_dict`).

    Raises:
        ValueError: the config uses something nanoGPT cannot express.
    """
    _check_nanogpt_shape(cfg)
    state = {current_name(name): tensor for name, tensor in state.items()}  # an older state dict's names too
    out = {"lm_head.weight": state["_token_embeddings.weight"]}
    for name, tensor in state.items():
        head, _, leaf = name.rpartition(".")
        if head in _TOP:
            out[f"{_TOP[head]}.{leaf}"] = tensor
            continue
        _, layer, inner = head.split(".", 2)
        if inner in _BLOCK:
            out[f"transformer.h.{layer}.{_BLOCK[inner]}.{leaf}"] = tensor
        elif inner == "_attention._q":
            parts = [state[f"_decoders.{layer}._attention._{p}.{leaf}"] for p in "qkv"]
            out[f"transformer.h.{layer}.attn.c_attn.{leaf}"] = torch.cat(parts, dim=0)
    return out


def from_nanogpt(state: Mapping[str, torch.Tensor], num_heads: int, dropout: float = 0.0) -> tuple[GPTConfig, dict]:
    """`(GPTConfig, full state dict)` from a nanoGPT state dict (a `_orig_mod.` prefix is dropped).

    The causal-mask buffers some checkpoints carry (`attn.bias`, `attn.masked_bias`) are skipped; an
    `lm_head.weight` that differs from the token embedding gives an untied model that keeps it.
    """
    state = {
        k.removeprefix("_orig_mod."): v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))
    }
    head_weight = state.pop("lm_head.weight", None)
    tied = head_weight is None or torch.equal(head_weight, state["transformer.wte.weight"])
    vocab, emb = state["transformer.wte.weight"].shape
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.h.")})
    cfg = GPTConfig(
        vocab_size=vocab,
        max_seq_len=state["transformer.wpe.weight"].shape[0],
        emb_size=emb,
        num_heads=num_heads,
        head_size=emb // num_heads,
        num_layers=layers,
        dropout=dropout,
        bias="transformer.ln_f.bias" in state,
        tie_embeddings=tied,
    )
    ours = {} if tied else {"_lm_head.weight": head_weight}
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    for name, tensor in state.items():
        head, _, leaf = name.rpartition(".")
        if head in top:
            ours[f"{top[head]}.{leaf}"] = tensor
        elif head.startswith("transformer.h."):
            _, _, layer, inner = head.split(".", 3)
            if inner == "attn.c_attn":
                for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                    ours[f"_decoders.{layer}._attention._{part}.{leaf}"] = chunk
            else:
                ours[f"_decoders.{layer}.{block[inner]}.{leaf}"] = tensor
    return cfg, ours
