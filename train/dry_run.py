"""Check a job before it is queued: play rank R of an N-rank job in this one process, on the fake backend.

    python -m train.dry_run --world-size 512 --rank 0 --device-memory h100 model=llama3_70b parallel.tp=8 \\
        parallel.dp_shard=64 trainer.seq_len=8192 trainer.batch_size=64 trainer.activation_checkpointing=full
    python -m train.dry_run --world-size 16 --all-ranks parallel.tp=2 parallel.dp_shard=4 parallel.dp_replicate=2

(also `tp-dry-run`). The rank runs the training job's own code: the config check (`train.main.prepare`), the
groups (`ParallelDims.build`), the model, its stage, FSDP2 or DDP and the optimizer (`train.trainer.Trainer`).
Then one training step, measured (`train.reporting.measure`): the job's own first step (`measured_step`) with
real tensors when the rank fits this machine (its estimated bytes x 1.5 below MemAvailable, and its weights
drawn in about a minute) and is not a pipeline stage (which would receive nothing, so its numbers would not be
finite and the step would skip), else forward, backward, clipping and the optimizer step on fake tensors
(`FakeTensorMode`: shapes and storage sizes, no memory, no values; `--tensors` chooses). Collectives return at
once and nothing opens a socket, so losses and norms are meaningless; shapes, bytes and collectives are real.

It prints which ranks form each of this rank's groups, the bytes of parameters, gradients, optimizer state and
saved activations (measured; the memory report's estimate beside them), the step's collectives, and whether
the rank fits `--device-memory` (`80GB`, `40GiB`, or a GPU name: see `GPUS`). `--all-ranks` plays, each in
its own process, every rank position whose pieces can differ (`ParallelDims.distinct_ranks`) and reports the
worst. `--json PATH` writes the report. Exit status: 0 fits (or no device given), 3 does not fit, 2 a config
error (the same line the training job prints), 1 a failure of the rank's step (its traceback).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.pipelining._utils import InferenceMode
from torch.nn.parallel import DistributedDataParallel
from torch.testing._internal.distributed.fake_pg import FakeStore

from tp_attention.model import GPT
from train.config import (
    CONF_DIR,
    ConfigError,
    TrainConfig,
    batch_layout,
    compose_config,
    parallel_dims,
    pipeline_microbatches,
    register,
)
from train.main import prepare
from train.reporting.measure import StepMeasure, local_bytes
from train.reporting.memory import activation_bytes, available_memory
from train.trainer import Trainer

GiB = 2**30
GPUS = {  # memory as NVIDIA sells it, read as GiB (torch.cuda reports a little less: an H100's 79.6 GiB)
    "a100-40gb": 40 * GiB,
    "a100": 80 * GiB,
    "a100-80gb": 80 * GiB,
    "h100": 80 * GiB,
    "h100-80gb": 80 * GiB,
    "h200": 141 * GiB,
    "b200": 180 * GiB,
    "l40s": 48 * GiB,
    "rtx4090": 24 * GiB,
}
UNITS = {"gb": 10**9, "gib": GiB, "mb": 10**6, "mib": 2**20, "tb": 10**12, "tib": 2**40}
FORCED = ["parallel.device=cpu", "parallel.shm_collectives=false", "trainer.log_with=[]", "trainer.progress=false"]
REAL_STEP_SECONDS = 60  # a rank whose weights take longer to draw than this runs on fake tensors
DOES_NOT_FIT = 3  # the exit status (1 is Python's for an exception)
DRAW_PER_SECOND = 1e8  # parameters reset_parameters draws per second here, about (every rank draws the whole model)


def device_memory(value: str) -> int:
    """Bytes of `--device-memory`: `80GB` (10^9), `80GiB` (2^30), or a GPU's name (`h100`, `a100-40gb`, ...).

    Raises:
        ConfigError: neither a size nor a known GPU, naming both forms.
    """
    name = value.strip().lower()
    if name in GPUS:
        return GPUS[name]
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b)", name)
    if match is None or match.group(2) not in UNITS:
        raise ConfigError(
            f"--device-memory {value!r} must be a size such as 80GB or 40GiB, or a GPU: {', '.join(GPUS)}"
        )
    return int(float(match.group(1)) * UNITS[match.group(2)])


@contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """The fake backend as the default group, playing `rank` of `world_size` (torchrun's environment set to match).
    Its collectives return at once; the object collectives, which would unpickle bytes nobody sent, keep this
    rank's own object (a broadcast) or give it for every rank (an all-gather)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1"
    )
    os.environ.setdefault("MASTER_PORT", "29500")  # read by accelerate, never connected to: the group is up
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    broadcast, gather = dist.broadcast_object_list, dist.all_gather_object
    dist.broadcast_object_list = lambda objects, *args, **kwargs: None
    dist.all_gather_object = lambda out, obj, *args, **kwargs: out.__setitem__(slice(None), [obj] * len(out))
    try:
        yield
    finally:
        dist.broadcast_object_list, dist.all_gather_object = broadcast, gather
        dist.destroy_process_group()


def compose_job(overrides: list[str], out_dir: Path) -> DictConfig:
    """The training job's config for `overrides` (plus `FORCED` and a scratch out_dir), Hydra's own view of the
    job set as a run would set it."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [*overrides, *FORCED, f"trainer.out_dir={out_dir}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def estimate(conf: TrainConfig, world_size: int) -> tuple[int, float]:
    """(bytes, seconds) a real-tensor step of one rank would take here, roughly: 16 bytes per parameter (weights,
    gradients, AdamW's two moments) over tp x pp x FSDP2 shards, the activation estimate, and the time to draw the
    whole model's weights (each rank draws all of them and keeps its pieces)."""
    m, p, t = conf.model, conf.parallel, conf.trainer
    cfg = m.gpt_config(m.vocab_size or 256)
    dims = parallel_dims(p, world_size)
    micro, _ = batch_layout(t, dims.dp, dims.dp_formula, pipeline_microbatches(p))
    with torch.device("meta"):
        parameters = GPT.from_config(cfg).num_parameters(exclude_position_embeddings=False)
    shards = p.tp * p.pp * dims.fsdp_shards
    activations = activation_bytes(cfg, micro, t.seq_len, p.tp, cp=p.cp, loss_chunk_bytes=t.loss_chunk_mib * 2**20)
    return 16 * parameters // shards + activations, parameters / DRAW_PER_SECOND


def bucket_all_reduce(group, bucket):  # unannotated: DDP refuses a hook whose annotations are strings
    """DDP's own averaging of a `dist.GradBucket` over `group` (its DP group), as a Python comm hook: the fake
    backend's work hands DDP's C++ reducer no tensor back, and here the all-reduces are counted (the reducer's
    are not)."""
    buffer = bucket.buffer()
    dist.all_reduce(buffer, group=group)
    buffer.div_(dist.get_world_size(group))
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(buffer)
    return future


def vote_static(schedule: Any) -> None:
    """torch's schedules start with a vote over P2P: do all stages know their shapes? Alone on the fake backend
    nothing arrives, so this rank's stages, which do (`Trainer(alone=True)`), decide: static."""
    stages = getattr(schedule, "_stages", None) or [schedule._stage]

    def vote(*_: Any) -> None:
        for stage in stages:
            stage._inference_mode = InferenceMode.STATIC

    schedule._warmup_p2p = vote


def shapes_step(trainer: Trainer) -> None:
    """One step's forward and backward (every micro-batch, through the pipeline schedule where there is one),
    clipping and optimizer step on the trainer's fake tensors; the token ids are real (the model checks them)."""
    t = trainer.conf.trainer
    x = torch.randint(0, trainer.model_config.vocab_size, (trainer.rank_batch, t.seq_len))
    for _ in range(trainer.grad_accum):
        with trainer.fake:
            if trainer.schedule is None:
                trainer.forward_backward(x, x)
            else:
                trainer.pipeline_step(x, x)
    with trainer.fake:
        trainer.clip_gradients()
        trainer.optimizer.step()


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """The global ranks of `group`; this rank alone for None (an axis of size 1)."""
    return [dist.get_rank()] if group is None else dist.get_process_group_ranks(group)


def describe_ranks(ranks: list[int]) -> str:
    """`0, 8, ..., 504 (64 ranks, every 8th)` for long even runs; the list itself otherwise."""
    steps = {b - a for a, b in itertools.pairwise(ranks)}
    if len(ranks) > 4 and len(steps) == 1:
        step = steps.pop()
        every = "consecutive" if step == 1 else f"every {step}th"
        return f"{ranks[0]}, {ranks[1]}, ..., {ranks[-1]} ({len(ranks)} ranks, {every})"
    return ", ".join(map(str, ranks))


def span(layers: list[int]) -> str:
    """`16-31` for consecutive layers, `3` for one."""
    return (
        f"{layers[0]}-{layers[-1]}"
        if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1))
        else (", ".join(map(str, layers)))
    )


def play(world_size: int, rank: int, overrides: list[str], tensors: str) -> dict[str, Any]:
    """Rank `rank`'s report: its groups, measured and estimated bytes, collectives (see the module docstring).

    Raises:
        ConfigError: the configuration is invalid for `world_size` ranks (the training job's own checks).
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"--rank {rank} must be in [0, --world-size {world_size})")
    with tempfile.TemporaryDirectory(prefix="dry-run-") as scratch, fake_process_group(rank, world_size):
        cfg = compose_job(overrides, Path(scratch))
        conf = prepare(cfg, world_size)
        need, seconds = estimate(conf, world_size)
        if tensors == "real" and conf.parallel.pp > 1:
            raise ConfigError(
                "--tensors real with parallel.pp > 1: a stage played alone receives nothing (the fake backend's "
                "receive leaves its buffer as it was), so its real step is not finite and skips; use --tensors fake"
            )
        real = tensors == "real" or (
            tensors == "auto"
            and conf.parallel.pp == 1
            and 1.5 * need < available_memory(torch.device("cpu"))
            and seconds < REAL_STEP_SECONDS
        )
        run_dir = Path(scratch) / "run"  # Hydra makes a job's directory before the job starts
        run_dir.mkdir()
        trainer = Trainer(conf, cfg, run_dir, None if real else FakeTensorMode(allow_non_fake_inputs=True), alone=True)
        if trainer.schedule is not None:
            vote_static(trainer.schedule)
        if isinstance(trainer.wrapped, DistributedDataParallel):
            trainer.wrapped.register_comm_hook(trainer.dp_group, bucket_all_reduce)
        try:
            if real:
                trainer.measured_step(trainer.step)
                measured = trainer.measured
            else:
                with StepMeasure(trainer.model, trainer.optimizer) as measure:
                    shapes_step(trainer)
                measured = measure.report()
            groups = trainer.groups
            layout = {
                "tp": group_ranks(trainer.tp_group),
                "dp": group_ranks(trainer.dp_group),
                "cp": group_ranks(trainer.cp_group),
                "pp": group_ranks(trainer.pp_group),
                "fsdp": group_ranks(None if trainer.fsdp_mesh is None else trainer.fsdp_mesh.get_group(-1)),
            }
            return {
                "world_size": world_size,
                "rank": rank,
                "tensors": "real" if real else "fake",
                "stages": [{"index": st.index, "layers": list(st.layers)} for st in trainer.stages],
                "layout": layout if groups is not None else {},
                "micro_batch": trainer.micro_batch,
                "seq_len": conf.trainer.seq_len,
                **measured,
                "estimated": trainer.memory,
                "notes": notes(trainer),
            }
        finally:
            trainer.close()


def notes(trainer: Trainer) -> list[str]:
    """What the figures leave out, for this rank's layout."""
    said = []
    if trainer.dp_group is not None and trainer.fsdp_mesh is None:
        said.append(
            "DDP keeps its gradient buckets besides the gradients (about their bytes again), not counted above"
            + ("; on fake tensors the gradients are averaged as DDP would, without DDP" if trainer.fake else "")
        )
    if trainer.fsdp_mesh is not None:
        width = 2 if trainer.conf.trainer.mixed_precision == "bf16" else 4
        shards = trainer.fsdp_mesh.size(-1)
        block = max((sum(local_bytes(q) for q in b.parameters()) for b in trainer.model._decoders.values()), default=0)
        gathered = 2 * block * shards * width // 4  # this block's and the prefetched next one's, in param dtype
        said.append(
            f"FSDP2 also holds two blocks' gathered weights while they run, about {size(gathered)}, not counted"
        )
    return said


def fits(report: dict[str, Any], capacity: int) -> tuple[bool, str]:
    """Whether the rank's measured total fits `capacity` bytes, and one line saying so (naming the largest part
    when it does not)."""
    memory = {k: v for k, v in report["memory"].items() if k != "total"}
    total = report["memory"]["total"]
    if total <= capacity:
        tight = (
            "; under 10% is left for what is not counted (the notes, the CUDA context)"
            if total > 0.9 * capacity
            else ""
        )
        return True, f"fits: {size(total)} of {size(capacity)} ({total / capacity:.0%}){tight}"
    largest = max(memory, key=memory.get)
    return (
        False,
        f"does not fit: {size(total)} > {size(capacity)}; the largest part is {largest}, {size(memory[largest])}",
    )


def size(n: int) -> str:
    """`512.0 MiB`, `1.25 GiB`: bytes for people."""
    for unit, scale in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.{2 if unit in ('TiB', 'GiB') else 1}f} {unit}"
    return f"{n} B"


def describe(report: dict[str, Any]) -> str:
    """The report as lines for people."""
    stages = [f"{st['index']} (layers {span(st['layers'])})" for st in report["stages"]]
    where = f", pipeline stage{'s' if len(stages) > 1 else ''} {', '.join(stages)}" if stages else ""
    lines = [
        f"rank {report['rank']} of {report['world_size']}{where}: one step of micro-batch {report['micro_batch']} "
        f"x {report['seq_len']} tokens on {report['tensors']} tensors"
    ]
    for axis, ranks in report["layout"].items():
        if len(ranks) > 1:
            lines.append(f"  {axis} group: {describe_ranks(ranks)}")
    lines.append(f"  {'memory':<16}{'measured':>12}{'estimated':>12}")
    for part, value in report["memory"].items():
        lines.append(f"    {part:<14}{size(value):>12}{size(report['estimated'].get(part, 0)):>12}")
    lines.append("  collectives of the step (calls, bytes of their buffers)")
    for name, c in report["collectives"].items():
        lines.append(f"    {name:<14}{c['calls']:>12,}{size(c['bytes']):>12}")
    if not report["collectives"]:
        lines.append("    none")
    lines += [f"  note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def all_ranks(world_size: int, overrides: list[str], tensors: str) -> list[dict[str, Any]]:
    """Every distinct rank position's report, each played in its own process (a fresh fake group and state)."""
    dims = parallel_dims(compose_config([*overrides, *FORCED]).parallel, world_size)
    reports = []
    for rank in dims.distinct_ranks():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rank.json"
            command = [sys.executable, "-m", "train.dry_run", "--world-size", str(world_size), "--rank", str(rank)]
            done = subprocess.run(
                [*command, "--tensors", tensors, "--json", str(out), *overrides], capture_output=True, text=True
            )
            if done.returncode == 2:
                said = [line for line in done.stderr.splitlines() if line.startswith("config error: ")]
                raise ConfigError(said[-1].removeprefix("config error: ") if said else done.stderr.strip())
            if done.returncode != 0:
                raise RuntimeError(f"rank {rank}'s dry run failed:\n{done.stderr[-3000:]}")
            reports.append(json.loads(out.read_text()))
    return reports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.dry_run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--world-size", type=int, required=True, help="ranks of the job (GPUs)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--rank", type=int, default=0, help="the rank to play (default 0)")
    where.add_argument("--all-ranks", action="store_true", help="every distinct rank position; report the worst")
    parser.add_argument("--device-memory", help="e.g. 80GB, 40GiB, h100, a100-40gb: say whether each rank fits")
    parser.add_argument("--tensors", choices=("auto", "real", "fake"), default="auto", help="see above (default auto)")
    parser.add_argument("--json", type=Path, help="write the report(s) here")
    args, overrides = parser.parse_known_args(argv)
    try:
        capacity = device_memory(args.device_memory) if args.device_memory else None
        if args.world_size < 1:
            raise ConfigError(f"--world-size {args.world_size} must be >= 1")
        if args.all_ranks:
            reports = all_ranks(args.world_size, overrides, args.tensors)
        else:
            reports = [play(args.world_size, args.rank, overrides, args.tensors)]
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    for report in reports:
        print(describe(report))
    worst = max(reports, key=lambda r: r["memory"]["total"])
    if len(reports) > 1:
        ranks = ", ".join(str(r["rank"]) for r in reports)
        print(f"worst of ranks {ranks}: rank {worst['rank']}, {size(worst['memory']['total'])}")
    fit = None
    if capacity is not None:
        fit, line = fits(worst, capacity)
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = reports[0] if len(reports) == 1 and not args.all_ranks else {"ranks": reports, "worst": worst["rank"]}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if fit is not False else DOES_NOT_FIT)


if __name__ == "__main__":
    main()
