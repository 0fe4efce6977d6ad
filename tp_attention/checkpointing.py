"""Activation checkpointing of GPT blocks: keep a block's input, recompute its activations in backward.

    apply_activation_checkpointing(model, "full")                 every block
    apply_activation_checkpointing(model, "selective", every=2)   blocks 0, 2, 4, ... (every `every`-th)

`torch.utils.checkpoint` (non-reentrant) with the RNG state preserved, so the recomputed dropout masks are
the forward's; TP ranks keep their RNG in step, so sequence parallelism's tiled masks are too. Under TP the
recompute runs the block's forward collectives again (one more all-reduce per attention and per MLP, or
all-gather + reduce-scatter with sequence parallelism): the price of not storing `[B, T, 4E]`-sized MLP and
attention activations. Inference forwards and KV-cache steps never recompute.
"""

from __future__ import annotations

from torch import nn

MODES = ("none", "full", "selective")


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> int:
    """Mark `model`'s blocks (`model._decoders`) for recomputation; returns how many are.

    Raises:
        ValueError: an unknown `mode`, or `every` < 1.
    """
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode = {mode!r} must be one of {', '.join(MODES)}")
    if every < 1:
        raise ValueError(f"activation checkpointing every = {every} must be >= 1")
    for i, block in model._decoders.items():  # a pipeline stage's blocks under their layer numbers
        block.checkpointed = is_recomputed(int(i), mode, every)
    return sum(block.checkpointed for block in model._decoders.values())


def is_recomputed(block: int, mode: str, every: int = 2) -> bool:
    """Whether block number `block` is recomputed in `mode` (see `apply_activation_checkpointing`)."""
    return mode == "full" or (mode == "selective" and block % every == 0)
