"""Context parallelism: every rank of a CP group holds `seq_len / cp` tokens of each sequence, and attention
runs as a ring (ring attention, Liu et al. 2023; torch's `context_parallel`, Megatron-core's CP, picotron).

Load balance for causal attention: a sequence is cut into `2 * cp` chunks and CP rank r holds chunks r and
`2cp - 1 - r` (an early chunk and a late one), so every rank does the same share of the causal triangle:

    seq_len 8, cp 2:  chunks 0 1 2 3   rank 0 holds [0, 3] (tokens 0 1 6 7), rank 1 holds [1, 2] (tokens 2 3 4 5)

Keys and values travel around the ring, one rank's block per step; each step's partial result is merged
with the others by its log-sum-exp (the online softmax), so the output is exact. Step i holds the block
of rank `src = r - i`:

    i = 0        all my queries, my keys, causal
    src < r      all my queries, the block's early chunk (its late chunk lies in my future)
    src > r      my late chunk's queries, the whole block (my early chunk lies before it)

Backward is exact too: each block's gradients are the fused kernel's, given the final output and
log-sum-exp; keys and values go around the ring again, their gradients travelling with them and arriving
back at their owner after `cp` steps. The next block's transfer runs while this block is computed.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tp_attention.groups import ProcessGroup
from tp_attention.shapes import check_context_parallel


def cp_size(group: ProcessGroup | None) -> int:
    """Ranks in the context-parallel group; 1 for None."""
    return 1 if group is None else dist.get_world_size(group)


def cp_rank(group: ProcessGroup | None) -> int:
    """This process's rank in the context-parallel group; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


def local_positions(seq_len: int, cp: int, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The positions `[seq_len / cp]` (int64) of the tokens CP rank `rank` holds: chunks rank and 2cp-1-rank."""
    check_context_parallel(seq_len, cp)
    chunk = seq_len // (2 * cp)
    early = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    late = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([early, late]) if cp > 1 else torch.arange(seq_len, device=device)


def shard_sequence(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """This CP rank's tokens of `x` along `dim` (`[B, T]` ids -> `[B, T / cp]`); `x` itself without CP.

    Raises:
        ValueError: the length does not split into `2 * cp` chunks.
    """
    cp = cp_size(group)
    if cp == 1:
        return x
    return x.index_select(dim, local_positions(x.size(dim), cp, cp_rank(group), x.device))


def _send_to_next(flat: torch.Tensor, group: ProcessGroup) -> tuple[torch.Tensor, dist.Work]:
    """Start sending 1-D `flat` to the next rank of the ring while receiving the previous rank's.

    One all-to-all whose only non-empty splits are next and previous (torch's context_parallel rotates
    the same way): it runs on every backend, gloo and the threaded test group included.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sends = [flat.numel() if peer == (rank + 1) % world else 0 for peer in range(world)]
    receives = [flat.numel() if peer == (rank - 1) % world else 0 for peer in range(world)]
    received = torch.empty_like(flat)
    return received, dist.all_to_all_single(received, flat, receives, sends, group=group, async_op=True)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out [B, H, Tq, D] in q's dtype, lse [B, H, Tq] fp32)`: softmax(q k^T * scale) v over these keys and
    the log-sum-exp of its scores. `fused`: torch's flash kernel for CPU; else the same in fp32 math."""
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def attend_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients `(dq, dk, dv)` of this key block's share of attention, given the final `out` and `lse` over
    all keys (then the blocks' shares sum to the exact gradient)."""
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, causal, scale=scale
        )
    q32, k32, v32, grad32 = q.float(), k.float(), v.float(), grad.float()
    scores = (q32 @ k32.transpose(-2, -1)) * scale
    if causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
    probs = (scores - lse[..., None]).exp()  # (B, H, Tq, Tk): this block's share of the full softmax
    dprobs = grad32 @ v32.transpose(-2, -1)
    dscores = probs * (dprobs - (grad32 * out.float()).sum(-1, keepdim=True)) * scale
    dq, dk, dv = dscores @ k32, dscores.transpose(-2, -1) @ q32, probs.transpose(-2, -1) @ grad32
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


ALL = slice(None)


def _block(step: int, rank: int, world: int, chunk: int, causal: bool) -> tuple[slice, slice, bool]:
    """`(query rows, key columns, causal)` of ring step `step` on `rank` (see the module docstring)."""
    source = (rank - step) % world
    if not causal:
        return ALL, ALL, False
    if step == 0:
        return ALL, ALL, True
    if source < rank:
        return ALL, slice(0, chunk), False
    return slice(chunk, None), ALL, False


def _expand(t: torch.Tensor, repeats: int) -> torch.Tensor:
    """KV heads `(B, KV, T, D)` -> `(B, KV * repeats, T, D)`, head h serving queries h * repeats ... (GQA)."""
    return t if repeats == 1 else t.repeat_interleave(repeats, dim=1)


def _fold(t: torch.Tensor, repeats: int) -> torch.Tensor:
    """The conjugate of `_expand` for gradients: sum over the query heads that shared a KV head."""
    return t if repeats == 1 else t.unflatten(1, (-1, repeats)).sum(2)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        repeats, scale, fused = q.size(1) // k.size(1), 1.0 / math.sqrt(q.size(-1)), q.device.type == "cpu"
        chunk = q.size(2) // 2
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # (B, H, T_local, D)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)  # (B, H, T_local)
        kv = torch.cat([k.reshape(-1), v.reshape(-1)])  # k and v themselves are saved: views of the fused QKV
        for step in range(world):
            if step + 1 < world:
                incoming, transfer = _send_to_next(kv, group)  # the next block travels while this one is used
            block_k, block_v = kv.split(k.numel())
            rows, columns, block_causal = _block(step, rank, world, chunk, causal)
            part, part_lse = attend(
                q[:, :, rows].contiguous(),
                _expand(block_k.view(k.shape)[:, :, columns], repeats).contiguous(),
                _expand(block_v.view(v.shape)[:, :, columns], repeats).contiguous(),
                block_causal,
                scale,
                fused,
            )
            merged = torch.logaddexp(lse[:, :, rows], part_lse)
            out[:, :, rows] = (
                out[:, :, rows] * (lse[:, :, rows] - merged).exp()[..., None]
                + part.float() * (part_lse - merged).exp()[..., None]
            )
            lse[:, :, rows] = merged
            if step + 1 < world:
                transfer.wait()
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.repeats, ctx.scale, ctx.fused = group, causal, repeats, scale, fused
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        group, repeats = ctx.group, ctx.repeats
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        chunk, grad = q.size(2) // 2, grad.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.cat([k.reshape(-1), v.reshape(-1)])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # the gradient of the block held
        for step in range(world):
            if step + 1 < world:
                incoming, transfer = _send_to_next(kv, group)
            block_k, block_v = kv.split(k.numel())
            block_dk, block_dv = (t.view(k.shape) for t in dkv.split(k.numel()))
            rows, columns, block_causal = _block(step, rank, world, chunk, ctx.causal)
            gq, gk, gv = attend_backward(
                grad[:, :, rows].contiguous(),
                q[:, :, rows].contiguous(),
                _expand(block_k.view(k.shape)[:, :, columns], repeats).contiguous(),
                _expand(block_v.view(v.shape)[:, :, columns], repeats).contiguous(),
                out[:, :, rows].contiguous(),
                lse[:, :, rows].contiguous(),
                block_causal,
                ctx.scale,
                ctx.fused,
            )
            dq[:, :, rows] += gq
            block_dk[:, :, columns] += _fold(gk.float(), repeats)
            block_dv[:, :, columns] += _fold(gv.float(), repeats)
            gradients_in, returned = _send_to_next(dkv, group)  # on with its block; the owner's is last
            if step + 1 < world:
                transfer.wait()
                kv = incoming
            returned.wait()
            dkv = gradients_in  # the gradient so far of the block now held (after the last step: my own)
        dk, dv = (t.view(k.shape).to(k.dtype) for t in dkv.split(k.numel()))
        return dq.to(q.dtype), dk, dv, None, None


@torch.compiler.disable  # collectives inside an autograd.Function: runs eagerly under torch.compile
def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ProcessGroup | None, causal: bool = True
) -> torch.Tensor:
    """Softmax attention of this CP rank's queries over the keys of the whole sequence.

    Args:
        q: `(B, H, T_local, D)` queries of this rank's tokens (`local_positions` order when causal).
        k, v: `(B, KV, T_local, D)` keys and values of the same tokens; `H % KV == 0` (GQA/MQA).
        group: the CP group; None (or a group of one) is plain scaled-dot-product attention.
        causal: each token attends to the positions up to its own.

    Returns `(B, H, T_local, D)`, equal to full attention over all `T_local * cp` tokens restricted to
    this rank's rows. A collective: every rank of `group` calls it, in the same order.

    Raises:
        ValueError: T_local is odd under causal attention (not two equal chunks), or H % KV != 0.
    """
    if q.size(1) % k.size(1):
        raise ValueError(f"{q.size(1)} query heads cannot share {k.size(1)} key/value heads evenly")
    if cp_size(group) == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.size(1) != k.size(1))
    if causal and q.size(2) % 2:
        raise ValueError(f"{q.size(2)} tokens on this CP rank: causal context parallelism needs two equal chunks")
    return _RingAttention.apply(q, k, v, group, causal)
