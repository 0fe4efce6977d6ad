"""Resumable checkpoints: torch.distributed.checkpoint (DCP) over DTensor views of the local shards.

    <run_dir>/checkpoints/step_00000100/   DCP files (model + AdamW moments) and meta.json
    <run_dir>/checkpoints/.tmp-step_...     a save in progress; renamed when complete
    <run_dir>/checkpoints/good.json         the newest checkpoint known good (never rotated away)
    <run_dir>/checkpoints/best.json         with trainer.keep_best: the best validation loss's (kept too)

A checkpoint is written into a temporary directory and renamed only after every rank has finished
and rank 0 has recorded each file's size and SHA-256 in meta.json, so a crash mid-save never
touches the last good one; a save that fails (a full disk, a write error) removes its temporary
directory and stops the run with the reason. A checkpoint whose directory holds a file meta.json does
not list, or lacks one it lists, is refused; its DCP metadata is read without unpickling code
(`train.checkpoints.dcp_metadata`). Because shards are stored with their global layout, a checkpoint loads at
any (dp, tp). The step is the whole RNG and sampler state (both are derived from (seed, step)).
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
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from tp_attention.model import GPT
from tp_attention.state_dict import current_name, dcp_state_dict, full_shapes
from train.checkpoints.dcp_metadata import SafeReader, UnsafeCheckpoint, load_metadata
from train.config import ConfigError, TrainingError
from train.run.ranks import barrier, is_main_process

log = logging.getLogger(__name__)
META = "meta.json"
GOOD = "good.json"
BEST = "best.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Completed checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def normalize_path(path: Path) -> Path:
    """`path`, or its zero-padded form when it names `.../step_N` that exists as `.../step_0000000N`."""
    match = re.fullmatch(r"step_(\d+)", path.name)
    if match and not path.exists():
        padded = path.with_name(checkpoint_name(int(match.group(1))))
        return padded if padded.exists() else path
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else what is wrong with it: meta.json must
    list every other file of the directory, each with its size and SHA-256, and nothing else."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        return f"{meta_file} is missing"
    try:
        files = json.loads(meta_file.read_text())["files"]
        listed = {name: (int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{meta_file} is unreadable ({type(e).__name__}: {e})"
    present = {p.name for p in path.iterdir()} - {META}
    if present - set(listed):
        return f"{path} holds files meta.json does not list: {sorted(present - set(listed))}"
    if ".metadata" not in listed:
        return f"{meta_file} does not list DCP's .metadata"
    for name, (size, sha256) in listed.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, expected {size}"
        if _sha256(file) != sha256:
            return f"{file} fails its SHA-256 check"
    return None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def latest_valid(
    run_dirs: list[Path], accept: Callable[[Path], str | None] | None = None
) -> tuple[Path | None, list[str]]:
    """The newest (last written) intact checkpoint among `run_dirs` that `accept` does not object to
    (it returns None, or why not), and what is wrong with each newer one. Broken ones are logged."""
    candidates = sorted(
        (c for d in run_dirs for c in checkpoint_dirs(d)), key=lambda c: (c.stat().st_mtime, c.name), reverse=True
    )
    problems = []
    for candidate in candidates:
        problem = verify(candidate) or (accept(candidate) if accept else None)
        if problem is None:
            return candidate, problems
        log.warning("skipping checkpoint %s: %s", candidate, problem)
        problems.append(f"{candidate.name}: {problem}")
    return None, problems


def find_intact(path: Path) -> tuple[Path | None, list[str]]:
    """Checkpoint `path` itself when it is one (`meta.json` in it), else its run directory's newest intact
    checkpoint; each candidate's manifest is checked once. Returns it (None if none is intact) and what is
    wrong with each one passed over."""
    if (path / META).is_file():
        problem = verify(path)
        return (None, [problem]) if problem else (path, [])
    return latest_valid([path])


def good_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint of `run_dir` known good (training went on healthily from it)."""
    file = Path(run_dir) / "checkpoints" / GOOD
    try:
        return int(json.loads(file.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_good(run_dir: Path, step: int) -> None:
    """Record checkpoint `step` as known good (rank 0; atomic)."""
    _write_marker(Path(run_dir) / "checkpoints" / GOOD, {"step": step})


def best(run_dir: Path) -> dict[str, Any] | None:
    """`{"step", "val_loss"}` of the checkpoint with the best validation loss (`trainer.keep_best`), if any."""
    try:
        return json.loads((Path(run_dir) / "checkpoints" / BEST).read_text())
    except (OSError, ValueError):
        return None


def mark_best(run_dir: Path, step: int, val_loss: float) -> None:
    """Record checkpoint `step` as the one with the best validation loss (rank 0; atomic)."""
    _write_marker(Path(run_dir) / "checkpoints" / BEST, {"step": step, "val_loss": val_loss})


def _write_marker(file: Path, content: dict[str, Any]) -> None:
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, file)


def _whole(model: nn.Module) -> nn.Module:
    """`model`, or for one pipeline stage of a GPT the whole model (on the meta device) it is a part of."""
    if getattr(model, "stage", None) is None:
        return model
    with torch.device("meta"):
        return GPT.from_config(model.config)


def check_compatible(path: Path, model: nn.Module) -> dict[str, str]:
    """Refuse a checkpoint of another model shape, listing every parameter that differs. Returns the
    checkpoint's name of each of its tensors by today's name (older checkpoints use the names that
    `tp_attention.state_dict.RENAMED_MODULES` maps to today's).

    Raises:
        ConfigError: a parameter is missing, unexpected, or has another (full) shape.
    """
    try:
        metadata = load_metadata(Path(path) / ".metadata")
    except UnsafeCheckpoint as e:
        raise ConfigError(
            f"checkpoint {path} is refused: {e} (load checkpoints only from sources you trust; "
            "share exports, model.safetensors, instead)"
        ) from None
    saved = {
        current_name(k.removeprefix("model.")): tuple(v.size)
        for k, v in metadata.state_dict_metadata.items()
        if k.startswith("model.")
    }
    expected = {k: tuple(v) for k, v in full_shapes(_whole(model)).items()}
    problems = [
        f"{k}: checkpoint {saved[k]} != model {shape}"
        for k, shape in expected.items()
        if k in saved and saved[k] != shape
    ]
    problems += [f"{k}: missing from the checkpoint" for k in expected if k not in saved]
    problems += [f"{k}: not in the model" for k in saved if k not in expected]
    if problems:
        raise ConfigError(f"checkpoint {path} was saved from another model shape:\n  " + "\n  ".join(problems))
    return {current_name(k): k for k in metadata.state_dict_metadata}


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


class Checkpointer:
    """The checkpoints of one run: each save atomic and verified, the newest `keep` kept, and the newest
    known-good one (`good.json`) never rotated away.

    `save` is a collective (every rank calls it). It writes into a temporary directory (`write`, every
    rank), rank 0 records each file's size and SHA-256 (`seal`), and only then renames it into place.
    """

    def __init__(self, run_dir: Path, mesh: DeviceMesh | None, keep: int) -> None:
        self.run_dir, self.mesh, self.keep = Path(run_dir), mesh, keep
        self.root = self.run_dir / "checkpoints"

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
        """Write checkpoint `step`; returns its directory.

        Raises:
            TrainingError: the save failed on some rank (the partial save is removed, the previous ones
                kept): "disk full while writing checkpoint step N" when the cause is space.
        """
        final, tmp = self.root / checkpoint_name(step), self.root / f".tmp-{checkpoint_name(step)}"
        if is_main_process():
            for stale in self.root.glob(".tmp-step_*"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        state, _ = _state(model, optimizer, self.mesh)
        failure = _attempt(lambda: self.write(tmp, state))
        if failure is None and is_main_process():
            failure = _attempt(lambda: self.seal(tmp, {"step": step, **extra}))
        failure = _first_failure(failure)  # every rank learns of any rank's failure, and all stop together
        if failure is not None:
            self._fail(step, tmp, failure)
        if is_main_process():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            kept = {
                checkpoint_name(s)
                for s in (good_step(self.run_dir), (best(self.run_dir) or {}).get("step"))
                if s is not None
            }
            for stale in checkpoint_dirs(self.run_dir)[: -self.keep]:  # all but the newest `keep`, good and best
                if stale.name not in kept:
                    shutil.rmtree(stale, ignore_errors=True)
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

    def _fail(self, step: int, tmp: Path, failure: tuple[str, bool]) -> None:
        reason, disk_full = failure
        free = shutil.disk_usage(self.root).free if self.root.exists() else 0
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        previous = [c for c in checkpoint_dirs(self.run_dir) if c != tmp]
        last = previous[-1] if previous else "none"
        what = "disk full while writing" if disk_full else "failed to write"
        raise TrainingError(
            f"{what} checkpoint step {step} to {self.root} ({reason}; {free / 2**20:.0f} MiB free); "
            f"the partial save was removed; the last complete checkpoint is {last}"
        )


def _attempt(action: Callable[[], None]) -> tuple[str, bool] | None:
    """Run `action`; None if it succeeded, else `(one-line reason, whether the cause is a full disk)`.
    DCP raises `CheckpointException` (a BaseException) wrapping each rank's error; a full disk is an
    ENOSPC/EDQUOT OSError anywhere in that chain (torch's zip writer raises RuntimeError "unexpected pos"
    for a short write, with the ENOSPC OSError as its context)."""
    try:
        action()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        causes = _causes(e)
        disk_full = any(isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT) for c in causes)
        root = next((c for c in causes if isinstance(c, OSError)), causes[-1])
        reason = f"{type(root).__name__}: {str(root).strip().splitlines()[0][:160] if str(root).strip() else ''}"
        return reason, disk_full
    return None


def _causes(error: BaseException) -> list[BaseException]:
    """`error`, the errors DCP wrapped in it, and their causes."""
    seen, todo = [], [error]
    while todo:
        e = todo.pop()
        if e is None or e in seen:
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    return seen


def _first_failure(failure: tuple[str, bool] | None) -> tuple[str, bool] | None:
    """The first rank's failure, the same on every rank (one small all-gather)."""
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, failure)
        failure = next((f for f in everyone if f is not None), None)
    return failure


def init_optimizer_state(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Give every parameter AdamW state (zeros, `step` updates done) so that DCP has tensors to load into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            state["step"] = torch.tensor(float(step))
            state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, mesh: DeviceMesh | None) -> dict:
    """Load checkpoint `path` into `model` and `optimizer` at the current layout; returns its meta."""
    meta = read_meta(path)
    saved = check_compatible(path, model)
    init_optimizer_state(optimizer, meta["optimizer_steps"])
    state, finishes = _state(model, optimizer, mesh)
    state = {saved.get(k, k): v for k, v in state.items()}
    with _quiet_single_process():
        dcp.load(
            state, checkpoint_id=str(path), storage_reader=SafeReader(str(path)), no_dist=not dist.is_initialized()
        )
    for finish in finishes:
        finish()
    return meta


def load_model(path: Path, model: nn.Module, mesh: DeviceMesh | None = None) -> dict:
    """Load just the model tensors of checkpoint `path` into `model`, at any layout (a collective when
    `mesh` is given: every rank of it calls this); returns the checkpoint's meta."""
    meta = read_meta(path)
    saved = check_compatible(path, model)
    wrapped, finish = dcp_state_dict(model, model.state_dict(), mesh)
    state = {saved.get(f"model.{k}", f"model.{k}"): v for k, v in wrapped.items()}
    with _quiet_single_process():
        dcp.load(
            state, checkpoint_id=str(path), storage_reader=SafeReader(str(path)), no_dist=not dist.is_initialized()
        )
    finish()
    return meta
