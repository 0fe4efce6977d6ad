"""What a layout costs each rank before it runs out of memory: parameters, gradients, AdamW state, activations.

Parameters are measured from the model's own tensors (this rank's shards; replicated norms counted on every
rank); gradients are as large; AdamW keeps two fp32 moments per parameter; activations are an estimate
(`activation_bytes`) for one micro-batch, with activation checkpointing counted. The training job
logs this at start and writes it to `run.json` (`memory`); `python -m train.memory` prints it. Without a
process group, `layout_report` builds the model on the meta device at each TP rank in threads, so it needs no
memory and no GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tp_attention.checkpointing import apply_activation_checkpointing
from tp_attention.config import GPTConfig
from tp_attention.fsdp import local
from tp_attention.model import GPT
from tp_attention.pipeline import Stage, in_flight, rank_part, rank_stages, split_model, stage_layers
from tp_attention.testing import run_threaded
from tp_attention.vocab import LOSS_CHUNK_BYTES, loss_chunk_tokens
from train.config import ConfigError

ADAMW_MOMENTS = 2


def activation_bytes(
    cfg: GPTConfig,
    micro_batch: int,
    seq_len: int,
    tp: int,
    element_size: int = 4,
    recomputed: int = 0,
    cp: int = 1,
    layers: int | None = None,
    logits: bool = True,
    loss_chunk_bytes: int = LOSS_CHUNK_BYTES,
) -> int:
    """About the bytes one rank's forward keeps for backward, for its `seq_len / cp` tokens: per token and
    layer, the norm, residual and projection outputs (6 E), the local Q/K/V and attention output (4 E / tp), the
    MLP's hidden activations (2 or, SwiGLU, 3 of them, / tp) and the attention probabilities (H T / tp, where
    SDPA keeps them; ring attention keeps one log-sum-exp per head instead); and the loss's fp32 vocab-sharded
    logits of one chunk of tokens (`loss_chunk_bytes`, or all tokens where they fit in one), thrice.
    A `recomputed` block (activation checkpointing) keeps only its input (E), plus one block's activations while
    it is recomputed. A pipeline stage keeps its `layers` (default all) and, on the last stage only, the `logits`."""
    mlp = (3 if cfg.activation == "swiglu" else 2) * cfg.hidden_size
    attention = cfg.num_heads * (seq_len if cp == 1 else 1) / tp
    per_layer = (6 + 4 / tp) * cfg.emb_size + mlp / tp + attention
    layers = cfg.num_layers if layers is None else layers
    kept = (layers - recomputed) * per_layer + recomputed * cfg.emb_size + (per_layer if recomputed else 0)
    tokens = micro_batch * seq_len // cp
    local_vocab = -(-cfg.vocab_size // tp)
    chunk = min(tokens, loss_chunk_tokens(local_vocab, loss_chunk_bytes)) if logits else 0
    return int(element_size * tokens * kept) + 3 * 4 * chunk * local_vocab


def available_memory(device: torch.device) -> int:
    """Free bytes where the activations live: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def check_activation_memory(
    cfg: GPTConfig,
    micro_batch: int,
    seq_len: int,
    tp: int,
    device: torch.device,
    recomputed: int = 0,
    cp: int = 1,
    loss_chunk_bytes: int = LOSS_CHUNK_BYTES,
) -> None:
    """Refuse a micro-batch whose activations cannot fit (with `recomputed` checkpointed blocks), before
    anything is allocated.

    Raises:
        ConfigError: naming the estimate and the memory available.
    """
    need = activation_bytes(
        cfg, micro_batch, seq_len, tp, recomputed=recomputed, cp=cp, loss_chunk_bytes=loss_chunk_bytes
    )
    try:
        free = available_memory(device)
    except (OSError, KeyError, ValueError):  # no /proc/meminfo: nothing to compare with
        return
    if need > free:
        raise ConfigError(
            f"{micro_batch} sequences per forward pass (trainer.micro_batch, or trainer.batch_size / dp) of "
            f"trainer.seq_len = {seq_len} tokens need about {need / 2**30:,.1f} GiB of activations per rank "
            f"(estimate), and {free / 2**30:,.1f} GiB are available on {device.type}: set a smaller "
            "trainer.micro_batch (gradients then accumulate over more of them), trainer.activation_checkpointing, "
            "or a larger parallel.cp (each rank then holds seq_len / cp tokens)"
        )


def memory_report(
    model: GPT, micro_batch: int, seq_len: int, tp: int, cp: int = 1, schedule: str = "1f1b", microbatches: int = 1
) -> dict[str, int]:
    """Bytes this rank holds for `model` (built at tp `tp`) trained with AdamW on `micro_batch` x `seq_len`
    (`seq_len / cp` tokens of each sequence per rank under context parallelism). For a pipeline stage: its
    parameters, and the activations of its blocks for each micro-batch `schedule` keeps in flight there
    (`tp_attention.pipeline.in_flight`)."""
    params = sum(local(p).numel() * p.element_size() for p in model.parameters())  # FSDP2: this rank's rows
    fp32 = sum(local(p).numel() * 4 for p in model.parameters())
    recomputed = sum(getattr(block, "checkpointed", False) for block in model._decoders.values())
    stage, kept = model.stage, 1
    if stage is not None:
        kept = in_flight(schedule, stage, microbatches)
    activations = int(
        kept
        * activation_bytes(
            model.config,
            micro_batch,
            seq_len,
            tp,
            recomputed=recomputed,
            cp=cp,
            layers=len(model._decoders),
            logits=stage is None or stage.last,
            loss_chunk_bytes=model.loss_chunk_bytes,
        )
    )
    report = {"parameters": params, "gradients": params, "optimizer": ADAMW_MOMENTS * fp32, "activations": activations}
    return report | {"total": sum(report.values())}


def describe(report: dict[str, int]) -> str:
    """One line: each part in GiB."""
    parts = ", ".join(f"{name} {value / 2**30:,.2f}" for name, value in report.items() if name != "total")
    return f"memory per rank (GiB): {parts}; total {report['total'] / 2**30:,.2f}"


def _meta_report(
    rank: int,
    world: int,
    cfg: GPTConfig,
    micro_batch: int,
    seq_len: int,
    mode: str,
    every: int,
    cp: int,
    stage: Stage | None,
    schedule: str,
    microbatches: int,
    loss_chunk_bytes: int,
) -> dict[str, int]:
    with torch.device("meta"):
        model = GPT.from_config(cfg, tp_group=dist.group.WORLD if world > 1 else None)
    model.loss_chunk_bytes = loss_chunk_bytes
    if stage is not None:
        split_model(model, stage)
    apply_activation_checkpointing(model, mode, every)
    return memory_report(model, micro_batch, seq_len, world, cp, schedule, microbatches)


def layout_report(
    cfg: GPTConfig,
    tp: int,
    micro_batch: int,
    seq_len: int,
    mode: str = "none",
    every: int = 2,
    dp_shard: int = 1,
    cp: int = 1,
    stage: Stage | None = None,
    schedule: str = "1f1b",
    microbatches: int = 1,
    loss_chunk_bytes: int = LOSS_CHUNK_BYTES,
) -> dict[str, int]:
    """The report of rank 0 at tp `tp`, from meta-device models (no memory used); with FSDP2 over
    `dp_shard` ranks, parameters, gradients and AdamW state are `1 / dp_shard` of that (FSDP2 pads each
    parameter's split dim to a multiple of dp_shard: at most one row, or column, per parameter more); with
    context parallelism each rank's activations are those of `seq_len / cp` tokens; with pipeline parallelism,
    those of pipeline `stage` (`stage_reports`)."""
    options = (cfg, micro_batch, seq_len, mode, every, cp, stage, schedule, microbatches, loss_chunk_bytes)
    report = _meta_report(0, 1, *options) if tp == 1 else run_threaded(tp, _meta_report, *options)[0]
    report = {k: v if k == "activations" else -(-v // dp_shard) for k, v in report.items() if k != "total"}
    return report | {"total": sum(report.values())}


def stage_reports(
    cfg: GPTConfig,
    pp: int,
    layers: list[int] | None,
    schedule: str,
    microbatches: int,
    virtual: int = 1,
    **layout: int | str,
) -> list[dict[str, int]]:
    """`layout_report` of what each of `pp` pipeline ranks holds (`virtual` stages each; `layers` per stage, or
    even), in rank order."""
    splits = stage_layers(cfg.num_layers, pp * virtual, layers)
    parts = [rank_part(rank_stages(rank, pp, virtual, splits)) for rank in range(pp)]
    return [layout_report(cfg, stage=part, schedule=schedule, microbatches=microbatches, **layout) for part in parts]
