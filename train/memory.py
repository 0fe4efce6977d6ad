"""What a layout costs each rank before it runs out of memory: parameters, gradients, AdamW state, activations.

    python -m train.memory model=gpt2 parallel.tp=2 parallel.dp_shard=4 trainer.batch_size=32   (any overrides)
    python -m train.memory parallel.cp=4 trainer.seq_len=8192 model.max_seq_len=8192  (1/4 of each sequence per rank)

The report of the layout the overrides describe, built on the meta device (no memory, no GPU): see
`train.reporting.memory`.
"""

from __future__ import annotations

import sys

from train.config import ConfigError, batch_layout, compose_config, validate
from train.reporting.memory import describe, layout_report


def main() -> None:
    conf = compose_config(sys.argv[1:])
    m, p, t = conf.model, conf.parallel, conf.trainer
    dp = p.dp_shard * (p.dp_replicate or 1)
    try:
        validate(conf, world_size=p.tp * p.cp * dp)
        micro, _ = batch_layout(t, dp)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    model_cfg = m.gpt_config(m.vocab_size or 256)  # null: the byte tokenizer's
    micro = t.micro_batch or micro
    mode, every = t.activation_checkpointing, t.activation_checkpointing_every
    shards = p.dp_shard * p.cp if p.dp_shard > 1 else 1  # FSDP2 shards over dp_shard x cp
    report = layout_report(model_cfg, p.tp, micro, t.seq_len, mode, every, shards, p.cp)
    layout = f"tp {p.tp} x cp {p.cp} x dp_shard {p.dp_shard}"
    print(f"{layout}, micro-batch {micro} x {t.seq_len} tokens ({t.seq_len // p.cp} per rank): {describe(report)}")


if __name__ == "__main__":
    main()
