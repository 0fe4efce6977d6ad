"""The vocabulary split over the TP group: embedding, LM-head logits and cross-entropy.

Each rank owns `padded_vocab / tp` consecutive token rows. A vocabulary that tp does not divide
is zero-padded to a multiple of tp, and the pad logits are -inf, so softmax and loss equal the
unpadded model's exactly. The full `[B, T, V]` logits are never needed for the loss, and
`VocabParallelEmbedding.loss` never builds more than one chunk of tokens' `[chunk, V / tp]` logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tp_attention.groups import Group, check_group, tp_rank, tp_size
from tp_attention.init import Init, fill_
from tp_attention.layers import column_parallel_linear
from tp_attention.mappings import (
    all_reduce_in_place,
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
)
from tp_attention.sharding import ShardSpec

LOSS_CHUNK_BYTES = 256 * 2**20  # the most fp32 logits one chunk of the loss holds (VocabParallelEmbedding.loss)


def loss_chunk_tokens(local_vocab: int, chunk_bytes: int = LOSS_CHUNK_BYTES) -> int:
    """Tokens per chunk of the loss: as many as `chunk_bytes` of fp32 `[tokens, local_vocab]` logits hold (>= 1).

    Raises:
        ValueError: `chunk_bytes` < 1.
    """
    if chunk_bytes < 1:
        raise ValueError(f"loss chunk bytes = {chunk_bytes} must be >= 1")
    return max(1, chunk_bytes // (4 * local_vocab))


class VocabParallelEmbedding(nn.Module):
    """Token embedding `[vocab_size, emb_size]` with the rows split over `tp_group`.

    forward: ids `[B, T]` -> `[B, T, E]`. Ids outside this rank's rows look up zeros; one
    all-reduce sums the ranks (a reduce-scatter over tokens with `sequence_parallel`: `[B, T / tp, E]`).
    `logits(h)` uses the same weight as an output layer (tied LM head).
    """

    def __init__(
        self,
        vocab_size: int,
        emb_size: int,
        *,
        tp_group: Group = None,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        tp, rank = tp_size(check_group(tp_group)), tp_rank(tp_group)
        spec = ShardSpec(dim=0, num_shards=tp, full_size=vocab_size)
        self.vocab_size, self.emb_size, self.tp_group = vocab_size, emb_size, tp_group
        self.tp_shards = {"weight": spec}
        self.local_vocab = spec.padded_size(vocab_size) // tp
        self.vocab_start = rank * self.local_vocab
        self.local_real = spec.extent(self.local_vocab, rank, tp)[1]  # rows that are not pad
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(self.local_vocab, emb_size))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw the full `[vocab_size, emb_size]` N(0, init_std²) table from `generator`, chunk by chunk,
        and keep this rank's rows (pad rows zero); nothing is drawn on the meta device."""
        shape, spec = (self.vocab_size, self.emb_size), self.tp_shards["weight"]
        fill_(
            self.weight,
            shape,
            Init("normal", self.init_std),
            spec,
            tp_rank(self.tp_group),
            tp_size(self.tp_group),
            generator,
        )

    def forward(self, ids: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        if tp_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        emb = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)  # (B, T, E)
        reduce = reduce_scatter_to_sp if sequence_parallel else reduce_from_tp
        return reduce(emb, self.tp_group)

    def logits(self, h: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """This rank's logits `[B, T, local_vocab]` for hidden states `h` `[B, T, E]` (this rank's tokens
        `[B, T / tp, E]` with `sequence_parallel`: all-gathered first); pad columns are -inf."""
        logits = column_parallel_linear(h, self.weight, None, self.tp_group, sequence_parallel)  # all tokens
        if self.local_real < self.local_vocab:
            pad = torch.arange(self.local_vocab, device=logits.device) >= self.local_real
            logits = logits.masked_fill(pad, float("-inf"))
        return logits

    def loss(
        self,
        h: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int = -100,
        sequence_parallel: bool = False,
        chunk_bytes: int = LOSS_CHUNK_BYTES,
    ) -> torch.Tensor:
        """The mean cross-entropy of `logits(h)` against `targets` `[B, T]` (global ids, `ignore_index` skipped),
        computed `loss_chunk_tokens(local_vocab, chunk_bytes)` tokens at a time: no more than one chunk's
        `[chunk, local_vocab]` fp32 logits (and their gradient) exist at once, and backward recomputes each
        chunk's logits. Tokens that fit in one chunk take the unchunked path itself (`logits`, then
        `vocab_parallel_cross_entropy`). Equals that path; the same two all-reduces of `[N]`-sized tensors.

        `h` is `[B, T, E]`, or this rank's tokens `[B, T / tp, E]` with `sequence_parallel` (all-gathered first).

        Raises:
            ValueError: `chunk_bytes` < 1.
        """
        chunk = loss_chunk_tokens(self.local_vocab, chunk_bytes)
        if targets.numel() <= chunk:
            logits = self.logits(h, sequence_parallel)  # (B, T, V_local)
            return vocab_parallel_cross_entropy(logits, targets, self.vocab_start, ignore_index, self.tp_group)
        h = gather_from_sp(h, self.tp_group) if sequence_parallel else copy_to_tp(h, self.tp_group)  # (B, T, E)
        per_token = _ChunkedVocabParallelCrossEntropy.apply(
            h.reshape(-1, h.size(-1)),
            self.weight,
            targets.reshape(-1),
            self.vocab_start,
            self.local_real,
            ignore_index,
            self.tp_group,
            chunk,
        )
        return per_token.sum() / (targets != ignore_index).sum()

    def gather_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """All ranks' logits `[B, T, vocab_size]` (pad columns dropped)."""
        return gather_from_tp(local_logits, self.tp_group)[..., : self.vocab_size]

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, emb_size={self.emb_size}, local_vocab={self.local_vocab}, "
            f"vocab_start={self.vocab_start}"
        )


def _local_targets(
    target: torch.Tensor, vocab_start: int, local_vocab: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For global ids `target` `[N]`: (not ignored, the id as this rank's column clamped into range, whether that
    column is on this rank) -- the masks both cross-entropies take the target logit with."""
    valid = target != ignore_index
    local_target = target - vocab_start
    here = valid & (local_target >= 0) & (local_target < local_vocab)
    return valid, local_target.clamp(0, local_vocab - 1), here


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from vocab-sharded logits: two all-reduces of `[N]`-sized tensors."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, ignore_index, group):
        ctx.dtype = logits.dtype
        logits = logits.float()  # (N, V_local)
        local_vocab = logits.size(-1)
        row_max = all_reduce_in_place(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
        shifted = logits - row_max[:, None]
        valid, local_target, here = _local_targets(target, vocab_start, local_vocab, ignore_index)
        target_logit = torch.where(here, shifted.gather(-1, local_target[:, None]).squeeze(-1), 0.0)  # pad: -inf
        exp = shifted.exp()
        stats = all_reduce_in_place(torch.stack([exp.sum(dim=-1), target_logit]), group)  # (2, N): one for both
        loss = (stats[0].log() - stats[1]) * valid
        ctx.save_for_backward(exp.div_(stats[0][:, None]), local_target, here, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, here, valid = ctx.saved_tensors
        grad = softmax * (grad_loss * valid)[:, None]
        rows = torch.arange(grad.size(0), device=grad.device)
        grad[rows, local_target] -= grad_loss * here
        return grad.to(ctx.dtype), None, None, None, None


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, local_real: int) -> torch.Tensor:
    """fp32 logits `[c, V_local]` of hidden states `h` `[c, E]`, pad columns -inf (matmul in autocast's dtype)."""
    logits = torch.matmul(h, weight.t()).float()
    if local_real < weight.size(0):
        logits[:, local_real:] = float("-inf")
    return logits


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `h @ weight.T` (vocab-sharded), `chunk` tokens at a time. Each rank keeps its
    columns' log-sum-exp `[N]` per token; one MAX and one SUM all-reduce of `[N]`-sized tensors merge them.
    Backward recomputes each chunk's logits from `h` and the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, h, weight, target, vocab_start, local_real, ignore_index, group, chunk):
        # h (N, E) after f (or the SP gather), weight (V_local, E), target (N,)
        device = h.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        ctx.autocast = (device, autocast, torch.get_autocast_dtype(device) if autocast else torch.float32)
        ctx.chunk, ctx.local_real = chunk, local_real
        n, local_vocab = h.size(0), weight.size(0)
        valid, local_target, here = _local_targets(target, vocab_start, local_vocab, ignore_index)
        lse = torch.empty(n, device=h.device)  # this rank's columns' log-sum-exp
        target_logit = torch.empty(n, device=h.device)
        for start in range(0, n, chunk):
            logits = _chunk_logits(h[start : start + chunk], weight, local_real)  # (c, V_local)
            lse[start : start + chunk] = logits.logsumexp(dim=-1)
            target_logit[start : start + chunk] = logits.gather(-1, local_target[start : start + chunk, None])[:, 0]
        target_logit = torch.where(here, target_logit, 0.0)
        if tp_size(group) > 1:
            row_max = all_reduce_in_place(lse.clone(), group, dist.ReduceOp.MAX)
            stats = all_reduce_in_place(torch.stack([(lse - row_max).exp(), target_logit]), group)  # (2, N)
            lse, target_logit = row_max + stats[0].log(), stats[1]
        ctx.save_for_backward(h, weight, lse, local_target, here, valid)
        return (lse - target_logit) * valid

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, lse, local_target, here, valid = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        scale = grad_loss * valid
        chunk = ctx.chunk
        with torch.autocast(device, dtype, enabled=enabled):  # the forward's matmul precision
            for start in range(0, h.size(0), chunk):
                stop = min(start + chunk, h.size(0))
                probs = _chunk_logits(h[start:stop], weight, ctx.local_real).sub_(lse[start:stop, None]).exp_()
                grad = probs.mul_(scale[start:stop, None])  # d loss / d logits (c, V_local)
                rows = torch.arange(stop - start, device=grad.device)
                grad[rows, local_target[start:stop]] -= grad_loss[start:stop] * here[start:stop]
                grad = grad.to(weight.dtype)  # a bf16 model's matmuls run in bf16 (autocast casts itself)
                if grad_h is not None:
                    grad_h[start:stop] = torch.matmul(grad, weight)
                if grad_weight is not None:
                    grad_weight += torch.matmul(grad.t(), h[start:stop])
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_h, grad_weight, None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    vocab_start: int = 0,
    ignore_index: int = -100,
    tp_group: Group = None,
) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored targets, from logits split along the vocab.

    Args:
        local_logits: `[..., V_local]`, this rank's columns `[vocab_start, vocab_start + V_local)`;
            pad columns must be -inf.
        target: `[...]` global token ids, or `ignore_index`.

    Equals `F.cross_entropy(full_logits, target, ignore_index=ignore_index)` (NaN, as there, when
    every target is ignored). Computed in fp32.
    """
    if tp_size(tp_group) == 1:  # nothing is sharded: torch's fused kernel
        logits = local_logits.reshape(-1, local_logits.size(-1)).float()
        return F.cross_entropy(logits, target.reshape(-1), ignore_index=ignore_index)
    per_token = _VocabParallelCrossEntropy.apply(
        local_logits.reshape(-1, local_logits.size(-1)), target.reshape(-1), vocab_start, ignore_index, tp_group
    )
    return per_token.sum() / (target != ignore_index).sum()
