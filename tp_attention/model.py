"""A GPT built only from tensor-parallel layers; reads top to bottom like nanoGPT's model.py.

Where the all-reduces happen, per forward (tp > 1):
    token embedding              1   (each rank looks up its vocab rows; the sum fills the rest)
    per block: attention         1   (g after the row-parallel output projection)
    per block: MLP               1   (g after the row-parallel down projection)
    loss                         2   ([N]-sized: row max, then sum-exp and target logit together)
and per backward: 1 per attention + 1 per MLP (f before the column-parallel layers) + 1 for the
LM head (f before the vocab-parallel logits). Everything between those points is either
replicated (residual stream, LayerNorms, position embedding) or local to this rank's shard.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tp_attention.attention import KVCache, MultiHeadAttention
from tp_attention.distributed import Group, check_group, tp_rank, tp_size
from tp_attention.layers import ColumnParallelLinear, RowParallelLinear, SequenceParallelDropout
from tp_attention.shapes import check_gpt, check_seq_len, check_sequence_parallel
from tp_attention.state_dict import full_shapes, full_state_dict, load_full_state_dict
from tp_attention.vocab import VocabParallelEmbedding, vocab_parallel_cross_entropy

INIT_STD = 0.02  # GPT-2 / nanoGPT


@dataclass
class GPTConfig:
    """Shape and options of a GPT. Defaults are a tiny byte-level model."""

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

    def __post_init__(self) -> None:
        check_gpt(self)  # the rules that do not depend on tp; GPT checks the rest with its group

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GPTConfig:
        """Build from a dict (or Hydra DictConfig), refusing unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; known: {sorted(known)}")
        return cls(**dict(values))


class FeedForward(nn.Module):
    """GELU MLP: column-parallel up-projection, row-parallel down-projection, dropout."""

    def __init__(self, cfg: GPTConfig, tp_group: Group, generator: torch.Generator | None) -> None:
        super().__init__()
        hidden = cfg.ffn_mult * cfg.emb_size
        self._up = ColumnParallelLinear(
            cfg.emb_size, hidden, cfg.bias, tp_group=tp_group, init_std=INIT_STD, generator=generator
        )
        self._down = RowParallelLinear(
            hidden,
            cfg.emb_size,
            cfg.bias,
            tp_group=tp_group,
            input_is_parallel=True,
            init_std=INIT_STD / math.sqrt(2 * cfg.num_layers),
            generator=generator,
        )
        self._dropout = SequenceParallelDropout(cfg.dropout, tp_group)

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        hidden = F.gelu(self._up(x, sequence_parallel))  # (B, T, ffn * E / tp): f (or all-gather) before
        return self._dropout(self._down(hidden, sequence_parallel), sequence_parallel)  # (B, T[/tp], E): g


class Decoder(nn.Module):
    """Pre-LayerNorm transformer block: `h + attn(ln(h))`, then `h + mlp(ln(h))`."""

    def __init__(self, cfg: GPTConfig, tp_group: Group, generator: torch.Generator | None) -> None:
        super().__init__()
        self._norm1 = nn.LayerNorm(cfg.emb_size, bias=cfg.bias)
        self._heads = MultiHeadAttention(
            cfg.num_heads,
            cfg.emb_size,
            cfg.head_size,
            cfg.max_seq_len,
            cfg.dropout,
            num_kv_heads=cfg.num_kv_heads,
            bias=cfg.bias,
            tp_group=tp_group,
            init_std=INIT_STD,
            out_init_std=INIT_STD / math.sqrt(2 * cfg.num_layers),
            generator=generator,
        )
        self._norm2 = nn.LayerNorm(cfg.emb_size, bias=cfg.bias)
        self._ff = FeedForward(cfg, tp_group, generator)

    def forward(
        self, h: torch.Tensor, kv_cache: KVCache | None = None, sequence_parallel: bool = False
    ) -> torch.Tensor:
        attn = self._heads(self._norm1(h), kv_cache=kv_cache, sequence_parallel=sequence_parallel)
        h = h + attn  # all-reduce 1 (forward), 1 (backward)
        return h + self._ff(self._norm2(h), sequence_parallel)  # all-reduce 2 (forward), 2 (backward)


class GPT(nn.Module):
    """GPT whose attention heads, MLP columns and vocabulary are split over `tp_group`.

    The seed project's signature: `GPT(vocab_size, max_seq_len, emb_size, num_heads, head_size,
    num_layers, dropout=0.1, **options)` with options `num_kv_heads`, `bias`, `tie_embeddings`,
    `ffn_mult` (see GPTConfig), plus `tp_group`, `generator` (RNG for the full weights; one
    seed gives the same logical model at every tp) and `sequence_parallel`.

    `sequence_parallel` (Korthikanti et al.; tp > 1): in training forwards, LayerNorms, dropout and
    residual adds run on `T / tp` tokens per rank; all-gather enters and reduce-scatter leaves each
    TP region. Call `tp_attention.grad_norm.sync_replicated_grads` after backward. Generation and
    `attention_maps` run without it.

    Raises:
        TypeError: a size is not an integer, or tp_group is not a group.
        ValueError: an invalid size or option, or one tp cannot split (rules in `tp_attention.shapes`).
    """

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int,
        emb_size: int,
        num_heads: int,
        head_size: int,
        num_layers: int,
        dropout: float = 0.1,
        *,
        tp_group: Group = None,
        generator: torch.Generator | None = None,
        sequence_parallel: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        cfg = GPTConfig.from_mapping(
            dict(
                vocab_size=vocab_size,
                max_seq_len=max_seq_len,
                emb_size=emb_size,
                num_heads=num_heads,
                head_size=head_size,
                num_layers=num_layers,
                dropout=dropout,
                **options,
            )
        )
        check_gpt(cfg, tp_size(check_group(tp_group)))
        self.config, self.tp_group, self.sequence_parallel = cfg, tp_group, sequence_parallel
        self._token_embeddings = VocabParallelEmbedding(
            cfg.vocab_size, cfg.emb_size, tp_group=tp_group, init_std=INIT_STD, generator=generator
        )
        self._position_embeddings = nn.Embedding(cfg.max_seq_len, cfg.emb_size)
        nn.init.normal_(self._position_embeddings.weight, 0.0, INIT_STD, generator=generator)
        self._dropout = SequenceParallelDropout(cfg.dropout, tp_group)
        self._decoders = nn.ModuleList(Decoder(cfg, tp_group, generator) for _ in range(cfg.num_layers))
        self._norm = nn.LayerNorm(cfg.emb_size, bias=cfg.bias)
        self._lm_head = (
            None
            if cfg.tie_embeddings
            else VocabParallelEmbedding(
                cfg.vocab_size, cfg.emb_size, tp_group=tp_group, init_std=INIT_STD, generator=generator
            )
        )

    @classmethod
    def from_config(
        cls,
        cfg: GPTConfig | Mapping[str, Any],
        tp_group: Group = None,
        generator: torch.Generator | None = None,
        sequence_parallel: bool = False,
    ) -> GPT:
        """Build from a GPTConfig or a mapping of its fields (e.g. a Hydra config)."""
        values = asdict(cfg) if isinstance(cfg, GPTConfig) else dict(cfg)
        return cls(**values, tp_group=tp_group, generator=generator, sequence_parallel=sequence_parallel)

    @property
    def output_embeddings(self) -> VocabParallelEmbedding:
        """The LM head's weight holder: the token embedding itself when tied."""
        return self._token_embeddings if self._lm_head is None else self._lm_head

    @torch.compiler.disable  # runs eagerly under torch.compile: a bad id gets this message, not a kernel abort
    def _check_ids(self, ids: torch.Tensor, what: str, allowed_extra: int | None = None) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"{what} must be an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"{what} must be a non-empty [batch, seq_len] tensor, got shape {tuple(ids.shape)}")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if allowed_extra is not None:
            bad &= ids != allowed_extra
        if bad.any():
            value = ids[bad][0].item()
            raise ValueError(f"{what} holds id {value} outside the vocabulary [0, {self.config.vocab_size})")

    def _hidden(
        self, idx: torch.Tensor, kv_caches: list[KVCache] | None = None, sequence_parallel: bool = False
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states `[B, T, E]` (replicated on every TP rank), or this rank's
        tokens `[B, T / tp, E]` with `sequence_parallel`."""
        self._check_ids(idx, "idx")
        start = kv_caches[0].length if kv_caches else 0
        check_seq_len(start + idx.size(1), self.config.max_seq_len)
        positions = torch.arange(start, start + idx.size(1), device=idx.device)
        tp = tp_size(self.tp_group)
        sequence_parallel = sequence_parallel and tp > 1
        if sequence_parallel:  # this rank's tokens from here to the LM head
            check_sequence_parallel(idx.size(1), tp)
            positions = positions.chunk(tp)[tp_rank(self.tp_group)]
        h = self._token_embeddings(idx, sequence_parallel) + self._position_embeddings(positions)  # (B, T[/tp], E)
        h = self._dropout(h, sequence_parallel)
        for i, block in enumerate(self._decoders):
            h = block(h, None if kv_caches is None else kv_caches[i], sequence_parallel)
        return self._norm(h)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_caches: list[KVCache] | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Without `targets`: full logits `[B, T, vocab_size]` on every rank (gathered; for inference).

        With `targets` `[B, T]`: the mean next-token cross-entropy, computed from vocab-sharded
        logits (the full logits are never built); targets equal to `ignore_index` are skipped. Only this
        training forward uses sequence parallelism (when the model was built with it).
        """
        head = self.output_embeddings
        if targets is None:
            return head.gather_logits(head.logits(self._hidden(idx, kv_caches)))
        self._check_ids(targets, "targets", allowed_extra=ignore_index)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        sequence_parallel = self.sequence_parallel and kv_caches is None
        hidden = self._hidden(idx, kv_caches, sequence_parallel)
        local_logits = head.logits(hidden, sequence_parallel)  # (B, T, V_local)
        return vocab_parallel_cross_entropy(local_logits, targets, head.vocab_start, ignore_index, self.tp_group)

    def new_kv_caches(self) -> list[KVCache]:
        """Empty per-layer KV caches (this rank's heads only) for incremental decoding."""
        return [KVCache(self.config.max_seq_len) for _ in self._decoders]

    def next_token_logits(self, idx: torch.Tensor, kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """Full logits `[B, vocab_size]` of the last position only (without sequence parallelism)."""
        head = self.output_embeddings
        return head.gather_logits(head.logits(self._hidden(idx, kv_caches)[:, -1:]))[:, 0]

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Continue `idx`; see `tp_attention.generation.generate` for the options."""
        from tp_attention.generation import generate

        return generate(self, idx, max_new_tokens, **kwargs)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Every layer's attention weights `[L, B, H, T, T]` (all heads if `gather`, a collective)."""
        self._check_ids(idx, "idx")
        positions = torch.arange(idx.size(1), device=idx.device)
        h = self._token_embeddings(idx) + self._position_embeddings(positions)
        maps = []
        for block in self._decoders:
            maps.append(block._heads.get_attention_weights(block._norm1(h), gather=gather))
            h = block(h)
        return torch.stack(maps)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the unsharded model to directory `path`: `model.safetensors` (config in its metadata
        too) and `config.json`. A collective: call on every rank; global rank 0 writes."""
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in full_state_dict(self).items()}
        path = Path(path)
        if not dist.is_initialized() or dist.get_rank() == 0:
            path.mkdir(parents=True, exist_ok=True)
            config = json.dumps(asdict(self.config), indent=2)
            tmp = path / "model.safetensors.tmp"
            save_file(state, tmp, metadata={"format": "pt", "config": config})
            os.replace(tmp, path / "model.safetensors")
            (path / "config.json").write_text(config + "\n")
        if dist.is_initialized():
            dist.barrier()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, tp_group: Group = None) -> GPT:
        """Load a model written by `save` (a directory or its `.safetensors` file) at any tp.

        Raises:
            FileNotFoundError: no model file at `path`.
            ValueError: the file carries no GPT config in its metadata (it was not written by `save`), or
                its tensors do not fit its config (lists every mismatch).
        """
        from safetensors import safe_open

        file = Path(path)
        file = file / "model.safetensors" if file.is_dir() else file
        if not file.is_file():
            raise FileNotFoundError(f"no model file at {file}")
        with safe_open(str(file), framework="pt") as f:
            saved = (f.metadata() or {}).get("config")
            if saved is None:
                raise ValueError(
                    f"{file} has no GPT config in its safetensors metadata: it was not written by "
                    "GPT.save (which stores one)"
                )
            config = GPTConfig.from_mapping(json.loads(saved))
            state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        model = cls.from_config(config, tp_group=tp_group, generator=torch.Generator())
        load_full_state_dict(model, state)
        return model

    def num_parameters(self, exclude_position_embeddings: bool = True) -> int:
        """Logical (unsharded) parameter count; nanoGPT's count leaves out the position embedding."""
        n = sum(math.prod(shape) for shape in full_shapes(self).values())
        return n - self._position_embeddings.weight.numel() if exclude_position_embeddings else n
