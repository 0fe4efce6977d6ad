"""All-reduce, all-gather and reduce-scatter through shared memory for the ranks of a TP group that
share one machine (CPU tensors).

gloo moves every collective through loopback TCP (~1.4 ms for a 1.5 MB all-reduce on the reference
2-core box). Here each rank copies its tensor into its own slot of a shared buffer, publishes a
sequence number and waits until every rank has published; then it reads what it needs: all slots
summed in rank order (all-reduce: the same bits on every rank), all slots concatenated (all-gather),
or its own chunk of every slot summed in rank order (reduce-scatter: the bits of the all-reduce's
chunk). Two buffers alternate, so one wait per call is enough: a rank can only reuse a buffer after
every other rank has published the next call, which it does only after it finished reading this one.

Used only where it is safe: CPU tensors, every rank of the group on this host, x86-64 (whose stores
are seen in program order). Anything else, and tensors larger than the buffer, go to the process group.
A group uses it only when built for it: `with_shared_memory(group)` returns the `TPGroup` to pass
to the layers.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import platform
import socket
import time
import uuid
from collections import Counter
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.shared_memory import _posixshmem
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tp_attention.distributed import ParallelGroups
from tp_attention.groups import ProcessGroup, TPGroup

SLOT_ALIGN = 64
_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]
# torch.library ops take strings, not objects: the compiled collectives (tp_attention.mappings) name
# their communicator by its segment name, and this table turns the name back into the object.
_BY_NAME: dict[str, SharedMemoryCollectives] = {}


class SharedMemoryCollectives:
    """Collectives on CPU tensors over `group` through a shared buffer of `2 * world * max_bytes`.

    A collective to build: every rank of `group` must call it, and then the same sequence of calls.
    Each slot has a header (byte count and dtype of what its rank published), so ranks that disagree on
    the tensor get a RuntimeError, as gloo would give them, instead of a silently wrong result. The segment
    is named `tpattn_<pid of rank 0>_<random>`; rank 0 unlinks it on `close()` and at exit, and segments
    of dead processes (a job killed with SIGKILL) are removed when the next one is created.
    """

    def __init__(self, group: ProcessGroup, max_bytes: int = 16 << 20, timeout_s: float = 600.0) -> None:
        self.group, self.max_bytes, self.timeout_s = group, max_bytes, timeout_s
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.seq = 0
        self.calls: Counter[str] = Counter()  # calls per collective (what a test checks went through here)
        name = [f"tpattn_{os.getpid()}_{uuid.uuid4().hex[:12]}" if self.rank == 0 else None]
        dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0), group=group)
        header = SLOT_ALIGN * self.world + 2 * self.world * 2 * 8  # counters, then (nbytes, dtype) per slot
        if self.rank == 0:
            remove_stale_segments()
            self.shm = shared_memory.SharedMemory(name=name[0], create=True, size=header + 2 * self.world * max_bytes)
        dist.barrier(group=group)
        if self.rank != 0:
            self.shm = shared_memory.SharedMemory(name=name[0])
        resource_tracker.unregister(self.shm._name, "shared_memory")  # ours to unlink: close(), atexit, next start
        self.counters = np.ndarray((self.world,), dtype=np.int64, buffer=self.shm.buf, offset=0, strides=(SLOT_ALIGN,))
        self.headers = np.ndarray(
            (2, self.world, 2), dtype=np.int64, buffer=self.shm.buf, offset=SLOT_ALIGN * self.world
        )
        if self.rank == 0:
            self.counters[:] = 0
        dist.barrier(group=group)
        self.data = torch.frombuffer(
            self.shm.buf, dtype=torch.uint8, offset=header, count=2 * self.world * max_bytes
        ).view(2, self.world, max_bytes)
        self.name = name[0]
        _BY_NAME[self.name] = self
        atexit.register(self.close)

    @staticmethod
    def by_name(name: str) -> SharedMemoryCollectives:
        """The open communicator whose segment is `name`."""
        return _BY_NAME[name]

    def fits(self, tensor: torch.Tensor) -> bool:
        nbytes = tensor.numel() * tensor.element_size()
        return tensor.device.type == "cpu" and tensor.dtype in _DTYPES and nbytes <= self.max_bytes

    def _exchange(self, tensor: torch.Tensor, name: str) -> list[torch.Tensor]:
        """Publish `tensor` in this rank's slot, wait for every rank, return every rank's tensor (views).

        Raises:
            RuntimeError: the ranks published tensors of different sizes or dtypes.
        """
        self.seq += 1
        nbytes = tensor.numel() * tensor.element_size()
        self.calls[name] += 1
        slots, headers = self.data[self.seq % 2], self.headers[self.seq % 2]  # (world, max_bytes), (world, 2)
        slots[self.rank, :nbytes].copy_(tensor.reshape(-1).view(torch.uint8))
        headers[self.rank] = (nbytes, _DTYPES.index(tensor.dtype))
        self.counters[self.rank] = self.seq  # x86-64 stores are seen in order: data and header first
        self._wait_for_all(name)
        if (headers != headers[self.rank]).any():
            published = ", ".join(f"rank {r}: {n} bytes of {_DTYPES[d]}" for r, (n, d) in enumerate(headers.tolist()))
            raise RuntimeError(
                f"shared-memory {name.replace('_', '-')}: the ranks published different tensors "
                f"({published}); every rank must pass the same shape and dtype"
            )
        return [slots[r, :nbytes].view(tensor.dtype).view(tensor.shape) for r in range(self.world)]

    @staticmethod
    def _reduce(parts: list[torch.Tensor], op: dist.ReduceOp, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum (or max) `parts` in rank order into `out` (a new tensor if None): one pass for two ranks."""
        combine = torch.maximum if op == dist.ReduceOp.MAX else torch.add
        out = combine(parts[0], parts[1], out=out)
        for part in parts[2:]:
            combine(out, part, out=out)
        return out

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce `tensor` in place over the group and return it."""
        parts = self._exchange(tensor, "all_reduce")  # `tensor` is in this rank's slot now: free to overwrite
        return self._reduce(parts, op, out=tensor)

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `tensor` concatenated along `dim`, in rank order (a new tensor)."""
        return torch.cat(self._exchange(tensor, "all_gather"), dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The sum of every rank's `tensor`, this rank's chunk along `dim` of it (a new tensor).

        `tensor.size(dim)` must be divisible by the group size (the caller checks).
        """
        parts = self._exchange(tensor, "reduce_scatter")
        return self._reduce([p.chunk(self.world, dim=dim)[self.rank] for p in parts], dist.ReduceOp.SUM).contiguous()

    def _wait_for_all(self, name: str) -> None:
        """Spin briefly, then yield the core (ranks may outnumber cores), then sleep; give up at the timeout."""
        start, spins = None, 0
        while (self.counters < self.seq).any():
            spins += 1
            if spins < 100:
                continue
            if start is None:
                start = time.monotonic()
            waited = time.monotonic() - start
            if waited > self.timeout_s:
                raise RuntimeError(
                    f"shared-memory {name.replace('_', '-')} timed out after {self.timeout_s:g} s "
                    f"waiting for ranks {np.flatnonzero(self.counters < self.seq).tolist()}"
                )
            time.sleep(1e-4) if waited > 0.01 else os.sched_yield()

    def close(self) -> None:
        """Free the shared buffer (rank 0 also unlinks it). The communicator is unusable afterwards."""
        if _BY_NAME.pop(self.name, None) is None:
            return
        atexit.unregister(self.close)
        self.data = self.counters = self.headers = None
        self.shm.close()
        if self.rank == 0:  # not SharedMemory.unlink(): it would tell the resource tracker, which we left
            with contextlib.suppress(FileNotFoundError):
                _posixshmem.shm_unlink(self.shm._name)


def remove_stale_segments(directory: str = "/dev/shm") -> list[str]:
    """Unlink the `tpattn_<pid>_*` segments whose creating process is gone; returns their names."""
    removed = []
    for path in Path(directory).glob("tpattn_*_*"):
        pid = path.name.split("_")[1]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def can_share_memory(group: ProcessGroup) -> bool:
    """Whether every rank of `group` is on this host, an x86-64 one, and there are several (a collective)."""
    if dist.get_world_size(group) == 1:
        return False
    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return len(set(hosts)) == 1 and platform.machine().lower() in ("x86_64", "amd64")


def with_shared_memory(group: ProcessGroup, timeout_s: float = 600.0) -> TPGroup:
    """`group` with its all-reduces, all-gathers and reduce-scatters of CPU tensors through shared
    memory, where `can_share_memory(group)`; otherwise a TPGroup using the process group alone.
    A collective over `group`. Free the buffer with `result.shared_memory.close()`."""
    shared = SharedMemoryCollectives(group, timeout_s=timeout_s) if can_share_memory(group) else None
    return TPGroup(group, shared)


def with_shared_memory_groups(groups: ParallelGroups, timeout_s: float | None = None) -> ParallelGroups:
    """`groups` with its TP group's collectives through shared memory (`with_shared_memory`; a collective
    over the TP group)."""
    return dataclasses.replace(groups, tp_group=with_shared_memory(groups.tp_group, timeout_s or 600.0))
