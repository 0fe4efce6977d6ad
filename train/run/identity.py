"""Which experiment a run is: a fingerprint of the config that defines its loss curve.

The run directory is `<out_dir>/<trainer.name>-<fingerprint[:8]>` (or `$TP_RUN_ID`), so running the same
command again finds the same directory and continues it; every checkpoint records the experiment config,
and a resume from a checkpoint of another experiment is refused with the fields that differ.

What may change between a run and its resume without making it another experiment is listed once, in
`RESUMABLE` (and all of `parallel.*`: the layout). The global batch (`trainer.batch_size`) counts, not how
it is split into micro-batches, accumulation steps and DP ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

SECTIONS = ("model", "data", "optim", "trainer")
RESUMABLE = frozenset(
    {
        "trainer.max_steps",
        "trainer.keep_checkpoints",
        "trainer.out_dir",
        "trainer.resume",
        "trainer.name",
        "trainer.progress",
        "trainer.log_interval",
        "trainer.eval_interval",
        "trainer.eval_batches",
        "trainer.checkpoint_interval",
        "trainer.sample_tokens",
        "trainer.sample_prompt",
        "trainer.max_bad_steps",
        "trainer.spike_factor",
        "trainer.micro_batch",
        "trainer.log_with",
        "trainer.compile",
        "trainer.activation_checkpointing",
        "trainer.activation_checkpointing_every",
        "trainer.loss_chunk_mib",
        "trainer.compile_backend",
        "trainer.deterministic",
        "trainer.eval_only",
        "trainer.keep_best",
        "trainer.profile_steps",
        "optim.fused",
        "optim.foreach",
        "data.cache_dir",
    }
)


def experiment(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The training-defining config, flattened (`{"optim.lr": 0.002, ...}`)."""
    flat = {}
    for section in SECTIONS:
        values = cfg[section]
        values = OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values)
        flat.update({f"{section}.{k}": v for k, v in values.items() if f"{section}.{k}" not in RESUMABLE})
    return dict(sorted(flat.items()))


def fingerprint(config: Mapping[str, Any]) -> str:
    """A SHA-256 of an experiment config (from `experiment`)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`"optim.lr: 0.002 (checkpoint) != 0.001 (now)"` for every field that differs."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k, '(absent)')!r} (checkpoint) != {current.get(k, '(absent)')!r} (now)"
        for k in keys
        if saved.get(k, "(absent)") != current.get(k, "(absent)")
    ]


SWEEP_FUNCTIONS = ("range(", "choice(", "glob(", "interval(", "tag(")


def swept_keys(args: list[str]) -> set[str]:
    """The config keys a sweep command line varies: `key=a,b,c` or `key=range(...)` (Hydra's sweep syntax)."""
    keys = set()
    for arg in args:
        key, _, value = arg.partition("=")
        depth, comma = 0, False
        for char in value:
            depth += 1 if char in "[({" else -1 if char in "])}" else 0
            comma |= char == "," and depth == 0
        if comma or value.startswith(SWEEP_FUNCTIONS):
            keys.add(key.lstrip("+~"))
    return keys


def sweep_subdir(*, _root_: DictConfig) -> str:
    """A sweep job's directory name: the values of the swept keys (`optim.lr=0.001`), else the job number (a
    Hydra resolver: `hydra.sweep.subdir: ${sweep_subdir:}`)."""
    swept = swept_keys(sys.argv[1:])
    name = ",".join(o for o in _root_.hydra.overrides.task if o.partition("=")[0].lstrip("+~") in swept)
    return name if name and len(name) <= 200 else str(_root_.hydra.job.num)


def run_id(*, _root_: DictConfig) -> str:
    """The run directory's name, the same on every rank: $TP_RUN_ID if set, else `<trainer.name>-<fingerprint>`
    (a Hydra resolver: `hydra.run.dir: ${trainer.out_dir}/${run_id:}`)."""
    explicit = os.environ.get("TP_RUN_ID")
    if explicit:
        return explicit
    return f"{_root_.trainer.name}-{fingerprint(experiment(_root_))[:8]}"
