"""The shared-memory all-reduce on real processes: exact sums, every rank the same bits, fallbacks, timeouts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_gloo
from tp_attention.mappings import all_reduce_in_place
from tp_attention.shm import (
    SharedMemoryAllReduce,
    communicator_for,
    disable_shared_memory_all_reduce,
    enable_shared_memory_all_reduce,
)


def many_reductions(rank, world):
    group = dist.group.WORLD
    assert enable_shared_memory_all_reduce(group)
    results = []
    for i, (shape, dtype) in enumerate([((3, 5), torch.float32), ((1000,), torch.bfloat16), ((7,), torch.float64),
                                        ((2, 2), torch.int64)] * 5):  # back-to-back calls reuse both buffers
        x = (torch.arange(torch.Size(shape).numel()).reshape(shape) * (rank + 1) + i).to(dtype)
        results.append(all_reduce_in_place(x.clone(), group))
    y = torch.tensor([float(rank), -float(rank)])
    results.append(all_reduce_in_place(y, group, dist.ReduceOp.MAX))
    big = torch.ones(5 << 20)  # 20 MiB: more than the buffer, so the process group does it
    fallback = communicator_for(group, big) is None
    results.append(all_reduce_in_place(big, group)[:3])
    disable_shared_memory_all_reduce(group)
    return results, fallback


@pytest.mark.parametrize("world", [2, 4])
def test_sums_match_and_are_identical_on_every_rank(world):
    outputs = run_gloo(world, many_reductions)
    results, fallback = outputs[0]
    assert fallback
    for i, (shape, dtype) in enumerate([((3, 5), torch.float32), ((1000,), torch.bfloat16), ((7,), torch.float64),
                                        ((2, 2), torch.int64)] * 5):
        base = torch.arange(torch.Size(shape).numel()).reshape(shape)
        expected = sum(((base * (r + 1) + i).to(dtype) for r in range(world)), torch.zeros(shape, dtype=dtype))
        assert torch.equal(results[i], expected), (i, dtype)
    assert torch.equal(results[-2], torch.tensor([world - 1.0, 0.0]))
    assert torch.equal(results[-1], torch.full((3,), float(world)))
    for other, _ in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, results, strict=True)), "ranks must agree bitwise"


def absent_peer(rank, world):
    communicator = SharedMemoryAllReduce(dist.group.WORLD, max_bytes=1024, timeout_s=1.0)
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
    message = run_gloo(2, absent_peer)[0]
    assert message == "shared-memory all-reduce timed out after 1 s waiting for ranks [1]"


def test_declines_groups_it_cannot_serve():
    assert not enable_shared_memory_all_reduce(None)
    assert communicator_for(None, torch.ones(1)) is None
