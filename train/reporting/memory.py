"""What a layout costs each rank before it runs out of memory: parameters, gradients, AdamW state, activations.

Parameters are measured from the model's own tensors (this rank's shards; replicated norms counted on every
rank); gradients are as large; AdamW keeps two fp32 moments per parameter; activations are an estimate
(`train.data.corpus.activation_bytes`) for one micro-batch, with activation checkpointing counted. The training job
logs this at start and writes it to `run.json` (`memory`); `python -m train.memory` prints it. Without a
process group, `layout_report` builds the model on the meta device at each TP rank in threads, so it needs no
memory and no GPU.
"""

from __future__ import annotations

import torch

from tp_attention.fsdp import local
from tp_attention.model import GPT, GPTConfig
from train.data.corpus import activation_bytes

ADAMW_MOMENTS = 2


def memory_report(model: GPT, micro_batch: int, seq_len: int, tp: int) -> dict[str, int]:
    """Bytes this rank holds for `model` (built at tp `tp`) trained with AdamW on `micro_batch` x `seq_len`."""
    params = sum(local(p).numel() * p.element_size() for p in model.parameters())  # FSDP2: this rank's rows
    fp32 = sum(local(p).numel() * 4 for p in model.parameters())
    recomputed = sum(getattr(block, "checkpointed", False) for block in model._decoders)
    activations = activation_bytes(model.config, micro_batch, seq_len, tp, recomputed=recomputed)
    report = {"parameters": params, "gradients": params, "optimizer": ADAMW_MOMENTS * fp32, "activations": activations}
    return report | {"total": sum(report.values())}


def describe(report: dict[str, int]) -> str:
    """One line: each part in GiB."""
    parts = ", ".join(f"{name} {value / 2**30:,.2f}" for name, value in report.items() if name != "total")
    return f"memory per rank (GiB): {parts}; total {report['total'] / 2**30:,.2f}"


def _meta_report(rank: int, world: int, cfg: GPTConfig, micro_batch: int, seq_len: int, mode: str, every: int):
    import torch.distributed as dist

    from tp_attention.checkpointing import apply_activation_checkpointing

    with torch.device("meta"):
        model = GPT.from_config(cfg, tp_group=dist.group.WORLD if world > 1 else None)
    apply_activation_checkpointing(model, mode, every)
    return memory_report(model, micro_batch, seq_len, world)


def layout_report(
    cfg: GPTConfig, tp: int, micro_batch: int, seq_len: int, mode: str = "none", every: int = 2, dp_shard: int = 1
) -> dict[str, int]:
    """The report of rank 0 at tp `tp`, from meta-device models (no memory used); with FSDP2 over
    `dp_shard` ranks, parameters, gradients and AdamW state are `1 / dp_shard` of that (FSDP2 pads each
    parameter's split dim to a multiple of dp_shard: at most one row, or column, per parameter more)."""
    from tp_attention.testing import run_threaded

    if tp == 1:
        report = _meta_report(0, 1, cfg, micro_batch, seq_len, mode, every)
    else:
        report = run_threaded(tp, _meta_report, cfg, micro_batch, seq_len, mode, every)[0]
    report = {k: v if k == "activations" else -(-v // dp_shard) for k, v in report.items() if k != "total"}
    return report | {"total": sum(report.values())}
