"""The shared-memory collectives on real processes: exact results, every rank the same bits, fallbacks, timeouts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.helpers import free_port
from tp_attention.mappings import _all_gather, _reduce_scatter, all_reduce_in_place, shared_memory_for
from tp_attention.shm import SharedMemoryCollectives, with_shared_memory
from tp_attention.testing import run_processes


def many_reductions(rank, world):
    group = with_shared_memory(dist.group.WORLD)
    assert group.shared_memory is not None
    results = []
    for i, (shape, dtype) in enumerate(
        [((3, 5), torch.float32), ((1000,), torch.bfloat16), ((7,), torch.float64), ((2, 2), torch.int64)] * 5
    ):  # back-to-back calls reuse both buffers
        x = (torch.arange(torch.Size(shape).numel()).reshape(shape) * (rank + 1) + i).to(dtype)
        results.append(all_reduce_in_place(x.clone(), group))
    y = torch.tensor([float(rank), -float(rank)])
    results.append(all_reduce_in_place(y, group, dist.ReduceOp.MAX))
    big = torch.ones(5 << 20)  # 20 MiB: more than the buffer, so the process group does it
    fallback = shared_memory_for(group, big) is None
    results.append(all_reduce_in_place(big, group)[:3])
    group.shared_memory.close()
    return results, fallback


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sums_match_and_are_identical_on_every_rank(world):
    outputs = run_processes(world, many_reductions)
    results, fallback = outputs[0]
    assert fallback
    for i, (shape, dtype) in enumerate(
        [((3, 5), torch.float32), ((1000,), torch.bfloat16), ((7,), torch.float64), ((2, 2), torch.int64)] * 5
    ):
        base = torch.arange(torch.Size(shape).numel()).reshape(shape)
        expected = sum(((base * (r + 1) + i).to(dtype) for r in range(world)), torch.zeros(shape, dtype=dtype))
        assert torch.equal(results[i], expected), (i, dtype)
    assert torch.equal(results[-2], torch.tensor([world - 1.0, 0.0]))
    assert torch.equal(results[-1], torch.full((3,), float(world)))
    for other, _ in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, results, strict=True)), "ranks must agree bitwise"


def gathers_and_scatters(rank, world, shared_memory):
    """All-gathers and reduce-scatters along every dim and dtype, non-contiguous inputs included."""
    group = with_shared_memory(dist.group.WORLD) if shared_memory else dist.group.WORLD
    gen = torch.Generator().manual_seed(rank)
    results = []
    for dim, dtype in [(0, torch.float32), (1, torch.bfloat16), (2, torch.float64), (1, torch.float32)]:
        local = torch.randn(2, 3, 4, generator=gen).to(dtype)
        full = torch.randint(-8, 8, (4, 4 * world, 4 * world), generator=gen).to(dtype)  # exact sums in any order
        if dim == 1 and dtype == torch.float32:  # a transposed (non-contiguous) gradient, as backward gives
            local, full = local.transpose(0, 2), full.transpose(0, 2)
        results.append((local, full, _all_gather(local, dim, group), _reduce_scatter(full, dim, group)))
    if shared_memory:
        counts = dict(group.shared_memory.calls)
        group.shared_memory.close()
        return results, counts
    return results, {}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_all_gather_and_reduce_scatter_match_the_process_group(world):
    on_gloo = run_processes(world, gathers_and_scatters, False)
    in_shm = run_processes(world, gathers_and_scatters, True)
    dims = [0, 1, 2, 1]
    for rank in range(world):
        assert in_shm[rank][1] == {"all_gather": 4, "reduce_scatter": 4}
        for i, dim in enumerate(dims):
            gathered, scattered = in_shm[rank][0][i][2:]
            expected_gather = torch.cat([in_shm[r][0][i][0] for r in range(world)], dim=dim)
            total = sum((in_shm[r][0][i][1] for r in range(1, world)), in_shm[0][0][i][1].clone())  # rank order
            assert torch.equal(gathered, expected_gather), (rank, i)
            assert torch.equal(scattered, total.chunk(world, dim=dim)[rank]), (rank, i)
            assert scattered.is_contiguous()
            assert torch.equal(scattered, on_gloo[rank][0][i][3])
            assert torch.equal(on_gloo[rank][0][i][2], torch.cat([on_gloo[r][0][i][0] for r in range(world)], dim))


def absent_peer(rank, world):
    communicator = SharedMemoryCollectives(dist.group.WORLD, max_bytes=1024, timeout_s=1.0)
    dist.barrier()
    message = None
    if rank == 0:
        try:
            communicator.all_reduce(torch.ones(4))  # rank 1 never comes
        except RuntimeError as e:
            message = str(e)
    dist.barrier()
    communicator.close()
    return message


def test_a_missing_peer_times_out_with_a_message():
    message = run_processes(2, absent_peer)[0]
    assert message == "shared-memory all-reduce timed out after 1 s waiting for ranks [1]"


def one_rank_group(rank, world):
    group = with_shared_memory(dist.group.WORLD)
    return group.shared_memory is None and shared_memory_for(group, torch.ones(1)) is None


def tensors_it_cannot_carry(rank, world):
    group = with_shared_memory(dist.group.WORLD)
    carried = shared_memory_for(group, torch.ones(4)) is group.shared_memory is not None
    declined = [
        shared_memory_for(group, tensor) is None
        for tensor in (torch.ones(5 << 20), torch.ones(4, dtype=torch.uint16), torch.ones(4, device="meta"))
    ]  # more than its buffer; a dtype it has no code for; not in host memory
    big = all_reduce_in_place(torch.full((5 << 20,), float(rank + 1)), group)  # through gloo instead
    group.shared_memory.close()
    return carried, declined, big.unique().tolist()


SCRIPT = """
import os, sys, torch, torch.distributed as dist
from tp_attention.mappings import all_reduce_in_place
from tp_attention.shm import with_shared_memory
dist.init_process_group("gloo")
group = with_shared_memory(dist.group.WORLD)
total = all_reduce_in_place(torch.ones(3) * (dist.get_rank() + 1), group)
print(group.shared_memory is None, total.tolist(), flush=True)
dist.barrier()
os._exit(0)  # gloo's teardown with a hostname that does not resolve aborts now and then (1 in 20 here)
"""


def test_declines_groups_it_cannot_serve():
    assert run_processes(1, one_rank_group) == [True]  # a group of one has nothing to share
    for carried, declined, big in run_processes(2, tensors_it_cannot_carry):
        assert carried and declined == [True, True, True] and big == [3.0]


def test_ranks_on_different_hosts_use_the_process_group():
    """Each rank in its own UTS namespace (a hostname of its own, the network shared): really two hosts to
    `socket.gethostname`, so no shared memory, and the sum still right. Needs root (CI runs as root)."""
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --uts needs root (CI runs as root)")
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                "unshare",
                "--uts",
                "sh",
                "-c",
                f'hostname host{rank} && exec "$0" -c "$1"',
                sys.executable,
                SCRIPT,
            ],
            env=dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                OMP_NUM_THREADS="1",
                GLOO_SOCKET_IFNAME="lo",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["True [3.0, 3.0, 3.0]"] * 2


def test_reductions_other_than_sum_and_max_are_refused_by_name():
    with pytest.raises(ValueError, match=r"op = .*MIN.* is not supported: use dist.ReduceOp.SUM or dist.ReduceOp.MAX"):
        all_reduce_in_place(torch.ones(2), None, dist.ReduceOp.MIN)


def disagreeing_ranks(rank, world):
    group = with_shared_memory(dist.group.WORLD)
    try:
        all_reduce_in_place(torch.ones(4 + rank), group)  # rank 1 passes one element more
    except RuntimeError as e:
        return str(e)
    finally:
        group.shared_memory.close()
    return None


def test_ranks_that_disagree_get_an_error():
    for message in run_processes(2, disagreeing_ranks):
        assert message == (
            "shared-memory all-reduce: the ranks published different tensors (rank 0: 16 bytes of "
            "torch.float32, rank 1: 20 bytes of torch.float32); every rank must pass the same shape "
            "and dtype"
        )


def test_segments_of_dead_processes_are_removed(tmp_path):
    from tp_attention.shm import remove_stale_segments

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"tpattn_{dead.stdout.strip()}_abc").write_bytes(b"x")
    (tmp_path / f"tpattn_{os.getpid()}_def").write_bytes(b"x")  # alive: this process
    assert remove_stale_segments(str(tmp_path)) == [f"tpattn_{dead.stdout.strip()}_abc"]
    assert [p.name for p in tmp_path.iterdir()] == [f"tpattn_{os.getpid()}_def"]
