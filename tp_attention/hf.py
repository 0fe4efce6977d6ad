"""Hugging Face checkpoints in and out: `GPT2LMHeadModel` and `LlamaForCausalLM` directories, at any tp.

    GPT.from_pretrained(path, tp_group=...)   config.json + model.safetensors (or a sharded index)
    model.save_pretrained(path)               a directory transformers' from_pretrained loads

Loading builds the model on the meta device and gives each parameter only this rank's slice, read with
safetensors' `get_slice`, so a rank's peak memory is about its shard, not the model. Saving gathers one
tensor at a time; global rank 0 writes them, a file (`max_shard_bytes`) at a time. Names and layouts:

    GPT-2   transformer.wte / wpe / h.{i}.ln_1 / attn.c_attn / attn.c_proj / ln_2 / mlp.c_fc / mlp.c_proj / ln_f
            (Conv1D: weights stored [in, out]; c_attn holds Q, K and V side by side)
    Llama   model.embed_tokens / layers.{i}.input_layernorm / self_attn.{q,k,v,o}_proj /
            post_attention_layernorm / mlp.{gate,up,down}_proj / norm, lm_head (when untied)

A config field these layouts cannot honour is refused by name (`ValueError`), never silently dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tp_attention.config import GPTConfig
from tp_attention.groups import tp_rank, tp_size
from tp_attention.rope import RotaryEmbedding
from tp_attention.sharding import ShardSpec
from tp_attention.state_dict import current_name, gather_shard, sharded_parameters, unshard_data_parallel

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
GPT2_EOS = 50256
IGNORED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # buffers older exports carry


def _refuse(problems: dict[str, Any], kind: str) -> None:
    bad = [f"{name} = {value!r}" for name, value in problems.items() if value is not None]
    if bad:
        raise ValueError(f"{kind} config fields not supported: {', '.join(bad)}")


def _gpt2_config(hf: dict[str, Any]) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    _refuse(
        {
            "activation_function": None if act in GPT2_ACTIVATIONS else act,
            "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx") or None,
            "reorder_and_upcast_attn": hf.get("reorder_and_upcast_attn") or None,
            "scale_attn_weights": None if hf.get("scale_attn_weights", True) else False,
            "add_cross_attention": hf.get("add_cross_attention") or None,
        },
        "GPT-2",
    )
    emb, heads = hf.get("n_embd", 768), hf.get("n_head", 12)
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        max_seq_len=hf.get("n_positions", 1024),
        emb_size=emb,
        num_heads=heads,
        head_size=emb // heads,
        num_layers=hf.get("n_layer", 12),
        dropout=0.0,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        activation=GPT2_ACTIVATIONS[act],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        intermediate_size=hf.get("n_inner"),  # None: 4 * n_embd, as ffn_mult's default gives
    )


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """`(rope_theta, rope_scaling)` from either config format: transformers 5's `rope_parameters`, or the
    older `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"Llama config field rope_scaling rope_type = {kind!r} is not supported: default, llama3")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {"rope_type": "llama3", **{k: params[k] for k in keys if k in params}}


def _llama_config(hf: dict[str, Any]) -> GPTConfig:
    act = hf.get("hidden_act", "silu")
    _refuse(
        {
            "hidden_act": None if act == "silu" else act,
            "pretraining_tp": None if (hf.get("pretraining_tp") or 1) == 1 else hf["pretraining_tp"],
        },
        "Llama",
    )
    emb, heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        emb_size=emb,
        num_heads=heads,
        head_size=hf.get("head_dim") or emb // heads,
        num_layers=hf["num_hidden_layers"],
        dropout=0.0,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        bias=False,
        attention_bias=True if hf.get("attention_bias") else None,  # None: `bias`, False here
        mlp_bias=True if hf.get("mlp_bias") else None,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        intermediate_size=hf["intermediate_size"],
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
    )


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """Our GPTConfig from a Hugging Face `config.json` of a GPT-2 or Llama model.

    Raises:
        ValueError: another model type, or a field that cannot be honoured (named).
    """
    kind = hf.get("model_type")
    if kind == "gpt2":
        return _gpt2_config(hf)
    if kind == "llama":
        return _llama_config(hf)
    raise ValueError(f"model_type = {kind!r} is not supported: gpt2 (GPT2LMHeadModel) or llama (LlamaForCausalLM)")


def is_hf_directory(path: Path) -> bool:
    """A directory whose config.json names a Hugging Face `model_type` (our own export's has none)."""
    config = path / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text())


def read_config(path: Path) -> GPTConfig:
    """The GPTConfig of the Hugging Face directory at `path`.

    Raises:
        FileNotFoundError: no config.json there.
        ValueError: as for `config_from_hf`.
    """
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    return config_from_hf(json.loads(config.read_text()))


def architecture(cfg: GPTConfig) -> str:
    """`gpt2` or `llama`: the Hugging Face layout that expresses `cfg`.

    Raises:
        ValueError: neither does (the fields in the way named for each).
    """
    gpt2 = {
        "position = 'learned'": cfg.position == "learned",
        "norm = 'layernorm'": cfg.norm == "layernorm",
        "activation in (gelu, gelu_tanh)": cfg.activation in ("gelu", "gelu_tanh"),
        "num_kv_heads = num_heads": cfg.kv_heads == cfg.num_heads,
        "emb_size = num_heads * head_size": cfg.emb_size == cfg.num_heads * cfg.head_size,
        "bias (all of them)": cfg.bias and cfg.attn_bias and cfg.ffn_bias,
    }
    if all(gpt2.values()):
        return "gpt2"
    llama = {
        "position = 'rope'": cfg.position == "rope",
        "norm = 'rmsnorm'": cfg.norm == "rmsnorm",
        "activation = 'swiglu'": cfg.activation == "swiglu",
    }
    if all(llama.values()):
        return "llama"
    missing = [", ".join(k for k, ok in table.items() if not ok) for table in (gpt2, llama)]
    raise ValueError(
        f"this GPTConfig fits neither Hugging Face layout: GPT-2 needs {missing[0]}; Llama needs {missing[1]}"
    )


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` of `cfg` (see `architecture`)."""
    if architecture(cfg) == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.emb_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": None if cfg.hidden_size == 4 * cfg.emb_size else cfg.hidden_size,
            "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": GPT2_EOS if cfg.vocab_size > GPT2_EOS else None,  # GPT-2's <|endoftext|>
            "eos_token_id": GPT2_EOS if cfg.vocab_size > GPT2_EOS else None,
            "dtype": "float32",
        }
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_size,
        "intermediate_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,  # transformers 5; 4.x reads the two below
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "attention_bias": cfg.attn_bias,
        "mlp_bias": cfg.ffn_bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "dtype": "float32",
    }


@dataclass(frozen=True)
class Source:
    """Where one of our (unsharded) tensors lives in the checkpoint: HF tensor `name`, transposed
    (GPT-2's Conv1D stores `[in, out]`), and only `rows` of our first dim (Q, K or V of GPT-2's c_attn)."""

    name: str
    transpose: bool = False
    rows: tuple[int, int] | None = None


def _gpt2_sources(cfg: GPTConfig) -> dict[str, Source]:
    e = cfg.emb_size
    out = {
        "_token_embeddings.weight": Source("transformer.wte.weight"),
        "_position_embeddings.weight": Source("transformer.wpe.weight"),
        "_norm.weight": Source("transformer.ln_f.weight"),
        "_norm.bias": Source("transformer.ln_f.bias"),
    }
    linears = (("attn.c_proj", "_attention._layer"), ("mlp.c_fc", "_ff._up"), ("mlp.c_proj", "_ff._down"))
    for i in range(cfg.num_layers):
        hf, ours = f"transformer.h.{i}.", f"_decoders.{i}."
        for part, rows in zip("qkv", ((0, e), (e, 2 * e), (2 * e, 3 * e)), strict=True):
            out[f"{ours}_attention._{part}.weight"] = Source(f"{hf}attn.c_attn.weight", True, rows)
            out[f"{ours}_attention._{part}.bias"] = Source(f"{hf}attn.c_attn.bias", False, rows)
        for theirs, mine in linears:
            out[f"{ours}{mine}.weight"] = Source(f"{hf}{theirs}.weight", True)
            out[f"{ours}{mine}.bias"] = Source(f"{hf}{theirs}.bias")
        for theirs, mine in (("ln_1", "_norm1"), ("ln_2", "_norm2")):
            out |= {f"{ours}{mine}.{p}": Source(f"{hf}{theirs}.{p}") for p in ("weight", "bias")}
    return out


def _llama_sources(cfg: GPTConfig) -> dict[str, Source]:
    out = {"_token_embeddings.weight": Source("model.embed_tokens.weight"), "_norm.weight": Source("model.norm.weight")}
    pairs = {
        "self_attn.q_proj": "_attention._q",
        "self_attn.k_proj": "_attention._k",
        "self_attn.v_proj": "_attention._v",
        "self_attn.o_proj": "_attention._layer",
        "mlp.gate_proj": "_ff._gate",
        "mlp.up_proj": "_ff._up",
        "mlp.down_proj": "_ff._down",
        "input_layernorm": "_norm1",
        "post_attention_layernorm": "_norm2",
    }
    for i in range(cfg.num_layers):
        for theirs, mine in pairs.items():
            for p in ("weight", "bias"):  # a bias only where the model has one
                out[f"_decoders.{i}.{mine}.{p}"] = Source(f"model.layers.{i}.{theirs}.{p}")
    return out


def sources(cfg: GPTConfig, kind: str) -> dict[str, Source]:
    """Our parameter names -> their places in a `kind` (gpt2 | llama) checkpoint."""
    out = _gpt2_sources(cfg) if kind == "gpt2" else _llama_sources(cfg)
    if not cfg.tie_embeddings:
        out["_lm_head.weight"] = Source("lm_head.weight")
    return out


class SafetensorsFiles:
    """The tensors of `model.safetensors` (or of the file `directory` names), or of the files
    `model.safetensors.index.json` lists, opened lazily.

    Raises:
        FileNotFoundError: neither file is in `directory`.
    """

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        if directory.is_file():  # one file, named as it is
            directory, single = directory.parent, directory.name
        else:
            single = "model.safetensors"
        self._safe_open, self.directory, self._open = safe_open, directory, {}
        index = directory / "model.safetensors.index.json"
        if index.is_file() and single == "model.safetensors":
            self.where = json.loads(index.read_text())["weight_map"]
        elif (directory / single).is_file():
            self.where = dict.fromkeys(self._file(single).keys(), single)
        else:
            raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")

    def _file(self, name: str):
        if name not in self._open:
            self._open[name] = self._safe_open(str(self.directory / name), framework="pt")
        return self._open[name]

    def slice(self, name: str):
        """A lazy view of tensor `name` (indexing it reads only the indexed part). KeyError if absent."""
        return self._file(self.where[name]).get_slice(name)


def _local_piece(files: SafetensorsFiles, source: Source, spec: ShardSpec | None, rank: int, tp: int) -> torch.Tensor:
    """This rank's piece of one of our tensors, read from the file without reading the rest."""
    view = files.slice(source.name)
    shape = view.get_shape()
    ours = list(reversed(shape)) if source.transpose else list(shape)  # our layout of the whole HF tensor
    offset = 0
    if source.rows:
        offset, ours[0] = source.rows[0], source.rows[1] - source.rows[0]
    ranges = [(0, n) for n in ours]
    pad = 0
    if spec is not None:  # this rank's chunk along spec.dim (the vocabulary is zero-padded to a multiple of tp)
        chunk = spec.padded_size(ours[spec.dim]) // spec.num_shards
        low = spec.index(rank, tp) * chunk
        high = min(low + chunk, ours[spec.dim])
        pad = low + chunk - max(high, low)
        ranges[spec.dim] = (low, max(high, low))
    ranges[0] = (ranges[0][0] + offset, ranges[0][1] + offset)
    piece = view[tuple(slice(a, b) for a, b in (reversed(ranges) if source.transpose else ranges))]
    piece = piece.t() if source.transpose else piece
    if pad:
        zeros = list(piece.shape)
        zeros[spec.dim] = pad
        piece = torch.cat([piece, piece.new_zeros(zeros)], dim=spec.dim)
    return piece.contiguous()


def load_weights(
    model: nn.Module, path: Path, dtype: torch.dtype = torch.float32, whole: Collection[str] | None = None
) -> None:
    """Give `model` (built for the checkpoint's shape, on any device, the meta device included) this
    rank's slices of the weights at `path`: a Hugging Face directory, or an export written by `GPT.save`
    (its directory or file).
    Only the slices are read. Parameters are replaced (`assign`), so build the model on the meta device
    to never hold a second copy. `whole`: the whole model's state-dict names when `model` is one pipeline stage
    of it (the other stages' tensors in the files are then expected, and not read).

    Raises:
        FileNotFoundError: no weights at `path`.
        ValueError: tensors missing, unexpected or of the wrong shape (all listed).
    """
    files = SafetensorsFiles(path)
    ours = model.state_dict(keep_vars=True)
    if is_hf_directory(path):
        kind = json.loads((path / "config.json").read_text())["model_type"]
        table = sources(model.config, kind)
        if kind == "gpt2" and "transformer.wte.weight" not in files.where and "wte.weight" in files.where:
            table = {k: replace(v, name=v.name.removeprefix("transformer.")) for k, v in table.items()}  # the Hub's
    else:
        saved = {current_name(name): name for name in files.where}  # an older export's names too
        kind, table = "GPT.save", {name: Source(saved.get(name, name)) for name in whole or ours}
    specs, local, problems, used = sharded_parameters(model), {}, [], set()
    for name, tensor in ours.items():
        spec, group = specs.get(name, (None, None))
        source = table[name]
        used.add(source.name)
        if source.name not in files.where:
            problems.append(f"{source.name}: missing")
            continue
        piece = _local_piece(files, source, spec, tp_rank(group), tp_size(group))
        if piece.shape != tensor.shape:
            problems.append(
                f"{source.name}: this rank's piece is {tuple(piece.shape)}, the model's {tuple(tensor.shape)}"
            )
        local[name] = piece.to(dtype, copy=True)  # our own memory, not a view of the file's mapping
    used |= {table[name].name for name in whole or () if name in table}  # the other stages'
    if model.config.tie_embeddings:
        used.add("lm_head.weight")  # a tied head some exports still write: the embedding itself
    unexpected = sorted(n for n in files.where if n not in used and not n.endswith(IGNORED))
    problems += [f"{n}: not used by a {kind} model of this shape" for n in unexpected]
    if problems:
        raise ValueError(f"{path} does not fit the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(local, assign=True)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset()  # its buffer is computed, not stored


def hf_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`(Hugging Face name, full tensor)` in checkpoint order, gathered one at a time (each a collective
    over the TP group: call on every rank)."""
    cfg, specs = model.config, sharded_parameters(model)
    ours = model.state_dict()
    grouped: dict[str, list[tuple[str, Source]]] = {}
    for name, source in sources(cfg, architecture(cfg)).items():
        if name in ours:
            grouped.setdefault(source.name, []).append((name, source))
    for hf_name, parts in grouped.items():
        full = []
        for name, source in parts:
            tensor = unshard_data_parallel(ours[name].detach())  # FSDP2: this rank's whole TP shard first
            tensor = gather_shard(tensor, *specs[name]) if name in specs else tensor
            full.append(tensor.t() if source.transpose else tensor)
        yield hf_name, torch.cat(full, dim=-1 if parts[0][1].transpose else 0).contiguous()  # Q|K|V: GPT-2's c_attn


def save_pretrained(model: nn.Module, path: Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """`GPT.save_pretrained`: config.json and model.safetensors (or numbered files and an index when the
    tensors exceed `max_shard_bytes`). A collective; global rank 0 writes."""
    from safetensors.torch import save_file

    config = config_to_hf(model.config)  # before any collective: a layout error raises on every rank alike
    writer = not dist.is_initialized() or dist.get_rank() == 0
    if writer:
        path.mkdir(parents=True, exist_ok=True)
    files: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, tensor in hf_tensors(model):
        if not writer:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if files[-1] and size + nbytes > max_shard_bytes:
            _write_part(files[-1], path, len(files), save_file)
            files[-1], size = dict.fromkeys(files[-1]), 0  # names kept for the index, tensors freed
            files.append({})
        files[-1][name] = tensor.cpu()
        size, total = size + nbytes, total + nbytes
    if writer:
        _finish(files, path, config, total, save_file)
    if dist.is_initialized():
        dist.barrier()
    return path


def _write_part(tensors: dict[str, torch.Tensor], path: Path, number: int, save_file) -> None:
    tmp = path / f"part-{number:05d}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})


def _finish(files: list[dict], path: Path, config: dict[str, Any], total_bytes: int, save_file) -> None:
    """Write the last file; name the files (`model.safetensors`, or `model-0000i-of-0000N` + index)."""
    for stale in [*path.glob("model*.safetensors"), path / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # an earlier export here must not mix with this one
    if len(files) == 1:
        save_file(files[0], str(path / "model.safetensors.tmp"), metadata={"format": "pt"})
        os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    else:
        _write_part(files[-1], path, len(files), save_file)
        weight_map = {}
        for number, names in enumerate(files, start=1):
            final = f"model-{number:05d}-of-{len(files):05d}.safetensors"
            os.replace(path / f"part-{number:05d}.safetensors.tmp", path / final)
            weight_map |= dict.fromkeys(names, final)
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
