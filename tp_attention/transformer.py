"""The seed project's import path: `from tp_attention.transformer import MultiHeadAttention`."""

from tp_attention.attention import MultiHeadAttention

__all__ = ["MultiHeadAttention"]
