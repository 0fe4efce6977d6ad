"""What one training step really holds and sends, measured from its tensors and collectives.

`StepMeasure` wraps a step: it counts the step's collectives (`CollectiveCounter`), the peak bytes autograd
keeps for backward (`SavedActivations`), the gradients' bytes when the optimizer steps and, after it, the
parameters' and the optimizer state's. The training job records its first step's in `run.json` (`measured`,
one entry per rank); `python -m train.dry_run` prints the same for a rank it plays on the fake backend.
Meta and fake tensors count as real ones would: sizes come from their storages, never from their values.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

COLLECTIVES = {
    "allreduce": "all_reduce",
    "allgather": "all_gather",
    "allgatherbase": "all_gather",
    "allgatherintotensor": "all_gather",
    "reducescatter": "reduce_scatter",
    "reducescatterbase": "reduce_scatter",
    "reducescattertensor": "reduce_scatter",
    "broadcast": "broadcast",
    "alltoall": "all_to_all",
    "send": "send",
    "recv": "recv",
    "recvany": "recv",
}  # op names without "_" -> one name


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of this rank's piece of `t` (a DTensor's local shard)."""
    local = getattr(t, "_local_tensor", t)
    return local.numel() * local.element_size()


class CollectiveCounter(TorchDispatchMode):
    """Counts collectives and their payload by name: c10d's (`dist.all_reduce`, FSDP2's, the pipeline's sends),
    the functional ones (DTensor's) and our shared-memory ones (`shm_<name>` with `by_transport`, else under the
    collective's own name). Per call, the bytes of its largest tensor argument: the all-reduced tensor, the
    all-gather's output, the reduce-scatter's input. DDP's bucketed all-reduces run in its C++ reducer, unseen."""

    def __init__(self, by_transport: bool = False) -> None:
        super().__init__()
        self.by_transport = by_transport
        self.calls: Counter[str] = Counter()
        self.sizes: Counter[str] = Counter()

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key = func.__name__.split(".")[0].replace("_", "")
        name = COLLECTIVES.get(key.removeprefix("shm"))
        if name and func.namespace in ("c10d", "_c10d_functional", "tp_attention"):
            if self.by_transport and func.namespace == "tp_attention":
                name = "shm_" + name
            tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
            self.calls[name] += 1
            self.sizes[name] += max((t.numel() * t.element_size() for t in tensors), default=0)
        return func(*args, **(kwargs or {}))


class _Saved:
    """What autograd keeps instead of a saved tensor while `SavedActivations` is active: the tensor itself; its
    storage counts until the last holder of that storage is released (after backward)."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedActivations:
    """`with SavedActivations(): ...` tracks the bytes of the storages autograd saves for backward, each storage
    once, from when it is first saved until backward releases it; `peak` is the most held at once (every
    micro-batch a pipeline schedule keeps in flight, for example). Parameters and views of them are left out
    (FSDP2's unsharded ones included), and meta tensors (torch's pipeline stages infer shapes with them); a
    checkpointed block's recomputed tensors are not saved, only its input. Fake tensors count as real ones."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage -> [holders, bytes]
        self.current = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter) or t.is_meta:
            return t  # a weight (or F.linear's `weight.t()`), or a meta tensor, which holds nothing (shape inference)
        try:
            storage = getattr(t, "_local_tensor", t).untyped_storage()
        except (RuntimeError, NotImplementedError):  # a wrapper without storage: its local piece is saved too
            return t
        key = storage._cdata
        entry = self.live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        saved = _Saved(t)
        weakref.finalize(saved, self._release, key)
        return saved

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


class StepMeasure:
    """`with StepMeasure(model, optimizer): <one training step>`, then `report()`: this rank's bytes of
    parameters, gradients (summed when the optimizer steps), optimizer state (after it) and saved activations
    (their peak), and the step's collectives (`{name: {"calls": n, "bytes": b}}`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, getattr(optimizer, "optimizer", optimizer)  # accelerate's wraps torch's
        self.gradients = 0
        self.collectives = CollectiveCounter()
        self.activations = SavedActivations()

    def _count_gradients(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.gradients = sum(local_bytes(g) for g in grads)

    def __enter__(self) -> StepMeasure:
        self._hook = self.optimizer.register_step_pre_hook(self._count_gradients)
        self.collectives.__enter__()
        self.activations.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.activations.__exit__(*exc)
        self.collectives.__exit__(*exc)
        self._hook.remove()

    def report(self) -> dict[str, Any]:
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        memory = {
            "parameters": sum(local_bytes(p) for p in self.model.parameters()),
            "gradients": self.gradients,
            "optimizer": sum(local_bytes(v) for v in state),
            "activations": self.activations.peak,
        }
        counter = self.collectives
        collectives = {name: {"calls": n, "bytes": counter.sizes[name]} for name, n in sorted(counter.calls.items())}
        return {"memory": memory | {"total": sum(memory.values())}, "collectives": collectives}
