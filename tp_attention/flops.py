"""Model FLOPs per token (nanoGPT's estimate), for MFU."""

from __future__ import annotations

from tp_attention.config import GPTConfig


def flops_per_token(cfg: GPTConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: `6 N + 12 L H D T` (nanoGPT / PaLM appendix B).

    N is the parameter count without the position embedding; the second term is attention's
    `QK^T` and `AV` matmuls, which have no parameters.
    """
    return 6.0 * num_params + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len
