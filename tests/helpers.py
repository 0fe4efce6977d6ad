"""What several test modules share: reference layers and models, collective counting, training-job runs.

The multi-rank machinery itself is the public kit, `tp_attention.testing`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

from tp_attention import MultiHeadAttention
from tp_attention.fsdp import shard_data_parallel
from tp_attention.groups import Group, TPGroup
from tp_attention.model import GPT
from tp_attention.testing import assert_close

ROOT = Path(__file__).resolve().parent.parent
FP32 = dict(rtol=1e-5, atol=1e-6)  # element-wise; atol: gradients that are zero in exact arithmetic keep ~1e-7
BF16 = dict(rtol=2e-2, atol=2e-2)  # bf16 keeps 8 mantissa bits; sharded sums are added in another order

# ---------------------------------------------------------------- attention
ATTENTION = dict(num_heads=4, emb_size=32, head_size=8, max_seq_len=16, dropout=0.0)
MASKS = ["none", "key_padding_bool", "key_padding_int", "tt_bool", "btt_bool", "bhtt_bool", "additive"]


def make_mask(kind: str, batch: int, heads: int, seq: int, gen: torch.Generator) -> torch.Tensor | None:
    """A mask of each accepted kind; key padding hides the first keys of sequence 0 entirely."""
    if kind == "none":
        return None
    if kind in ("key_padding_bool", "key_padding_int"):
        mask = torch.ones(batch, seq, dtype=torch.bool)
        mask[0, :2] = False  # with causal, query 0 of sequence 0 then sees no key at all
        return mask if kind == "key_padding_bool" else mask.long()
    shapes = {"tt_bool": (seq, seq), "btt_bool": (batch, seq, seq), "bhtt_bool": (batch, heads, seq, seq)}
    if kind in shapes:
        mask = torch.rand(shapes[kind], generator=gen) > 0.3
        mask[..., 0] = True
        return mask
    if kind == "additive":
        bias = torch.randn(batch, heads, seq, seq, generator=gen)
        return bias.masked_fill(torch.rand(batch, heads, seq, seq, generator=gen) > 0.7, float("-inf"))
    raise ValueError(kind)


def attention_case(cfg: dict, mask_kind: str, batch: int = 3, seq: int = 7, seed: int = 0):
    """An unsharded layer, an input and a mask, from one seed."""
    gen = torch.Generator().manual_seed(seed)
    ref = MultiHeadAttention(**cfg, generator=gen)
    x = torch.randn(batch, seq, cfg["emb_size"], generator=gen)
    return ref, x, make_mask(mask_kind, batch, cfg["num_heads"], seq, gen)


def naive_attention(mha: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Head-by-head attention written out longhand from an unsharded layer's weights."""
    batch, seq, _ = x.shape
    d, group = mha.head_size, mha.num_heads // mha.num_kv_heads
    outs = []
    for h in range(mha.num_heads):
        kv = h // group
        q = x @ mha._q.weight[h * d : (h + 1) * d].T + mha._q.bias[h * d : (h + 1) * d]
        k = x @ mha._k.weight[kv * d : (kv + 1) * d].T + mha._k.bias[kv * d : (kv + 1) * d]
        v = x @ mha._v.weight[kv * d : (kv + 1) * d].T + mha._v.bias[kv * d : (kv + 1) * d]
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, T, T)
        allowed = torch.ones(batch, seq, seq, dtype=torch.bool)
        if mha.causal:
            allowed &= torch.ones(seq, seq, dtype=torch.bool).tril()
        if mask is not None and mask.dim() == 2 and mask.shape == (batch, seq):
            allowed &= mask.bool()[:, None, :]
        elif mask is not None and mask.is_floating_point():
            scores = scores + mask[:, h]
        elif mask is not None:
            allowed &= {2: mask, 3: mask, 4: mask[:, h] if mask.dim() == 4 else mask}[mask.dim()]
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
        outs.append(weights @ v)
    return torch.cat(outs, dim=-1) @ mha._layer.weight.T + mha._layer.bias


# ---------------------------------------------------------------- GPT
# (world, shared_memory) for the multi-process equivalence runs: 4 ranks over gloo only with --runslow
LAYOUTS = [(2, False), (2, True), pytest.param(4, False, marks=pytest.mark.slow), (4, True)]

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
LLAMA3_SCALING["original_max_position_embeddings"] = 8  # below max_seq_len: every frequency band is in play
TINY_GPT = dict(vocab_size=64, max_seq_len=16, emb_size=32, num_heads=4, head_size=8, num_layers=2, dropout=0.0)
CASES = {
    "base": TINY_GPT,
    "vocab65": dict(TINY_GPT, vocab_size=65),
    "gqa": dict(TINY_GPT, num_kv_heads=2, vocab_size=65),
    "mqa-untied-nobias": dict(TINY_GPT, num_kv_heads=1, tie_embeddings=False, bias=False),
    "llama": dict(  # Llama's block: RMSNorm, SwiGLU (intermediate_size), RoPE, GQA, no biases, untied
        TINY_GPT,
        vocab_size=65,
        num_kv_heads=2,
        norm="rmsnorm",
        activation="swiglu",
        intermediate_size=48,
        position="rope",
        bias=False,
        tie_embeddings=False,
    ),
    "gelu_tanh-rope-llama3": dict(  # GPT-2's activation; Llama 3's scaled RoPE; biases only in the MLP
        TINY_GPT,
        activation="gelu_tanh",
        position="rope",
        rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING,
        attention_bias=False,
        norm_eps=1e-6,
    ),
}


def gpt_batch(cfg: dict, seed: int = 0, batch: int = 3, seq: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and targets (the first three of sequence 0 ignored) from one seed."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=gen)
    targets = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=gen)
    targets[0, :3] = -100
    return idx, targets


def logits_and_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two forwards of a GPT, for forward_backward: full logits (inference: compared, not
    differentiated) and the loss (training: its gradients are compared)."""
    return model(idx).detach(), model(idx, targets)


def spiky(cfg: dict, seed: int = 1) -> GPT:
    """A model with large random weights, so greedy decoding does not repeat one token."""
    model = GPT(**cfg, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


# ---------------------------------------------------------------- counting collectives
def comm_counts(counts) -> dict[str, int]:
    """Counts by collective; c10d's in-place and the functional (async) all-reduce count alike."""
    out: dict[str, int] = {}
    for op, n in counts.items():
        name = str(op).split(".")[-1]
        name = {"allreduce_": "all_reduce", "_allgather_base_": "all_gather"}.get(name, name)
        out[name] = out.get(name, 0) + n
    return {name: n for name, n in out.items() if n}


def count_collectives(step) -> tuple[dict[str, int], dict[str, int]]:
    """Process-group collectives issued by `step()` (forward and backward), split forward/backward."""
    with CommDebugMode() as mode:
        step()
    per_pass = mode.comm_module_counts["Global"]
    return comm_counts(per_pass["forward"]), comm_counts(per_pass["backward"])


@contextmanager
def count_shared_memory_calls(group: Group):
    """Yields a Counter filled, on exit, with the shared-memory collectives issued inside (empty without)."""
    shared, calls = group.shared_memory if isinstance(group, TPGroup) else None, Counter()
    before = shared.calls.copy() if shared else Counter()
    yield calls
    if shared:
        calls.update(shared.calls - before)


# ---------------------------------------------------------------- the training job
TINY_RUN = [
    "model.num_layers=2",
    "model.emb_size=64",
    "model.head_size=16",
    "model.num_heads=4",
    "trainer.seq_len=32",
    "trainer.batch_size=4",
    "trainer.log_interval=1",
    "trainer.eval_interval=5",
    "trainer.eval_batches=2",
    "trainer.checkpoint_interval=5",
    "trainer.progress=false",
    "trainer.sample_tokens=8",
    "data.max_bytes=1000000",
    "model.dropout=0.0",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
CURVE_TOL = dict(rtol=1e-5, atol=0.0)  # fp32 loss curves of different layouts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(run_id: str, cache: Path) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # torchrun, accelerate
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TP_RUN_ID=run_id,
        TP_ATTENTION_CACHE=str(cache),
        PYTHONPATH=str(ROOT),
        PATH=path,
    )


def train(
    workdir: Path,
    run_id: str,
    overrides: list[str],
    nproc: int = 1,
    command: list[str] | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run the training job in a subprocess (`command` + overrides); outputs go to workdir/runs/run_id."""
    if command is None:
        command = (
            [sys.executable, "-m", "train"]
            if nproc == 1
            else [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={nproc}",
                "-m",
                "train",
            ]
        )
    args = [*command, *TINY_RUN, f"trainer.out_dir={workdir / 'runs'}", *overrides]
    result = subprocess.run(
        args,
        env={**env_for(run_id, workdir / "cache"), **(env or {})},
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def records(run: Path) -> list[dict]:
    """The metrics records of the run directory `run`."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def metrics(workdir: Path, run_id: str) -> list[dict]:
    return records(workdir / "runs" / run_id)


def losses(workdir: Path, run_id: str) -> list[float]:
    return [r["loss"] for r in metrics(workdir, run_id)]


def rank0_log(workdir: Path, run_id: str) -> str:
    return (workdir / "runs" / run_id / "logs" / "rank0.log").read_text()


def assert_same_curve(actual: list[float], expected: list[float], what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} != {len(expected)} steps"
    assert_close(torch.tensor(actual), torch.tensor(expected), **CURVE_TOL, what=what)


class LargestAllocation(TorchDispatchMode):
    """The most elements any tensor made inside the `with` block holds."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs:  # not in place
            self.numel = max(self.numel, out.untyped_storage().nbytes() // out.element_size())
        return out


def materialised(cfg: dict, tp_group=None, mesh=None, seed: int = 5) -> tuple[GPT, int]:
    """The model built on meta (FSDP2-sharded there over `mesh`), then given its weights; the largest
    tensor allocated while drawing them."""
    with torch.device("meta"):
        model = GPT(**cfg, tp_group=tp_group)
    if mesh is not None:
        shard_data_parallel(model, mesh)
    model.to_empty(device="cpu")
    with LargestAllocation() as largest:
        model.reset_parameters(torch.Generator().manual_seed(seed))
    return model, largest.numel
