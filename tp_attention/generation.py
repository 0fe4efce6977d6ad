"""Autoregressive decoding with a per-rank KV cache; every TP rank emits the same tokens."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from tp_attention.groups import process_group, tp_size


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the `top_k` largest logits and the smallest set whose probability reaches `top_p`."""
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # the first token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError unless `max_new_tokens >= 0`, `temperature` is a finite number >= 0, `top_k` is None or
    positive and `top_p` is None or in (0, 1] (NaN is none of these)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append up to `max_new_tokens` tokens to `idx` `[B, T]`; returns `[B, T + n]`.

    A batch of prompts of different lengths is left-padded, with `attention_mask` `[B, T]` (1 = token,
    0 = padding; Hugging Face's convention): each row then continues as if generated alone.

    Greedy when `do_sample=False` or `temperature == 0`; otherwise samples from the softmax of
    `logits / temperature`, restricted by `top_k` / `top_p`. With tp > 1 the token drawn on TP
    rank 0 is broadcast, so every rank continues identically. Sequences that emitted
    `eos_token_id` are padded with it; decoding stops when all have. The context is cropped to the
    last `max_seq_len` tokens; once it is full, each step re-encodes that window (learned absolute
    positions cannot slide), so the cache saves work only until then. `streamer`, if given, is called
    with each new token `[B]` as soon as it is chosen (to print a sample as it is written).

    Raises:
        ValueError: empty `idx`, an `attention_mask` of another shape than `idx`, or a bad sampling option
            (`check_sampling`).
    """
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.numel() == 0:
        raise ValueError(f"idx must be a non-empty [batch, seq_len] tensor, got {getattr(idx, 'shape', idx)!r}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(idx.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal idx shape {tuple(idx.shape)}")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    greedy = not do_sample or temperature == 0
    window = model.config.max_seq_len
    group = model.tp_group
    was_training = model.training
    model.eval()
    caches = None
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    mask = torch.ones_like(idx) if attention_mask is None else attention_mask.to(device=idx.device, dtype=torch.long)
    try:
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = model.next_token_logits(idx[:, -window:], attention_mask=mask[:, -window:])
            elif caches is None or caches[0].length >= window:
                caches = model.new_kv_caches()  # (re)encode the whole window
                logits = model.next_token_logits(idx[:, -window:], caches, mask[:, -window:])
            else:  # one new position; the mask covers the cached ones too
                logits = model.next_token_logits(idx[:, -1:], caches, mask[:, -caches[0].length - 1 :])
            logits = logits.float()  # (B, V)
            if greedy:
                token = logits.argmax(dim=-1)
            else:
                probs = _filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
                if tp_size(group) > 1:
                    pg = process_group(group)
                    dist.broadcast(token, src=dist.get_global_rank(pg, 0), group=pg)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            idx = torch.cat([idx, token[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
            if streamer is not None:
                streamer(token)
            if eos_token_id is not None and finished.all():
                break
    finally:
        model.train(was_training)
    return idx
