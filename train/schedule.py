"""The learning-rate schedule: a function of the step alone, so a resumed run continues it exactly."""

from __future__ import annotations

import math

from train.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `decay_steps` (default max_steps)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay = optim.decay_steps or max_steps
    if step >= decay:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, decay - optim.warmup_steps)
    return optim.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)
