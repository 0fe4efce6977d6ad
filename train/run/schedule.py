"""The learning-rate schedule: a function of the step alone, so a resumed run continues it exactly.

linear warmup to optim.lr over optim.warmup_steps, then, until optim.decay_steps (default trainer.max_steps):
  cosine     cosine decay to optim.min_lr
  linear     linear decay to optim.min_lr
  constant   optim.lr
  wsd        warmup-stable-decay: optim.lr, then a linear decay to optim.min_lr over the last
             optim.decay_fraction of the steps after warmup
and optim.min_lr after it (optim.lr for constant).
"""

from __future__ import annotations

import math

from train.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The learning rate of (0-based) step `step`."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    decay = optim.decay_steps or max_steps
    if step >= decay:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, decay - optim.warmup_steps)
    if optim.schedule == "cosine":
        return optim.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)
    if optim.schedule == "wsd":
        stable = 1 - optim.decay_fraction
        progress = max(0.0, (progress - stable) / optim.decay_fraction) if optim.decay_fraction > 0 else 0.0
    return optim.lr + progress * (optim.min_lr - optim.lr)


def schedule_warnings(optim: OptimConfig, max_steps: int) -> list[str]:
    """What about this schedule a person would want to know before the run: it never peaks, or never decays."""
    warnings = []
    if optim.warmup_steps >= max_steps:
        warnings.append(
            f"optim.warmup_steps = {optim.warmup_steps} >= trainer.max_steps = {max_steps}: the run "
            f"never reaches optim.lr = {optim.lr:g} (it ends at {lr_at(max_steps - 1, optim, max_steps):g})"
        )
    decay = optim.decay_steps or max_steps
    if optim.schedule != "constant" and decay > max_steps:
        warnings.append(
            f"optim.decay_steps = {decay} > trainer.max_steps = {max_steps}: the {optim.schedule} decay "
            f"does not finish (the last step's lr is {lr_at(max_steps - 1, optim, max_steps):g}, not "
            f"optim.min_lr = {optim.min_lr:g})"
        )
    return warnings
