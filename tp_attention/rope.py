"""Rotary position embedding (RoPE, Su et al. 2021), as Llama and Hugging Face apply it.

Each head's query and key vectors are rotated by angles `position * inv_freq`: pairs `(x[i], x[i + D/2])`
(Hugging Face's `rotate_half` layout). The rotation is per head and per token, so under tensor
parallelism every rank rotates its own heads and nothing is communicated; the KV cache stores rotated
keys, so a cached key is never rotated again.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling: dict[str, Any] | None, name: str = "rope_scaling") -> None:
    """None, or Llama 3's frequency scaling `{"rope_type": "llama3", factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings}`.

    Raises:
        ValueError: another rope_type, or a missing or non-positive number (named).
    """
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"{name} rope_type = {kind!r} is not supported: null (none) or 'llama3'")
    for key in LLAMA3_KEYS:
        value = scaling.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name}.{key} = {value!r} must be a positive number (llama3 scaling)")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"{name}.high_freq_factor must exceed {name}.low_freq_factor")


def rope_inverse_frequencies(head_size: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies `[head_size / 2]` (fp32), with Llama 3's scaling when given, computed exactly
    as Hugging Face computes them (`_compute_default_rope_parameters`, `_compute_llama3_parameters`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)  # long waves: slowed down
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[-x2, x1]` for `x = [x1, x2]` split in halves along the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryEmbedding(nn.Module):
    """The rotation of one attention layer's heads.

    Args:
        head_size: D, even.
        theta: base of the frequencies (Llama: 10000 or 500000).
        scaling: None, or Llama 3's frequency scaling (see `check_rope_scaling`).

    `inv_freq` is a non-persistent buffer (not in the state dict): `reset()` recomputes it, e.g. after
    building the model on the meta device.

    Raises:
        ValueError: an odd head_size or bad scaling.
    """

    def __init__(self, head_size: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        if head_size % 2:
            raise ValueError(f"head_size = {head_size} must be even for rotary position embedding")
        check_rope_scaling(scaling)
        self.head_size, self.theta, self.scaling = head_size, theta, scaling
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_size, theta, scaling), persistent=False)

    def reset(self) -> None:
        """Recompute `inv_freq` on its current device (a meta tensor gets a real one on the CPU)."""
        inv_freq = rope_inverse_frequencies(self.head_size, self.theta, self.scaling)
        self.inv_freq = inv_freq if self.inv_freq.is_meta else inv_freq.to(self.inv_freq.device)

    def _apply(self, fn, recurse: bool = True):
        """`module.to(torch.bfloat16)` and the like cast buffers: `inv_freq` stays fp32 (bf16 angles drift
        by whole radians at long positions), as Hugging Face's rotary embedding keeps it."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            self.inv_freq = rope_inverse_frequencies(self.head_size, self.theta, self.scaling).to(self.inv_freq.device)
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q `(B, H, T, D)` and k `(B, KV, T, D)` by `positions` `[T]` or `[B, T]` (integers)."""
        freqs = positions.to(self.inv_freq.device).float()[..., None] * self.inv_freq  # (B|-, T, D/2), fp32
        angles = torch.cat([freqs, freqs], dim=-1)  # (B|-, T, D)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        if cos.dim() == 3:  # per-sequence positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def extra_repr(self) -> str:
        return f"head_size={self.head_size}, theta={self.theta:g}, scaling={self.scaling}"
