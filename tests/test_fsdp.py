"""FSDP2 under TP (4 gloo processes): mixed precision gathers parameters in bf16 and reduces gradients in fp32,
with the loss and gradients of the unsharded model under autocast to bf16 accuracy; DCP checkpoints are written
from each rank's own piece, without gathering, and load in one process bitwise."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from tests.helpers import CASES, gpt_batch, materialised
from tp_attention import full_grads, full_state_dict, load_full_state_dict
from tp_attention.distributed import data_parallel_mesh, init_parallel_groups
from tp_attention.fsdp import shard_data_parallel
from tp_attention.model import GPT
from tp_attention.state_dict import dcp_state_dict
from tp_attention.testing import assert_close, run_processes
from train.run.layout import prepare

CFG = dict(CASES["llama"], num_layers=2)
BF16 = dict(rtol=3e-2, atol=3e-3)


def autocast_loss_and_grads(model: GPT, idx: torch.Tensor, targets: torch.Tensor):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, targets)
    loss.backward()
    return loss.detach().float(), full_grads(model)


def sharded_in_bf16(rank, world, state, idx, targets):
    groups = init_parallel_groups(2, "cpu")
    model = GPT(**CFG, tp_group=groups.tp_group)
    load_full_state_dict(model, state)
    shard_data_parallel(model, data_parallel_mesh("cpu", 1, 2, 2), param_dtype=torch.bfloat16)
    seen = []
    model._decoders[0]._attention.register_forward_pre_hook(lambda module, args: seen.append(module._q.weight.dtype))
    dp = dist.get_rank(groups.dp_group)
    loss, grads = autocast_loss_and_grads(model, idx[dp::2], targets[dp::2])  # this DP rank's half of the batch
    dist.all_reduce(loss, group=groups.dp_group)
    kept = {(p.dtype, p.grad.dtype, type(p.grad)) for p in model.parameters()}
    return loss / 2, grads, seen, kept


def test_fsdp2_gathers_parameters_in_bf16_and_reduces_gradients_in_fp32():
    reference = GPT(**CFG, generator=torch.Generator().manual_seed(0))
    idx, targets = gpt_batch(CFG, batch=4)
    losses = [reference(idx[i::2], targets[i::2]) for i in range(2)]  # the mean of the two halves' losses
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss = sum(reference(idx[i::2], targets[i::2]) for i in range(2)).float() / 2
    (sum(losses) / 2).backward()
    del losses
    state = {n: t.detach() for n, t in reference.state_dict().items()}
    for rank, (loss, grads, seen, kept) in enumerate(run_processes(4, sharded_in_bf16, state, idx, targets)):
        assert seen == [torch.bfloat16], rank  # the gathered weights the block computes with
        assert kept == {(torch.float32, torch.float32, DTensor)}, rank  # the sharded parameters and gradients
        assert_close(loss, expected_loss, **BF16, what=f"rank {rank} loss")
        for name, param in reference.named_parameters():
            assert_close(grads[name], param.grad, **BF16, what=f"rank {rank} {name}")


def save_from_pieces(rank, world, cfg, directory):
    """Save at dp_shard=2 x tp=2, then load into a model of other weights at that layout: its full state."""
    groups = init_parallel_groups(2, "cpu")
    model = materialised(cfg, groups.tp_group, data_parallel_mesh("cpu", 1, 2, 2), seed=0)[0]
    ours = model.state_dict()
    state, _ = dcp_state_dict(model, ours, groups.mesh)
    dcp.save(state, checkpoint_id=directory)
    in_place = {n for n, t in state.items() if t.to_local().data_ptr() == ours[n].to_local().data_ptr()}
    other = materialised(cfg, groups.tp_group, data_parallel_mesh("cpu", 1, 2, 2), seed=1)[0]
    state, finish = dcp_state_dict(other, other.state_dict(), groups.mesh)
    dcp.load(state, checkpoint_id=directory)
    finish()
    return in_place, full_state_dict(other)


@pytest.mark.parametrize(
    "vocab, emb",
    [(64, 48), (65, 48), (65, 45)],  # 65: tp=2 pads the vocabulary; 45: dp_shard=2 must split its table's rows
)
def test_a_dcp_checkpoint_is_written_from_the_fsdp2_pieces_and_loads_in_one_process(tmp_path, vocab, emb):
    cfg = dict(CFG, vocab_size=vocab, emb_size=emb)
    results = run_processes(4, save_from_pieces, cfg, str(tmp_path))
    expected = GPT(**cfg, generator=torch.Generator().manual_seed(0)).state_dict()
    for rank, (in_place, reloaded) in enumerate(results):
        padded_rows_split = (vocab, emb) == (65, 45) and rank % 2 == 1  # TP rank 1 holds the pad row
        gathered = {"_token_embeddings.weight", "_lm_head.weight"} if padded_rows_split else set()
        assert in_place == set(expected) - gathered  # written from the rank's own piece (or gathered)
        assert all(torch.equal(reloaded[n], expected[n]) for n in expected)  # and read back into it
    model = GPT(**cfg)
    state, finish = dcp_state_dict(model, model.state_dict(), None)
    dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
    finish()
    assert all(torch.equal(model.state_dict()[n], expected[n]) for n in expected)


def through_accelerate(rank, world, cfg, tp):
    from accelerate import Accelerator
    from accelerate.accelerator import DistributedType

    # accelerate 1.15 takes a ParallelismConfig only on its multi-device path, which leaves out MULTI_CPU
    # (Accelerator.multi_device, accelerator.py:659): count CPU processes in, and its GPU code runs here
    Accelerator.multi_device = property(lambda self: self.distributed_type == DistributedType.MULTI_CPU)
    sizes = dict(TP_SIZE=str(tp), DP_SHARD_SIZE=str(world // tp), DP_REPLICATE_SIZE="1")
    os.environ.update(
        {f"PARALLELISM_CONFIG_{k}": v for k, v in sizes.items()}, ACCELERATE_USE_PARALLELISM_CONFIG="true"
    )
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    groups = init_parallel_groups(tp, "cpu")
    accelerator = Accelerator(cpu=True)
    model = GPT(**cfg, tp_group=groups.tp_group if tp > 1 else None)
    shard_data_parallel(model, data_parallel_mesh("cpu", 1, world // tp, tp))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = list(model.parameters())
    prepared, prepared_optimizer = prepare(accelerator, model, optimizer, tp)
    kept = (
        getattr(prepared, "_is_accelerate_prepared", False),  # set at the end of accelerate's prepare_model
        prepared is model,
        all(a is b for a, b in zip(params, prepared.parameters(), strict=True)),
        all(a is b for a, b in zip(params, prepared_optimizer.optimizer.param_groups[0]["params"], strict=True)),
    )
    return accelerator.torch_device_mesh.mesh_dim_names, kept


@pytest.mark.parametrize("tp", [2, 1])
def test_accelerate_prepare_takes_the_fsdp2_x_tp_model_and_optimizer_as_they_are(tp):
    """tp=2: accelerate prepares the model without wrapping it. tp=1: accelerate would wrap it in DDP over all
    ranks (its TP branch is off), so only the optimizer goes through."""
    for names, kept in run_processes(4, through_accelerate, CFG, tp):
        assert names == (("dp_shard", "tp") if tp == 2 else ("dp_shard",))
        assert kept == (tp == 2, True, True, True)  # prepared?, not wrapped, the same parameters, optimizer on them
