"""Pieces of the training job on their own: data, TP-aware gradient norm, DCP resharding, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh

from tests.helpers import CASES, gpt_batch
from tp_attention import full_state_dict, load_full_state_dict
from tp_attention.grad_norm import clip_grad_norm_, grad_norm
from tp_attention.model import GPT
from tp_attention.state_dict import dcp_state_dict
from tp_attention.testing import assert_close, run_threaded
from train.checkpoints import checkpoint
from train.config import ConfigError, DataConfig
from train.data.corpus import prepare_data, stdlib_files, step_batch, windows


def no_barrier() -> None:
    pass


def test_stdlib_corpus_is_several_megabytes_of_python():
    files = stdlib_files()
    assert len(files) > 100 and sum(f.stat().st_size for f in files) > 3_000_000
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)


def test_text_source_splits_memmaps_and_caches(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_bytes(("hello world, " * 2000).encode() + "\xff binary \x00 bytes é".encode("latin-1"))
    cfg = DataConfig(source="text", path=str(text), cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    data = prepare_data(cfg, True, no_barrier, seq_len=32)
    assert isinstance(data.train, np.memmap) and data.vocab_size == 256
    assert len(data.train) + len(data.val) == text.stat().st_size  # bytes in, one token per byte
    assert abs(len(data.val) - 0.1 * text.stat().st_size) <= 1
    again = prepare_data(cfg, True, no_barrier, seq_len=32)
    assert again.directory == data.directory and np.array_equal(again.train, data.train)


def test_bpe_tokenizer_is_trained_and_cached_next_to_the_tokens(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    cfg = DataConfig(
        source="text", path=str(text), cache_dir=str(tmp_path / "cache"), tokenizer="bpe", bpe_vocab_size=300
    )
    data = prepare_data(cfg, True, no_barrier, seq_len=16)
    assert (data.directory / "tokenizer.json").is_file()
    assert 256 < data.vocab_size <= 300
    assert len(data.train) < 0.5 * text.stat().st_size, "BPE should compress"
    assert data.tokenizer.decode(data.tokenizer.encode("the lazy fox")) == "the lazy fox"


@pytest.mark.parametrize(
    "content,message",
    [
        (None, r"data.path = '.*missing.txt' does not exist"),
        (b"", r"corpus is empty"),
        (b"short text", r"the train split has \d+ tokens, fewer than one window of trainer.seq_len \+ 1 = 65"),
    ],
)
def test_bad_data_fails_clearly(tmp_path, content, message):
    path = tmp_path / "missing.txt"
    if content is not None:
        path = tmp_path / "data.txt"
        path.write_bytes(content)
    cfg = DataConfig(source="text", path=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=message):
        prepare_data(cfg, True, no_barrier, seq_len=64)


def test_global_batch_depends_only_on_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    whole = step_batch(tokens, 7, 1, micro_batch=8, grad_accum=1, seq_len=16, dp_rank=0, dp_size=1)[0]
    halves = [
        step_batch(tokens, 7, 1, micro_batch=4, grad_accum=1, seq_len=16, dp_rank=r, dp_size=2)[0] for r in range(2)
    ]
    accumulated = step_batch(tokens, 7, 1, micro_batch=2, grad_accum=4, seq_len=16, dp_rank=0, dp_size=1)
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([m[0] for m in accumulated]), whole[0])
    assert torch.equal(whole[1][:, :-1], whole[0][:, 1:]), "targets are the next tokens"
    other_step = step_batch(tokens, 8, 1, micro_batch=8, grad_accum=1, seq_len=16, dp_rank=0, dp_size=1)[0]
    assert not torch.equal(other_step[0], whole[0])


def test_windows_stay_inside_the_tokens():
    x, y = windows(np.arange(20, dtype=np.uint16), 500, 19, np.random.default_rng(0))
    assert x.min() == 0 and y.max() == 19


def test_grad_norm_counts_shards_and_replicas_once():
    cfg = dict(CASES["gqa"], num_kv_heads=1)  # replicated KV heads at tp=4, padded vocab 65
    ref = GPT(**cfg, generator=torch.Generator().manual_seed(0))
    idx, targets = gpt_batch(cfg)
    ref(idx, targets).backward()
    expected = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    assert_close(grad_norm(ref), expected, rtol=1e-6, atol=0.0, what="tp=1")

    def sharded(rank, world, state):
        model = GPT(**cfg, tp_group=dist.group.WORLD, generator=torch.Generator())
        load_full_state_dict(model, state)
        model(idx, targets).backward()
        before = clip_grad_norm_(model, 0.5, dist.group.WORLD)
        return before, grad_norm(model, dist.group.WORLD)

    for before, after in run_threaded(4, sharded, ref.state_dict()):
        assert_close(before, expected, rtol=1e-5, atol=0.0, what="tp=4 norm")
        assert_close(after, torch.tensor(0.5), rtol=1e-5, atol=0.0, what="clipped norm")


def save_sharded(rank, world, state, path):
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    model = GPT(**CASES["gqa"] | {"num_kv_heads": 1}, tp_group=mesh.get_group("tp"), generator=torch.Generator())
    load_full_state_dict(model, state)
    wrapped, _ = dcp_state_dict(model, model.state_dict(), mesh)
    dcp.save(wrapped, checkpoint_id=str(path))


def load_sharded(rank, world, path, dp):
    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "tp"))
    model = GPT(**CASES["gqa"] | {"num_kv_heads": 1}, tp_group=mesh.get_group("tp"), generator=torch.Generator())
    wrapped, finish = dcp_state_dict(model, model.state_dict(), mesh)
    dcp.load(wrapped, checkpoint_id=str(path))
    finish()
    return full_state_dict(model)


def test_dcp_state_dict_reshards_padded_vocab_and_replicated_kv(tmp_path):
    """Saved at tp=2, loaded at tp=4, at dp=2 x tp=2 and in one process: all exact."""
    ref = GPT(**CASES["gqa"] | {"num_kv_heads": 1}, generator=torch.Generator().manual_seed(3))
    state = ref.state_dict()
    run_threaded(2, save_sharded, state, tmp_path / "ckpt")
    for world, dp in [(4, 1), (4, 2)]:
        for full in run_threaded(world, load_sharded, tmp_path / "ckpt", dp):
            assert all(torch.equal(full[k], state[k]) for k in state)
    single = GPT(**CASES["gqa"] | {"num_kv_heads": 1})
    loaded = {f"model.{k}": v for k, v in single.state_dict().items()}
    dcp.load(
        {k.removeprefix("model."): v for k, v in loaded.items()}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True
    )
    assert all(torch.equal(single.state_dict()[k], state[k]) for k in state)


def test_checkpoint_save_is_atomic_and_verified(tmp_path):
    model = GPT(**CASES["base"])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()
    optimizer.step()
    checkpointer = checkpoint.Checkpointer(tmp_path, None, keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, model, optimizer, {"optimizer_steps": 1})
    kept = checkpoint.checkpoint_dirs(tmp_path)
    assert [p.name for p in kept] == ["step_00000002", "step_00000003"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert checkpoint.verify(kept[-1]) is None
    shard = next(kept[-1].glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    assert "bytes, expected" in checkpoint.verify(kept[-1])
    found, problems = checkpoint.latest_valid([tmp_path])
    assert found == kept[0] and problems == [f"step_00000003: {checkpoint.verify(kept[-1])}"]

    fresh = GPT(**CASES["base"])
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    assert checkpoint.load(kept[0], fresh, fresh_optimizer, None)["step"] == 2
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert torch.equal(optimizer.state[p]["exp_avg"], fresh_optimizer.state[q]["exp_avg"]), name


def test_a_load_hashes_each_file_once_and_export_is_convert_with_a_default_out(tmp_path, monkeypatch):
    from dataclasses import asdict

    from train.convert import convert
    from train.export import export

    model = GPT(**CASES["base"])
    optimizer = torch.optim.AdamW(model.parameters())
    saved = checkpoint.Checkpointer(tmp_path, None, keep=1).save(
        3, model, optimizer, {"optimizer_steps": 0, "model": asdict(model.config)}
    )
    hashed = []
    real_sha256 = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda path: hashed.append(path.name) or real_sha256(path))
    files = len(checkpoint.read_meta(saved)["files"])
    for source in (saved, tmp_path):  # the checkpoint itself, and its run directory
        hashed.clear()
        out = export(source)
        assert out == tmp_path / "export-step_00000003" and len(hashed) == len(set(hashed)) == files
    for exported in (out, convert(saved, tmp_path / "via-convert", "export")):
        assert all(torch.equal(t, model.state_dict()[k]) for k, t in GPT.load(exported).state_dict().items())
    with pytest.raises(ConfigError, match="not a training checkpoint: name OUT"):
        export(out)


def test_the_memory_report_counts_this_rank_s_tensors_and_checkpointed_blocks():
    from tp_attention.checkpointing import apply_activation_checkpointing
    from train.reporting.memory import layout_report, memory_report

    cfg = GPT(**CASES["llama"]).config
    full = layout_report(cfg, 1, micro_batch=4, seq_len=16)
    half = layout_report(cfg, 2, micro_batch=4, seq_len=16)
    assert full["parameters"] == 4 * GPT(**CASES["llama"]).num_parameters(exclude_position_embeddings=False)
    assert 0.5 <= half["parameters"] / full["parameters"] < 0.52  # the norms are replicated
    assert half["activations"] < full["activations"]
    model = GPT(**CASES["llama"])
    plain = memory_report(model, 4, 16, 1)["activations"]
    apply_activation_checkpointing(model, "full")
    assert memory_report(model, 4, 16, 1)["activations"] < plain


def test_the_memory_report_counts_one_chunk_of_the_loss_s_logits():
    """The loss builds `trainer.loss_chunk_mib` of fp32 logits at a time (thrice: logits, probabilities, their
    gradient), or all tokens' where they fit in one chunk; not the whole `[tokens, V / tp]`."""
    from tp_attention.config import GPTConfig
    from train.reporting.memory import activation_bytes

    cfg = GPTConfig(vocab_size=128256, emb_size=64, num_heads=2, head_size=32, num_layers=1)
    for tp in (1, 4):
        local_vocab = 128256 // tp
        blocks = activation_bytes(cfg, 2, 2048, tp, logits=False)
        chunk = 256 * 2**20 // (4 * local_vocab)  # tokens per 256 MiB chunk: 523 at tp=1
        assert activation_bytes(cfg, 2, 2048, tp) - blocks == 3 * 4 * chunk * local_vocab <= 3 * 256 * 2**20
        one_chunk = activation_bytes(cfg, 2, 8, tp) - activation_bytes(cfg, 2, 8, tp, logits=False)
        assert one_chunk == 3 * 4 * 16 * local_vocab  # 16 tokens fit in one chunk
        smaller = activation_bytes(cfg, 2, 2048, tp, loss_chunk_bytes=2**20) - blocks
        assert smaller == 3 * 4 * (2**20 // (4 * local_vocab)) * local_vocab


def test_the_loss_chunk_size_is_a_memory_knob_not_another_experiment():
    """`trainer.loss_chunk_mib` changes how the loss is computed, not what: the run directory (the experiment's
    fingerprint) does not depend on it, so a run started before the knob existed continues."""
    from hydra import compose, initialize_config_dir

    from train.config import CONF_DIR, register
    from train.run.identity import experiment, fingerprint

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        default, chunked = (compose("config", overrides) for overrides in ([], ["trainer.loss_chunk_mib=1"]))
    assert fingerprint(experiment(default)) == fingerprint(experiment(chunked))
