"""Structured configs (dataclasses in Hydra's ConfigStore) and the checks Hydra cannot do by type.

Every field says what it is (`describe`); a wrong key or type fails in Hydra with its own message;
`validate` then checks values and the relations between them (tp against heads and world size,
sequence lengths, finite numbers in range, ...) and raises ConfigError, which names the value and
the rule.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from tp_attention.checkpointing import MODES as ACTIVATION_CHECKPOINTING
from tp_attention.config import GPTConfig
from tp_attention.distributed import ParallelDims
from tp_attention.pipeline import SCHEDULES, VIRTUAL, stage_layers
from tp_attention.shapes import (
    check_choice,
    check_context_parallel,
    check_gpt,
    check_int,
    check_number,
    check_seq_len,
    check_sequence_parallel,
)
from train.run.identity import run_id, sweep_subdir

# A wheel carries the configs in train/conf; a checkout has them in its top-level conf/, where people edit them
_HERE = Path(__file__).resolve().parent
CONF_DIR = _HERE / "conf" if (_HERE / "conf" / "config.yaml").is_file() else _HERE.parent / "conf"


class ConfigError(ValueError):
    """An invalid configuration: the message names the value and the rule."""


class TrainingError(RuntimeError):
    """A run that cannot go on (timeouts, repeated bad steps, a full disk): says why and what is safe."""


def opt(default: Any, help: str) -> Any:
    """A config field with its one-line description (shown by `python -m train --help`)."""
    return field(default=default, metadata={"help": help})


MODEL_HELP = {
    "vocab_size": "vocabulary size; null: the tokenizer's",
    "max_seq_len": "longest sequence the model accepts (learned positions)",
    "emb_size": "model width",
    "num_heads": "query heads; divisible by parallel.tp",
    "head_size": "width of one head",
    "num_layers": "transformer blocks",
    "dropout": "dropout on embeddings, attention output and MLP output",
    "num_kv_heads": "key/value heads (GQA; 1 = MQA); null: num_heads",
    "bias": "biases in the linear layers and LayerNorms",
    "tie_embeddings": "the LM head reuses the token embedding",
    "ffn_mult": "MLP hidden size = ffn_mult * emb_size (unless intermediate_size is set)",
    "norm": "layernorm | rmsnorm",
    "norm_eps": "epsilon of the norms",
    "activation": "gelu (exact) | gelu_tanh (GPT-2's gelu_new) | swiglu (Llama: gate and up projections)",
    "intermediate_size": "MLP hidden size; null: ffn_mult * emb_size (swiglu: 2/3 of it, rounded up to 256)",
    "position": "learned (absolute embeddings) | rope (rotary, per head)",
    "rope_theta": "rope: base of the rotary frequencies",
    "rope_scaling": "rope: null, or Llama 3's {rope_type: llama3, factor, low_freq_factor, high_freq_factor, "
    "original_max_position_embeddings}",
    "attention_bias": "biases on Q/K/V and the attention output; null: model.bias",
    "mlp_bias": "biases on the MLP projections; null: model.bias",
    "init_from": "start from this Hugging Face directory (GPT-2, Llama) or export: its shape and weights "
    "(and tokenizer.json); only dropout may differ",
}


@dataclass
class ModelConfig(GPTConfig):
    """GPTConfig's fields, with the vocabulary taken from the tokenizer unless set."""

    vocab_size: int | None = None
    dropout: float = 0.0
    init_from: str | None = None

    def __post_init__(self) -> None:
        """GPTConfig's rules, named as in the config; vocab_size None means the tokenizer's."""
        _as_config_error(check_gpt, self, prefix="model.", vocab_size_optional=True)

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The model this config describes (`init_from` is where its weights come from, not its shape)."""
        shape = {f.name: getattr(self, f.name) for f in fields(GPTConfig)}
        return GPTConfig(**{**shape, "vocab_size": vocab_size})


@dataclass
class DataConfig:
    source: str = opt("stdlib", "stdlib (this Python's standard library, no download) | text | hf")
    path: str | None = opt(None, "text: a file, or a directory read recursively (*.txt *.md *.py ...)")
    hf_name: str | None = opt(None, "hf: the dataset name for datasets.load_dataset (needs internet)")
    hf_config: str | None = opt(None, "hf: the dataset's configuration name")
    hf_split: str = opt("train", "hf: the split to read")
    hf_text_field: str = opt("text", "hf: the column that holds the text")
    tokenizer: str = opt("byte", "byte (256 ids, nothing to train) | bpe (trained on the corpus)")
    bpe_vocab_size: int = opt(2048, "bpe: vocabulary size to learn (> 256)")
    tokenizer_file: str | None = opt(
        None, "a tokenizer.json to use instead of training one (set from model.init_from's directory)"
    )
    val_fraction: float = opt(0.05, "share of the corpus held out for validation, in (0, 1)")
    max_bytes: int = opt(0, "read at most this many bytes of the corpus; 0: all of it")
    cache_dir: str | None = opt(
        None, "where token files are cached; null: $TP_ATTENTION_CACHE or ~/.cache/tp-attention"
    )


@dataclass
class OptimConfig:
    lr: float = opt(2e-3, "peak learning rate (AdamW)")
    min_lr: float = opt(2e-4, "learning rate at the end of the cosine decay, in [0, lr]")
    warmup_steps: int = opt(50, "linear warmup steps from 0 to lr")
    decay_steps: int | None = opt(None, "step at which the cosine decay reaches min_lr; null: trainer.max_steps")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices and embeddings (not biases or norms)")
    beta1: float = opt(0.9, "AdamW beta1, in [0, 1)")
    beta2: float = opt(0.95, "AdamW beta2, in [0, 1)")
    grad_clip: float = opt(1.0, "clip the global gradient norm (shards counted once) to this; 0: no clipping")
    eps: float = opt(1e-8, "AdamW epsilon")
    fused: bool | None = opt(None, "AdamW's fused implementation (true/false); null: torch's default")
    foreach: bool | None = opt(None, "AdamW's multi-tensor implementation (true/false); null: torch's default")
    schedule: str = opt("cosine", "after warmup: cosine | linear | constant | wsd (warmup-stable-decay)")
    decay_fraction: float = opt(0.2, "wsd: the share of the steps after warmup spent decaying to min_lr")


@dataclass
class ParallelConfig:
    tp: int = opt(1, "tensor-parallel size; dp = world_size / (pp x tp x cp)")
    pp: int = opt(1, "pipeline-parallel stages: the layers split into this many consecutive groups of ranks")
    pp_schedule: str = opt(
        "1f1b",
        "pipeline schedule (torch.distributed.pipelining): gpipe | 1f1b | interleaved_1f1b | interleaved_zero_bubble",
    )
    pp_virtual_stages: int = opt(1, "stages per rank (interleaved schedules: >= 2; the layers split into pp x this)")
    pp_microbatches: int | None = opt(
        None, "micro-batches per step through the pipeline (they divide batch_size / dp); null: pp"
    )
    pp_layers: list[int] | None = field(
        default=None, metadata={"help": "layers per stage, first to last (sums to model.num_layers); null: even"}
    )
    cp: int = opt(
        1,
        "context-parallel size: each sequence split over this many ranks (seq_len / cp tokens each), attention a ring",
    )
    dp_shard: int = opt(
        1, "FSDP2: shard parameters, gradients and AdamW state over this many of the dp ranks (1: DDP over all dp)"
    )
    dp_replicate: int | None = opt(None, "replicas of the dp_shard groups (HSDP when > 1); null: dp / dp_shard")
    sequence_parallel: bool = opt(False, "LayerNorm, dropout and residual adds on seq_len / tp tokens per rank")
    device: str = opt("auto", "auto | cpu | cuda")
    timeout_s: float = opt(600.0, "deadline of every collective, seconds")
    shm_collectives: bool = opt(True, "CPU: a TP group on one host communicates through shared memory")
    nproc_per_node: int = opt(
        1,
        "N > 1: this job starts its own `torchrun --standalone --nproc_per_node N` (one "
        "per job of a sweep); leave 1 under a launcher",
    )


@dataclass
class TrainerConfig:
    max_steps: int = opt(1000, "optimizer steps to train for")
    batch_size: int = opt(16, "sequences per optimizer step, over all DP ranks: the global batch, whatever the layout")
    micro_batch: int | None = opt(
        None,
        "sequences per forward pass on each DP rank (a memory knob: gradients "
        "accumulate over batch_size / (dp * micro_batch) of them); null: batch_size / dp",
    )
    seq_len: int = opt(128, "tokens per training sequence (<= model.max_seq_len)")
    eval_interval: int = opt(200, "evaluate every this many steps (and at the end)")
    eval_batches: int = opt(8, "validation micro-batches per evaluation")
    log_interval: int = opt(20, "write a metrics line every this many steps")
    checkpoint_interval: int = opt(200, "save a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = opt(2, "newest checkpoints to keep (the newest known-good one is always kept)")
    mixed_precision: str = opt("no", "no | bf16 | fp16 (fp16: CUDA only)")
    seed: int = opt(1337, "seeds the weights, the data windows and dropout")
    resume: str = opt("none", "none | auto (newest checkpoint of this experiment under out_dir) | PATH (warm start)")
    out_dir: str = opt("outputs", "parent directory of the run directories")
    name: str = opt("gpt", "experiment name: the run directory is <out_dir>/<name>-<config fingerprint>")
    sample_tokens: int = opt(200, "tokens sampled at the end of the run")
    sample_prompt: str = opt("def ", "prompt of that sample")
    progress: bool = opt(True, "show a progress bar")
    max_bad_steps: int = opt(25, "consecutive bad steps (non-finite or loss spike) before the run stops")
    spike_factor: float = opt(4.0, "a step whose loss exceeds spike_factor x the median of the last 50 is bad; 0: off")
    log_with: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "accelerate trackers: tensorboard, mlflow, wandb, aim, ... ([] for none)"},
    )
    activation_checkpointing: str = opt(
        "none", "none | full (every block) | selective (every activation_checkpointing_every-th): recompute in backward"
    )
    activation_checkpointing_every: int = opt(2, "selective: checkpoint blocks 0, k, 2k, ... for this k")
    loss_chunk_mib: int = opt(256, "the loss builds the vocab-sharded fp32 logits at most this many MiB at a time")
    compile: bool = opt(False, "torch.compile the model for training")
    compile_backend: str = opt("inductor", "torch.compile backend (inductor; aot_eager to debug)")
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms (and CUBLAS_WORKSPACE_CONFIG on GPU)")
    eval_only: bool = opt(False, "evaluate the resumed (or fresh) model once, write eval.json, train nothing")
    keep_best: bool = opt(False, "also save and keep the checkpoint with the best validation loss")
    profile_steps: str | None = opt(None, "a torch.profiler trace of steps A-B (e.g. 10-12) in <run>/profile/")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run_id: str = "${run_id:}"


def describe(section: Any, name: str) -> str:
    """The one-line description of a config field."""
    if isinstance(section, ModelConfig) or section is ModelConfig:
        return MODEL_HELP[name]
    return next(f.metadata["help"] for f in fields(section) if f.name == name)


def register() -> None:
    """Put the schema in Hydra's ConfigStore and the `${run_id:}` resolver in OmegaConf."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id)
        OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir)
    ConfigStore.instance().store(name="base_config", node=TrainConfig)


def compose_config(overrides: list[str]) -> TrainConfig:
    """The typed config `python -m train` builds from conf/ with these Hydra overrides (not yet validated)."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


def _as_config_error(check, *args, **kwargs) -> None:
    """Run one of tp_attention.shapes' checks, its ValueError/TypeError raised as a ConfigError."""
    try:
        check(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


MAX_COUNT = 2**31 - 1  # no count, size or interval of a training job reaches it: a larger one is a typo
INTEGERS = {  # every integer field: (least, most) allowed; None fields (optional) are skipped when null
    **{f"model.{n}": (1, MAX_COUNT) for n in ("vocab_size", "max_seq_len", "emb_size", "num_heads", "head_size")},
    **{f"model.{n}": (1, MAX_COUNT) for n in ("num_layers", "num_kv_heads", "ffn_mult", "intermediate_size")},
    "data.bpe_vocab_size": (1, MAX_COUNT),
    "data.max_bytes": (0, 2**50),  # bytes: may be large (1 PiB)
    "optim.warmup_steps": (0, MAX_COUNT),
    "optim.decay_steps": (1, MAX_COUNT),
    **{
        f"parallel.{n}": (1, MAX_COUNT)
        for n in (
            "tp",
            "cp",
            "pp",
            "pp_microbatches",
            "pp_virtual_stages",
            "dp_shard",
            "dp_replicate",
            "nproc_per_node",
        )
    },
    **{
        f"trainer.{n}": (1, MAX_COUNT)
        for n in (
            "max_steps",
            "batch_size",
            "micro_batch",
            "seq_len",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "checkpoint_interval",
            "keep_checkpoints",
            "max_bad_steps",
            "activation_checkpointing_every",
            "loss_chunk_mib",
        )
    },
    "trainer.seed": (0, 2**32 - 1),  # numpy's generators take no negative seed
    "trainer.sample_tokens": (0, MAX_COUNT),
}


def _numbers(cfg: TrainConfig) -> None:
    """Finite numbers in their ranges (NaN, inf and absurd sizes included): each a one-line ConfigError."""
    o, p, t, d, m = cfg.optim, cfg.parallel, cfg.trainer, cfg.data, cfg.model
    for name, value, interval in [  # "(" / ")": that end excluded
        ("optim.lr", o.lr, "(0, 10]"),
        ("optim.weight_decay", o.weight_decay, "[0, 100]"),
        ("optim.beta1", o.beta1, "[0, 1)"),
        ("optim.beta2", o.beta2, "[0, 1)"),
        ("optim.grad_clip", o.grad_clip, "[0, 1e6]"),
        ("optim.eps", o.eps, "(0, 1]"),
        ("parallel.timeout_s", p.timeout_s, "(0, 1e7]"),  # 115 days; timedelta overflows far above
        ("data.val_fraction", d.val_fraction, "(0, 1)"),
        ("trainer.spike_factor", t.spike_factor, "[0, 1e6]"),
        ("model.rope_theta", m.rope_theta, "(0, 1e12]"),
    ]:
        low, high = (float(end) for end in interval[1:-1].split(","))
        kind = dict(low_open=interval[0] == "(", high_open=interval[-1] == ")")
        _as_config_error(check_number, value, name, low, high, **kind)
    _as_config_error(check_number, o.min_lr, "optim.min_lr", 0.0, o.lr, high_open=False)
    if 0 < t.spike_factor <= 1:
        raise ConfigError(f"trainer.spike_factor = {t.spike_factor} must be 0 (off) or above 1")
    for name, (least, most) in INTEGERS.items():
        section, field_name = name.split(".")
        value = getattr(getattr(cfg, section), field_name)
        if value is not None:
            _as_config_error(check_int, value, name, minimum=least, maximum=most)


def parallel_dims(parallel: ParallelConfig, world_size: int) -> ParallelDims:
    """The layout's sizes checked against `world_size` (`tp_attention.distributed.ParallelDims`, each size
    named as the config spells it).

    Raises:
        ConfigError: the sizes do not fit the world size.
    """
    p = parallel
    try:
        return ParallelDims(world_size, p.tp, p.cp, p.pp, p.dp_shard, p.dp_replicate, prefix="parallel.")
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def batch_layout(
    trainer: TrainerConfig, dp: int, dp_formula: str = "world_size / parallel.tp", microbatches: int | None = None
) -> tuple[int, int]:
    """`(micro_batch, grad_accum)` per DP rank for the global `trainer.batch_size` at data-parallel size `dp`.

    `dp_formula` says what dp is (`ParallelDims.dp_formula`), for the message.
    With pipeline parallelism, `microbatches` (`pipeline_microbatches`) go through the pipeline in one step.

    Raises:
        ConfigError: the batch does not split evenly into dp ranks of whole micro-batches.
    """
    if trainer.batch_size % dp != 0:
        raise ConfigError(
            f"trainer.batch_size = {trainer.batch_size} must be divisible by the data-parallel size "
            f"dp = {dp} ({dp_formula})"
        )
    per_rank = trainer.batch_size // dp
    if microbatches is not None:  # pipeline parallelism: one schedule step carries them all
        if per_rank % microbatches != 0:
            raise ConfigError(
                f"parallel.pp_microbatches = {microbatches} must divide trainer.batch_size / dp = {per_rank}"
            )
        if trainer.micro_batch is not None and trainer.micro_batch * microbatches != per_rank:
            raise ConfigError(
                f"trainer.micro_batch = {trainer.micro_batch} must be trainer.batch_size / dp / "
                f"parallel.pp_microbatches = {per_rank} / {microbatches} under pipeline parallelism (or null)"
            )
        return per_rank // microbatches, 1
    micro = trainer.micro_batch or per_rank
    if per_rank % micro != 0:
        raise ConfigError(
            f"trainer.batch_size / dp = {per_rank} sequences per rank must be a multiple of "
            f"trainer.micro_batch = {micro}"
        )
    return micro, per_rank // micro


def pipeline_microbatches(parallel: ParallelConfig) -> int | None:
    """Micro-batches per pipeline step: `parallel.pp_microbatches`, or pp; None without pipeline parallelism."""
    return None if parallel.pp == 1 else parallel.pp_microbatches or parallel.pp


TRACKERS = {
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
    "aim": "aim",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}  # name: module


def compile_backends() -> list[str]:
    """The backends `torch.compile` knows here (torch._dynamo's list, experimental ones included)."""
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=())


def _choices(cfg: TrainConfig) -> None:
    """Names from fixed lists, trackers that are installed, a profile window, AdamW's implementation."""
    o, t = cfg.optim, cfg.trainer
    _as_config_error(check_choice, o.schedule, "optim.schedule", ("cosine", "linear", "constant", "wsd"))
    _as_config_error(
        check_choice, t.activation_checkpointing, "trainer.activation_checkpointing", ACTIVATION_CHECKPOINTING
    )
    _as_config_error(check_number, o.decay_fraction, "optim.decay_fraction", 0.0, 1.0, high_open=False)
    if t.compile_backend not in compile_backends():
        raise ConfigError(
            f"trainer.compile_backend = {t.compile_backend!r} is not one of torch.compile's backends: "
            + ", ".join(compile_backends())
        )
    if o.fused and o.foreach:
        raise ConfigError("optim.fused and optim.foreach cannot both be true: AdamW takes one implementation")
    for name in t.log_with:
        _as_config_error(check_choice, name, "trainer.log_with entry", tuple(TRACKERS))
        if importlib.util.find_spec(TRACKERS[name]) is None:
            extra = " (pip install 'tp-attention[trackers]')" if name == "mlflow" else ""
            raise ConfigError(
                f"trainer.log_with has {name!r}, but the {TRACKERS[name]} package is not installed{extra}"
            )
    if t.profile_steps is not None:
        first, _, last = t.profile_steps.partition("-")
        if not (first.isdigit() and (last or first).isdigit() and 1 <= int(first) <= int(last or first)):
            raise ConfigError(f"trainer.profile_steps = {t.profile_steps!r} must be a step range A-B (1 <= A <= B)")


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Check values and the relations between them. Raises ConfigError naming the value and the rule."""
    m, d, p, t = cfg.model, cfg.data, cfg.parallel, cfg.trainer
    _numbers(cfg)
    _choices(cfg)
    dims = parallel_dims(p, world_size)
    batch_layout(t, dims.dp, dims.dp_formula, pipeline_microbatches(p))
    _as_config_error(check_choice, p.pp_schedule, "parallel.pp_schedule", tuple(SCHEDULES))
    _pipeline(cfg)
    _as_config_error(check_gpt, m, p.tp, prefix="model.", tp_name="parallel.tp", vocab_size_optional=True)
    _as_config_error(check_choice, d.source, "data.source", ("stdlib", "text", "hf"))
    _as_config_error(check_choice, d.tokenizer, "data.tokenizer", ("byte", "bpe"))
    _as_config_error(check_choice, t.mixed_precision, "trainer.mixed_precision", ("no", "bf16", "fp16"))
    _as_config_error(check_choice, p.device, "parallel.device", ("auto", "cpu", "cuda"))
    if d.source == "text" and not d.path:
        raise ConfigError("data.path must name a file or directory when data.source = 'text'")
    if d.source == "hf" and not d.hf_name:
        raise ConfigError("data.hf_name must name a dataset when data.source = 'hf'")
    if d.tokenizer_file and not Path(d.tokenizer_file).expanduser().is_file():
        raise ConfigError(f"data.tokenizer_file = {d.tokenizer_file!r} is not a file")
    if d.bpe_vocab_size <= 256:  # checked whatever the tokenizer: a typo is refused even where unused
        raise ConfigError(f"data.bpe_vocab_size = {d.bpe_vocab_size} must exceed 256 (the byte alphabet)")
    _as_config_error(check_seq_len, t.seq_len, m.max_seq_len, name="trainer.seq_len", max_name="model.max_seq_len")
    if t.mixed_precision == "fp16" and p.dp_shard > 1:
        raise ConfigError(
            "trainer.mixed_precision = 'fp16' with parallel.dp_shard > 1 is not supported: the loss scaler's "
            "inf checks are per rank; use bf16"
        )
    _as_config_error(check_context_parallel, t.seq_len, p.cp, name="trainer.seq_len")
    if p.sequence_parallel:
        name = "trainer.seq_len" if p.cp == 1 else f"trainer.seq_len / parallel.cp = {t.seq_len} / {p.cp}"
        _as_config_error(check_sequence_parallel, t.seq_len // p.cp, p.tp, name=name, tp_name="parallel.tp")


def _pipeline(cfg: TrainConfig) -> None:
    """The stages divide the layers; an interleaved schedule has virtual stages and a multiple of pp micro-batches."""
    m, p, t = cfg.model, cfg.parallel, cfg.trainer
    stages, names = p.pp * p.pp_virtual_stages, ("model.num_layers", "parallel.pp")
    if p.pp_virtual_stages > 1:
        names = ("model.num_layers", "parallel.pp x parallel.pp_virtual_stages")
    _as_config_error(stage_layers, m.num_layers, stages, p.pp_layers, names=names)
    if p.pp == 1:
        return
    if t.mixed_precision == "fp16":
        raise ConfigError(
            "trainer.mixed_precision = 'fp16' with parallel.pp > 1 is not supported: the schedule runs backward "
            "without the loss scaler; use bf16"
        )
    interleaved = p.pp_schedule in VIRTUAL
    if interleaved and p.pp_virtual_stages < 2:
        raise ConfigError(
            f"parallel.pp_schedule = {p.pp_schedule!r} needs parallel.pp_virtual_stages >= 2 (stages per rank)"
        )
    if not interleaved and p.pp_virtual_stages > 1:
        raise ConfigError(
            f"parallel.pp_virtual_stages = {p.pp_virtual_stages} needs an interleaved parallel.pp_schedule "
            f"({', '.join(sorted(VIRTUAL))}); {p.pp_schedule!r} runs one stage per rank"
        )
    microbatches = pipeline_microbatches(p)
    if interleaved and microbatches % p.pp != 0:
        raise ConfigError(
            f"parallel.pp_microbatches = {microbatches} must be a multiple of parallel.pp = {p.pp} for "
            f"parallel.pp_schedule = {p.pp_schedule!r}"
        )
    if interleaved and p.dp_shard > 1:
        raise ConfigError(
            f"parallel.pp_schedule = {p.pp_schedule!r} with parallel.dp_shard > 1 is not supported yet: FSDP2 "
            "gathers a rank's embeddings and head in its model's forward, which an interleaved rank never calls"
        )
    if p.pp_schedule == "interleaved_zero_bubble" and t.compile:
        raise ConfigError(
            "parallel.pp_schedule = 'interleaved_zero_bubble' cannot run under trainer.compile (torch's rule)"
        )


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "parallel": ParallelConfig,
    "trainer": TrainerConfig,
}


def check_known_keys(cfg: Any) -> None:
    """Refuse keys the schema does not have, such as `+trainer.compil=true` (Hydra's `+` adds any key).

    Raises:
        ConfigError: naming the key and the section's fields.
    """
    for key in cfg:
        if key not in (*SECTIONS, "run_id", "hydra"):
            raise ConfigError(f"unknown config key {key!r}: the config has {', '.join((*SECTIONS, 'run_id'))}")
    for section, schema in SECTIONS.items():
        known = {f.name for f in fields(schema)}
        for key in cfg[section]:
            if key not in known:
                raise ConfigError(
                    f"unknown config key {section}.{key} (a typo?): {section} has {', '.join(sorted(known))}"
                )
