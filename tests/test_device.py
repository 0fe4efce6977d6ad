"""The sharded layers on an accelerator: attention and GPT equivalence, generation and save/load on the
device `TP_TEST_DEVICE` names (`cuda`), at tp=1 and at tp=2 with two processes sharing one GPU over gloo
(NCCL refuses two ranks on one device). The unsharded CPU fp32 model is the reference.

Run by `bench/gpu_check.sh` (`TP_TEST_DEVICE=cuda`); its dry run, a test in the default suite, runs this
module on the CPU (`TP_TEST_DEVICE=cpu`). Without the variable the module is skipped: the rest of the suite
covers the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.helpers import ATTENTION, BF16, CASES, gpt_batch, logits_and_loss, spiky
from tp_attention import MultiHeadAttention, full_state_dict, load_full_state_dict
from tp_attention.grad_norm import sync_replicated_grads
from tp_attention.model import GPT
from tp_attention.testing import Results, assert_results_close, forward_backward, run_processes

DEVICE = os.environ.get("TP_TEST_DEVICE")
pytestmark = pytest.mark.skipif(DEVICE is None, reason="set TP_TEST_DEVICE (bench/gpu_check.sh does)")
DTYPES = {"fp32": (torch.float32, dict(rtol=1e-4, atol=1e-5)), "bf16": (torch.bfloat16, BF16)}  # fp32: cuBLAS order


def on_cpu(results: Results) -> Results:
    """The results as fp32 CPU tensors, to compare with the reference."""
    outputs, input_grads = ([t.float().cpu() for t in ts] for ts in (results.outputs, results.input_grads))
    return Results(outputs, input_grads, {k: v.float().cpu() for k, v in results.param_grads.items()})


def _device() -> torch.device:
    return torch.device(DEVICE or "cpu")


def _group(world: int):
    return dist.group.WORLD if world > 1 else None


def run(world: int, fn, *args) -> list:
    """`fn(rank, world, *args)` on `world` gloo processes (in this process for one)."""
    return run_processes(world, fn, *args) if world > 1 else [fn(0, 1, *args)]


VARIANTS = [(dtype, sp) for dtype in DTYPES for sp in (False, True)]  # sequence parallelism at tp > 1 only


def gpt_on_device(rank, world, cfg, state, idx, targets) -> dict:
    """Results of every (dtype, sequence parallel) variant at this tp, in one process start."""
    out = {}
    for dtype, sequence_parallel in VARIANTS:
        if sequence_parallel and world == 1:
            continue
        group = _group(world)
        model = GPT(**cfg, tp_group=group, generator=torch.Generator(), sequence_parallel=sequence_parallel)
        load_full_state_dict(model, state)
        model = model.to(_device(), DTYPES[dtype][0])
        sync = (lambda m: sync_replicated_grads(m, m.tp_group)) if sequence_parallel else None
        inputs = (idx.to(_device()), targets.to(_device()))
        out[dtype, sequence_parallel] = on_cpu(forward_backward(model, inputs, logits_and_loss, after_backward=sync))
    return out


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", ["gqa", "llama"])
def test_gpt_on_the_device_equals_the_cpu_reference(case, tp):
    cfg = CASES[case]
    reference = GPT(**cfg, generator=torch.Generator().manual_seed(0))
    idx, targets = gpt_batch(cfg, seq=12)
    expected = forward_backward(reference, (idx, targets), logits_and_loss)
    for rank, variants in enumerate(run(tp, gpt_on_device, cfg, reference.state_dict(), idx, targets)):
        assert len(variants) == (2 if tp == 1 else 4)
        for (dtype, sp), got in variants.items():
            where = f"{case} {DEVICE} {dtype}{' sequence parallel' if sp else ''} tp={tp} rank {rank}"
            assert_results_close(got, expected, **DTYPES[dtype][1], where=where)


def attention_on_device(rank, world, state, x, mask):
    mha = MultiHeadAttention(**ATTENTION, tp_group=_group(world), generator=torch.Generator())
    load_full_state_dict(mha, state)
    mha = mha.to(_device())
    inputs = (x.to(_device()).requires_grad_(), mask.to(_device()))
    return on_cpu(forward_backward(mha, inputs))


@pytest.mark.parametrize("tp", [1, 2])
def test_attention_on_the_device_equals_the_cpu_reference(tp):
    gen = torch.Generator().manual_seed(0)
    reference = MultiHeadAttention(**ATTENTION, generator=gen)
    x = torch.randn(2, 7, ATTENTION["emb_size"], generator=gen).requires_grad_()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    expected = forward_backward(reference, (x, mask))
    for rank, got in enumerate(run(tp, attention_on_device, reference.state_dict(), x, mask)):
        assert_results_close(got, expected, **DTYPES["fp32"][1], where=f"attention {DEVICE} tp={tp} rank {rank}")


def generate_and_save(rank, world, cases, directory):
    tokens = {}
    for name, (cfg, state, prompt) in cases.items():
        model = GPT(**cfg, tp_group=_group(world), generator=torch.Generator())
        load_full_state_dict(model, state)
        model = model.to(_device())
        tokens[name] = model.generate(prompt.to(_device()), 12).cpu()
        model.save(directory / name)
    return tokens


def test_kv_cache_generation_and_a_tp2_save_loaded_at_tp1_on_the_device(tmp_path):
    models = {name: spiky(CASES[name]) for name in ("gqa", "llama")}
    prompt = torch.randint(0, 65, (2, 5), generator=torch.Generator().manual_seed(3))
    cases = {name: (CASES[name], model.state_dict(), prompt) for name, model in models.items()}
    for tokens in run(2, generate_and_save, cases, tmp_path):
        for name, model in models.items():
            expected = model.generate(prompt, 12, use_cache=False)
            assert torch.equal(tokens[name], expected), f"{name}: greedy tokens at tp=2 on {DEVICE}"
            loaded = GPT.load(tmp_path / name).to(_device())
            assert torch.equal(loaded.generate(prompt.to(_device()), 12).cpu(), expected), f"{name} loaded at tp=1"
            for key, tensor in full_state_dict(loaded).items():
                assert torch.equal(tensor.cpu(), full_state_dict(model)[key]), f"{name}: {key}"
