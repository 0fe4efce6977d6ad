"""Fine-tuning a Hugging Face checkpoint from the command line: `model.init_from` at tp=2 (its shape, weights
and tokenizer), then the result converted back to a directory transformers loads, and sampled."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.helpers import ROOT, env_for, rank0_log, train  # noqa: E402
from train.data.tokenizer import BPETokenizer  # noqa: E402

CORPUS = ["data.source=text", f"data.path={ROOT / 'tp_attention'}", "data.max_bytes=0"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A GPT-2 (transformers' own) of TINY_RUN's shape with a BPE tokenizer.json, as a user downloads one."""
    directory = tmp_path_factory.mktemp("hf") / "gpt2-small-test"
    text = "\n".join(p.read_text() for p in sorted((ROOT / "tp_attention").glob("*.py")))
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=320, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    BPETokenizer.train(iter([text]), 300).save(directory)
    return directory


def run(args: list[str], workdir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        env=env_for("x", workdir / "cache"),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fine_tune_at_tp2_convert_back_and_sample(tmp_path, hf_dir):
    init = [f"model.init_from={hf_dir}", *CORPUS, "trainer.max_steps=3", "optim.warmup_steps=1"]
    refused = train(tmp_path, "conflict", [*init, "model.num_layers=3"], check=False)
    assert refused.returncode == 2
    assert "drop the overrides that contradict it: model.num_layers = 3 (it has 2)" in refused.stderr

    train(tmp_path, "ft", [*init, "parallel.tp=2", "model.dropout=0.1"], nproc=2)  # TINY_RUN's shape agrees
    run_dir = tmp_path / "runs" / "ft"
    model = json.loads((run_dir / "run.json").read_text())["config"]["model"]
    assert (model["activation"], model["vocab_size"], model["dropout"]) == ("gelu_tanh", 320, 0.1)
    assert f"weights from {hf_dir}" in rank0_log(tmp_path, "ft")
    assert (run_dir / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()

    done = run(["train.convert", str(run_dir), str(tmp_path / "out"), "--to", "hf"], tmp_path)
    assert done.returncode == 0, done.stderr
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    before = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert not any(info.values()) and type(theirs).__name__ == "GPT2LMHeadModel"
    changed = [n for n, p in theirs.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert "transformer.h.0.attn.c_attn.weight" in changed, "three steps of training moved the weights"
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    done = run(["train.sample", str(tmp_path / "out"), "--prompt", "def forward", "--max-new-tokens", "8"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def forward") and len(done.stdout) > len("def forward")
