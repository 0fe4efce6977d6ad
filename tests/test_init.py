"""Initialisation from the meta device: each rank draws the full tensors chunk by chunk and keeps its pieces,
so one seed gives bitwise the same logical weights as the eager tp=1 model at every (tp, dp_shard, dp_replicate),
and no rank ever allocates a whole parameter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import tp_attention.init
from tests.helpers import CASES, materialised
from tp_attention import ShardSpec, full_state_dict
from tp_attention.distributed import data_parallel_mesh, init_parallel_groups
from tp_attention.init import Init, fill_, rows_per_chunk
from tp_attention.model import GPT
from tp_attention.testing import run_processes, run_threaded

CFG = dict(CASES["llama"], vocab_size=251, emb_size=48, num_heads=4, head_size=12, num_layers=2)  # padded at tp 2, 4
SMALL_CHUNK = 256  # numbers per drawn chunk: the embedding (251 x 48) takes 48 chunks


def eager(cfg: dict, seed: int = 5) -> dict[str, torch.Tensor]:
    return GPT(**cfg, generator=torch.Generator().manual_seed(seed)).state_dict()


@pytest.mark.parametrize("shape", [(250, 48), (33, 7), (1000,), (5, 3)])
@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_chunked_draws_hold_the_numbers_of_one_whole_draw(monkeypatch, shape, kind):
    monkeypatch.setattr(tp_attention.init, "CHUNK_NUMEL", 64)
    init = Init(kind, 0.02)
    whole = init.draw(shape, torch.Generator().manual_seed(1))
    spec = ShardSpec(dim=len(shape) - 1, num_shards=1)
    out = torch.empty(shape)
    fill_(out, shape, init, spec, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, whole)
    if math.prod(shape) > 64:
        assert rows_per_chunk(shape[-1] if len(shape) > 1 else 1) < shape[0]  # really drawn in several chunks


def test_the_meta_model_materialises_to_the_eager_weights_one_chunk_at_a_time(monkeypatch):
    monkeypatch.setattr(tp_attention.init, "CHUNK_NUMEL", SMALL_CHUNK)
    for cfg in (CFG, dict(CASES["vocab65"], position="learned")):
        model, largest = materialised(cfg)
        expected = eager(cfg)
        assert all(torch.equal(model.state_dict()[n], expected[n]) for n in expected)
        assert largest < max(p.numel() for p in expected.values()) / 4  # never the whole embedding
    model = materialised(CFG)[0]  # RoPE: its computed buffer, garbage after to_empty, is recomputed
    fresh = GPT(**CFG)._decoders[0]._attention.rotary.inv_freq
    assert torch.equal(model._decoders[0]._attention.rotary.inv_freq, fresh)


def test_the_global_rng_gives_the_same_weights_eagerly_and_from_meta():
    cfg = dict(CASES["vocab65"], position="learned")
    torch.manual_seed(3)
    expected = GPT(**cfg).state_dict()
    with torch.device("meta"):
        model = GPT(**cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(3)
    model.reset_parameters()
    assert all(torch.equal(model.state_dict()[n], expected[n]) for n in expected)


def at_tp(rank, world, cfg):
    model, largest = materialised(cfg, tp_group=dist.group.WORLD)
    return full_state_dict(model), largest


def test_every_tp_rank_draws_the_same_logical_weights(monkeypatch):
    monkeypatch.setattr(tp_attention.init, "CHUNK_NUMEL", SMALL_CHUNK)
    expected = eager(CFG)
    for tp in (2, 4):
        for full, largest in run_threaded(tp, at_tp, CFG):
            assert full.keys() == expected.keys()
            assert all(torch.equal(full[n], expected[n]) for n in expected), tp
            assert largest <= max(SMALL_CHUNK, 252 * 48 // tp + 48)  # a chunk or this rank's rows, no more


def at_fsdp_layouts(rank, world, cfg):
    tp_attention.init.CHUNK_NUMEL = SMALL_CHUNK
    results = []
    for dp_replicate, dp_shard, tp in ((1, 2, 2), (2, 2, 1), (1, 4, 1)):
        groups = init_parallel_groups(tp, "cpu")
        mesh = data_parallel_mesh("cpu", dp_replicate, dp_shard, tp)
        model, largest = materialised(cfg, tp_group=groups.tp_group if tp > 1 else None, mesh=mesh)
        local = sum(p.to_local().numel() for p in model.parameters())
        results.append(((dp_replicate, dp_shard, tp), full_state_dict(model), largest, local))
    return results


def test_fsdp2_shards_on_the_meta_device_then_each_rank_draws_only_its_rows():
    expected = eager(CFG)
    total = sum(t.numel() for t in expected.values())
    for rank, layouts in enumerate(run_processes(4, at_fsdp_layouts, CFG)):
        for layout, full, largest, local in layouts:
            assert all(torch.equal(full[n], expected[n]) for n in expected), (layout, rank)
            assert largest <= SMALL_CHUNK + 252 * 48 // 4, (layout, rank)
            assert local < total / (layout[1] * layout[2]) * 1.1, (layout, rank, local)  # 1 / (dp_shard x tp)
