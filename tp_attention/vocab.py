"""The vocabulary split over the TP group: embedding, LM-head logits and cross-entropy.

Each rank owns `padded_vocab / tp` consecutive token rows. A vocabulary that tp does not divide
is zero-padded to a multiple of tp, and the pad logits are -inf, so softmax and loss equal the
unpadded model's exactly. The full `[B, T, V]` logits are never needed for the loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tp_attention.groups import Group, check_group, tp_rank, tp_size
from tp_attention.init import Init, fill_
from tp_attention.layers import column_parallel_linear
from tp_attention.mappings import all_reduce_in_place, gather_from_tp, reduce_from_tp, reduce_scatter_to_sp
from tp_attention.sharding import ShardSpec


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

    def gather_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """All ranks' logits `[B, T, vocab_size]` (pad columns dropped)."""
        return gather_from_tp(local_logits, self.tp_group)[..., : self.vocab_size]

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, emb_size={self.emb_size}, local_vocab={self.local_vocab}, "
            f"vocab_start={self.vocab_start}"
        )


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from vocab-sharded logits: two all-reduces of `[N]`-sized tensors."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, ignore_index, group):
        ctx.dtype = logits.dtype
        logits = logits.float()  # (N, V_local)
        local_vocab = logits.size(-1)
        row_max = all_reduce_in_place(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
        shifted = logits - row_max[:, None]
        valid = target != ignore_index
        local_target = target - vocab_start
        here = valid & (local_target >= 0) & (local_target < local_vocab)  # target row on this rank
        local_target = local_target.clamp(0, local_vocab - 1)
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
