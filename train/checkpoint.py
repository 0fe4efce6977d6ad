"""Resumable checkpoints: torch.distributed.checkpoint (DCP) over DTensor views of the local shards.

    <run_dir>/checkpoints/step_00000100/   DCP files (model + AdamW moments) and meta.json
    <run_dir>/checkpoints/.tmp-step_...     a save in progress; renamed when complete

A checkpoint is written into a temporary directory and renamed only after every rank has finished
and rank 0 has recorded each file's size and SHA-256 in meta.json, so a crash mid-save never
touches the last good one. Because shards are stored with their global layout, a checkpoint loads
at any (dp, tp). The step is the whole RNG and sampler state (both are derived from (seed, step)).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.device_mesh import DeviceMesh

from tp_attention.state_dict import dcp_state_dict, full_shapes
from train.config import ConfigError, TrainingError
from train.ranks import barrier, is_main_process

log = logging.getLogger(__name__)
META = "meta.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Completed checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else what is wrong with it."""
    meta_file = Path(path) / META
    if not meta_file.is_file():
        return f"{meta_file} is missing"
    try:
        files = json.loads(meta_file.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{meta_file} is unreadable ({e})"
    for name, expected in files.items():
        file = Path(path) / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{file} has {file.stat().st_size} bytes, expected {expected['size']}"
        if _sha256(file) != expected["sha256"]:
            return f"{file} fails its SHA-256 check"
    return None


def latest_valid(run_dirs: list[Path]) -> tuple[Path | None, list[str]]:
    """The newest (last written) intact checkpoint among `run_dirs`, and what is wrong with each newer one.

    Every broken checkpoint passed over is logged as a warning.
    """
    candidates = sorted(
        (c for d in run_dirs for c in checkpoint_dirs(d)), key=lambda c: (c.stat().st_mtime, c.name), reverse=True
    )
    problems = []
    for candidate in candidates:
        problem = verify(candidate)
        if problem is None:
            return candidate, problems
        log.warning("skipping checkpoint %s: %s", candidate, problem)
        problems.append(f"{candidate.name}: {problem}")
    return None, problems


def check_compatible(path: Path, model: nn.Module) -> None:
    """Refuse a checkpoint of another model shape, listing every parameter that differs.

    Raises:
        ConfigError: a parameter is missing, unexpected, or has another (full) shape.
    """
    saved = {
        k.removeprefix("model."): tuple(v.size)
        for k, v in FileSystemReader(str(path)).read_metadata().state_dict_metadata.items()
        if k.startswith("model.")
    }
    expected = {k: tuple(v) for k, v in full_shapes(model).items()}
    problems = [
        f"{k}: checkpoint {saved[k]} != model {shape}"
        for k, shape in expected.items()
        if k in saved and saved[k] != shape
    ]
    problems += [f"{k}: missing from the checkpoint" for k in expected if k not in saved]
    problems += [f"{k}: not in the model" for k in saved if k not in expected]
    if problems:
        raise ConfigError(f"checkpoint {path} was saved from another model shape:\n  " + "\n  ".join(problems))


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, mesh: DeviceMesh | None):
    """DCP state: model tensors and AdamW moments, keyed by parameter name, wrapped as DTensors."""
    names = {p: n for n, p in model.named_parameters()}
    model_state, finish_model = dcp_state_dict(model, model.state_dict(), mesh)
    state: dict[str, Any] = {f"model.{k}": v for k, v in model_state.items()}
    finishes = [finish_model]
    for moment in ("exp_avg", "exp_avg_sq"):
        tensors = {names[p]: s[moment] for p, s in optimizer.state.items() if moment in s}
        wrapped, finish = dcp_state_dict(model, tensors, mesh)
        state.update({f"optim.{moment}.{k}": v for k, v in wrapped.items()})
        finishes.append(finish)
    return state, finishes


@contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; one process is a supported use here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def normalize_path(path: Path) -> Path:
    """`path`, or its zero-padded form when it names `.../step_N` that exists as `.../step_0000000N`."""
    match = re.fullmatch(r"step_(\d+)", path.name)
    if match and not path.exists():
        padded = path.with_name(checkpoint_name(int(match.group(1))))
        return padded if padded.exists() else path
    return path


class Checkpointer:
    """The checkpoints of one run: each save atomic and verified, the newest `keep` kept.

    `save` is a collective (every rank calls it). It writes into a temporary directory (`write`, every
    rank), rank 0 records each file's size and SHA-256 (`seal`), and only then renames it into place.
    """

    def __init__(self, run_dir: Path, mesh: DeviceMesh | None, keep: int) -> None:
        self.run_dir, self.mesh, self.keep = Path(run_dir), mesh, keep
        self.root = self.run_dir / "checkpoints"

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
        """Write checkpoint `step`; returns its directory.

        Raises:
            TrainingError: the disk filled up (the partial save is removed, the previous one kept).
        """
        final, tmp = self.root / checkpoint_name(step), self.root / f".tmp-{checkpoint_name(step)}"
        if is_main_process():
            for stale in self.root.glob(".tmp-step_*"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        state, _ = _state(model, optimizer, self.mesh)
        try:
            self.write(tmp, state)
            if is_main_process():
                self.seal(tmp, {"step": step, **extra})
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            previous = checkpoint_dirs(self.run_dir)
            raise TrainingError(
                f"disk full while writing checkpoint step {step} to {self.root} ({e.strerror}); "
                f"the last complete checkpoint is {previous[-1] if previous else 'none'}"
            ) from e
        if is_main_process():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in checkpoint_dirs(self.run_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def write(self, directory: Path, state: dict[str, Any]) -> None:
        """Every rank writes its shards of `state` into `directory` (DCP); returns when all have."""
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=str(directory), no_dist=not dist.is_initialized())
        barrier()

    @staticmethod
    def seal(directory: Path, meta: dict[str, Any]) -> None:
        """Record each file's size and SHA-256 in meta.json and flush it to disk."""
        meta["files"] = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(directory.iterdir())}
        with (directory / META).open("w") as f:
            json.dump(meta, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())


def init_optimizer_state(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Give every parameter AdamW state (zeros, `step` updates done) so that DCP has tensors to load into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            state["step"] = torch.tensor(float(step))
            state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, mesh: DeviceMesh | None) -> dict:
    """Load checkpoint `path` into `model` and `optimizer` at the current layout; returns its meta."""
    meta = read_meta(path)
    check_compatible(path, model)
    init_optimizer_state(optimizer, meta["optimizer_steps"])
    state, finishes = _state(model, optimizer, mesh)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    for finish in finishes:
        finish()
    return meta


def load_model_only(path: Path, model: nn.Module) -> dict:
    """Load just the model tensors of a checkpoint into an unsharded model in one process."""
    meta = read_meta(path)
    check_compatible(path, model)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return meta
