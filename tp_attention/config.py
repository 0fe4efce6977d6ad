"""The shape and options of a GPT: one dataclass that the model, its Hugging Face and safetensors I/O,
the FLOP count and the training config share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from tp_attention.shapes import check_gpt, mlp_hidden_size


@dataclass
class GPTConfig:
    """Shape and options of a GPT. Defaults are a tiny byte-level GPT-2-style model.

    Architecture options (GPT-2: the defaults with `activation="gelu_tanh"`; Llama: `norm="rmsnorm"`,
    `activation="swiglu"`, `position="rope"`, `bias=False`, `tie_embeddings=False`):
        norm: "layernorm" | "rmsnorm", with `norm_eps`.
        activation: "gelu" (exact) | "gelu_tanh" (GPT-2's gelu_new) | "swiglu" (gate and up projections).
        intermediate_size: the MLP's hidden width; None: `ffn_mult * emb_size` (SwiGLU: Llama's rounding,
            see `tp_attention.shapes.mlp_hidden_size`).
        position: "learned" (absolute embeddings) | "rope" (`rope_theta`, `rope_scaling`: Llama 3's).
        bias: biases in the norms and, unless `attention_bias` / `mlp_bias` say otherwise, the projections.
    """

    vocab_size: int = 256
    max_seq_len: int = 128
    emb_size: int = 128
    num_heads: int = 4
    head_size: int = 32
    num_layers: int = 4
    dropout: float = 0.1
    num_kv_heads: int | None = None
    bias: bool = True
    tie_embeddings: bool = True
    ffn_mult: int = 4
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    intermediate_size: int | None = None
    position: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool | None = None
    mlp_bias: bool | None = None

    def __post_init__(self) -> None:
        check_gpt(self)  # the rules that do not depend on tp; GPT checks the rest with its group

    @property
    def hidden_size(self) -> int:
        """The MLP's hidden width (`intermediate_size`, or what `ffn_mult` gives)."""
        return mlp_hidden_size(self)

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def attn_bias(self) -> bool:
        """Biases on Q/K/V and the attention output projection."""
        return self.bias if self.attention_bias is None else self.attention_bias

    @property
    def ffn_bias(self) -> bool:
        """Biases on the MLP's projections."""
        return self.bias if self.mlp_bias is None else self.mlp_bias

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GPTConfig:
        """Build from a dict (or Hydra DictConfig), refusing unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; known: {sorted(known)}")
        return cls(**dict(values))
