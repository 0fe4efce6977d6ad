"""Structured configs (dataclasses in Hydra's ConfigStore) and the checks Hydra cannot do by type.

A wrong key or type fails in Hydra with its own message; `validate` then checks the relations
between values (tp against heads and world size, sequence lengths, ...) and raises ConfigError,
which names the value and the rule.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from tp_attention.model import GPTConfig
from tp_attention.shapes import check_gpt, check_seq_len, check_sequence_parallel

# A wheel carries the configs in train/conf; a checkout has them in its top-level conf/, where people edit them
_HERE = Path(__file__).resolve().parent
CONF_DIR = _HERE / "conf" if (_HERE / "conf" / "config.yaml").is_file() else _HERE.parent / "conf"


class ConfigError(ValueError):
    """An invalid configuration: the message names the value and the rule."""


class TrainingError(RuntimeError):
    """A run that cannot go on (timeouts, repeated non-finite steps, a full disk): says why and what is safe."""


@dataclass
class ModelConfig(GPTConfig):
    """GPTConfig's fields, with the vocabulary taken from the tokenizer unless set."""

    vocab_size: int | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        """GPTConfig's rules, named as in the config; vocab_size None means the tokenizer's."""
        _as_config_error(check_gpt, self, prefix="model.", vocab_size_optional=True)


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | text | hf
    path: str | None = None  # text: a file or a directory of text files
    hf_name: str | None = None  # hf: dataset name for datasets.load_dataset
    hf_config: str | None = None
    hf_split: str = "train"
    hf_text_field: str = "text"
    tokenizer: str = "byte"  # byte | bpe
    bpe_vocab_size: int = 2048
    val_fraction: float = 0.05
    max_bytes: int = 0  # 0: the whole corpus
    cache_dir: str | None = None  # default $TP_ATTENTION_CACHE or ~/.cache/tp-attention


@dataclass
class OptimConfig:
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 50
    decay_steps: int | None = None  # None: trainer.max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class ParallelConfig:
    tp: int = 1  # dp is derived: world_size / tp
    sequence_parallel: bool = False  # LayerNorm/dropout/residual on T / tp tokens per rank
    device: str = "auto"  # auto | cpu | cuda
    timeout_s: float = 600.0
    shm_collectives: bool = True  # CPU: TP collectives through shared memory when the group shares a host


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    micro_batch: int = 16
    grad_accum: int = 1
    seq_len: int = 128
    eval_interval: int = 200
    eval_batches: int = 8
    log_interval: int = 20
    checkpoint_interval: int = 200
    keep_checkpoints: int = 2
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 1337
    resume: str = "none"  # none | auto | PATH (a run dir or one of its checkpoints)
    out_dir: str = "outputs"
    sample_tokens: int = 200
    sample_prompt: str = "def "
    progress: bool = True
    max_bad_steps: int = 25  # consecutive steps with non-finite loss or gradients before the run stops


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run_id: str = "${run_id:}"


def run_id() -> str:
    """One name for all ranks of a run: $TP_RUN_ID, else torchrun's run id, else the start time."""
    explicit = os.environ.get("TP_RUN_ID")
    if explicit:
        return explicit
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if elastic != "none":
        return elastic
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def register() -> None:
    """Put the schema in Hydra's ConfigStore and the `${run_id:}` resolver in OmegaConf."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)
    ConfigStore.instance().store(name="base_config", node=TrainConfig)


def _as_config_error(check, *args, **kwargs) -> None:
    """Run one of tp_attention.shapes' checks, its ValueError/TypeError raised as a ConfigError."""
    try:
        check(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def _choice(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} must be one of {', '.join(allowed)}")


def _positive(cfg, names: tuple[str, ...], prefix: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{prefix}.{name} = {value} must be positive")


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Check the relations between values. Raises ConfigError naming the value and the rule."""
    m, d, o, p, t = cfg.model, cfg.data, cfg.optim, cfg.parallel, cfg.trainer
    _positive(p, ("tp", "timeout_s"), "parallel")
    if world_size % p.tp != 0:
        raise ConfigError(f"world_size = {world_size} must be divisible by parallel.tp = {p.tp}")
    _as_config_error(check_gpt, m, p.tp, prefix="model.", tp_name="parallel.tp", vocab_size_optional=True)
    _positive(
        t,
        (
            "max_steps",
            "micro_batch",
            "grad_accum",
            "seq_len",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "checkpoint_interval",
            "keep_checkpoints",
            "max_bad_steps",
        ),
        "trainer",
    )
    _positive(o, ("lr", "decay_steps"), "optim")
    if o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr = {o.min_lr} must be in [0, optim.lr = {o.lr}]")
    if o.warmup_steps < 0 or o.weight_decay < 0 or o.grad_clip < 0:
        raise ConfigError("optim.warmup_steps, optim.weight_decay and optim.grad_clip must be >= 0")
    _choice(d.source, ("stdlib", "text", "hf"), "data.source")
    _choice(d.tokenizer, ("byte", "bpe"), "data.tokenizer")
    _choice(t.mixed_precision, ("no", "bf16", "fp16"), "trainer.mixed_precision")
    _choice(p.device, ("auto", "cpu", "cuda"), "parallel.device")
    if d.source == "text" and not d.path:
        raise ConfigError("data.path must name a file or directory when data.source = 'text'")
    if d.source == "hf" and not d.hf_name:
        raise ConfigError("data.hf_name must name a dataset when data.source = 'hf'")
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction = {d.val_fraction} must be in (0, 1)")
    if d.tokenizer == "bpe" and d.bpe_vocab_size <= 256:
        raise ConfigError(f"data.bpe_vocab_size = {d.bpe_vocab_size} must exceed 256 (the byte alphabet)")
    _as_config_error(check_seq_len, t.seq_len, m.max_seq_len, name="trainer.seq_len", max_name="model.max_seq_len")
    if p.sequence_parallel:
        _as_config_error(check_sequence_parallel, t.seq_len, p.tp, name="trainer.seq_len", tp_name="parallel.tp")
