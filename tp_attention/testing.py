"""A kit for sharding-equivalence tests: prove a tensor-parallel module equals the unsharded one on a CPU.

    run_threaded(world_size, fn, *args)      fn(rank, world_size, *args) on threads over torch's
                                             in-process "threaded" process group
    run_processes(world_size, fn, *args)     the same on real gloo processes
    assert_close(actual, expected, ...)      element-wise, naming the worst element and its index
    forward_backward(module, inputs)         outputs, input gradients and full parameter gradients
    assert_results_close(actual, expected)   all of those at once
    assert_tp_equivalent(build, inputs, ...) build at every tp from one seed, load the same full
                                             weights, compare outputs, input and parameter gradients

A module takes part by declaring which parameters are shards: our parallel layers
(`ColumnParallelLinear`, `RowParallelLinear`, `VocabParallelEmbedding`, ...) do it with
`tp_shards = {name: ShardSpec}` and `tp_group`; a module built from them needs nothing more.
The threaded group is a private torch API (torch.testing._internal); keep real processes beside it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tp_attention.state_dict import full_grads, full_state_dict, load_full_state_dict


def run_threaded(world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 120) -> list[Any]:
    """Run `fn(rank, world_size, *args)` as `world_size` threads over the "threaded" process group.

    The default process group is initialised on every thread; results come back as a list indexed
    by rank. The first exception of any rank is re-raised. Threads share the default RNG: give each
    rank its own `torch.Generator` where randomness matters.
    """
    from torch.testing._internal.distributed.multi_threaded_pg import (
        ProcessLocalGroup,
        _install_threaded_pg,
        _uninstall_threaded_pg,
    )

    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []
    store = dist.HashStore()

    def worker(rank: int) -> None:
        try:
            dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store)
            results[rank] = fn(rank, world_size, *args)
        except BaseException as e:
            errors.append(e)
            ProcessLocalGroup.exception_handle(e)

    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    _install_threaded_pg()
    try:
        threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s)
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"threaded ranks still running after {timeout_s} s")
    finally:
        ProcessLocalGroup.reset()
        _uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    if errors:
        raise errors[0]
    return results


def _process_worker(rank: int, world_size: int, init_file: str, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears its connections down while a peer may still be using them
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's finalisation: after destroy_process_group, a normal exit aborted
    # in gloo's teardown ("terminate called without an active exception", SIGABRT) in 2 of 60 two-rank
    # runs with distinct hostnames (and now and then in CI); destroy, then os._exit: 0 of 100.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_processes(world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on a real gloo group: in this process for one rank, else in
    spawned processes (one thread each). `fn` must be importable (a module-level function) and its
    arguments and results picklable; results come back as a list indexed by rank.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        if world_size == 1:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
            try:
                return [fn(0, 1, *args)]
            finally:
                dist.destroy_process_group()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(_process_worker, args=(world_size, init_file, tmp, fn, args), nprocs=world_size)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str = "") -> None:
    """`|actual - expected| <= atol + rtol * |expected|` element-wise (torch.testing.assert_close's rule).

    On failure the message names how many elements differ and the worst one: its index, both values
    and its allowed difference. `atol` is the floor for elements that are zero in exact arithmetic
    (fp32 leaves ~1e-7 of noise there and nothing to be relative to).
    """
    label = f"{what}: " if what else ""
    if actual.shape != expected.shape:
        raise AssertionError(f"{label}shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        return
    same_nonfinite = (a == e) | (a.isnan() & e.isnan())
    allowed = atol + rtol * e.abs()
    excess = torch.where(same_nonfinite, 0.0, ((a - e).abs() / allowed).nan_to_num(nan=float("inf")))
    if (excess <= 1).all():
        return
    worst = int(excess.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
    bad = int((excess > 1).sum())
    raise AssertionError(
        f"{label}{bad} of {a.numel()} elements differ; worst at index {index}: actual {a.reshape(-1)[worst]:.8g}, "
        f"expected {e.reshape(-1)[worst]:.8g}, |difference| {abs(a.reshape(-1)[worst] - e.reshape(-1)[worst]):.3g} "
        f"> atol + rtol * |expected| = {allowed.reshape(-1)[worst]:.3g} (rtol {rtol:g}, atol {atol:g})"
    )


class Results(NamedTuple):
    """One forward and backward: outputs, gradients of the inputs that require them, full parameter gradients."""

    outputs: list[torch.Tensor]
    input_grads: list[torch.Tensor]
    param_grads: dict[str, torch.Tensor]


def forward_backward(
    module: nn.Module,
    inputs: Sequence[Any],
    forward: Callable[..., Any] | None = None,
    seed: int = 0,
    after_backward: Callable[[nn.Module], None] | None = None,
) -> Results:
    """Run `forward(module, *inputs)` (default `module(*inputs)`; a tensor or a tuple of them) and
    backward of `sum(output * w)`, `w` fixed random weights from `seed`, so every output element gets
    its own gradient; then `after_backward(module)` if given (e.g. the gradient sum sequence
    parallelism needs). Input tensors with `requires_grad` get their gradients (on copies; `inputs`
    are left as they are). Parameter gradients are gathered in full (`full_grads`: a collective at tp > 1)."""
    forward = forward or (lambda m, *xs: m(*xs))
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in inputs]
    out = forward(module, *inputs)
    outputs = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outputs]
    loss = sum((o.double() * w).sum() for o, w in zip(outputs, weights, strict=True) if o.is_floating_point())
    loss.backward()
    if after_backward is not None:
        after_backward(module)
    input_grads = [x.grad for x in inputs if isinstance(x, torch.Tensor) and x.grad is not None]
    return Results([o.detach() for o in outputs], input_grads, full_grads(module))


def assert_results_close(
    actual: Results, expected: Results, *, rtol: float = 1e-5, atol: float = 1e-6, where: str = ""
) -> None:
    """Every output, input gradient and parameter gradient of `actual` close to `expected` (`assert_close`)."""
    prefix = f"{where} " if where else ""
    for kind, got, want in (
        ("output", actual.outputs, expected.outputs),
        ("gradient of input", actual.input_grads, expected.input_grads),
    ):
        if len(got) != len(want):
            raise AssertionError(f"{prefix}{len(got)} {kind}s != {len(want)}")
        for i, (a, e) in enumerate(zip(got, want, strict=True)):
            assert_close(a, e, rtol=rtol, atol=atol, what=f"{prefix}{kind} {i}")
    if actual.param_grads.keys() != expected.param_grads.keys():
        raise AssertionError(f"{prefix}gradients of {sorted(actual.param_grads)} != {sorted(expected.param_grads)}")
    for name, e in expected.param_grads.items():
        assert_close(actual.param_grads[name], e, rtol=rtol, atol=atol, what=f"{prefix}gradient of {name}")


def _sharded(rank: int, world: int, build, state, inputs, forward, seed: int, after_backward) -> Results:
    module = build(dist.group.WORLD)
    load_full_state_dict(module, state)
    return forward_backward(module, inputs, forward, seed, after_backward)


def assert_tp_equivalent(
    build: Callable[[dist.ProcessGroup | None], nn.Module],
    inputs: Sequence[Any],
    tp_sizes: Sequence[int] = (1, 2, 4),
    *,
    forward: Callable[..., Any] | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    processes: bool = False,
    seed: int = 0,
) -> None:
    """Build the module at every tp in `tp_sizes`, give it the reference's full weights, and check
    that outputs, input gradients and (gathered) parameter gradients equal the unsharded module's.

    Args:
        build: `build(tp_group)` returns the module; `build(None)` is the unsharded reference (built
            after `torch.manual_seed(seed)`). Sharded modules get the reference's full weights, so
            their own initialisation does not matter.
        inputs: the positional inputs, the same full tensors on every rank; those with
            `requires_grad` get their gradients compared.
        forward: `forward(module, *inputs)`, returning the same full tensor(s) on every rank
            (default `module(*inputs)`); see `forward_backward`.
        after_backward: `after_backward(module)` runs after each backward (reference too).
        rtol, atol: element-wise tolerance (`assert_close`).
        processes: real gloo processes (`run_processes`; `build` and `forward` must then be
            module-level functions) instead of threads (`run_threaded`).

    Raises:
        AssertionError: naming the tp, the rank, the tensor and its worst element.
    """
    torch.manual_seed(seed)
    reference = build(None)
    expected = forward_backward(reference, inputs, forward, seed, after_backward)
    run = run_processes if processes else run_threaded
    for tp in tp_sizes:
        results = run(tp, _sharded, build, full_state_dict(reference), inputs, forward, seed, after_backward)
        for rank, result in enumerate(results):
            assert_results_close(result, expected, rtol=rtol, atol=atol, where=f"tp={tp} rank {rank}")
