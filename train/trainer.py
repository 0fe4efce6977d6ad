"""The training job in parts, in the order they run (torchtitan's Trainer, nanoGPT's brevity).

    trainer = Trainer(conf, cfg, hydra_dir)   setup: process groups, run dir (locked), data, model, optimizer, resume
    trainer.train_step(step)                  one optimizer step: forward_backward per micro-batch, clip, update
    trainer.evaluate()                        validation loss
    trainer.save_checkpoint(step)
    trainer.train()                           the loop: steps, then logging, evaluation, checkpoints when due
    trainer.finish()                          export, sample, loss plot

Layout: our own `(dp, tp)` mesh, dp = batches x cp; the model's TP layers use the tp group, its ring attention
the cp group (each CP rank holds `seq_len / cp` tokens of the same sequences), DDP (or FSDP2) syncs gradients
over the dp group only (accelerate's `prepare(model)` without a parallelism config would wrap DDP over
*all* ranks and destroy the shards, so then only the optimizer goes through accelerate). Every TP rank of a
group sees the same batch; DP ranks see their share of one global batch that depends only on (seed, step).
Each step ends in one tiny all-reduce that tells every rank whether any rank saw a bad step (skip the
update: `train.run.guard`) or a stop signal (save and stop: `train.run.preemption`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from omegaconf import DictConfig, OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.parallel import DistributedDataParallel

from tp_attention import pipeline
from tp_attention.checkpointing import apply_activation_checkpointing, is_recomputed
from tp_attention.distributed import init_process_group
from tp_attention.flops import flops_per_token
from tp_attention.fsdp import gathered, local, shard_data_parallel
from tp_attention.grad_norm import average_gradients, clip_grad_norm_, grad_norm, sync_replicated_grads
from tp_attention.hf import load_weights
from tp_attention.model import GPT, write_model
from tp_attention.shm import with_shared_memory_groups
from train.checkpoints import checkpoint
from train.config import (
    ConfigError,
    TrainConfig,
    batch_layout,
    parallel_dims,
    pipeline_microbatches,
)
from train.data.corpus import eval_batches, prepare_data, step_batch
from train.reporting.flops import measure_peak_flops, mfu
from train.reporting.measure import StepMeasure
from train.reporting.memory import check_activation_memory, memory_report
from train.reporting.memory import describe as describe_memory
from train.reporting.metrics import Metrics
from train.reporting.plots import save_loss_plot
from train.reporting.profiling import StepProfiler
from train.reporting.progress import Progress
from train.run import faults
from train.run.directory import agree_on_run_dir, check_output_space, setup_logging, write_hydra_files, write_status
from train.run.guard import DivergenceGuard
from train.run.identity import experiment
from train.run.layout import accelerate_layout, check_same_layout, prepare
from train.run.lock import RunLock
from train.run.phases import phase
from train.run.preemption import Preempted, StopFlag
from train.run.ranks import any_rank, broadcast_object, on_main
from train.run.records import add_to_run_record, write_run_record
from train.run.resume import resolve_resume
from train.run.schedule import lr_at, schedule_warnings

log = logging.getLogger("train")


def step_seed(seed: int, step: int, dp_rank: int) -> int:
    """Dropout RNG seed: the same on the TP ranks of a group, different across DP ranks and steps."""
    return (seed * 1_000_003 + step * 1_009 + dp_rank) % 2**63


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's split: weight decay on matrices and embeddings, none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def device_type_for(conf: TrainConfig) -> str:
    """The device `parallel.device` asks for, checked against what this machine has.

    Raises:
        ConfigError: CUDA asked for but absent, or fp16 without CUDA.
    """
    p, t = conf.parallel, conf.trainer
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("parallel.device = 'cuda' but no CUDA device is visible")
    if t.mixed_precision == "fp16" and device_type != "cuda":
        raise ConfigError("trainer.mixed_precision = 'fp16' needs a CUDA device; use bf16 on CPU")
    return device_type


@dataclass
class StepResult:
    """What one training step did."""

    done: int  # steps completed, counting this one
    loss: torch.Tensor  # mean over the step's micro-batches (this DP rank), on the device
    grad_norm: torch.Tensor
    bad: str | None  # why its update was skipped on every rank; None: applied
    stop: bool  # some rank was asked to stop (SIGTERM/SIGINT): save and stop after this step
    lr: float
    seconds: float

    @property
    def applied(self) -> bool:
        return self.bad is None


class LogWindow:
    """The steps since the last log line: their time, and the loss of those that were applied."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.steps, self.good_steps, self.seconds = 0, 0, 0.0

    def add(self, result: StepResult) -> None:
        self.steps, self.seconds = self.steps + 1, self.seconds + result.seconds
        if result.applied:
            self.loss_sum += result.loss
            self.good_steps += 1

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps, self.good_steps, self.seconds = 0, 0, 0.0


class Trainer:
    """One training run, set up in `__init__` (a collective: every rank builds one). Call `close()` at the end.

    For a rank played alone (`train.dry_run`): with `fake`, the parameters are that mode's fake tensors (shapes
    without memory or values; nothing is drawn or read) and the activation check against this machine's memory
    is left to the caller, who checks the target device's; `alone` (always, for the dry run) gives pipeline stages
    the shapes they exchange (`stage_examples`) instead of asking their neighbours, and leaves out the check of
    the output directory's free space (the job's disk is not this machine's)."""

    def __init__(
        self,
        conf: TrainConfig,
        cfg: DictConfig,
        hydra_dir: Path,
        fake: FakeTensorMode | None = None,
        alone: bool = False,
    ) -> None:
        self.conf, self.cfg, self.fake, self.alone = conf, cfg, fake, alone
        self.groups, self.lock, self.stop = None, None, StopFlag()
        self._setup_parallel(hydra_dir)
        self._setup_data()
        self._setup_model()
        self._resume()
        self._setup_measures()
        faults.install(self)

    def _setup_parallel(self, hydra_dir: Path) -> None:
        """Process groups (ours first; accelerate adopts them), the run dir and its lock, logging, accelerate."""
        p, t = self.conf.parallel, self.conf.trainer
        self.device_type = device_type_for(self.conf)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.dims = parallel_dims(p, self.world)  # every axis's size, checked; the groups are built from it
        self.groups = None
        if self.world > 1:
            init_process_group(self.device_type, p.timeout_s)
            self.groups = self.dims.build(self.device_type)
        if self.groups and self.device_type == "cpu" and p.shm_collectives:
            self.groups = with_shared_memory_groups(self.groups, p.timeout_s)
        self.mesh, self.tp_group = (self.groups.mesh, self.groups.tp_group) if self.groups else (None, None)
        self.cp_group = self.groups.cp_group if self.groups else None
        self.pp_group = self.groups.pp_group if self.groups else None
        self.embedding_group = self.groups.embedding_group if self.groups else None
        self.stage = None  # this rank's pipeline stage (set with the model when parallel.pp > 1)
        self.stages: list[pipeline.Stage] = []  # and the pipeline stages it is made of (several: interleaved)
        # replicas: every rank holding this TP shard (losses and gradients average over them); dp: distinct batches
        self.replicas, self.replica_rank = (self.groups.dp_size, self.groups.dp_rank) if self.groups else (1, 0)
        self.dp_size, self.dp_rank = (self.groups.batch_ranks, self.groups.batch_rank) if self.groups else (1, 0)
        self.dp_group = self.groups.dp_group if self.groups and self.replicas > 1 else None
        self.dp_replicate, self.dp_shard = self.dims.dp_replicate, self.dims.dp_shard
        self.fsdp_mesh = self.groups.fsdp_mesh if self.groups else None  # FSDP2 over dp_shard x cp
        self.pp_microbatches = pipeline_microbatches(p)
        self.micro_batch, self.grad_accum = batch_layout(t, self.dp_size, self.dims.dp_formula, self.pp_microbatches)
        self.rank_batch = self.micro_batch * (self.pp_microbatches or 1)  # sequences per forward_backward call
        torch.use_deterministic_algorithms(t.deterministic)  # off again for the next job of a sweep
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
        self.run_dir = agree_on_run_dir(hydra_dir)
        self.lock = RunLock(self.run_dir)
        stale = on_main(self.lock.acquire)  # one writer per run dir: a second run here is refused, naming the holder
        use_parallelism_config = os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG")
        if self.device_type == "cpu" and accelerate_layout() is not None:
            # accelerate 1.16 refuses a ParallelismConfig on MULTI_CPU (ParallelismConfig._validate_accelerator);
            # train.run.layout already read it into parallel.*, so go on without one
            os.environ["ACCELERATE_USE_PARALLELISM_CONFIG"] = "false"
        try:
            self.accelerator = Accelerator(
                cpu=self.device_type == "cpu",
                mixed_precision=t.mixed_precision,
                gradient_accumulation_steps=self.grad_accum,
                log_with=list(t.log_with) or None,
                project_config=ProjectConfiguration(str(self.run_dir), str(self.run_dir)),
            )
        finally:  # the next job of a sweep in this process reads the layout again
            if use_parallelism_config is not None:
                os.environ["ACCELERATE_USE_PARALLELISM_CONFIG"] = use_parallelism_config
        self.rank, self.device = self.accelerator.process_index, self.accelerator.device
        if self.fake is not None:  # fake tensors compare devices exactly: accelerate's "cpu:0" is not FSDP2's "cpu"
            self.device = torch.device(self.device.type)
        self.is_main = self.rank == 0
        setup_logging(self.run_dir, self.rank)
        if self.accelerator.torch_device_mesh is not None:
            check_same_layout(self.accelerator.torch_device_mesh, self.world)
            log.info("accelerate's device mesh %s has the layout of our groups", self.accelerator.torch_device_mesh)
        if stale:
            log.warning("took over the stale lock of %s on %s", stale, self.run_dir)
        if self.is_main:
            write_hydra_files(self.run_dir, self.cfg)
            write_run_record(self.run_dir, self.cfg, self.world)
        log.info(
            "run dir %s | world %d = %sdp %d x cp %d x tp %d%s | device %s | batch %d = dp x %d micro x %d %s%s",
            self.run_dir,
            self.world,
            f"pp {p.pp} ({p.pp_schedule}) x " if p.pp > 1 else "",
            self.dp_size,
            p.cp,
            p.tp,
            f" (FSDP2: dp = {self.dp_replicate} replicas x {self.dp_shard} shards)" if self.dp_shard > 1 else "",
            self.device_type,
            t.batch_size,
            self.micro_batch,
            self.pp_microbatches or self.grad_accum,
            "in the pipeline" if self.pp_microbatches else "accumulated",
            " | deterministic algorithms" if t.deterministic else "",
        )

    def _setup_data(self) -> None:
        d, m, t = self.conf.data, self.conf.model, self.conf.trainer
        self.data = prepare_data(
            d, self.accelerator.is_local_main_process, self.accelerator.wait_for_everyone, t.seq_len
        )
        vocab = m.vocab_size or self.data.vocab_size
        if vocab < self.data.vocab_size:
            raise ConfigError(f"model.vocab_size = {vocab} is smaller than the tokenizer's {self.data.vocab_size}")
        self.model_config = m.gpt_config(vocab)
        mode, every = t.activation_checkpointing, t.activation_checkpointing_every
        recomputed = sum(is_recomputed(i, mode, every) for i in range(m.num_layers))
        p = self.conf.parallel
        if self.fake is None:  # a dry run checks the device it plans for instead
            chunk = t.loss_chunk_mib * 2**20
            check_activation_memory(
                self.model_config, self.micro_batch, t.seq_len, p.tp, self.device, recomputed, p.cp, chunk
            )
        log.info(
            "data %s: %d train / %d val tokens, vocab %d",
            self.data.directory,
            len(self.data.train),
            len(self.data.val),
            vocab,
        )
        self.val_batches = eval_batches(
            self.data.val, t.eval_batches * t.batch_size, t.seed, self.rank_batch, t.seq_len
        )

    def _setup_model(self) -> None:
        """The model, built on the meta device, then given this rank's pieces only: drawn from one seed (the
        same logical weights at every layout; `tp_attention.init`) or read from `model.init_from`; FSDP2
        or DDP; AdamW."""
        o, p, t, init_from = self.conf.optim, self.conf.parallel, self.conf.trainer, self.conf.model.init_from
        with torch.device("meta"):
            self.model = GPT.from_config(
                self.model_config, tp_group=self.tp_group, sequence_parallel=p.sequence_parallel, cp_group=self.cp_group
            )
        self.model.loss_chunk_bytes = t.loss_chunk_mib * 2**20
        self.num_parameters = self.model.num_parameters()  # the whole model's, before a stage keeps its part
        self.all_parameters = self.model.num_parameters(exclude_position_embeddings=False)
        whole = list(self.model.state_dict())  # its tensors' names, which a stage's weights file also holds
        order = None  # the whole model's modules, for a stage's initialisation
        if p.pp > 1:
            pp_rank, virtual = self.groups.pp_rank, p.pp_virtual_stages
            splits = pipeline.stage_layers(self.model_config.num_layers, p.pp * virtual, p.pp_layers)
            self.stages = pipeline.rank_stages(pp_rank, p.pp, virtual, splits)
            self.stage = pipeline.rank_part(self.stages)
            order = pipeline.split_model(self.model, self.stage)
            for stage in self.stages:
                log.info(
                    "pipeline stage %d of %d: layers %d to %d",
                    stage.index,
                    stage.num_stages,
                    stage.layers[0],
                    stage.layers[-1],
                )
        recomputed = apply_activation_checkpointing(
            self.model, t.activation_checkpointing, t.activation_checkpointing_every
        )
        if recomputed:
            log.info(
                "activation checkpointing: %d of %d blocks recompute in backward", recomputed, len(self.model._decoders)
            )  # of this stage's, under pipeline parallelism
        if init_from and self.fake is None:
            load_weights(self.model, Path(init_from).expanduser(), whole=whole)  # this rank's TP slices
            self.model.to(self.device)
            log.info("weights from %s", init_from)
        if self.fsdp_mesh is not None:  # parameters, gradients and AdamW state: 1 / dp_shard of the TP shard
            bf16 = torch.bfloat16 if t.mixed_precision == "bf16" else None  # gathered in bf16, reduced in fp32
            shard_data_parallel(self.model, self.fsdp_mesh, param_dtype=bf16)  # on meta without init_from
        if self.fake is not None:
            with self.fake:
                self.model.to_empty(device=self.device)
        elif not init_from:  # each rank draws the full tensors chunk by chunk and keeps its pieces
            self.model.to_empty(device=self.device)
            self.model.reset_parameters(torch.Generator().manual_seed(t.seed), order)
        self.wrapped = self.model  # FSDP2 (in place) or no data parallelism
        plain_dp = self.fsdp_mesh is None and self.dp_group is not None
        # DDP cannot wrap a pipeline stage (several forwards before their backwards), nor fake tensors (its C++
        # reducer reads their data): clip_gradients then averages, as DDP would
        self.average_by_hand = plain_dp and (self.stage is not None or self.fake is not None)
        if plain_dp and not self.average_by_hand:
            self.wrapped = DistributedDataParallel(self.model, process_group=self.dp_group)
        self.memory = memory_report(
            self.model, self.micro_batch, t.seq_len, p.tp, p.cp, p.pp_schedule, self.pp_microbatches or 1
        )
        log.info(describe_memory(self.memory))
        stages = None  # under pipeline parallelism, each stage's report (rank 0 sees its own stage's)
        if self.pp_group is not None:
            stages = [None] * p.pp
            dist.all_gather_object(stages, self.memory, group=self.pp_group)
        if self.is_main:
            add_to_run_record(self.run_dir, memory=self.memory, **({"memory_stages": stages} if stages else {}))
        implementation = {k: v for k, v in (("fused", o.fused), ("foreach", o.foreach)) if v is not None}
        optimizer = torch.optim.AdamW(
            param_groups(self.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **implementation
        )
        # accelerate takes the model only where it leaves its TP shards alone (train.run.layout.prepare); our TP-aware
        # clipping (tp_attention.grad_norm) and DCP checkpoints (train.checkpoints.checkpoint) stay in charge, because
        # accelerate's clip_grad_norm_ and save_state do not know plain TP shards
        self.wrapped, self.optimizer = prepare(self.accelerator, self.wrapped, optimizer, p.tp)
        if self.conf.trainer.compile:
            self.wrapped = torch.compile(self.wrapped, backend=self.conf.trainer.compile_backend)
        self.schedule = None  # pipeline parallelism: torch's schedule runs forward and backward
        if self.stage is not None:
            modules = [self.wrapped] if len(self.stages) == 1 else pipeline.stage_views(self.model, self.stages)
            examples = self.stage_examples() if self.alone else None
            self.schedule = pipeline.build_schedule(
                modules,
                self.model,
                self.stages,
                p.pp_schedule,
                self.pp_microbatches,
                self.pp_group,
                self.device,
                examples,
            )
        self._start_trackers()
        self.metrics = Metrics(self.run_dir, self.accelerator, self.is_main)
        self.checkpointer = checkpoint.Checkpointer(self.run_dir, self.mesh, self.conf.trainer.keep_checkpoints)
        self.guard = DivergenceGuard(
            self.conf.trainer.max_bad_steps, self.conf.trainer.spike_factor, self.model_config.vocab_size
        )

    def stage_examples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's token ids `[B, T]` and hidden states between pipeline stages `[B, T / cp, E]` (`/ tp`
        more under sequence parallelism; bf16 when FSDP2 gathers bf16 weights), fake tensors under `fake`."""
        t, p = self.conf.trainer, self.conf.parallel
        tokens = t.seq_len // p.cp // (p.tp if self.model.sequence_parallel and p.tp > 1 else 1)
        bf16 = self.fsdp_mesh is not None and t.mixed_precision == "bf16"
        with self.fake or nullcontext():
            ids = torch.zeros(self.micro_batch, t.seq_len, dtype=torch.long, device=self.device)
            hidden = torch.zeros(self.micro_batch, tokens, self.model_config.emb_size, device=self.device)
        return ids, hidden.to(torch.bfloat16 if bf16 else hidden.dtype)

    def _resume(self) -> None:
        """Continue from the checkpoint `trainer.resume` names (or this run dir's newest), if any."""
        t = self.conf.trainer
        self.experiment = experiment(self.cfg)
        self.step = self.optimizer_steps = 0
        self.last_val: float | None = None
        self.best_val = (checkpoint.best(self.run_dir) or {}).get("val_loss", math.inf)
        source = on_main(resolve_resume, t.resume, self.run_dir, Path(t.out_dir), self.experiment)
        if source is not None:
            meta = checkpoint.load(Path(source), self.model, self.optimizer.optimizer, self.mesh)
            self.step, self.optimizer_steps = meta["step"], meta["optimizer_steps"]
            self.guard.losses.extend(meta.get("recent_losses", []))
            self.guard.pending = Path(source)  # known good once the first step from it is healthy
            if checkpoint.good_step(Path(source).parent.parent) == meta["step"]:
                self.guard.good = Path(source)
            log.info(
                "resumed from %s at step %d (saved at dp %s x tp %s)",
                source,
                self.step,
                meta["layout"]["dp"],
                meta["layout"]["tp"],
            )
        # the resumed records (none when starting over: an earlier attempt's would repeat its steps)
        self.metrics.continue_from(Path(source).parent.parent if source is not None else self.run_dir, self.step)
        if self.step >= t.max_steps:
            log.info(
                "the run is complete at step %d (trainer.max_steps = %d): nothing to train; raise "
                "trainer.max_steps to continue it",
                self.step,
                t.max_steps,
            )
        self.last_saved = self.step
        if self.is_main and (self.data.directory / "tokenizer.json").is_file():
            shutil.copy(self.data.directory / "tokenizer.json", self.run_dir / "tokenizer.json")
        checkpoint_bytes = 12 * self.all_parameters  # weights + 2 moments
        if not self.alone:
            on_main(check_output_space, self.run_dir, checkpoint_bytes, t.keep_checkpoints)

    def _setup_measures(self) -> None:
        """Tokens and model FLOPs per step, and the matmul peak (for MFU)."""
        t = self.conf.trainer
        self.tokens_per_step = t.batch_size * t.seq_len
        self.step_flops = flops_per_token(self.model_config, self.num_parameters, t.seq_len) * self.tokens_per_step
        self.peak_flops = broadcast_object(measure_peak_flops(self.device)) * self.world
        for warning in schedule_warnings(self.conf.optim, t.max_steps):
            log.warning(warning)
        self._check_precision()

    def _start_trackers(self) -> None:
        """accelerate's trackers (`trainer.log_with`), the run's hyperparameters logged once."""
        if not self.conf.trainer.log_with:
            return
        if "mlflow" in self.conf.trainer.log_with:  # a local file store in the run dir, nothing to serve
            os.environ.setdefault("MLFLOW_TRACKING_URI", (self.run_dir / "mlruns").as_uri())
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        hparams = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in experiment(self.cfg).items()}
        hparams |= {
            "parallel.tp": self.conf.parallel.tp,
            "parallel.dp": self.dp_size,
            "parallel.cp": self.conf.parallel.cp,
        }
        kwargs = {
            "mlflow": {"run_name": self.run_dir.name},
            "wandb": {"name": self.run_dir.name, "dir": str(self.run_dir)},
        }
        self.accelerator.init_trackers(
            "tensorboard",
            config=hparams,
            init_kwargs={k: v for k, v in kwargs.items() if k in self.conf.trainer.log_with},
        )

    def _check_precision(self) -> None:
        """Warn when the chosen mixed precision is much slower than fp32 on this device (CPUs without native
        bf16 run a bf16 matmul tens of times slower), naming both measured peaks."""
        precision = self.conf.trainer.mixed_precision
        if precision == "no":
            return
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        low = broadcast_object(measure_peak_flops(self.device, dtype))
        full = broadcast_object(measure_peak_flops(self.device, torch.float32))
        log.info("matmul peak here: %s %.1f GFLOP/s, fp32 %.1f GFLOP/s", precision, low / 1e9, full / 1e9)
        if low < 0.5 * full:
            log.warning(
                "trainer.mixed_precision = %s is %.0fx slower than fp32 here: %s matmuls reach %.1f GFLOP/s, "
                "fp32 %.1f GFLOP/s (this %s has no fast %s); trainer.mixed_precision=no is faster",
                precision,
                full / low,
                precision,
                low / 1e9,
                full / 1e9,
                self.device_type,
                precision,
            )

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The model's loss on one micro-batch (through DDP where there is data parallelism)."""
        return self.wrapped(x, y)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients accumulate); returns its loss, detached."""
        with self.accelerator.accumulate(self.wrapped):
            with self.accelerator.autocast():
                loss = self.loss(x.to(self.device), y.to(self.device))
            self.accelerator.backward(loss)
        return loss.detach().float()

    def pipeline_step(self, x: torch.Tensor, y: torch.Tensor, train: bool = True) -> torch.Tensor:
        """Forward (and backward, with `train`) of this rank's batch through the pipeline, in
        `parallel.pp_microbatches`; returns the mean of their losses, computed on the last stage, on every stage."""
        losses: list[torch.Tensor] = []
        args = (x.to(self.device),) if self.stage.first else ()
        target = y.to(self.device) if self.stage.last else None
        with self.accelerator.autocast():
            (self.schedule.step if train else self.schedule.eval)(*args, target=target, losses=losses)
        loss = torch.stack(losses).detach().float().mean() if self.stage.last else torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.pp_group)  # the last stage's, on every stage
        return loss

    def clip_gradients(self) -> torch.Tensor:
        """Unscale (fp16), sum sequence-parallel partial gradients and a tied table's two stage copies, clip by
        the global norm over TP, FSDP2 and the pipeline's stages."""
        o = self.conf.optim
        self.accelerator.unscale_gradients()
        if self.model.sequence_parallel:
            sync_replicated_grads(self.model, self.tp_group)  # LayerNorm etc. saw only this rank's tokens
        if self.average_by_hand:
            average_gradients(self.model, self.dp_group)  # DDP's job, which it cannot do for a stage
        pipeline.sync_tied_embeddings(self.model, self.embedding_group)
        skip = pipeline.counted_elsewhere(self.model) if self.stage is not None else set()
        if o.grad_clip > 0:
            return clip_grad_norm_(self.model, o.grad_clip, self.tp_group, self.pp_group, skip)
        return grad_norm(self.model, self.tp_group, self.pp_group, skip)

    def train_step(self, step: int) -> StepResult:
        """One optimizer step on the global batch of `step`, skipped on every rank if any rank saw a bad one."""
        t = self.conf.trainer
        start = time.perf_counter()
        lr = lr_at(step, self.conf.optim, t.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(t.seed, step, self.replica_rank))  # CP ranks drop out different tokens
        loss_sum = torch.zeros((), device=self.device)
        for x, y in step_batch(
            self.data.train, step, t.seed, self.rank_batch, self.grad_accum, t.seq_len, self.dp_rank, self.dp_size
        ):
            loss_sum += self.forward_backward(x, y) if self.schedule is None else self.pipeline_step(x, y)
        norm = self.clip_gradients()
        if self.cp_group is not None:  # each CP rank's loss is its tokens' mean: the sequences' is their mean
            dist.all_reduce(loss_sum, group=self.cp_group)
            loss_sum /= self.conf.parallel.cp
        loss, limit = loss_sum / self.grad_accum, self.guard.spike_limit()
        nonfinite, spike, stop = any_rank(
            ~(torch.isfinite(loss_sum) & torch.isfinite(norm)), loss > limit, torch.tensor(self.stop.requested)
        )
        bad = "non-finite loss or gradients" if nonfinite else None
        if spike and not nonfinite:
            bad = f"loss {loss.item():.4g} above trainer.spike_factor x its reference = {limit:.4g}"
        if bad is None or (nonfinite and self.accelerator.scaler is not None):  # fp16: the scaler skips itself
            self.optimizer.step()
        self.optimizer_steps += int(bad is None)
        self.optimizer.zero_grad(set_to_none=True)
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        return StepResult(step + 1, loss, norm, bad, stop, lr, time.perf_counter() - start)

    def measured_step(self, step: int) -> StepResult:
        """`train_step(step)`, its memory and collectives measured (`train.reporting.measure`) and every rank's
        written to `run.json` as `measured` (in rank order). `train` measures the run's first step, or under
        pipeline parallelism its second when there is one: in the first, torch's stages also infer the shapes
        they exchange (a forward of one micro-batch, alive while the step's own run, and a few messages). Under
        `trainer.compile` the step runs unmeasured (a dispatch mode around a compiled model recompiles it)."""
        if self.conf.trainer.compile:
            return self.train_step(step)
        with StepMeasure(self.model, self.optimizer) as measure:
            result = self.train_step(step)
        self.measured = measure.report()
        ranks = [self.measured]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, self.measured)
        if self.is_main:
            add_to_run_record(self.run_dir, measured={"step": step + 1, "ranks": ranks})
        return result

    def evaluate(self) -> float:
        """Mean validation loss over the fixed validation batches (split over DP ranks; each CP rank's share of
        a batch is its tokens' mean, so the sum over the replicas counts every batch cp times)."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        with torch.no_grad(), self.accelerator.autocast():
            for x, y in self.val_batches[self.dp_rank :: self.dp_size]:  # this DP rank's share
                if self.schedule is not None:
                    total += self.pipeline_step(x, y, train=False)
                else:
                    total += self.model(x.to(self.device), y.to(self.device)).float()
        if self.dp_group is not None:
            dist.all_reduce(total, group=self.dp_group)
        self.model.train()
        return total.item() / len(self.val_batches) / self.conf.parallel.cp

    def log_record(self, result: StepResult, window: LogWindow) -> dict[str, Any]:
        """The metrics line for the window ending at `result` (a collective over the DP group)."""
        if self.dp_group is not None:
            dist.all_reduce(window.loss_sum, group=self.dp_group)
        train_loss = window.loss_sum.item() / window.good_steps / self.replicas if window.good_steps else None
        return {
            "step": result.done,
            "loss": train_loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm.item() if result.applied else None,
            "tokens_per_s": self.tokens_per_step * window.steps / window.seconds,
            "mfu": mfu(self.step_flops * window.steps / window.seconds, self.peak_flops),
            "skipped_steps": self.guard.skipped,
        }

    def save_checkpoint(self, step: int) -> Path | None:
        """Save checkpoint `step` unless the state is suspect (a bad streak, non-finite weights); returns it."""
        if not pipeline.tied_copies_equal(self.model, self.embedding_group):
            raise RuntimeError(f"step {step}: the first and last pipeline stage's tied embedding tables differ")
        finite = torch.stack([torch.isfinite(local(p)).all() for p in self.model.parameters()]).all()
        if not self.guard.healthy() or any_rank(~finite)[0]:
            log.warning(
                "step %d: no checkpoint written: %s",
                step,
                "in a streak of bad steps" if not self.guard.healthy() else "the weights are not finite",
            )
            return None
        extra = {
            "layout": {
                "dp": self.dp_size,
                "tp": self.conf.parallel.tp,
                "dp_shard": self.dp_shard,
                "cp": self.conf.parallel.cp,
                "pp": self.conf.parallel.pp,
            },
            "model": asdict(self.model_config),
            "config": OmegaConf.to_container(self.cfg, resolve=False),
            "experiment": self.experiment,
            "run_dir": str(self.run_dir),
            "optimizer_steps": self.optimizer_steps,
            "recent_losses": list(self.guard.losses),
        }
        path = self.checkpointer.save(step, self.model, self.optimizer.optimizer, extra)
        self.last_saved, self.guard.pending = step, path
        return path

    def train(self) -> None:
        """Train from `self.step` to `trainer.max_steps`; each failure names the step and what was running.

        Raises:
            Preempted: a stop signal arrived; the checkpoint of the last step was saved.
        """
        t = self.conf.trainer
        progress = Progress(t.max_steps, self.step, self.tokens_per_step, self.is_main, t.progress)
        profiler = StepProfiler(t.profile_steps, self.run_dir, self.rank, self.device)
        self.model.train()
        window = LogWindow(self.device)
        if self.is_main:
            write_status(self.run_dir, "running", self.step)
        self.stop.install()
        first = self.step
        measured = first + int(self.schedule is not None and first + 1 < t.max_steps)  # see measured_step
        try:
            for step in range(first, t.max_steps):
                profiler.before(step + 1)
                with phase(f"training step {step + 1}", self.conf.parallel.timeout_s):
                    result = self.measured_step(step) if step == measured else self.train_step(step)
                profiler.after(step + 1)
                self.step = result.done
                self.stop.step_grace_s = max(self.stop.step_grace_s, 3 * result.seconds)
                if result.stop:
                    self.stop.step_finished()
                confirmed = self.guard.record(result.done, result.loss.item(), result.bad)
                if confirmed is not None and confirmed.parent.parent == self.run_dir and self.is_main:
                    checkpoint.mark_good(self.run_dir, int(confirmed.name.removeprefix("step_")))
                window.add(result)
                progress.update()
                self.after_step(result, window, progress)
        finally:
            self.stop.uninstall()
            progress.close()

    def after_step(self, result: StepResult, window: LogWindow, progress: Progress) -> None:
        """Log, evaluate and checkpoint when due after step `result.done`; stop if a signal asked to."""
        t, done = self.conf.trainer, result.done
        is_last, record, saved = done == t.max_steps, None, None
        if done % t.log_interval == 0 or is_last:
            record = self.log_record(result, window)
            progress.report(record)
            window.reset()
        improved = False
        if done % t.eval_interval == 0 or is_last:
            with phase(f"evaluation at step {done}", self.conf.parallel.timeout_s):
                val = self.evaluate()
            improved, self.last_val = t.keep_best and val < self.best_val, val
            self.best_val = min(self.best_val, val)
            record = {**(record or {"step": done}), "val_loss": val}
            log.info("step %d: val loss %.4f", done, val)
        if record is not None:
            self.metrics.log(record)
        if done % t.checkpoint_interval == 0 or is_last or result.stop or improved:
            with phase(f"saving checkpoint step {done}", self.conf.parallel.timeout_s):
                saved = self.save_checkpoint(done)
            if saved is not None and self.is_main and is_last:
                checkpoint.mark_good(self.run_dir, done)  # the run's own end: nothing comes after to confirm it
            if saved is not None and self.is_main and improved:
                checkpoint.mark_best(self.run_dir, done, self.last_val)
        if result.stop:
            raise Preempted(self.stop.signum or 15, done, str(saved or self.guard.good or "none"))

    def evaluate_only(self) -> dict[str, Any]:
        """`trainer.eval_only`: the validation loss of the model as resumed (or freshly built), in eval.json."""
        with phase(f"evaluation at step {self.step}", self.conf.parallel.timeout_s):
            val = self.evaluate()
        result = {"step": self.step, "val_loss": val, "perplexity": math.exp(val), "run_dir": str(self.run_dir)}
        if self.is_main:
            (self.run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            log.info(
                "step %d: val loss %.4f, perplexity %.3f (trainer.eval_only; eval.json)", self.step, val, math.exp(val)
            )
        return result

    def sample(self, model: GPT) -> str:
        """`trainer.sample_tokens` sampled from `model` after `trainer.sample_prompt` (seeded by `trainer.seed`)."""
        t = self.conf.trainer
        prompt = torch.tensor([self.data.tokenizer.encode(t.sample_prompt) or [0]], device=self.device)
        torch.manual_seed(t.seed)
        ids = model.generate(prompt, t.sample_tokens, do_sample=True, temperature=0.8, top_k=50)
        return self.data.tokenizer.decode(ids[0].tolist())

    def finish(self) -> dict[str, Any]:
        """Export the model, sample from it, plot the loss; returns the run's summary."""
        p = self.conf.parallel
        export_dir = self.run_dir / "export"
        if self.stage is None:
            self.model.save(export_dir)
            with gathered(self.model):  # FSDP2 gathers parameters in forward only; generate calls other methods
                sample = self.sample(self.model)
        else:  # the stages' pieces joined on rank 0, which writes the whole model and samples from it alone
            state, sample = pipeline.gather_stages(self.model, self.pp_group), None
            if self.is_main:
                write_model(state, self.model_config, export_dir)
                whole = GPT.from_config(self.model_config).to(self.device)
                whole.load_state_dict(state)
                sample = self.sample(whole)
            sample = broadcast_object(sample)
        if self.is_main and (self.run_dir / "tokenizer.json").is_file():
            shutil.copy(self.run_dir / "tokenizer.json", export_dir / "tokenizer.json")
        history = self.metrics.read() if self.is_main else []
        if self.is_main:
            (self.run_dir / "sample.txt").write_text(sample)
            save_loss_plot(
                history,
                self.run_dir / "loss.png",
                title=f"{self.run_dir.name}: dp {self.dp_size} x cp {p.cp} x tp {p.tp}",
            )
            write_status(self.run_dir, "complete", self.step)
            log.info("sample:\n%s", sample)
            log.info("outputs in %s: metrics.jsonl, loss.png, sample.txt, export/, checkpoints/", self.run_dir)
        self.accelerator.end_training()
        train_losses = [r["loss"] for r in history if r.get("loss") is not None]
        return {
            "run_dir": str(self.run_dir),
            "final_loss": train_losses[-1] if train_losses else None,
            "val_loss": self.last_val,
            "last_checkpoint": self.last_saved,
            "sample": sample,
        }

    def close(self) -> None:
        """Release the run dir's lock, the shared-memory buffer and accelerate's process-wide state (the next
        job of a sweep runs in this process), also after a failure."""
        if self.lock is not None:
            self.lock.release()
        AcceleratorState._reset_state(reset_partial_state=True)
        shared = getattr(self.groups.tp_group, "shared_memory", None) if self.groups else None
        if shared is not None:
            shared.close()
