"""What a layout costs each rank before it runs out of memory: parameters, gradients, AdamW state, activations.

    python -m train.memory model=gpt2 parallel.tp=2 parallel.dp_shard=4 trainer.batch_size=32   (any overrides)
    python -m train.memory parallel.cp=4 trainer.seq_len=8192 model.max_seq_len=8192  (1/4 of each sequence per rank)
    python -m train.memory model=llama3_1b parallel.pp=2 parallel.tp=2                 (one line per pipeline stage)

The report of the layout the overrides describe, built on the meta device (no memory, no GPU): see
`train.reporting.memory`.
"""

from __future__ import annotations

import sys

from train.config import ConfigError, batch_layout, compose_config, pipeline_microbatches, validate
from train.reporting.memory import describe, layout_report, stage_reports


def main() -> None:
    conf = compose_config(sys.argv[1:])
    m, p, t = conf.model, conf.parallel, conf.trainer
    dp = p.dp_shard * (p.dp_replicate or 1)
    try:
        validate(conf, world_size=p.pp * p.tp * p.cp * dp)
        micro, _ = batch_layout(t, dp, microbatches=pipeline_microbatches(p))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    model_cfg = m.gpt_config(m.vocab_size or 256)  # null: the byte tokenizer's
    shards = p.dp_shard * p.cp if p.dp_shard > 1 else 1  # FSDP2 shards over dp_shard x cp
    layout = dict(
        tp=p.tp,
        micro_batch=micro,
        seq_len=t.seq_len,
        mode=t.activation_checkpointing,
        every=t.activation_checkpointing_every,
        dp_shard=shards,
        cp=p.cp,
        loss_chunk_bytes=t.loss_chunk_mib * 2**20,
    )
    where = f"tp {p.tp} x cp {p.cp} x dp_shard {p.dp_shard}, micro-batch {micro} x {t.seq_len} tokens"
    where += f" ({t.seq_len // p.cp} per rank)"
    if p.pp == 1:
        print(f"{where}: {describe(layout_report(model_cfg, **layout))}")
        return
    microbatches = pipeline_microbatches(p)
    reports = stage_reports(model_cfg, p.pp, p.pp_layers, p.pp_schedule, microbatches, p.pp_virtual_stages, **layout)
    virtual = f", {p.pp_virtual_stages} stages per rank" if p.pp_virtual_stages > 1 else ""
    print(f"pp {p.pp} ({p.pp_schedule}{virtual}, {microbatches} micro-batches) x {where}:")
    for i, report in enumerate(reports):
        print(f"  pipeline rank {i}: {describe(report)}")


if __name__ == "__main__":
    main()
