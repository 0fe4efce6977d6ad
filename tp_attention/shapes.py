"""The shape rules of tensor-parallel attention and the GPT, written once.

The layers, `GPTConfig` and the training job's config check all call these, so a rule has one
message wherever it is broken. Each check raises `TypeError` (not an integer, ...) or `ValueError`
naming the value and the rule. `prefix` and `tp_name` let a caller name the values as its user
wrote them: the training config says `model.num_heads` and `parallel.tp`, the library `num_heads`
and `tp_size`.
"""

from __future__ import annotations

import math
from typing import Any

from tp_attention.rope import check_rope_scaling


def check_int(value: Any, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """`value` if it is an int (not a bool) >= `minimum` (and <= `maximum`, if given)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} = {value!r} must be {rule}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} = {value!r} must be at most {maximum:,} (a typo?)")
    return value


def check_number(
    value: Any, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = True
) -> float:
    """`value` if it is a finite real number in the interval `low`..`high` (open or closed ends)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not math.isfinite(value) or not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or math.isinf(high) else ']'}"
        finite = "" if math.isfinite(value) else "a finite number "
        raise ValueError(f"{name} = {value!r} must be {finite}in {interval}")
    return value


def check_divisible(value: int, name: str, tp: int, tp_name: str = "tp_size") -> int:
    """`value // tp`, or a ValueError naming both numbers."""
    if value % tp != 0:
        raise ValueError(f"{name} = {value} must be divisible by {tp_name} = {tp}")
    return value // tp


def check_heads(
    num_heads: int, num_kv_heads: int | None, tp: int = 1, *, prefix: str = "", tp_name: str = "tp_size"
) -> None:
    """Query heads split over tp; KV heads (GQA/MQA) dividing the query heads, and split over tp
    (`num_kv_heads % tp == 0`) or replicated (`tp % num_kv_heads == 0`)."""
    check_int(num_heads, f"{prefix}num_heads")
    kv = num_heads if num_kv_heads is None else check_int(num_kv_heads, f"{prefix}num_kv_heads")
    if num_heads % kv != 0:
        raise ValueError(f"{prefix}num_heads = {num_heads} must be divisible by {prefix}num_kv_heads = {kv}")
    check_divisible(num_heads, f"{prefix}num_heads", tp, tp_name)
    if kv % tp != 0 and tp % kv != 0:
        raise ValueError(f"{prefix}num_kv_heads = {kv} must be divisible by {tp_name} = {tp} or divide it")


def check_attention(
    num_heads: int,
    emb_size: int,
    head_size: int,
    max_seq_len: int,
    dropout: float,
    num_kv_heads: int | None = None,
    tp: int = 1,
    *,
    prefix: str = "",
    tp_name: str = "tp_size",
) -> None:
    """Every rule of a `MultiHeadAttention` at tensor-parallel size `tp`."""
    for name, value in (("emb_size", emb_size), ("head_size", head_size), ("max_seq_len", max_seq_len)):
        check_int(value, prefix + name)
    check_number(dropout, f"{prefix}dropout", 0.0, 1.0)
    check_heads(num_heads, num_kv_heads, tp, prefix=prefix, tp_name=tp_name)


NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")
POSITIONS = ("learned", "rope")
SWIGLU_MULTIPLE_OF = 256  # Llama rounds its SwiGLU hidden size up to a multiple of this


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} = {value!r} must be one of {', '.join(choices)}")
    return value


def mlp_hidden_size(cfg: Any) -> int:
    """The MLP's hidden width: `intermediate_size` when set; else `ffn_mult * emb_size`, or for SwiGLU
    Llama's rule, `2/3` of that rounded up to a multiple of 256 (the same parameter count as a 4x GELU MLP)."""
    if cfg.intermediate_size is not None:
        return cfg.intermediate_size
    hidden = cfg.ffn_mult * cfg.emb_size
    if cfg.activation != "swiglu":
        return hidden
    return -(-int(2 * hidden / 3) // SWIGLU_MULTIPLE_OF) * SWIGLU_MULTIPLE_OF


def check_gpt(
    cfg: Any, tp: int = 1, *, prefix: str = "", tp_name: str = "tp_size", vocab_size_optional: bool = False
) -> None:
    """Every rule of a GPT config (`GPTConfig` or an object with its fields) at tensor-parallel size `tp`.

    `vocab_size_optional`: None stands for "the tokenizer's" (the training config).
    """
    if not (vocab_size_optional and cfg.vocab_size is None):
        check_int(cfg.vocab_size, f"{prefix}vocab_size")
    check_int(cfg.num_layers, f"{prefix}num_layers")
    check_int(cfg.ffn_mult, f"{prefix}ffn_mult")
    check_choice(cfg.norm, f"{prefix}norm", NORMS)
    check_choice(cfg.activation, f"{prefix}activation", ACTIVATIONS)
    check_choice(cfg.position, f"{prefix}position", POSITIONS)
    check_number(cfg.norm_eps, f"{prefix}norm_eps", 0.0, 1.0, low_open=True)
    check_number(cfg.rope_theta, f"{prefix}rope_theta", 0.0, math.inf, low_open=True)
    if cfg.intermediate_size is not None:
        check_int(cfg.intermediate_size, f"{prefix}intermediate_size")
    for name in ("bias", "tie_embeddings", "attention_bias", "mlp_bias"):
        value = getattr(cfg, name)
        if not isinstance(value, bool) and not (value is None and name in ("attention_bias", "mlp_bias")):
            raise TypeError(f"{prefix}{name} must be true or false, got {value!r}")
    if cfg.position == "rope":
        if cfg.head_size % 2:
            raise ValueError(f"{prefix}head_size = {cfg.head_size} must be even with {prefix}position = 'rope'")
        check_rope_scaling(cfg.rope_scaling, f"{prefix}rope_scaling")
    elif cfg.rope_scaling is not None:
        raise ValueError(f"{prefix}rope_scaling is set but {prefix}position = {cfg.position!r} (it needs 'rope')")
    check_attention(
        cfg.num_heads,
        cfg.emb_size,
        cfg.head_size,
        cfg.max_seq_len,
        cfg.dropout,
        cfg.num_kv_heads,
        tp,
        prefix=prefix,
        tp_name=tp_name,
    )
    hidden_name = f"{prefix}ffn_mult * {prefix}emb_size"
    if cfg.intermediate_size is not None:
        hidden_name = f"{prefix}intermediate_size"
    elif cfg.activation == "swiglu":
        hidden_name = f"the SwiGLU hidden size from {hidden_name}"
    check_divisible(mlp_hidden_size(cfg), hidden_name, tp, tp_name)


def check_seq_len(seq_len: int, max_seq_len: int, *, name: str = "seq_len", max_name: str = "max_seq_len") -> None:
    """A sequence no longer than the model's context."""
    if seq_len > max_seq_len:
        raise ValueError(f"{name} = {seq_len} must be <= {max_name} = {max_seq_len}")


def check_sequence_parallel(seq_len: int, tp: int, *, name: str = "seq_len", tp_name: str = "tp_size") -> None:
    """Sequence parallelism splits the tokens over tp."""
    if seq_len % tp != 0:
        raise ValueError(f"{name} = {seq_len} must be divisible by {tp_name} = {tp} under sequence parallelism")


def check_context_parallel(seq_len: int, cp: int, name: str = "seq_len") -> None:
    """Raise ValueError unless `seq_len` splits into `2 * cp` equal chunks (the load-balanced layout)."""
    if cp > 1 and seq_len % (2 * cp):
        raise ValueError(
            f"{name} = {seq_len} must be a multiple of 2 * cp = {2 * cp} for context parallelism "
            "(each CP rank holds two equal chunks of every sequence)"
        )
