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
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import checkpoint

from tp_attention.attention import KVCache, MultiHeadAttention
from tp_attention.config import GPTConfig
from tp_attention.context import cp_rank, cp_size, local_positions, shard_sequence
from tp_attention.generation import generate
from tp_attention.groups import Group, ProcessGroup, check_group, tp_rank, tp_size
from tp_attention.hf import load_weights, read_config, save_pretrained
from tp_attention.init import Init, drawing_meta_tensors, fill_
from tp_attention.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelDropout,
    fused_column_parallel,
)
from tp_attention.rope import RotaryEmbedding
from tp_attention.shapes import check_context_parallel, check_gpt, check_seq_len, check_sequence_parallel
from tp_attention.state_dict import full_shapes, full_state_dict, rename_old_keys
from tp_attention.vocab import LOSS_CHUNK_BYTES, VocabParallelEmbedding

INIT_STD = 0.02  # GPT-2 / nanoGPT


def make_norm(cfg: GPTConfig) -> nn.Module:
    """The block's normalisation: LayerNorm (bias per `cfg.bias`) or RMSNorm, with `cfg.norm_eps`."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.emb_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.emb_size, eps=cfg.norm_eps, bias=cfg.bias)


class FeedForward(nn.Module):
    """MLP: column-parallel up-projection (SwiGLU: gate and up, one fused GEMM), the activation on this
    rank's hidden columns, row-parallel down-projection, dropout."""

    def __init__(self, cfg: GPTConfig, tp_group: Group, generator: torch.Generator | None) -> None:
        super().__init__()
        hidden, self.activation = cfg.hidden_size, cfg.activation
        column = dict(bias=cfg.ffn_bias, tp_group=tp_group, init_std=INIT_STD, generator=generator)
        if cfg.activation == "swiglu":
            self._gate = ColumnParallelLinear(cfg.emb_size, hidden, **column)
        self._up = ColumnParallelLinear(cfg.emb_size, hidden, **column)
        self._down = RowParallelLinear(
            hidden,
            cfg.emb_size,
            cfg.ffn_bias,
            tp_group=tp_group,
            input_is_parallel=True,
            init_std=INIT_STD / math.sqrt(2 * cfg.num_layers),
            generator=generator,
        )
        self._dropout = SequenceParallelDropout(cfg.dropout, tp_group)

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        if self.activation == "swiglu":  # f (or all-gather) once for both projections
            gate, up = fused_column_parallel(x, (self._gate, self._up), sequence_parallel)  # (B, T, H / tp) x2
            hidden = F.silu(gate) * up
        else:
            approximate = "tanh" if self.activation == "gelu_tanh" else "none"
            hidden = F.gelu(self._up(x, sequence_parallel), approximate=approximate)  # (B, T, H / tp)
        return self._dropout(self._down(hidden, sequence_parallel), sequence_parallel)  # (B, T[/tp], E): g


class Decoder(nn.Module):
    """Pre-norm transformer block: `h + attn(norm(h))`, then `h + mlp(norm(h))`."""

    def __init__(
        self, cfg: GPTConfig, tp_group: Group, generator: torch.Generator | None, cp_group: ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self._norm1 = make_norm(cfg)
        self._attention = MultiHeadAttention(
            cfg.num_heads,
            cfg.emb_size,
            cfg.head_size,
            cfg.max_seq_len,
            cfg.dropout,
            num_kv_heads=cfg.num_kv_heads,
            bias=cfg.attn_bias,
            rope_theta=cfg.rope_theta if cfg.position == "rope" else None,
            rope_scaling=cfg.rope_scaling,
            tp_group=tp_group,
            cp_group=cp_group,
            init_std=INIT_STD,
            out_init_std=INIT_STD / math.sqrt(2 * cfg.num_layers),
            generator=generator,
        )
        self._norm2 = make_norm(cfg)
        self._ff = FeedForward(cfg, tp_group, generator)
        self.checkpointed = False  # recompute in backward (tp_attention.checkpointing)
        self.register_load_state_dict_pre_hook(rename_old_keys)  # `_heads.*` of older state dicts

    def forward(
        self,
        h: torch.Tensor,
        kv_cache: KVCache | None = None,
        sequence_parallel: bool = False,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        context_parallel: bool = False,
    ) -> torch.Tensor:
        """`h` `[B, T[/cp][/tp], E]`; `mask`, `positions` (RoPE) and the parallel flags as for
        `MultiHeadAttention.forward`."""
        args = (sequence_parallel, mask, positions, context_parallel)
        if self.checkpointed and kv_cache is None and torch.is_grad_enabled():
            return checkpoint(self._block, h, None, *args, use_reentrant=False, preserve_rng_state=True)
        return self._block(h, kv_cache, *args)

    def _block(self, h, kv_cache, sequence_parallel, mask, positions, context_parallel) -> torch.Tensor:
        attn = self._attention(
            self._norm1(h),
            mask,
            kv_cache=kv_cache,
            sequence_parallel=sequence_parallel,
            context_parallel=context_parallel,
            positions=positions,
        )
        h = h + attn  # all-reduce 1 (forward), 1 (backward)
        return h + self._ff(self._norm2(h), sequence_parallel)  # all-reduce 2 (forward), 2 (backward)


def write_model(state: Mapping[str, torch.Tensor], cfg: GPTConfig, path: Path) -> None:
    """Write the full `state` of a GPT of config `cfg` to directory `path` as `GPT.save` does (atomically:
    `model.safetensors`, its config in the metadata too, and `config.json`). Not a collective."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = json.dumps(asdict(cfg), indent=2)
    tmp = path / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt", "config": config})
    os.replace(tmp, path / "model.safetensors")
    (path / "config.json").write_text(config + "\n")


class Blocks(nn.ModuleDict):
    """The decoder blocks under their layer numbers ("0", "1", ...; `blocks[i]` takes an int too): a pipeline
    stage keeps only its own, under the whole model's names (torchtitan's ModuleDict of layers)."""

    def __getitem__(self, key: int | str) -> Decoder:
        return super().__getitem__(str(key))


class GPT(nn.Module):
    """GPT whose attention heads, MLP columns and vocabulary are split over `tp_group`.

    The seed project's signature: `GPT(vocab_size, max_seq_len, emb_size, num_heads, head_size,
    num_layers, dropout=0.1, **options)` with options the other GPTConfig fields (`num_kv_heads`, `bias`,
    `tie_embeddings`, `norm`, `activation`, `position`, ...), plus `tp_group`, `generator` (RNG for the
    full weights; one seed gives the same logical model at every tp), `sequence_parallel` and `cp_group`.
    `GPT.from_pretrained` / `save_pretrained` read and write Hugging Face GPT-2 and Llama directories.

    `sequence_parallel` (Korthikanti et al.; tp > 1): in training forwards, LayerNorms, dropout and
    residual adds run on `T / tp` tokens per rank; all-gather enters and reduce-scatter leaves each
    TP region. Call `tp_attention.grad_norm.sync_replicated_grads` after backward. Generation and
    `attention_maps` run without it.

    `cp_group` (context parallelism, `tp_attention.context`): training forwards (`model(idx, targets)`)
    keep this CP rank's `T / cp` tokens of every sequence (chunks `r` and `2cp - 1 - r`), RoPE and learned
    positions at each token's own position, and attention runs as a ring over the group. The loss is the
    mean over this rank's tokens: average it (and the gradients, as DDP and FSDP2 do) over the CP ranks.
    Every CP rank holds the same parameters; logits and generation run on whole sequences, without it.

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
        cp_group: ProcessGroup | None = None,
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
        self.cp_group = cp_group
        self._token_embeddings = VocabParallelEmbedding(
            cfg.vocab_size, cfg.emb_size, tp_group=tp_group, init_std=INIT_STD, generator=generator
        )
        self._position_embeddings = None
        if cfg.position == "learned":
            table = torch.empty(cfg.max_seq_len, cfg.emb_size)  # given: nn.Embedding then draws nothing itself
            self._position_embeddings = nn.Embedding(cfg.max_seq_len, cfg.emb_size, _weight=table)
            fill_(
                self._position_embeddings.weight,
                (cfg.max_seq_len, cfg.emb_size),
                Init("normal", INIT_STD),
                generator=generator,
            )
        self._dropout = SequenceParallelDropout(cfg.dropout, tp_group)
        self._decoders = Blocks({str(i): Decoder(cfg, tp_group, generator, cp_group) for i in range(cfg.num_layers)})
        self._norm = make_norm(cfg)
        self._lm_head = (
            None
            if cfg.tie_embeddings
            else VocabParallelEmbedding(
                cfg.vocab_size, cfg.emb_size, tp_group=tp_group, init_std=INIT_STD, generator=generator
            )
        )
        self.stage = None  # a pipeline stage's part only (tp_attention.pipeline.split_model)
        self.loss_chunk_bytes = LOSS_CHUNK_BYTES  # the loss's logits are built this many bytes at a time

    @classmethod
    def from_config(
        cls,
        cfg: GPTConfig | Mapping[str, Any],
        tp_group: Group = None,
        generator: torch.Generator | None = None,
        sequence_parallel: bool = False,
        cp_group: ProcessGroup | None = None,
    ) -> GPT:
        """Build from a GPTConfig or a mapping of its fields (e.g. a Hydra config)."""
        values = asdict(cfg) if isinstance(cfg, GPTConfig) else dict(cfg)
        parallel = dict(tp_group=tp_group, sequence_parallel=sequence_parallel, cp_group=cp_group)
        return cls(**values, generator=generator, **parallel)

    def reset_parameters(self, generator: torch.Generator | None = None, order: list[nn.Module] | None = None) -> None:
        """Draw every weight again from `generator`, in the constructor's order, so the same seed gives the
        same numbers: after `to_empty`, this materialises a model built on the meta device (and perhaps
        sharded there by `tp_attention.fsdp.shard_data_parallel`). Each rank draws the full tensors chunk
        by chunk and keeps its pieces (`tp_attention.init`): no rank ever holds a whole parameter.
        RoPE's computed buffer is recomputed too. A pipeline stage passes the whole model's modules
        (`order`, from `tp_attention.pipeline.split_model`): the other stages' are drawn and dropped."""
        with drawing_meta_tensors() if order is not None else nullcontext():
            for module in self.modules() if order is None else order:
                self._reset_module(module, generator)

    def _reset_module(self, module: nn.Module, generator: torch.Generator | None) -> None:
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            module.reset_parameters(generator)
        elif isinstance(module, nn.Embedding):  # the learned position table (on every stage's list)
            fill_(module.weight, tuple(module.weight.shape), Init("normal", INIT_STD), generator=generator)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            for param, value in ((module.weight, 1.0), (getattr(module, "bias", None), 0.0)):  # RMSNorm: none
                if param is not None:
                    fill_(param, tuple(param.shape), Init("constant", value))
        elif isinstance(module, RotaryEmbedding):
            module.reset()

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
        if is_fake(bad):  # under FakeTensorMode (train.dry_run): shapes without values
            return
        if bad.any():
            value = ids[bad][0].item()
            raise ValueError(f"{what} holds id {value} outside the vocabulary [0, {self.config.vocab_size})")

    @torch.compiler.disable  # a data-dependent check: eager under torch.compile
    def _padding(
        self, idx: torch.Tensor, start: int, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`(key mask (B, 1, 1, start + T), positions [B, T])` for `idx` after `start` cached tokens; a
        mask of all ones gives `(None, positions [T])`, the unmasked path. Positions count per sequence as
        Hugging Face does for left padding: `cumsum(mask) - 1` (pads get position 1 and attend to nothing)."""
        keys = start + idx.size(1)
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (idx.size(0), keys):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(f"attention_mask must be [batch, cached + seq_len] = [{idx.size(0)}, {keys}], got {shape}")
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold 1 (token) or 0 (padding) only")
        if attention_mask.all():
            return None, torch.arange(start, keys, device=idx.device)
        keep = attention_mask.to(device=idx.device, dtype=torch.long)
        positions = (keep.cumsum(-1) - 1).masked_fill(keep == 0, 1)[:, start:]  # (B, T)
        return keep.bool()[:, None, None, :], positions

    def _hidden(
        self,
        idx: torch.Tensor,
        kv_caches: list[KVCache] | None = None,
        sequence_parallel: bool = False,
        attention_mask: torch.Tensor | None = None,
        context_parallel: bool = False,
    ) -> torch.Tensor:
        """Final-norm hidden states `[B, T, E]` (replicated on every TP rank), or this rank's
        tokens `[B, T / tp, E]` with `sequence_parallel`. With `context_parallel`, `idx` is this CP rank's
        `[B, T / cp]` tokens of `T`-token sequences."""
        self._check_ids(idx, "idx")
        start = kv_caches[0].length if kv_caches else 0
        cp = cp_size(self.cp_group) if context_parallel else 1
        check_seq_len(start + idx.size(1) * cp, self.config.max_seq_len)
        mask, positions = None, self._positions(idx.size(1) * cp, start, idx.device, cp)
        if attention_mask is not None:
            mask, positions = self._padding(idx, start, attention_mask)
        tp = tp_size(self.tp_group)
        sequence_parallel = sequence_parallel and tp > 1
        if sequence_parallel:  # this rank's tokens from here to the LM head
            check_sequence_parallel(idx.size(1), tp)
        h = self._embed(idx, positions, sequence_parallel)
        for i, block in enumerate(self._decoders.values()):
            kv_cache = None if kv_caches is None else kv_caches[i]
            h = block(h, kv_cache, sequence_parallel, mask, positions, context_parallel)
        return self._norm(h)

    def _positions(self, seq_len: int, start: int, device: torch.device, cp: int) -> torch.Tensor:
        """The positions of this rank's tokens of `seq_len`-token sequences after `start` cached ones: all of
        them, or under context parallelism (cp > 1, no cache) this CP rank's chunks."""
        if cp > 1:
            return local_positions(seq_len, cp, cp_rank(self.cp_group), device)
        return torch.arange(start, start + seq_len, device=device)

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        """Token (and learned position) embeddings, then dropout: `[B, T, E]`, or `[B, T / tp, E]` with
        `sequence_parallel` (this rank's tokens)."""
        h = self._token_embeddings(idx, sequence_parallel)  # (B, T[/tp], E)
        if self._position_embeddings is not None:
            tp = tp_size(self.tp_group)
            mine = positions.chunk(tp, dim=-1)[tp_rank(self.tp_group)] if sequence_parallel else positions
            h = h + self._position_embeddings(mine)
        return self._dropout(h, sequence_parallel)

    def _stage_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One pipeline stage's part of the training forward (`tp_attention.pipeline`): token ids `[B, T]` on
        the first stage, the previous stage's hidden states after; returns the hidden states for the next stage
        (`[B, T / cp, E]`, `/ tp` more with sequence parallelism), on the last stage those after the final norm:
        the schedule's `loss_fn` (`tp_attention.pipeline.stage_loss`) applies the LM head chunk by chunk."""
        tp, cp = tp_size(self.tp_group), cp_size(self.cp_group)
        sequence_parallel = self.sequence_parallel and tp > 1
        if self.stage.first:
            self._check_ids(x, "idx")
            seq_len = x.size(1)
            check_seq_len(seq_len, self.config.max_seq_len)
            if cp > 1:
                check_context_parallel(seq_len, cp, "idx's seq_len")
                x = shard_sequence(x, self.cp_group)
            if sequence_parallel:
                check_sequence_parallel(x.size(1), tp)
        else:
            seq_len = x.size(1) * cp * (tp if sequence_parallel else 1)
        positions = self._positions(seq_len, 0, x.device, cp)
        h = self._embed(x, positions, sequence_parallel) if self.stage.first else x
        for block in self._decoders.values():
            h = block(h, None, sequence_parallel, None, positions, cp > 1)
        return self._norm(h) if self.stage.last else h

    def _stage_loss(self, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """The last pipeline stage's loss of its output `hidden` (`_stage_forward`'s) against `targets` `[B, T]`:
        the LM head and cross-entropy chunk by chunk, over this CP rank's tokens. A forward of the module, so
        FSDP2 gathers the head for it (the schedule's `loss_fn` calls it: `tp_attention.pipeline.stage_loss`)."""
        if cp_size(self.cp_group) > 1:
            targets = shard_sequence(targets, self.cp_group)
        head = self.output_embeddings
        return head.loss(hidden, targets, ignore_index, self.sequence_parallel, self.loss_chunk_bytes)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Without `targets`: full logits `[B, T, vocab_size]` on every rank (gathered; for inference).

        With `targets` `[B, T]`: the mean next-token cross-entropy, computed from vocab-sharded logits
        `self.loss_chunk_bytes` at a time (`VocabParallelEmbedding.loss`); targets equal to `ignore_index` are
        skipped. Only this training forward uses sequence and context parallelism (when the model was built with them);
        under context parallelism it is the mean over this CP rank's tokens (see the class docstring).

        A pipeline stage (`tp_attention.pipeline.split_model`) runs its part instead: `_stage_forward(idx)`, or
        with `targets` the last stage's loss of its own output `idx` (`_stage_loss`).

        `attention_mask` `[B, T_cached + T]` (1 = token, 0 = padding, Hugging Face's convention): padded
        keys are never attended to, positions count per sequence (left padding), and the loss skips the
        positions whose token is padding.

        Raises:
            TypeError / ValueError: ids that are not integers in the vocabulary, mismatched shapes, or a
                mask that is not 0/1 of shape `[B, T_cached + T]`.
        """
        if self.stage is not None:  # with targets: the pipeline's loss, `idx` the last stage's output
            return self._stage_forward(idx) if targets is None else self._stage_loss(idx, targets, ignore_index)
        head = self.output_embeddings
        if targets is None:
            return head.gather_logits(head.logits(self._hidden(idx, kv_caches, attention_mask=attention_mask)))
        self._check_ids(targets, "targets", allowed_extra=ignore_index)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        if attention_mask is not None:
            targets = targets.masked_fill(attention_mask[:, -idx.size(1) :] == 0, ignore_index)
        sequence_parallel = self.sequence_parallel and kv_caches is None
        context_parallel = cp_size(self.cp_group) > 1 and kv_caches is None
        if context_parallel:  # this CP rank's tokens (and their targets) from here on
            if attention_mask is not None:
                raise ValueError("context parallelism: attention_mask is not supported; train on whole sequences")
            check_context_parallel(idx.size(1), cp_size(self.cp_group), "idx's seq_len")
            idx, targets = shard_sequence(idx, self.cp_group), shard_sequence(targets, self.cp_group)
        hidden = self._hidden(idx, kv_caches, sequence_parallel, attention_mask, context_parallel)
        return head.loss(hidden, targets, ignore_index, sequence_parallel, self.loss_chunk_bytes)  # chunk by chunk

    def new_kv_caches(self) -> list[KVCache]:
        """Empty per-layer KV caches (this rank's heads only) for incremental decoding."""
        return [KVCache(self.config.max_seq_len) for _ in self._decoders.values()]

    def next_token_logits(
        self,
        idx: torch.Tensor,
        kv_caches: list[KVCache] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full logits `[B, vocab_size]` of the last position only (without sequence parallelism)."""
        head = self.output_embeddings
        hidden = self._hidden(idx, kv_caches, attention_mask=attention_mask)
        return head.gather_logits(head.logits(hidden[:, -1:]))[:, 0]

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Continue `idx`; see `tp_attention.generation.generate` for the options."""
        return generate(self, idx, max_new_tokens, **kwargs)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Every layer's attention weights `[L, B, H, T, T]` (all heads if `gather`, a collective)."""
        self._check_ids(idx, "idx")
        h = self._token_embeddings(idx)
        if self._position_embeddings is not None:
            h = h + self._position_embeddings(torch.arange(idx.size(1), device=idx.device))
        maps = []
        for block in self._decoders.values():
            maps.append(block._attention.get_attention_weights(block._norm1(h), gather=gather))
            h = block(h)
        return torch.stack(maps)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the unsharded model to directory `path`: `model.safetensors` (config in its metadata
        too) and `config.json`. A collective: call on every rank; global rank 0 writes."""
        state = full_state_dict(self)
        path = Path(path)
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_model(state, self.config, path)
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
        with torch.device("meta"):
            model = cls.from_config(config, tp_group=tp_group)
        load_weights(model, file)  # each rank reads only its slices
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        tp_group: Group = None,
        *,
        sequence_parallel: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> GPT:
        """A Hugging Face `GPT2LMHeadModel` or `LlamaForCausalLM` directory (config.json + model.safetensors
        or a sharded index), at any tp. Each rank reads only its slices: peak memory is about its shard.

        Raises:
            FileNotFoundError: no config.json or weights at `path`.
            ValueError: an unsupported model type or config field (named), or tensors that do not fit.
        """
        path = Path(path)
        with torch.device("meta"):
            model = cls.from_config(read_config(path), tp_group=tp_group, sequence_parallel=sequence_parallel)
        load_weights(model, path, dtype)
        return model

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> Path:
        """Write a Hugging Face directory (GPT-2 or Llama layout, per the config) that
        `transformers.AutoModelForCausalLM.from_pretrained` loads. A collective: call on every rank;
        global rank 0 writes, holding at most one file's tensors (`max_shard_bytes`) at a time.

        Raises:
            ValueError: the config fits neither layout (the fields in the way named).
        """
        return save_pretrained(self, Path(path), max_shard_bytes)

    def num_parameters(self, exclude_position_embeddings: bool = True) -> int:
        """Logical (unsharded) parameter count; nanoGPT's count leaves out the position embedding."""
        n = sum(math.prod(shape) for shape in full_shapes(self).values())
        if exclude_position_embeddings and self._position_embeddings is not None:
            n -= self._position_embeddings.weight.numel()
        return n
