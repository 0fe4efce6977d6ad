"""`model.init_from=PATH`: fine-tune a Hugging Face model (GPT-2, Llama) or one of our exports.

The checkpoint decides the model's shape (its config.json); the training config may change only
`model.dropout`. An explicit `model.X=...` override that disagrees with the checkpoint is refused by
name rather than ignored. The resolved shape is written into the run's config (so `train.rerun` and
the run record show the real model), the directory's `tokenizer.json`, when it has one, tokenizes
the data (`data.tokenizer_file`), and the weights are loaded shard by shard once the model is built.
A resumed checkpoint replaces them (the fine-tuning run continues where it stopped).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from tp_attention.hf import is_hf_directory, read_config
from tp_attention.model import GPTConfig
from train.config import ConfigError
from train.data.tokenizer import TOKENIZER_FILE

TRAINING_FIELDS = ("init_from", "dropout")  # model.* fields the training config keeps


def checkpoint_config(path: Path) -> GPTConfig:
    """The GPTConfig of the Hugging Face directory or `GPT.save` export at `path`.

    Raises:
        ConfigError: neither is there, or its config cannot be honoured (the field named).
    """
    try:
        if is_hf_directory(path):
            return read_config(path)
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return GPTConfig.from_mapping(json.loads((path / "config.json").read_text()))
    except ValueError as e:
        raise ConfigError(f"model.init_from = {str(path)!r}: {e}") from None
    raise ConfigError(
        f"model.init_from = {str(path)!r} is neither a Hugging Face model directory (config.json with a "
        "model_type, model.safetensors) nor an export (config.json + model.safetensors)"
    )


def overridden_fields(overrides: list[str], section: str) -> set[str]:
    """The `<section>.X` fields set on the command line (`X=`, `+X=`, `++X=`)."""
    keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides)
    return {key.removeprefix(f"{section}.") for key in keys if key.startswith(f"{section}.")}


def apply_init_from(cfg: DictConfig, overrides: list[str]) -> None:
    """Put the shape of `cfg.model.init_from`'s checkpoint into `cfg.model` (in place); nothing to do
    without one.

    Raises:
        ConfigError: nothing loadable there, or an explicit override contradicts the checkpoint (named).
    """
    if not cfg.model.init_from:
        return
    path = Path(cfg.model.init_from).expanduser()
    shape = {k: v for k, v in asdict(checkpoint_config(path)).items() if k not in TRAINING_FIELDS}
    conflicts = [
        f"model.{name} = {cfg.model[name]!r} (it has {shape[name]!r})"
        for name in sorted(overridden_fields(overrides, "model") & set(shape))
        if cfg.model[name] != shape[name]
    ]
    if conflicts:
        raise ConfigError(
            f"model.init_from = {str(path)!r} fixes the model's shape; drop the overrides that contradict "
            f"it: {', '.join(conflicts)}"
        )
    for name, value in shape.items():
        cfg.model[name] = value
    if (path / TOKENIZER_FILE).is_file() and not cfg.data.tokenizer_file:
        cfg.data.tokenizer_file = str(path / TOKENIZER_FILE)
