"""The training job end to end: configs, layouts that must agree, resume, multi-node, accelerate launch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from tests.helpers import ROOT, TINY_RUN, assert_same_curve, env_for, free_port, losses, metrics, rank0_log, train
from tp_attention.model import GPT
from tp_attention.testing import assert_close
from train.config import ConfigError, compose_config, validate
from train.run.schedule import lr_at


def test_default_config_composes_and_is_valid():
    cfg = compose_config([])
    validate(cfg)
    assert (cfg.model.num_layers, cfg.model.emb_size, cfg.data.source, cfg.parallel.tp) == (4, 128, "stdlib", 1)
    small = compose_config(["model=small"]).model
    assert (small.num_layers, small.num_heads, small.emb_size) == (6, 6, 384)
    gpt2 = compose_config(["model=gpt2"]).model
    assert (gpt2.num_layers, gpt2.num_heads, gpt2.emb_size, gpt2.max_seq_len) == (12, 12, 768, 1024)


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["parallel.tp=3"], 3, r"model.num_heads = 4 must be divisible by parallel.tp = 3"),
        (
            ["model.emb_size=30", "model.ffn_mult=1", "parallel.tp=4"],
            4,
            r"model.ffn_mult \* model.emb_size = 30 must be divisible by parallel.tp = 4",
        ),
        (
            ["model.num_heads=12", "model.num_kv_heads=6", "parallel.tp=4"],
            4,
            r"model.num_kv_heads = 6 must be divisible by parallel.tp = 4 or divide it",
        ),
        (["model.num_kv_heads=3"], 1, r"model.num_heads = 4 must be divisible by model.num_kv_heads = 3"),
        (["parallel.tp=2"], 3, r"world_size = 3 must be divisible by parallel.tp = 2"),
        (
            ["parallel.tp=2", "parallel.cp=2"],
            6,
            r"world_size = 6 must be divisible by parallel.tp x parallel.cp = 2 x 2",
        ),
        (["parallel.cp=0"], 1, r"parallel.cp = 0 must be a positive integer"),
        (["parallel.pp=2"], 3, r"world_size = 3 must be divisible by parallel.pp x parallel.tp = 2 x 1"),
        (["parallel.pp=2", "model.num_layers=3"], 2, r"model.num_layers = 3 must be divisible by parallel.pp = 2"),
        (
            ["parallel.pp=2", "parallel.pp_layers=[3,2]"],
            2,
            r"parallel.pp_layers = \[3, 2\] must give each of parallel.pp = 2 stages at least one layer, "
            r"model.num_layers = 4 in all",
        ),
        (
            ["parallel.pp=2", "parallel.pp_microbatches=3"],
            2,
            r"parallel.pp_microbatches = 3 must divide trainer.batch_size / dp = 16",
        ),
        (
            ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"],
            2,
            r"parallel.pp_schedule = 'interleaved_1f1b' needs parallel.pp_virtual_stages >= 2",
        ),
        (
            ["parallel.pp=2", "parallel.pp_virtual_stages=2"],
            2,
            r"parallel.pp_virtual_stages = 2 needs an interleaved parallel.pp_schedule",
        ),
        (
            [
                "parallel.pp=2",
                "parallel.pp_virtual_stages=2",
                "parallel.pp_schedule=interleaved_1f1b",
                "model.num_layers=6",
            ],
            2,
            r"model.num_layers = 6 must be divisible by parallel.pp x parallel.pp_virtual_stages = 4",
        ),
        (
            [
                "parallel.pp=2",
                "parallel.pp_virtual_stages=2",
                "parallel.pp_schedule=interleaved_1f1b",
                "parallel.pp_microbatches=1",
            ],
            2,
            r"parallel.pp_microbatches = 1 must be a multiple of parallel.pp = 2",
        ),
        (
            ["parallel.pp=2", "trainer.micro_batch=2"],
            2,
            r"trainer.micro_batch = 2 must be trainer.batch_size / dp / parallel.pp_microbatches = 16 / 2",
        ),
        (["parallel.cp=2", "trainer.seq_len=30"], 2, r"trainer.seq_len = 30 must be a multiple of 2 \* cp = 4"),
        (
            ["parallel.cp=2", "parallel.tp=4", "parallel.sequence_parallel=true", "trainer.seq_len=36"],
            8,
            r"trainer.seq_len / parallel.cp = 36 / 2 = 18 must be divisible by parallel.tp = 4",
        ),
        (["trainer.seq_len=256"], 1, r"trainer.seq_len = 256 must be <= model.max_seq_len = 128"),
        (["trainer.micro_batch=0"], 1, r"trainer.micro_batch = 0 must be a positive integer"),
        (["trainer.sample_tokens=-1"], 1, r"trainer.sample_tokens = -1 must be an integer >= 0"),  # issue 24
        (["model.emb_size=-8"], 1, r"model.emb_size = -8 must be a positive integer"),
        (["model.dropout=1.5"], 1, r"model.dropout = 1.5 must be in \[0, 1\)"),
        (["optim.lr=-1"], 1, r"optim.lr = -1.0 must be in \(0, 10\]"),
        (["optim.lr=nan"], 1, r"optim.lr = nan must be a finite number in \(0, 10\]"),
        (["optim.lr=inf"], 1, r"optim.lr = inf must be a finite number in \(0, 10\]"),
        (["optim.beta1=1.5"], 1, r"optim.beta1 = 1.5 must be in \[0, 1\)"),
        (["optim.grad_clip=nan"], 1, r"optim.grad_clip = nan must be a finite number in \[0, 1e\+06\]"),
        (["optim.min_lr=0.01"], 1, r"optim.min_lr = 0.01 must be in \[0, 0.002\]"),
        (["parallel.timeout_s=nan"], 1, r"parallel.timeout_s = nan must be a finite number in \(0, 1e\+07\]"),
        (["trainer.spike_factor=0.5"], 1, r"trainer.spike_factor = 0.5 must be 0 \(off\) or above 1"),
        (["trainer.mixed_precision=fp8"], 1, r"trainer.mixed_precision = 'fp8' must be one of no, bf16, fp16"),
        (
            ["parallel.dp_shard=3"],
            4,
            r"parallel.dp_shard = 3 must divide dp = world_size / parallel.tp = 4 / 1 = 4",
        ),
        (
            ["parallel.dp_shard=3", "parallel.cp=2"],
            8,
            r"parallel.dp_shard = 3 must divide dp = world_size / \(parallel.tp x parallel.cp\) = 8 / 2 = 4",
        ),
        (
            ["parallel.dp_shard=2", "parallel.dp_replicate=3"],
            4,
            r"parallel.dp_replicate x parallel.dp_shard = 3 x 2 must equal dp = world_size / parallel.tp = 4",
        ),
        (["trainer.activation_checkpointing=some"], 1, r"trainer.activation_checkpointing = 'some' must be one of"),
        (["trainer.mixed_precision=fp16", "parallel.dp_shard=2"], 2, r"'fp16' with parallel.dp_shard > 1 is not"),
        (["data=text"], 1, r"data.path must name a file or directory"),
        (["data=hf"], 1, r"data.hf_name must name a dataset"),
        (["data.tokenizer=bpe", "data.bpe_vocab_size=200"], 1, r"data.bpe_vocab_size = 200 must exceed 256"),
        (
            ["parallel.sequence_parallel=true", "parallel.tp=2", "trainer.seq_len=31"],
            2,
            r"trainer.seq_len = 31 must be divisible by parallel.tp = 2 under sequence parallelism",
        ),
    ],
)
def test_bad_configs_fail_with_their_rule(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides), world)


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.max_stepz=3", "max_stepz"),
        ("trainer.max_steps=many", "max_steps"),
        ("model.dropout=high", "dropout"),
    ],
)
def test_wrong_keys_and_types_fail_in_hydra(override, message):
    with pytest.raises(ConfigCompositionException, match=message):
        compose_config([override])


def test_learning_rate_schedule():
    optim = compose_config(["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=10"]).optim
    assert lr_at(0, optim, 110) == pytest.approx(0.1)
    assert lr_at(9, optim, 110) == pytest.approx(1.0)
    assert lr_at(60, optim, 110) == pytest.approx(0.55)
    assert lr_at(110, optim, 110) == pytest.approx(0.1)
    assert all(lr_at(s, optim, 110) >= lr_at(s + 1, optim, 110) for s in range(10, 120))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def single(workdir) -> list[float]:
    """The reference: one process, global batch 8 (micro 8)."""
    train(workdir, "single", ["trainer.max_steps=10", "trainer.batch_size=8"])
    return losses(workdir, "single")


@pytest.fixture(scope="module")
def single_20_steps(workdir) -> list[float]:
    train(workdir, "single_20", ["trainer.max_steps=20", "trainer.batch_size=8"])
    return losses(workdir, "single_20")


def test_single_process_run_writes_every_output(workdir, single):
    run = workdir / "runs" / "single"
    for name in (
        "status.json",
        "metrics.jsonl",
        "loss.png",
        "sample.txt",
        "export/model.safetensors",
        "export/config.json",
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "logs/rank0.log",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events in tensorboard/"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= records[0].keys()
    assert "val_loss" in records[4] and "val_loss" in records[9] and "val_loss" not in records[0]
    assert single[-1] < single[0], "loss should fall"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["good.json", "step_00000005", "step_00000010"]
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    memory = json.loads((run / "run.json").read_text())["memory"]  # the start-up memory report
    parameters = GPT.load(run / "export").num_parameters(exclude_position_embeddings=False)
    assert memory["parameters"] == memory["gradients"] == 4 * parameters and memory["optimizer"] == 8 * parameters
    assert "memory per rank (GiB): parameters" in rank0_log(workdir, "single")


LAYOUT_RUNS = {  # activation checkpointing rides along: it must not change the curve either
    "dp1_tp2": (["parallel.tp=2"], 2),
    "dp1_tp2_sp_selective_ac": (
        ["parallel.tp=2", "parallel.sequence_parallel=true", "trainer.activation_checkpointing=selective"],
        2,
    ),
    "dp2_tp1": (["parallel.tp=1"], 2),
    "ga2_full_ac": (["trainer.micro_batch=4", "trainer.activation_checkpointing=full"], 1),
    "fsdp2_tp2_sp_full_ac": (
        [
            "parallel.dp_shard=2",
            "parallel.tp=2",
            "parallel.sequence_parallel=true",
            "trainer.activation_checkpointing=full",
        ],
        4,
    ),
    "fsdp4": (["parallel.dp_shard=4"], 4),
    "hsdp2x2": (["parallel.dp_shard=2", "parallel.dp_replicate=2"], 4),
    "cp2_tp2_sp_full_ac": (
        ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "trainer.activation_checkpointing=full"],
        4,
    ),
    "fsdp2_cp2": (["parallel.dp_shard=2", "parallel.cp=2"], 4),
    "pp2_gpipe_4_microbatches": (["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_microbatches=4"], 2),
    "pp2_tp2_sp_selective_ac": (
        [
            "parallel.pp=2",
            "parallel.tp=2",
            "parallel.sequence_parallel=true",
            "trainer.activation_checkpointing=selective",
        ],
        4,
    ),
    "pp2_fsdp2": (["parallel.pp=2", "parallel.dp_shard=2"], 4),
    "pp2_dp2": (["parallel.pp=2"], 4),  # DDP's averaging, done by hand: DDP cannot wrap a stage
    "pp2_cp2": (["parallel.pp=2", "parallel.cp=2"], 4),
}
FOUR_RANKS = [name for name, (_, nproc) in LAYOUT_RUNS.items() if nproc == 4]
SLOW = ["pp2_gpipe_4_microbatches"]  # GPipe's step is also checked against one process in tests/test_pipeline.py
IN_THE_DEFAULT_SUITE = ["cp2_tp2_sp_full_ac", "pp2_tp2_sp_selective_ac"]  # CP and PP composed with TP, 10 steps


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(name, marks=pytest.mark.slow)
        if (name in FOUR_RANKS and name not in IN_THE_DEFAULT_SUITE) or name in SLOW
        else name
        for name in LAYOUT_RUNS
    ],
)
def test_layouts_agree_with_the_single_process_run(workdir, request, layout):
    """10-step curves; 20 for the other four-rank layouts (slow), against a 20-step single-process run."""
    overrides, nproc = LAYOUT_RUNS[layout]
    steps = 20 if (layout in FOUR_RANKS and layout not in IN_THE_DEFAULT_SUITE) or layout in SLOW else 10
    reference = request.getfixturevalue("single" if steps == 10 else "single_20_steps")
    train(workdir, layout, [f"trainer.max_steps={steps}", "trainer.batch_size=8", *overrides], nproc)
    assert_same_curve(losses(workdir, layout), reference, layout)


def test_fsdp2_shards_the_state_and_its_checkpoints_load_at_other_layouts(workdir, single):
    """dp_shard=2 (FSDP2): the same curve, half the parameters per rank, and its checkpoint resumes in one
    process; a one-process checkpoint resumes under FSDP2."""
    overrides = ["trainer.max_steps=10", "trainer.batch_size=8"]
    train(workdir, "fsdp2", [*overrides, "parallel.dp_shard=2"], 2)
    assert_same_curve(losses(workdir, "fsdp2"), single, "fsdp2")
    norms = {run: [r["grad_norm"] for r in metrics(workdir, run)] for run in ("single", "fsdp2")}
    assert_same_curve(norms["fsdp2"], norms["single"], "fsdp2 gradient norms (sharded over dp_shard)")
    memory = {
        run: json.loads((workdir / "runs" / run / "run.json").read_text())["memory"] for run in ("single", "fsdp2")
    }
    assert 0.49 < memory["fsdp2"]["parameters"] / memory["single"]["parameters"] < 0.52
    assert_checkpoints_cross_layouts(workdir, single, "fsdp2", ["parallel.dp_shard=2"], 2)


def assert_checkpoints_cross_layouts(workdir, single, run: str, layout: list[str], nproc: int) -> None:
    """`run`'s step-5 checkpoint resumes in one process, and the one-process run's resumes at `layout`, both on
    the single-process curve."""
    overrides = ["trainer.max_steps=10", "trainer.batch_size=8"]
    step5 = workdir / "runs" / run / "checkpoints" / "step_5"
    train(workdir, f"{run}_to_1", [*overrides, f"trainer.resume={step5}"])
    assert_same_curve(losses(workdir, f"{run}_to_1"), single, f"{run} checkpoint resumed in one process")
    step5 = workdir / "runs" / "single" / "checkpoints" / "step_5"
    train(workdir, f"1_to_{run}", [*overrides, f"trainer.resume={step5}", *layout], nproc)
    assert_same_curve(losses(workdir, f"1_to_{run}"), single, f"one-process checkpoint resumed at {layout}")


def test_cp2_follows_the_single_process_curve_and_its_checkpoints_resume_at_other_layouts(workdir, single):
    """parallel.cp=2: the same loss and validation curve, activations per rank halved in the report; its
    checkpoint (data position, RNG) resumes in one process, and a one-process checkpoint resumes at cp=2."""
    overrides = ["trainer.max_steps=10", "trainer.batch_size=8"]
    train(workdir, "cp2", [*overrides, "parallel.cp=2"], 2)
    assert_same_curve(losses(workdir, "cp2"), single, "cp=2")
    val = {
        run: [r["val_loss"] for r in metrics(workdir, run) if r.get("val_loss") is not None]
        for run in ("single", "cp2")
    }
    assert len(val["cp2"]) == 2
    assert_same_curve(val["cp2"], val["single"], "cp=2 validation loss")
    memory = {run: json.loads((workdir / "runs" / run / "run.json").read_text())["memory"] for run in ("single", "cp2")}
    assert memory["cp2"]["activations"] < 0.55 * memory["single"]["activations"]
    assert "world 2 = dp 1 x cp 2 x tp 1" in rank0_log(workdir, "cp2")
    assert_checkpoints_cross_layouts(workdir, single, "cp2", ["parallel.cp=2"], 2)


def test_pp2_follows_the_single_process_curve_exports_the_same_model_and_its_checkpoints_cross_layouts(workdir, single):
    """parallel.pp=2 (1F1B, tied embeddings on both stages): the same loss and validation curve; the exported
    model is one process's; its checkpoint resumes in one process and a one-process checkpoint at pp=2."""
    from safetensors.torch import load_file

    train(workdir, "pp2", ["trainer.max_steps=10", "trainer.batch_size=8", "parallel.pp=2"], 2)
    assert_same_curve(losses(workdir, "pp2"), single, "pp=2")
    val = {run: [r["val_loss"] for r in metrics(workdir, run) if "val_loss" in r] for run in ("single", "pp2")}
    assert_same_curve(val["pp2"], val["single"], "pp=2 validation loss")
    exports = {run: load_file(workdir / "runs" / run / "export" / "model.safetensors") for run in ("single", "pp2")}
    assert exports["pp2"].keys() == exports["single"].keys()
    for name, tensor in exports["single"].items():
        assert_close(exports["pp2"][name], tensor, rtol=1e-4, atol=1e-6, what=f"exported {name}")
    assert (workdir / "runs" / "pp2" / "sample.txt").read_text() != ""
    log = rank0_log(workdir, "pp2")
    assert "world 2 = pp 2 (1f1b) x dp 1 x cp 1 x tp 1" in log and "pipeline stage 0 of 2: layers 0 to 0" in log
    assert max(r["grad_norm"] for r in metrics(workdir, "pp2")) > 1.0  # optim.grad_clip = 1: clipping at work
    record = {run: json.loads((workdir / "runs" / run / "run.json").read_text()) for run in ("single", "pp2")}
    stages, table = record["pp2"]["memory_stages"], 256 * 64 * 4  # the tied table, on both stages
    assert sum(s["parameters"] for s in stages) == record["single"]["memory"]["parameters"] + table
    assert_checkpoints_cross_layouts(workdir, single, "pp2", ["parallel.pp=2"], 2)


@pytest.mark.slow  # three runs; each schedule's step is checked against one process in tests/test_pipeline.py
def test_interleaved_schedules_and_pp4_follow_the_single_process_curve(workdir):
    """4 layers: pp=2 x 2 virtual stages (blocks 0 and 2 on rank 0, 1 and 3 on rank 1) under interleaved 1F1B and
    interleaved zero-bubble, and pp=4: the curve of one process; the interleaved run's checkpoint resumes at pp=4."""
    overrides = ["trainer.max_steps=10", "trainer.batch_size=8", "model.num_layers=4"]
    train(workdir, "single_4_layers", overrides)
    reference = losses(workdir, "single_4_layers")
    virtual = ["parallel.pp=2", "parallel.pp_virtual_stages=2", "parallel.pp_microbatches=4"]
    for schedule in ("interleaved_1f1b", "interleaved_zero_bubble"):
        train(workdir, f"pp2_{schedule}", [*overrides, *virtual, f"parallel.pp_schedule={schedule}"], 2)
        assert_same_curve(losses(workdir, f"pp2_{schedule}"), reference, schedule)
    train(workdir, "pp4", [*overrides, "parallel.pp=4", "parallel.pp_microbatches=4"], 4)  # 4 stages of one layer
    assert_same_curve(losses(workdir, "pp4"), reference, "pp=4")
    step5 = workdir / "runs" / "pp2_interleaved_1f1b" / "checkpoints" / "step_5"  # 2 x 2 stages, to 4 x 1
    train(workdir, "pp2x2_to_pp4", [*overrides, f"trainer.resume={step5}", "parallel.pp=4"], 4)
    assert_same_curve(losses(workdir, "pp2x2_to_pp4"), reference, "an interleaved pp=2 checkpoint resumed at pp=4")


@pytest.mark.slow  # inductor compiles for about half a minute on 2 cores
def test_pp2_under_torch_compile_follows_the_single_process_curve(workdir, single):
    """trainer.compile=true at pp=2: each stage's compiled module runs inside torch's schedule, on the same curve."""
    overrides = ["trainer.max_steps=10", "trainer.batch_size=8", "parallel.pp=2", "trainer.compile=true"]
    train(workdir, "pp2_compiled", overrides, 2)
    assert_same_curve(losses(workdir, "pp2_compiled"), single, "pp=2 under torch.compile")


@pytest.mark.slow  # a pp=2 run and four commands
def test_a_pp2_run_exports_converts_samples_and_evaluates_as_one_process_does(workdir, single):
    """train.export, train.convert --to hf, train.sample and train.evaluate read a pipeline run's checkpoint
    (every stage's tensors under the whole model's names) as they read one process's."""
    transformers = pytest.importorskip("transformers")

    def command(*args: str) -> subprocess.CompletedProcess:
        env = env_for("pp2_commands", workdir / "cache")
        done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    train(workdir, "pp2_commands", ["trainer.max_steps=10", "trainer.batch_size=8", "parallel.pp=2"], 2)
    runs = {"single": workdir / "runs" / "single", "pp2": workdir / "runs" / "pp2_commands"}
    command("train.export", str(runs["pp2"] / "checkpoints" / "step_10"), str(workdir / "pp2_exported"))
    exported, own = GPT.load(workdir / "pp2_exported").state_dict(), GPT.load(runs["pp2"] / "export").state_dict()
    assert exported.keys() == own.keys() and all(torch.equal(t, own[n]) for n, t in exported.items())
    hf = {}
    for run, path in runs.items():
        command("train.convert", str(path), str(workdir / f"{run}_hf"), "--to", "hf")
        hf[run] = transformers.AutoModelForCausalLM.from_pretrained(workdir / f"{run}_hf").state_dict()
    for name, tensor in hf["single"].items():
        assert_close(hf["pp2"][name], tensor, rtol=1e-4, atol=1e-6, what=f"Hugging Face {name}")
    sample = command("train.sample", str(runs["pp2"]), "--prompt", "def", "--max-new-tokens", "8")
    assert sample.stdout.startswith("def")
    val = {}
    for run, path in runs.items():
        command("train.evaluate", str(path), "--out", str(workdir / f"{run}_eval.json"))
        val[run] = json.loads((workdir / f"{run}_eval.json").read_text())["loss"]
    assert val["pp2"] == pytest.approx(val["single"], rel=1e-5)


@pytest.mark.slow  # a 4-rank run and three resumes
def test_a_pp2_tp2_checkpoint_resumes_at_pp1_tp1_and_pp1_tp2_and_back(workdir, single):
    overrides = ["trainer.max_steps=10", "trainer.batch_size=8"]
    train(workdir, "pp2_tp2", [*overrides, "parallel.pp=2", "parallel.tp=2"], 4)
    assert_same_curve(losses(workdir, "pp2_tp2"), single, "pp=2 x tp=2")
    step5 = workdir / "runs" / "pp2_tp2" / "checkpoints" / "step_5"
    for layout, nproc in ((["parallel.tp=1"], 1), (["parallel.tp=2"], 2)):
        run = f"pp2_tp2_to_{layout[0][-1]}"
        train(workdir, run, [*overrides, f"trainer.resume={step5}", *layout], nproc)
        assert_same_curve(losses(workdir, run), single, f"pp=2 x tp=2 checkpoint resumed at {layout}")
    back = workdir / "runs" / "pp2_tp2_to_2" / "checkpoints" / "step_10"
    train(
        workdir,
        "and_back",
        ["trainer.max_steps=12", "trainer.batch_size=8", f"trainer.resume={back}", "parallel.pp=2", "parallel.tp=2"],
        4,
    )
    assert [r["step"] for r in metrics(workdir, "and_back")][-2:] == [11, 12]


@pytest.mark.slow  # inductor compiles for about a minute on 2 cores
def test_cp2_under_torch_compile_follows_the_single_process_curve(workdir, single):
    """trainer.compile=true at cp=2: the ring runs eagerly inside the compiled model, on the same curve."""
    train(
        workdir,
        "cp2_compiled",
        ["trainer.max_steps=10", "trainer.batch_size=8", "parallel.cp=2", "trainer.compile=true"],
        2,
    )
    assert_same_curve(losses(workdir, "cp2_compiled"), single, "cp=2 under torch.compile")


def test_bf16_under_fsdp2_follows_the_fp32_curve_to_bf16_accuracy(workdir, single):
    """trainer.mixed_precision=bf16 at dp_shard=2: FSDP2 gathers bf16 parameters (tests/test_fsdp.py) and
    the curve stays within bf16 rounding of the fp32 one-process curve."""
    overrides = ["trainer.max_steps=10", "trainer.batch_size=8", "trainer.mixed_precision=bf16"]
    train(workdir, "fsdp2_bf16", [*overrides, "parallel.dp_shard=2"], 2)
    bf16 = losses(workdir, "fsdp2_bf16")
    assert bf16 != single  # bf16 rounding is in effect
    assert_close(torch.tensor(bf16), torch.tensor(single), rtol=2e-3, atol=0.0)  # measured: 2e-4


@pytest.mark.slow
def test_a_dp_shard2_x_tp2_checkpoint_resumes_at_every_layout_and_back(workdir, single):
    """(dp_replicate, dp_shard, tp) = (1, 2, 2) -> (1, 1, 1), (2, 1, 1), (1, 4, 1), (1, 1, 2), and back."""
    overrides = ["trainer.max_steps=10", "trainer.batch_size=8"]
    train(workdir, "fsdp2xtp2", [*overrides, "parallel.dp_shard=2", "parallel.tp=2"], 4)
    assert_same_curve(losses(workdir, "fsdp2xtp2"), single, "dp_shard=2 x tp=2")
    step5 = workdir / "runs" / "fsdp2xtp2" / "checkpoints" / "step_5"
    for name, layout, nproc in [
        ("to_111", [], 1),
        ("to_211", ["parallel.dp_replicate=2"], 2),
        ("to_141", ["parallel.dp_shard=4"], 4),
        ("to_112", ["parallel.tp=2"], 2),
    ]:
        train(workdir, name, [*overrides, f"trainer.resume={step5}", *layout], nproc)
        assert_same_curve(losses(workdir, name), single, f"(1, 2, 2) checkpoint resumed at {layout or 'one process'}")
    step5 = workdir / "runs" / "single" / "checkpoints" / "step_5"
    train(workdir, "to_122", [*overrides, f"trainer.resume={step5}", "parallel.dp_shard=2", "parallel.tp=2"], 4)
    assert_same_curve(losses(workdir, "to_122"), single, "one-process checkpoint resumed at (1, 2, 2)")


@pytest.mark.slow
def test_dp2_tp2_agrees_with_the_single_process_run(workdir, single):
    train(workdir, "dp2_tp2", ["trainer.max_steps=10", "trainer.batch_size=8", "parallel.tp=2"], 4)
    assert_same_curve(losses(workdir, "dp2_tp2"), single, "dp2_tp2")


def test_resume_matches_the_uninterrupted_run_and_reshards(workdir, single):
    step5 = workdir / "runs" / "single" / "checkpoints" / "step_5"  # the short form of step_00000005
    train(workdir, "resumed", ["trainer.max_steps=10", "trainer.batch_size=8", f"trainer.resume={step5}"])
    assert_same_curve(losses(workdir, "resumed"), single, "stop at 5, resume to 10")

    train(workdir, "tp2_run", ["trainer.max_steps=10", "trainer.batch_size=8", "parallel.tp=2"], 2)
    tp2_step5 = workdir / "runs" / "tp2_run" / "checkpoints" / "step_00000005"
    train(workdir, "tp2_to_tp1", ["trainer.max_steps=10", "trainer.batch_size=8", f"trainer.resume={tp2_step5}"])
    assert_same_curve(losses(workdir, "tp2_to_tp1"), single, "saved at tp=2, resumed at tp=1")
    log = (workdir / "runs" / "tp2_to_tp1" / "logs" / "rank0.log").read_text()
    assert "resumed from" in log and "saved at dp 1 x tp 2" in log


def test_export_takes_the_short_checkpoint_name(workdir, single):
    source = workdir / "runs" / "single" / "checkpoints" / "step_10"
    done = subprocess.run(
        [sys.executable, "-m", "train.export", str(source), str(workdir / "exported")],
        capture_output=True,
        text=True,
        env=env_for("export", workdir / "cache"),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    exported = GPT.load(workdir / "exported")
    final = GPT.load(workdir / "runs" / "single" / "export")  # the run's own export of step 10
    assert all(torch.equal(t, final.state_dict()[name]) for name, t in exported.state_dict().items())


@pytest.mark.slow  # resume=auto under test_long_runs covers the same path
def test_resume_auto_continues_the_latest_run(workdir):
    shutil.rmtree(workdir / "auto_runs", ignore_errors=True)
    runs = ["trainer.max_steps=10", "trainer.batch_size=8", f"trainer.out_dir={workdir / 'auto_runs'}"]
    train(workdir, "first", [*runs, "trainer.checkpoint_interval=3"])
    train(workdir, "second", [*runs, "trainer.max_steps=12", "trainer.resume=auto"])
    log = (workdir / "auto_runs" / "second" / "logs" / "rank0.log").read_text()
    assert "first/checkpoints/step_00000010" in log and "at step 10" in log
    steps = [json.loads(line)["step"] for line in (workdir / "auto_runs" / "second" / "metrics.jsonl").open()]
    assert steps == list(range(1, 13)), "metrics carried over from the run we resumed"


def test_single_node_launch_script(workdir, single):
    command = ["bash", str(ROOT / "launch" / "torchrun_single_node.sh"), "2"]
    train(workdir, "script_tp2", ["trainer.max_steps=5", "trainer.batch_size=8", "parallel.tp=2"], command=command)
    assert_same_curve(losses(workdir, "script_tp2"), single[:5], "launch/torchrun_single_node.sh, tp=2")


def test_two_nodes_on_loopback_train_at_tp2(workdir, single):
    """Two torchrun invocations (--nnodes 2, c10d rendezvous on 127.0.0.1) through the multi-node script."""
    port = free_port()
    args = [
        "bash",
        str(ROOT / "launch" / "torchrun_multi_node.sh"),
        *TINY_RUN,
        f"trainer.out_dir={workdir / 'two_nodes'}",
        "trainer.max_steps=5",
        "trainer.batch_size=8",
        "parallel.tp=2",
    ]
    procs = []
    for node in (0, 1):
        env = {
            **env_for("", workdir / "cache"),
            "NNODES": "2",
            "NODE_RANK": str(node),
            "NPROC": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RUN_ID": "two_nodes",
        }
        env.pop("TP_RUN_ID")  # both nodes must find the same run dir, named by the config
        procs.append(
            subprocess.Popen(args, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
    (run,) = (workdir / "two_nodes").iterdir()
    assert run.name.startswith("gpt-"), run.name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert_same_curve([r["loss"] for r in records], single[:5], "two nodes, tp=2")


def accelerate_config(workdir: Path, name: str, **replace: str) -> Path:
    """A copy of `launch/<name>` with a free port (and `replace`d lines)."""
    text = (ROOT / "launch" / name).read_text()
    for old, new in {"main_process_port: 2951": f"main_process_port: {free_port()}  # ", **replace}.items():
        text = text.replace(old, new)
    config = workdir / name
    config.write_text(text)
    return config


@pytest.mark.slow  # accelerate launch stays in the default suite with its parallelism_config (below)
def test_accelerate_launch_on_cpu_runs_two_processes(workdir, single):
    config = accelerate_config(workdir, "accelerate_cpu.yaml")
    command = ["bash", str(ROOT / "launch" / "accelerate.sh"), str(config)]
    env = {"ACCELERATE_USE_CPU": ""}  # the script must set it itself
    train(
        workdir,
        "accelerate",
        ["trainer.max_steps=5", "trainer.batch_size=8", "parallel.tp=2"],
        command=command,
        env=env,
    )
    assert_same_curve(losses(workdir, "accelerate"), single[:5], "accelerate launch, tp=2")
    assert (workdir / "runs" / "accelerate" / "logs" / "rank1.log").is_file()


@pytest.mark.parametrize(
    "processes, layout",
    [
        ("2", {"tp": 1, "dp_shard": 2}),  # the layout of this 2-core machine's default suite
        pytest.param("4", {"tp": 2, "dp_shard": 2}, marks=pytest.mark.slow),  # launch/accelerate_fsdp_tp_cpu.yaml
    ],
)
def test_accelerate_s_parallelism_config_sets_the_fsdp2_x_tp_layout(workdir, single, processes, layout):
    sizes = {f"parallelism_config_{k}_size: 2": f"parallelism_config_{k}_size: {v}" for k, v in layout.items()}
    config = accelerate_config(
        workdir, "accelerate_fsdp_tp_cpu.yaml", **{"num_processes: 4": f"num_processes: {processes}"}, **sizes
    )
    command = ["bash", str(ROOT / "launch" / "accelerate.sh"), str(config)]
    run = f"accelerate_fsdp_{processes}"
    train(workdir, run, ["trainer.max_steps=5", "trainer.batch_size=8"], command=command)
    assert_same_curve(losses(workdir, run), single[:5], f"accelerate launch, {layout}")
    recorded = json.loads((workdir / "runs" / run / "run.json").read_text())["config"]["parallel"]
    assert {k: recorded[k] for k in layout} == layout
    refused = train(workdir, "refused", ["parallel.tp=4"], command=command, check=False)
    assert "accelerate's parallelism_config sets the layout; drop parallel.tp = 4" in refused.stderr


def test_accelerate_s_cp_size_sets_parallel_cp(workdir, single):
    """launch/accelerate_cp_cpu.yaml: accelerate's `parallelism_config_cp_size: 2` is `parallel.cp=2`."""
    command = [
        "bash",
        str(ROOT / "launch" / "accelerate.sh"),
        str(accelerate_config(workdir, "accelerate_cp_cpu.yaml")),
    ]
    train(workdir, "accelerate_cp", ["trainer.max_steps=5", "trainer.batch_size=8"], command=command)
    assert_same_curve(losses(workdir, "accelerate_cp"), single[:5], "accelerate launch, cp=2")
    assert json.loads((workdir / "runs" / "accelerate_cp" / "run.json").read_text())["config"]["parallel"]["cp"] == 2
    assert "world 2 = dp 1 x cp 2 x tp 1" in rank0_log(workdir, "accelerate_cp")


def test_config_errors_exit_with_one_line(workdir):
    result = train(workdir, "bad", ["parallel.tp=3"], check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: world_size = 1 must be divisible by parallel.tp = 3"
    assert "Traceback" not in result.stderr
    result = train(workdir, "no_sample", ["trainer.sample_tokens=-1"], check=False)  # issue 24: was a traceback
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "config error: trainer.sample_tokens = -1 must be an integer >= 0",
    )
    assert not (workdir / "runs" / "no_sample" / "metrics.jsonl").exists(), "refused before training"


def test_a_shape_rule_has_one_message_in_the_layer_the_model_config_and_the_training_config():
    from tp_attention import MultiHeadAttention
    from tp_attention.model import GPTConfig

    rule = "num_heads = 4 must be divisible by num_kv_heads = 3"
    with pytest.raises(ValueError, match=rule):
        MultiHeadAttention(4, 32, 8, 16, num_kv_heads=3)
    with pytest.raises(ValueError, match=rule):
        GPTConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match=rule.replace("num_", "model.num_")):
        compose_config(["model.num_kv_heads=3"])


MISTYPED = {int: ["-1", "0", "1000000000000000000", "abc", "1.5"], float: ["-1", "0", "nan", "inf", "1e300", "abc"]}
ZERO_MAKES_SENSE = {  # the only mistyped values any field accepts: each its field's rule
    "model.dropout",
    "data.max_bytes",
    "optim.min_lr",
    "optim.warmup_steps",
    "optim.weight_decay",
    "optim.beta1",
    "optim.beta2",
    "optim.grad_clip",
    "optim.decay_fraction",
    "trainer.seed",
    "trainer.sample_tokens",
    "trainer.spike_factor",
}


def test_every_numeric_field_refuses_what_a_person_mistypes_in_one_line_naming_it(tmp_path):
    """Every int and float field of every config section (enumerated: a new field is tried too) against what a
    person mistypes: negative, zero, NaN, inf, absurdly large, not a number, a float for an int. Each is refused by
    what the job runs first (`precheck`, then `validate`) in one line naming the field, except a zero where the
    field's rule allows one; nothing raises anything else."""
    from dataclasses import fields

    from train.__main__ import precheck
    from train.config import SECTIONS, compose_config, validate

    accepted, unnamed = [], []
    for section, schema in SECTIONS.items():
        for field in fields(schema):
            kind = next((k for k in (int, float) if str(field.type).startswith(k.__name__)), None)
            for value in MISTYPED.get(kind, []):
                name, override = f"{section}.{field.name}", f"{section}.{field.name}={value}"
                try:
                    precheck([override, f"trainer.out_dir={tmp_path}"])
                    validate(compose_config([override]), world_size=1)
                except ConfigError as e:
                    if name not in str(e) or "\n" in str(e):
                        unnamed.append(f"{override}: {e}")
                    continue
                if not (value == "0" and name in ZERO_MAKES_SENSE):
                    accepted.append(override)
    assert accepted == [] and unnamed == []


CHOICES = {  # text fields whose value comes from a fixed list: a typo is refused
    "model.norm",
    "model.activation",
    "model.position",
    "data.source",
    "data.tokenizer",
    "optim.schedule",
    "parallel.device",
    "trainer.mixed_precision",
    "trainer.activation_checkpointing",
    "trainer.compile_backend",
    "parallel.pp_schedule",
}
FREE_TEXT = {  # names, paths (checked where they are opened), a prompt, a step range (its own rule)
    "model.init_from",
    "data.path",
    "data.hf_name",
    "data.hf_config",
    "data.hf_split",
    "data.hf_text_field",
    "data.tokenizer_file",
    "data.cache_dir",
    "trainer.resume",
    "trainer.out_dir",
    "trainer.name",
    "trainer.sample_prompt",
    "trainer.profile_steps",
}


def test_every_choice_field_refuses_a_typo_in_one_line_naming_it(tmp_path):
    """Every text field is a choice (a typo is refused, naming the field) or declared free text: a new text field
    fails this test until it is one or the other."""
    from dataclasses import fields

    from train.__main__ import precheck
    from train.config import SECTIONS, compose_config, validate

    text = {f"{s}.{f.name}" for s, schema in SECTIONS.items() for f in fields(schema) if str(f.type).startswith("str")}
    assert text == CHOICES | FREE_TEXT
    for name in sorted(CHOICES):
        with pytest.raises(ConfigError, match=rf"^{re.escape(name)} = 'bogus' ") as refused:
            precheck([f"{name}=bogus", f"trainer.out_dir={tmp_path}"])
            validate(compose_config([f"{name}=bogus"]), world_size=1)
        assert "\n" not in str(refused.value)
