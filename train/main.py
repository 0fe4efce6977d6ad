"""The training job: data x tensor parallel GPT training with accelerate, configured by Hydra.

    python -m train [overrides]                                  one process (CPU or one GPU)
    torchrun --nproc_per_node 4 -m train parallel.tp=2            dp=2 x tp=2

Layout: our own `(dp, tp)` mesh; the model's TP layers use the tp group, DDP syncs gradients over
the dp group only (accelerate's `prepare(model)` would wrap DDP over *all* ranks and destroy the
shards, so only the optimizer goes through accelerate). Every TP rank of a group sees the same
batch; DP ranks see their share of one global batch that depends only on (seed, step).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tp_attention.distributed import init_parallel_groups
from tp_attention.flops import flops_per_token, measure_peak_flops
from tp_attention.grad_norm import clip_grad_norm_, grad_norm, sync_replicated_grads
from tp_attention.model import GPT, GPTConfig
from tp_attention.plots import save_loss_plot
from tp_attention.shm import enable_shared_memory_collectives
from train import checkpoint, faults
from train.config import ConfigError, OptimConfig, TrainConfig, TrainingError, validate
from train.data import eval_batches, prepare_data, step_batch

log = logging.getLogger("train")


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `decay_steps` (default max_steps)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay = optim.decay_steps or max_steps
    if step >= decay:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, decay - optim.warmup_steps)
    return optim.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def step_seed(seed: int, step: int, dp_rank: int) -> int:
    """Dropout RNG seed: the same on the TP ranks of a group, different across DP ranks and steps."""
    return (seed * 1_000_003 + step * 1_009 + dp_rank) % 2**63


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's split: weight decay on matrices and embeddings, none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn, *args: Any) -> Any:
    """Run `fn` on rank 0 only and hand its result, or its ConfigError, to every rank."""
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn(*args)
        except ConfigError as e:
            error = str(e)
    result, error = _broadcast((result, error))
    if error is not None:
        raise ConfigError(error)
    return result


def agree_on_run_dir(hydra_dir: Path) -> Path:
    """Rank 0's Hydra output dir for every rank; a stray empty dir of another rank is removed."""
    run_dir = Path(_broadcast(str(hydra_dir.resolve())))
    if hydra_dir.resolve() != run_dir and hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
        hydra_dir.rmdir()
    return run_dir


def setup_logging(run_dir: Path, rank: int) -> None:
    """One log file per rank in `<run_dir>/logs/`; rank 0 also logs to stdout (above the bar)."""

    class TqdmHandler(logging.StreamHandler):  # above the progress bar; stdout, so stderr keeps the errors
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record), file=sys.stdout)

    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(TqdmHandler())
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")


def write_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """`.hydra/config.yaml` and `overrides.yaml`, as Hydra writes them, from rank 0 only."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)), hydra_dir / "overrides.yaml")


def resolve_resume(resume: str, run_dir: Path, out_dir: Path) -> Path | None:
    """The checkpoint to start from.

    A run dir that already has checkpoints always continues from its newest intact one (an elastic
    restart, or the same run id again). Otherwise `none` starts fresh, `auto` takes the newest
    intact checkpoint of any run under `out_dir`, and a path names a checkpoint or a run dir.
    Broken checkpoints are skipped with a warning.

    Raises:
        ConfigError: checkpoints exist where asked but none is intact (each problem listed).
    """
    if checkpoint.checkpoint_dirs(run_dir):
        found, problems = checkpoint.latest_valid([run_dir])
        if found is None:
            raise ConfigError(f"no intact checkpoint left in {run_dir / 'checkpoints'}: " + "; ".join(problems))
        return found
    if resume == "none":
        return None
    if resume == "auto":
        runs = [d for d in out_dir.iterdir() if d.is_dir()] if out_dir.is_dir() else []
        found, problems = checkpoint.latest_valid(runs)
        if found is None and problems:
            raise ConfigError(f"trainer.resume = auto: no intact checkpoint under {out_dir}: " + "; ".join(problems))
        return found
    path = Path(resume).expanduser()
    if (path / checkpoint.META).is_file():
        problem = checkpoint.verify(path)
        if problem:
            raise ConfigError(f"trainer.resume = {resume!r} is not a usable checkpoint: {problem}")
        return path
    found, problems = checkpoint.latest_valid([path])
    if found is None:
        raise ConfigError(f"trainer.resume = {resume!r} holds no intact checkpoint" +
                          (": " + "; ".join(problems) if problems else ""))
    return found


def check_output_space(run_dir: Path, bytes_per_checkpoint: int, keep: int) -> None:
    """Fail before training if the run dir is not writable or cannot hold the checkpoints.

    Raises:
        ConfigError: naming the directory, the free space and what the checkpoints need.
    """
    probe = run_dir / ".write-test"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"trainer.out_dir: cannot write to {run_dir} ({e.strerror})") from e
    need, free = bytes_per_checkpoint * (keep + 1), shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(f"trainer.out_dir: {run_dir} has {free / 2**20:.0f} MiB free; {keep + 1} checkpoints "
                          f"(trainer.keep_checkpoints + 1 while saving) need about {need / 2**20:.0f} MiB")


def carry_metrics(source_run: Path, run_dir: Path, step: int) -> None:
    """Copy the metrics up to `step` of the run we resume from, so the curve stays whole."""
    source, target = source_run / "metrics.jsonl", run_dir / "metrics.jsonl"
    if source.resolve() == target.resolve() or not source.is_file():
        return
    lines = [line for line in source.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    target.write_text("".join(line + "\n" for line in lines))


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics past `step` (written after the checkpoint we restart from)."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


class Metrics:
    """`metrics.jsonl` (one JSON object per logged step) and TensorBoard, from rank 0."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, enabled: bool) -> None:
        self.path, self.accelerator, self.enabled = run_dir / "metrics.jsonl", accelerator, enabled

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line] if self.path.is_file() else []


def all_ranks_agree(flag: torch.Tensor) -> bool:
    """True only if `flag` is true on every rank (one tiny all-reduce), so all ranks take one branch."""
    if dist.is_initialized():
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; returns a summary (final losses and where the outputs are).

    Raises:
        ConfigError: an invalid configuration, data or checkpoint (before training where possible).
        TrainingError: a collective timed out (naming the timeout and what was running), the run
            stopped after `trainer.max_bad_steps` non-finite steps, or the disk filled up.
    """
    phase = {"now": "start-up"}
    timeout_s = cfg.parallel.timeout_s
    try:
        return _run(cfg, phase)
    except RuntimeError as e:
        if isinstance(e, TrainingError) or ("timed out" not in str(e).lower() and "timeout" not in str(e).lower()):
            raise
        first_line = str(e).strip().splitlines()[0][:200]
        raise TrainingError(f"a collective timed out after {timeout_s:g} s (parallel.timeout_s) during "
                            f"{phase['now']}: a peer is hung or gone ({first_line})") from e


def _run(cfg: DictConfig, phase: dict[str, str]) -> dict[str, Any]:
    conf: TrainConfig = OmegaConf.to_object(cfg)
    m, d, o, p, t = conf.model, conf.data, conf.optim, conf.parallel, conf.trainer
    validate(conf, int(os.environ.get("WORLD_SIZE", "1")))
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("parallel.device = 'cuda' but no CUDA device is visible")
    if t.mixed_precision == "fp16" and device_type != "cuda":
        raise ConfigError("trainer.mixed_precision = 'fp16' needs a CUDA device; use bf16 on CPU")

    # our process group first (accelerate adopts it): restart-safe store, the (dp, tp) mesh, the timeout
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    groups = init_parallel_groups(p.tp, device_type, p.timeout_s) if distributed else None
    if groups is not None and device_type == "cpu" and p.shm_collectives:
        enable_shared_memory_collectives(groups.tp_group, p.timeout_s)
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)  # rank 0's is the run dir (see agree_on_run_dir)
    accelerator = Accelerator(
        cpu=device_type == "cpu", mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
        log_with="tensorboard", project_config=ProjectConfiguration(str(hydra_dir), str(hydra_dir / "tensorboard")),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    mesh, tp_group = (groups.mesh, groups.tp_group) if groups else (None, None)
    dp_size, dp_rank = (groups.dp_size, groups.dp_rank) if groups else (1, 0)
    dp_group = groups.dp_group if groups and dp_size > 1 else None

    run_dir = agree_on_run_dir(hydra_dir)
    setup_logging(run_dir, rank)
    is_main = rank == 0
    if is_main:
        write_hydra_files(run_dir, cfg)
    log.info("run dir %s | world %d = dp %d x tp %d | device %s", run_dir, world, dp_size, p.tp, device_type)

    data = prepare_data(d, accelerator.is_local_main_process, accelerator.wait_for_everyone, t.seq_len)
    vocab = m.vocab_size or data.vocab_size
    if vocab < data.vocab_size:
        raise ConfigError(f"model.vocab_size = {vocab} is smaller than the tokenizer's {data.vocab_size}")
    model_cfg = GPTConfig(**{**asdict(m), "vocab_size": vocab})
    log.info("data %s: %d train / %d val tokens, vocab %d", data.directory, len(data.train), len(data.val), vocab)

    torch.manual_seed(t.seed)  # the same full weights on every rank, whatever the layout
    model = GPT.from_config(model_cfg, tp_group=tp_group).to(accelerator.device)
    model.sequence_parallel = p.sequence_parallel
    ddp = DistributedDataParallel(model, process_group=dp_group) if dp_group is not None else model
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2))
    optimizer = accelerator.prepare(optimizer)
    accelerator.init_trackers("tensorboard")
    metrics = Metrics(run_dir, accelerator, is_main)

    start = optimizer_steps = 0
    resume_from = on_main(resolve_resume, t.resume, run_dir, Path(t.out_dir))
    if resume_from is not None:
        meta = checkpoint.load(Path(resume_from), model, optimizer.optimizer, mesh)
        start, optimizer_steps = meta["step"], meta["optimizer_steps"]
        if is_main:
            carry_metrics(Path(resume_from).parent.parent, run_dir, start)
            truncate_metrics(run_dir, start)
        log.info("resumed from %s at step %d (saved at dp %s x tp %s)", resume_from, start,
                 meta["layout"]["dp"], meta["layout"]["tp"])
    if is_main and data.directory.joinpath("tokenizer.json").is_file():
        shutil.copy(data.directory / "tokenizer.json", run_dir / "tokenizer.json")
    checkpoint_bytes = 12 * model.num_parameters(exclude_position_embeddings=False)  # weights + 2 AdamW moments
    on_main(check_output_space, run_dir, checkpoint_bytes, t.keep_checkpoints)

    tokens_per_step = t.micro_batch * t.grad_accum * dp_size * t.seq_len
    step_flops = flops_per_token(model_cfg, model.num_parameters(), t.seq_len) * tokens_per_step
    peak = _broadcast(measure_peak_flops(accelerator.device)) * world
    val_batches = eval_batches(data.val, t.eval_batches, t.seed, t.micro_batch, t.seq_len)
    ckpt_extra = {"layout": {"dp": dp_size, "tp": p.tp}, "model": asdict(model_cfg),
                  "config": OmegaConf.to_container(cfg, resolve=False), "run_dir": str(run_dir)}

    def evaluate() -> float:
        model.eval()
        total = torch.zeros((), device=accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            for i, (x, y) in enumerate(val_batches):
                if i % dp_size == dp_rank:
                    total += model(x.to(accelerator.device), y.to(accelerator.device)).float()
        if dp_group is not None:
            dist.all_reduce(total, group=dp_group)
        model.train()
        return total.item() / len(val_batches)

    bar = tqdm(total=t.max_steps, initial=start, disable=not (is_main and t.progress), desc="train", unit="step",
               dynamic_ncols=True)
    model.train()
    running, last_val, last_saved = torch.zeros((), device=accelerator.device), None, start
    window_time, window_steps, good_steps, skipped, bad_streak = 0.0, 0, 0, 0, 0
    good_total = 0  # optimizer updates in this process (AdamW's step count continues from optimizer_steps)
    for step in range(start, t.max_steps):
        done = step + 1
        phase["now"] = f"training step {done}"
        faults.inject("kill", done, rank)
        faults.inject("hang", done, rank)
        faults.inject("raise", done, rank)
        step_start = time.perf_counter()
        lr = lr_at(step, o, t.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(t.seed, step, dp_rank))
        loss_sum = torch.zeros((), device=accelerator.device)
        for x, y in step_batch(data.train, step, t.seed, t.micro_batch, t.grad_accum, t.seq_len, dp_rank, dp_size):
            with accelerator.accumulate(ddp):
                with accelerator.autocast():
                    loss = ddp(x.to(accelerator.device), y.to(accelerator.device))
                    if faults.active("nan", done, rank):
                        loss = loss * float("nan")
                accelerator.backward(loss)
            loss_sum += loss.detach().float()
        accelerator.unscale_gradients()
        if p.sequence_parallel:
            sync_replicated_grads(model, tp_group)  # LayerNorm etc. saw only this rank's tokens
        norm = (clip_grad_norm_(model, o.grad_clip, tp_group) if o.grad_clip > 0 else grad_norm(model, tp_group))
        finite = all_ranks_agree(torch.isfinite(loss_sum) & torch.isfinite(norm))
        if finite or accelerator.scaler is not None:  # fp16: the grad scaler skips and rescales itself
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if finite:
            running += loss_sum / t.grad_accum
            good_steps, good_total, bad_streak = good_steps + 1, good_total + 1, 0
        else:
            skipped, bad_streak = skipped + 1, bad_streak + 1
            log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row)", done, bad_streak)
            if bad_streak >= t.max_bad_steps:
                raise TrainingError(
                    f"{bad_streak} consecutive steps with non-finite loss or gradients (trainer.max_bad_steps = "
                    f"{t.max_bad_steps}), stopped at step {done}; the last good checkpoint is step {last_saved} "
                    f"in {run_dir / 'checkpoints'}")
        if device_type == "cuda":
            torch.cuda.synchronize()
        window_time += time.perf_counter() - step_start
        window_steps += 1
        bar.update(1)

        is_last = done == t.max_steps
        record = None
        if done % t.log_interval == 0 or is_last:
            if dp_group is not None:
                dist.all_reduce(running, group=dp_group)
            train_loss = running.item() / good_steps / dp_size if good_steps else None
            tok_s = tokens_per_step * window_steps / window_time
            mfu = step_flops * window_steps / window_time / peak
            record = {"step": done, "loss": train_loss, "lr": lr, "grad_norm": norm.item() if finite else None,
                      "tokens_per_s": tok_s, "mfu": mfu, "skipped_steps": skipped}
            if train_loss is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}")
            running.zero_()
            window_time, window_steps, good_steps = 0.0, 0, 0
        if done % t.eval_interval == 0 or is_last:
            phase["now"] = f"evaluation at step {done}"
            last_val = evaluate()
            record = {**(record or {"step": done}), "val_loss": last_val}
            log.info("step %d: val loss %.4f", done, last_val)
        if record is not None:
            metrics.log(record)
        if done % t.checkpoint_interval == 0 or is_last:
            phase["now"] = f"saving checkpoint step {done}"
            checkpoint.save(run_dir, done, model, optimizer.optimizer, mesh,
                            {**ckpt_extra, "optimizer_steps": optimizer_steps + good_total}, t.keep_checkpoints)
            last_saved = done
    bar.close()
    phase["now"] = "export and sampling"

    export_dir = model.save(run_dir / "export")
    if is_main and (run_dir / "tokenizer.json").is_file():
        shutil.copy(run_dir / "tokenizer.json", export_dir / "tokenizer.json")
    prompt = torch.tensor([data.tokenizer.encode(t.sample_prompt) or [0]], device=accelerator.device)
    torch.manual_seed(t.seed)
    sample_ids = model.generate(prompt, t.sample_tokens, do_sample=True, temperature=0.8, top_k=50)
    sample = data.tokenizer.decode(sample_ids[0].tolist())
    history = metrics.read() if is_main else []
    if is_main:
        (run_dir / "sample.txt").write_text(sample)
        save_loss_plot(history, run_dir / "loss.png", title=f"{run_dir.name}: dp {dp_size} x tp {p.tp}")
        log.info("sample:\n%s", sample)
        log.info("outputs in %s: metrics.jsonl, loss.png, sample.txt, export/, checkpoints/", run_dir)
    accelerator.end_training()
    train_losses = [r["loss"] for r in history if r.get("loss") is not None]
    return {"run_dir": str(run_dir), "final_loss": train_losses[-1] if train_losses else None,
            "val_loss": last_val, "last_checkpoint": last_saved, "sample": sample}
