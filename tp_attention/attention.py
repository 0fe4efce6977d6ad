"""Multi-head attention with whole heads sharded over the tensor-parallel group.

    x ──f──┬─ _q (column) ─┐
           ├─ _k (column) ─┼─ SDPA on local heads ─ _layer (row) ─g─ + bias ─ dropout ─> y
           └─ _v (column) ─┘

Q, K and V are one GEMM over their concatenated local weights with f fused in: one all-reduce of dx
in backward, started before and overlapped with the weight-gradient matmul. g, inside the
row-parallel `_layer`, is one all-reduce of y in forward. Nothing else communicates (except the
gradient sum over replicated KV heads when there are fewer KV heads than ranks).

The API follows the simple-llm seed document: `MultiHeadAttention(num_heads, emb_size, head_size,
max_seq_len)`, `forward(x, mask=None)` and `_heads[i].get_attention_weights(x)`.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from tp_attention.context import cp_rank, cp_size, local_positions, ring_attention
from tp_attention.groups import Group, ProcessGroup, check_group, tp_rank, tp_size
from tp_attention.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelDropout,
    fused_column_parallel,
)
from tp_attention.mappings import gather_from_tp
from tp_attention.rope import RotaryEmbedding
from tp_attention.shapes import check_attention, check_seq_len

MASK_HELP = (
    "a mask is [B, T] (key padding: 1/True = attend), [T, T], [B, T, T] or [B, H, T, T] "
    "(bool/integer: True = may attend; float: added to the scores)"
)


def check_input(x: object, emb_size: int, max_seq_len: int, weight: torch.Tensor) -> None:
    """Raise TypeError/ValueError unless `x` is a `[B, T, emb_size]` float tensor with T <= max_seq_len."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D [batch, seq_len, emb_size], got shape {tuple(x.shape)}")
    batch, seq_len, emb = x.shape
    if emb != emb_size:
        raise ValueError(f"last dim of x must equal emb_size = {emb_size}, got {emb}")
    if batch == 0 or seq_len == 0:
        raise ValueError(f"x must hold at least one sequence of one token, got shape {tuple(x.shape)}")
    check_seq_len(seq_len, max_seq_len)
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x has dtype {x.dtype} but the weights are {weight.dtype}; cast one of them")


def normalize_mask(mask: object, batch: int, seq_q: int, seq_k: int, num_heads: int) -> torch.Tensor:
    """Return `mask` as a 4-D `[B|1, H|1, Tq|1, Tk]` tensor: bool (True = may attend) or float (additive).

    Raises:
        TypeError: mask is not a tensor.
        ValueError: its shape or dtype is not one of the accepted kinds (see MASK_HELP).
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise ValueError(f"mask dtype must be bool, integer or float, got {mask.dtype}")
    shape = tuple(mask.shape)
    if mask.dim() == 2 and shape == (batch, seq_k) and shape != (seq_q, seq_k):
        if mask.is_floating_point() and not ((mask == 0) | (mask == 1)).all():
            raise ValueError("a [B, T] key-padding mask holds 1/True (attend) or 0/False (ignore)")
        return (mask != 0)[:, None, None, :]
    if mask.dim() == 2 and shape == (seq_q, seq_k):
        if batch != 1 and batch == seq_q:
            raise ValueError(
                f"a 2-D mask of shape {shape} is ambiguous when batch == seq_len == {batch}: "
                "pass key padding as mask[:, None, :] ([B, 1, T]) or a pattern as mask[None] ([1, T, T])"
            )
        mask = mask[None, None]
    elif mask.dim() == 3:
        mask = mask[:, None]
    elif mask.dim() != 4:
        raise ValueError(f"mask of shape {shape} not understood: {MASK_HELP}")
    b, h, tq, tk = mask.shape
    if b not in (1, batch) or h not in (1, num_heads) or tq not in (1, seq_q) or tk != seq_k:
        raise ValueError(
            f"mask of shape {shape} does not match batch = {batch}, num_heads = {num_heads}, "
            f"seq_len = {seq_q}: {MASK_HELP}"
        )
    return mask if mask.is_floating_point() else mask != 0


class HeadView:
    """One attention head held by this rank: a window onto its MultiHeadAttention, not a module.

    `index` is the head's position among this rank's heads; `global_index` among all heads.
    """

    def __init__(self, mha: MultiHeadAttention, index: int) -> None:
        self._mha, self.index = mha, index
        self.global_index = mha.head_offset + index

    def get_attention_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax weights `[B, T, T]` this head uses for `x` (causal and masked; no dropout).

        The weights of all this rank's heads are computed together and shared: while any head's result
        for `x` is alive, the other heads' calls for the same `x` and `mask` (unchanged, same weights, same
        grad mode) reuse it, so `[h.get_attention_weights(x) for h in mha._heads]` costs one computation.
        """
        return self._mha._shared_weights(x, mask)[:, self.index]

    def __repr__(self) -> str:
        return f"HeadView(head={self.global_index} of {self._mha.num_heads})"


class SharedWeights:
    """The last `[B, H_local, T, T]` weights the heads asked for, held weakly (no memory of its own: the
    entry lives exactly as long as some head's result, a view of it, does) with what they were computed
    from. Not copied or pickled with its module."""

    def __init__(self) -> None:
        self._entry: tuple[tuple, weakref.ref, weakref.ref | None, weakref.ref] | None = None

    @staticmethod
    def key(mha: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor | None) -> tuple:
        parameters = tuple((id(p), p._version) for p in mha.parameters())
        autocast = torch.is_autocast_enabled(x.device.type)
        return x._version, None if mask is None else mask._version, parameters, torch.is_grad_enabled(), autocast

    def get(self, key: tuple, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        if self._entry is None:
            return None
        saved_key, saved_x, saved_mask, weights = self._entry
        same_mask = mask is None if saved_mask is None else saved_mask() is mask
        return weights() if saved_key == key and saved_x() is x and same_mask else None

    def put(self, key: tuple, x: torch.Tensor, mask: torch.Tensor | None, weights: torch.Tensor) -> None:
        self._entry = (key, weakref.ref(x), None if mask is None else weakref.ref(mask), weakref.ref(weights))

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._entry = None


class KVCache:
    """Keys and values of the tokens seen so far, for one layer's local KV heads.

    Storage is allocated on the first `append` as `(B, KV_local, capacity, D)`, so each new token
    costs one position, not a copy of the whole history.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity, self.length = capacity, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` `(B, KV_local, T_new, D)`; return all keys and values so far."""
        if self.k is None:
            batch, heads, _, dim = k.shape
            self.k = k.new_empty(batch, heads, self.capacity, dim)
            self.v = v.new_empty(batch, heads, self.capacity, dim)
        end = self.length + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} requested")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention whose heads are split over `tp_group`.

    Args:
        num_heads: query heads in total (all ranks); must be divisible by tp_size.
        emb_size: model width E (input and output); need not equal num_heads * head_size.
        head_size: width D of one head.
        max_seq_len: longest sequence accepted.
        dropout: dropout probability on the output. The output is replicated over the TP group,
            so at tp > 1 it draws the same mask on every rank provided the ranks' default RNGs are
            in the same state (seed them alike); it then equals the unsharded layer's dropout.
        num_kv_heads: key/value heads (GQA; 1 = MQA). Default num_heads. Valid at tp > 1 when
            num_kv_heads % tp == 0 (KV heads split) or tp % num_kv_heads == 0 (each KV head
            replicated on tp / num_kv_heads ranks, gradients summed over the replicas).
        causal: mask future positions.
        bias: biases on the Q/K/V and output projections.
        rope_theta: rotate queries and keys by their positions (RoPE, `tp_attention.rope`) with this
            base; None for no rotation (positions then come from outside, e.g. learned embeddings).
        rope_scaling: Llama 3's frequency scaling for RoPE (`tp_attention.rope.check_rope_scaling`).
        tp_group: the tensor-parallel group (a process group or a TPGroup), or None for no parallelism.
        cp_group: the context-parallel group (`tp_attention.context`): with `forward(...,
            context_parallel=True)` each of its ranks holds `T / cp` tokens and attention runs as a ring.
        init_std, out_init_std: None for nn.Linear's init; else N(0, std) weights for Q/K/V and
            the output projection (out_init_std defaults to init_std).
        generator: RNG for the full weights (default: torch's global RNG).

    Shapes: forward(x `[B, T, E]`, mask) -> `[B, T, E]`; with `sequence_parallel=True` x and the
    output are this rank's tokens `[B, T / tp, E]` (all-gathered before the projections, reduce-scattered
    after the output projection). With `context_parallel=True` they are this CP rank's `T / cp` tokens
    (chunks `r` and `2cp - 1 - r`, `tp_attention.context.local_positions`), and `T / (cp * tp)` with both.

    Raises:
        TypeError: a size is not an integer, or tp_group is not a group.
        ValueError: a size is not positive, num_heads % tp_size != 0, or num_kv_heads is invalid
            (rules in `tp_attention.shapes`).
    """

    def __init__(
        self,
        num_heads: int,
        emb_size: int,
        head_size: int,
        max_seq_len: int,
        dropout: float = 0.1,
        *,
        num_kv_heads: int | None = None,
        causal: bool = True,
        bias: bool = True,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        tp_group: Group = None,
        cp_group: ProcessGroup | None = None,
        init_std: float | None = None,
        out_init_std: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        tp = tp_size(check_group(tp_group))
        check_attention(num_heads, emb_size, head_size, max_seq_len, dropout, num_kv_heads, tp)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        local_heads = num_heads // tp
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.emb_size, self.max_seq_len, self.causal = emb_size, max_seq_len, causal
        self.tp_group, self.cp_group = tp_group, cp_group
        self.local_heads = local_heads
        self.local_kv_heads = max(num_kv_heads // tp, 1)
        self.head_offset = tp_rank(tp_group) * self.local_heads

        common = dict(bias=bias, tp_group=tp_group, init_std=init_std, generator=generator)  # _project fuses them
        kv_shards = min(num_kv_heads, tp)
        self._q = ColumnParallelLinear(emb_size, num_heads * head_size, **common)
        self._k = ColumnParallelLinear(emb_size, num_kv_heads * head_size, num_shards=kv_shards, **common)
        self._v = ColumnParallelLinear(emb_size, num_kv_heads * head_size, num_shards=kv_shards, **common)
        self._layer = RowParallelLinear(
            num_heads * head_size,
            emb_size,
            bias=bias,
            tp_group=tp_group,
            input_is_parallel=True,
            init_std=out_init_std if out_init_std is not None else init_std,
            generator=generator,
        )
        self._dropout = SequenceParallelDropout(dropout, tp_group)
        self.rotary = None if rope_theta is None else RotaryEmbedding(head_size, rope_theta, rope_scaling)
        self._heads = tuple(HeadView(self, i) for i in range(local_heads))  # the seed's heads, this rank's
        self._last_weights = SharedWeights()

    def _shared_weights(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """`get_attention_weights(x, mask)`, computed once for all heads while a result is alive."""
        key = SharedWeights.key(self, x, mask)
        weights = self._last_weights.get(key, x, mask)
        if weights is None:
            weights = self.get_attention_weights(x, mask)
            self._last_weights.put(key, x, mask, weights)
        return weights

    def _project(
        self, x: torch.Tensor, sequence_parallel: bool = False, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local-head queries `(B, H_local, T, D)` and keys/values `(B, KV_local, T, D)` of all T tokens,
        queries and keys rotated to `positions` (`[T]` or `[B, T]`; default `0..T-1`) under RoPE.

        Q, K and V are one GEMM over their concatenated local weights, with f fused in: one
        all-reduce of dx in backward, overlapped with the weight-gradient matmul.
        """
        q, k, v = fused_column_parallel(x, (self._q, self._k, self._v), sequence_parallel)  # all T tokens
        batch, seq_len, _ = q.shape
        q = q.view(batch, seq_len, self.local_heads, self.head_size).transpose(1, 2)
        k = k.view(batch, seq_len, self.local_kv_heads, self.head_size).transpose(1, 2)
        v = v.view(batch, seq_len, self.local_kv_heads, self.head_size).transpose(1, 2)
        if self.rotary is not None:  # per head: no communication
            q, k = self.rotary(q, k, torch.arange(seq_len, device=x.device) if positions is None else positions)
        return q, k, v

    def _combined_mask(
        self, mask: torch.Tensor | None, batch: int, seq_q: int, seq_k: int, like: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The user's mask (local heads) combined with the causal one, and which query rows keep a key.

        Returns `(attn_mask, has_key)`: attn_mask is bool (True = attend), float (additive) or None;
        has_key `(B|1, H|1, Tq, 1)` is False on rows whose every key is masked (None if there are
        none to fear). Such rows are given all keys here and zeroed afterwards, so nothing is NaN.
        """
        causal = None
        if self.causal:
            causal = torch.ones(seq_q, seq_k, dtype=torch.bool, device=like.device).tril(seq_k - seq_q)
        if mask is None:
            return causal, None
        mask = normalize_mask(mask, batch, seq_q, seq_k, self.num_heads).to(like.device)
        if mask.size(1) == self.num_heads:
            mask = mask[:, self.head_offset : self.head_offset + self.local_heads]
        if mask.dtype == torch.bool:
            allowed = mask if causal is None else mask & causal
            has_key = allowed.any(-1, keepdim=True)
            return allowed | ~has_key, has_key
        additive = mask.to(like.dtype)
        if causal is not None:
            additive = additive.masked_fill(~causal, float("-inf"))
        has_key = (additive > float("-inf")).any(-1, keepdim=True)
        return additive.masked_fill(~has_key, 0.0), has_key

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        sequence_parallel: bool = False,
        context_parallel: bool = False,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over `x` `[B, T, E]` (optionally masked, see `normalize_mask`); returns `[B, T, E]`.

        With `kv_cache`, `x` holds only the new tokens: they attend to the cached ones and to each
        other, and their keys/values are appended (a mask then has `T_cached + T` keys).
        With `sequence_parallel` (tp > 1), `x` and the result are this rank's `T / tp` tokens.
        With `context_parallel` (cp > 1), they are this CP rank's tokens of sequences `cp` times as long,
        attended to as a ring over `cp_group` (no mask, no KV cache; positions default to the tokens' own).
        `positions` (RoPE only): the positions of all T tokens, `[T]` or `[B, T]` (left padding); default
        `T_cached .. T_cached + T - 1`.
        A query row whose every key is masked attends to nothing: its head output is zero.
        """
        check_input(x, self.emb_size, self.max_seq_len, self._q.weight)
        tp = tp_size(self.tp_group)
        sequence_parallel = sequence_parallel and tp > 1
        if sequence_parallel:
            if kv_cache is not None:
                raise ValueError("sequence parallel: a KV cache was given; decode without sequence parallelism")
            check_seq_len(x.size(1) * tp, self.max_seq_len, name=f"{x.size(1)} tokens per rank x tp_size {tp}")
        cp = cp_size(self.cp_group) if context_parallel else 1
        if cp > 1:
            if kv_cache is not None or mask is not None:
                raise ValueError("context parallelism: a mask or KV cache was given; attend without context_parallel")
            local = x.size(1) * (tp if sequence_parallel else 1)  # this CP rank's tokens
            check_seq_len(local * cp, self.max_seq_len, name=f"{local} tokens per CP rank x cp {cp}")
            if positions is None and self.rotary is not None:
                positions = local_positions(local * cp, cp, cp_rank(self.cp_group), x.device)
        if positions is None and kv_cache is not None and self.rotary is not None:
            positions = torch.arange(kv_cache.length, kv_cache.length + x.size(1), device=x.device)
        q, k, v = self._project(x, sequence_parallel, positions)  # (B, H_local, T, D), (B, KV_local, T, D) x2
        batch, _, seq_len, _ = q.shape
        if kv_cache is not None:
            if kv_cache.length + seq_len > self.max_seq_len:
                raise ValueError(
                    f"{kv_cache.length} cached + {seq_len} new tokens exceed max_seq_len = {self.max_seq_len}"
                )
            k, v = kv_cache.append(k, v)  # (B, KV_local, T_cached + T, D): keys already rotated
        seq_k = k.size(2)
        gqa = self.local_kv_heads != self.local_heads
        if cp > 1:
            y = ring_attention(q, k, v, self.cp_group, self.causal)  # keys and values of all T * cp tokens
        elif mask is None and (seq_k == seq_len or seq_len == 1 or not self.causal):
            causal = self.causal and seq_len > 1  # one new token may see every cached key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        else:
            attn_mask, has_key = self._combined_mask(mask, batch, seq_len, seq_k, q)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
            if has_key is not None:
                y = y * has_key  # rows with no key attend to nothing
        y = y.transpose(1, 2).reshape(batch, seq_len, self.local_heads * self.head_size)  # (B, T, H_local*D)
        y = self._layer(y, sequence_parallel)  # (B, T[/tp], E): g all-reduces (or reduce-scatters), bias once
        return self._dropout(y, sequence_parallel)

    def get_attention_weights(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        gather: bool = False,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Softmax weights used by `forward` (no dropout): `[B, H_local, T, T]` for this rank's heads.

        With `gather=True` every rank gets all `[B, num_heads, T, T]` (a collective: call it on
        every rank of the group). Fully masked query rows are all zeros. `positions` as for `forward`.
        """
        check_input(x, self.emb_size, self.max_seq_len, self._q.weight)
        batch, seq_len, _ = x.shape
        q, k, _ = self._project(x, positions=positions)
        k = k.repeat_interleave(self.local_heads // self.local_kv_heads, dim=1)  # (B, H_local, T, D)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_size)  # (B, H_local, T, T)
        attn_mask, has_key = self._combined_mask(mask, batch, seq_len, seq_len, scores)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:
            scores = scores + attn_mask
        weights = scores.softmax(dim=-1)
        if has_key is not None:
            weights = weights * has_key
        return gather_from_tp(weights.contiguous(), self.tp_group, dim=1) if gather else weights

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_size={self.head_size}, "
            f"emb_size={self.emb_size}, local_heads={self.local_heads}, causal={self.causal}"
        )
