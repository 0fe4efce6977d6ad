"""Hugging Face checkpoints: GPT2LMHeadModel and LlamaForCausalLM (transformers' own code, built from small
configs) loaded at tp 1, 2, 4 give their logits, loss and greedy tokens; what we save, transformers loads."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")


from tests.helpers import CASES, LLAMA3_SCALING, gpt_batch, spiky  # noqa: E402
from tp_attention import full_state_dict, load_full_state_dict  # noqa: E402
from tp_attention.hf import config_from_hf, load_weights, read_config  # noqa: E402
from tp_attention.model import GPT, GPTConfig  # noqa: E402
from tp_attention.testing import assert_close, run_threaded  # noqa: E402
from train.config import compose_config  # noqa: E402

LOGITS = dict(rtol=1e-5, atol=1e-5)
SMALL = dict(vocab_size=65, max_position_embeddings=32, initializer_range=0.3)  # 0.3: far from uniform logits
HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=65, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3
    ),  # activation gelu_new, LayerNorm eps 1e-5, tied: GPT-2's own
    "llama-gqa": lambda: transformers.LlamaConfig(
        **SMALL,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
    ),  # at tp=4 each of the two KV heads is replicated on two ranks
    "llama3-scaled-tied": lambda: transformers.LlamaConfig(
        **SMALL,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        rope_scaling=dict(LLAMA3_SCALING),  # a copy: transformers adds rope_theta to the dict it is given
    ),
}


def hf_model(name: str, directory):
    """A transformers model of config `name` with seeded random weights, saved to `directory`."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]()).eval()
    model.save_pretrained(directory)
    return model


def ours_at_tp(rank, world, directory, idx):
    model = GPT.from_pretrained(directory, tp_group=dist.group.WORLD)
    return model(idx).detach(), model(idx[:, :-1], idx[:, 1:]).detach()


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_checkpoint_loads_at_any_tp_with_its_logits_and_loss(tmp_path, name):
    reference = hf_model(name, tmp_path)
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = reference(idx, labels=idx)  # transformers shifts the labels itself
    for tp in (1, 2, 4):
        for rank, (logits, loss) in enumerate(run_threaded(tp, ours_at_tp, tmp_path, idx)):
            assert_close(logits, out.logits, **LOGITS, what=f"{name} logits at tp={tp}, rank {rank}")
            assert_close(loss, out.loss, **LOGITS, what=f"{name} loss at tp={tp}, rank {rank}")


def greedy_at_tp(rank, world, directory, idx, mask):
    model = GPT.from_pretrained(directory, tp_group=dist.group.WORLD)
    return model.generate(idx, 20), model.generate(idx, 20, attention_mask=mask)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_greedy_generation_equals_transformers_generate_also_left_padded(tmp_path, name):
    reference = hf_model(name, tmp_path)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(1, 65, (2, 6), generator=gen)
    mask = torch.ones_like(idx)
    mask[1, :3] = 0  # row 1 is a 3-token prompt, left-padded
    padded = idx.masked_fill(mask == 0, 0)
    options = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    expected = reference.generate(idx, attention_mask=torch.ones_like(idx), **options)
    expected_padded = reference.generate(padded, attention_mask=mask, **options)
    alone = reference.generate(idx[1:, 3:], attention_mask=torch.ones(1, 3, dtype=torch.long), **options)
    assert torch.equal(expected_padded[1, 3:], alone[0]), "transformers: a left-padded row continues as alone"
    assert len(set(expected[0, 6:].tolist())) >= 3, "decoding should not collapse to one token"
    for tp in (1, 2):
        for plain, with_mask in run_threaded(tp, greedy_at_tp, tmp_path, padded, mask):
            assert torch.equal(with_mask, expected_padded), f"{name} left-padded batch at tp={tp}"
            assert torch.equal(plain[0], expected[0]), f"{name} unpadded row at tp={tp}"


def save_at_tp(rank, world, cfg, state, directory, max_shard_bytes):
    model = GPT(**cfg, tp_group=dist.group.WORLD, generator=torch.Generator())
    load_full_state_dict(model, state)
    model.save_pretrained(directory, max_shard_bytes=max_shard_bytes)
    return model(PROMPT).detach()


PROMPT = torch.arange(10)[None] % 60
ROUND_TRIP = {  # name: (config, max_shard_bytes); 20 kB splits the file into several plus an index
    "gpt2-gelu_tanh": (dict(CASES["base"], activation="gelu_tanh"), 2**30),
    "llama-untied": (CASES["llama"], 2**30),
    "llama3-scaled-sharded-files": (
        dict(CASES["llama"], tie_embeddings=True, rope_scaling=LLAMA3_SCALING),
        20_000,
    ),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_what_we_save_at_tp2_transformers_loads_bitwise(tmp_path, name):
    cfg, max_shard_bytes = ROUND_TRIP[name]
    model = spiky(cfg)
    logits = run_threaded(2, save_at_tp, cfg, model.state_dict(), tmp_path, max_shard_bytes)[0]
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_shard_bytes < 2**30:
        assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file(), files
    else:
        assert files == ["model.safetensors"]
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    with torch.no_grad():
        assert_close(theirs(PROMPT).logits, logits, **LOGITS, what=f"{name}: transformers' logits")
    back = GPT.from_pretrained(tmp_path)
    assert back.config == model.config
    for key, tensor in full_state_dict(model).items():
        assert torch.equal(full_state_dict(back)[key], tensor), f"{name}: {key} after the round trip"


def test_unsupported_configs_and_tensors_are_refused_by_name(tmp_path):
    llama = HF_CONFIGS["llama-gqa"]().to_dict()
    for change, message in [
        (dict(model_type="mistral"), "model_type = 'mistral' is not supported: gpt2"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type = 'yarn' is not supported"),
        (dict(hidden_act="gelu"), "Llama config fields not supported: hidden_act = 'gelu'"),
    ]:
        hf = {**llama, **change}
        hf.pop("rope_parameters", None) if "rope_scaling" in change else None
        with pytest.raises(ValueError, match=message):
            config_from_hf(hf)
    gpt2 = HF_CONFIGS["gpt2"]().to_dict()
    with pytest.raises(ValueError, match="GPT-2 config fields not supported: activation_function = 'relu'"):
        config_from_hf({**gpt2, "activation_function": "relu"})

    neither = GPT(**dict(CASES["base"], norm="rmsnorm"))  # learned positions with RMSNorm: no HF layout
    with pytest.raises(ValueError, match="GPT-2 needs norm = 'layernorm'; Llama needs position = 'rope'"):
        neither.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()

    hf_model("llama-gqa", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"model.layers.2.self_attn.q_proj.weight: missing"):
        GPT.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight: not used"):
        GPT.from_pretrained(tmp_path / "m")


def test_padded_rows_equal_the_rows_alone_and_the_loss_skips_pads():
    def run(rank, world, cfg, state):
        model = GPT(**cfg, tp_group=dist.group.WORLD, generator=torch.Generator())
        load_full_state_dict(model, state)
        idx, targets = gpt_batch(cfg, batch=2, seq=10)
        mask = torch.ones_like(idx)
        mask[1, :4] = 0
        padded = model(idx, attention_mask=mask).detach()
        alone = model(idx[1:, 4:]).detach()
        loss = model(idx, targets, attention_mask=mask).detach()
        rows = [model(idx[:1]).detach()[0], alone[0]]
        wanted = [targets[0], targets[1, 4:]]
        expected = F.cross_entropy(torch.cat(rows), torch.cat(wanted), ignore_index=-100)
        return padded[1, 4:], alone[0], loss, expected

    for case in ("base", "llama"):
        ref = GPT(**CASES[case], generator=torch.Generator().manual_seed(0))
        for padded, alone, loss, expected in run_threaded(2, run, CASES[case], ref.state_dict()):
            assert_close(padded, alone, **LOGITS, what=f"{case}: a left-padded row vs alone")
            assert_close(loss, expected, **LOGITS, what=f"{case}: loss over the real tokens only")


LLAMA_3_2_1B = {  # the config.json Meta published with Llama-3.2-1B
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "vocab_size": 128256,
}

LLAMA_3_1_8B = {  # the config.json Meta published with Llama-3.1-8B (the keys that shape the model)
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}
LLAMA_3_1_70B = LLAMA_3_1_8B | {  # Llama-3.1-70B's config.json differs in these
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
}


def preset(name: str) -> GPTConfig:
    """The model `python -m train model=<name>` builds (vocab_size is set by these presets)."""
    model = compose_config([f"model={name}"]).model
    return model.gpt_config(model.vocab_size)


@pytest.mark.parametrize(
    "name, hf",
    [
        ("gpt2", lambda: transformers.GPT2Config()),
        ("llama3_1b", lambda: LLAMA_3_2_1B),
        ("llama3_8b", lambda: LLAMA_3_1_8B),
        ("llama3_70b", lambda: LLAMA_3_1_70B),
    ],
)
def test_model_presets_are_the_published_models(name, hf):
    ours = preset(name)
    config = hf() if isinstance(hf(), dict) else hf().to_dict()
    expected = config_from_hf(config)
    assert ours == dataclasses.replace(expected, max_seq_len=ours.max_seq_len)  # max_seq_len: our KV-cache capacity
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
        model = GPT.from_config(ours)
    published = sum(p.numel() for p in theirs.parameters())
    assert (
        model.num_parameters(exclude_position_embeddings=False) == published
    )  # 124,439,808 / 1,235,814,400 / 8,030,261,248 / 70,553,706,496


def meta_model_filled(rank, world, directory, idx):
    cfg = dataclasses.replace(read_config(directory), dropout=0.3)  # the trainer's dropout, the checkpoint's shape
    with torch.device("meta"):
        model = GPT.from_config(cfg, tp_group=dist.group.WORLD)
    load_weights(model, directory)
    return model.eval()(idx).detach(), [str(p.device) for p in model.parameters()]


def test_the_trainer_s_loader_fills_a_model_built_on_the_meta_device(tmp_path):
    reference = hf_model("llama-gqa", tmp_path)
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
    for logits, devices in run_threaded(2, meta_model_filled, tmp_path, idx):
        assert set(devices) == {"cpu"}
        assert_close(logits, expected, **LOGITS, what="meta-built model after load_weights")


def test_the_gpt2_preset_is_gpt2_124m_forward_included(tmp_path):
    """GPT-2 124M itself (transformers' GPT2Config(), random weights): our `model=gpt2` shape, its logits."""
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    reference.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config == preset("gpt2")
    idx = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(idx), reference(idx).logits, **LOGITS, what="GPT-2 124M logits")


def test_gpt2_as_the_hub_stores_it_without_the_transformer_prefix(tmp_path):
    """openai-community/gpt2's model.safetensors names its tensors `wte.weight`, `h.0.attn.c_attn.weight`, ..."""
    from safetensors.torch import load_file, save_file

    reference = hf_model("gpt2", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, tmp_path / "model.safetensors")
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(GPT.from_pretrained(tmp_path)(idx), reference(idx).logits, **LOGITS, what="Hub-named GPT-2")


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    model = GPT(**CASES["llama"]).to(torch.bfloat16)
    rotary = model._decoders[0]._attention.rotary
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, GPT(**CASES["llama"])._decoders[0]._attention.rotary.inv_freq)
