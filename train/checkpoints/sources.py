"""A trained model to use: from a run directory, one of its checkpoints, or an export, at any tp.

    run dir      its newest intact checkpoint (or its export/ when it has no checkpoint)
    checkpoint   `<run>/checkpoints/step_N` (or `step_0000000N`)
    export       a directory (or file) written by `GPT.save`: model.safetensors + config.json
    Hugging Face a GPT-2 or Llama directory (`GPT.from_pretrained`)

The tokenizer is the one saved beside it (`tokenizer.json`, BPE), else bytes; the training config, when
there is one, comes along (the run's validation split is described by it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch.distributed.device_mesh import DeviceMesh

from tp_attention.groups import Group
from tp_attention.hf import is_hf_directory
from tp_attention.model import GPT, GPTConfig
from train.checkpoints import checkpoint
from train.config import ConfigError
from train.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer


@dataclass
class Source:
    """A loaded model with what came with it."""

    model: GPT
    tokenizer: ByteTokenizer | BPETokenizer
    path: Path  # what was loaded: the checkpoint directory, the export's file or the Hugging Face directory
    run_dir: Path | None  # the run it came from, if any
    config: dict[str, Any] | None  # that run's training config, if known
    step: int | None  # the step it was saved at (None for an export)


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    saved = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(saved), resolve=False) if saved.is_file() else None


def load_source(path: str | Path, tp_group: Group = None, mesh: DeviceMesh | None = None) -> Source:
    """The model at `path` (see the module docstring), sharded over `tp_group` (with `mesh`, its `(dp, tp)`
    mesh, for checkpoints). A collective when tp > 1.

    Raises:
        ConfigError: nothing loadable at `path`, or a checkpoint is refused.
    """
    path = checkpoint.normalize_path(Path(path).expanduser())
    if is_hf_directory(path):
        try:
            model = GPT.from_pretrained(path, tp_group)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
        return Source(model, load_tokenizer(path), path, None, None, None)
    export = path if path.suffix == ".safetensors" else path / "model.safetensors"
    if export.is_file():
        model = GPT.load(export, tp_group=tp_group)
        parent = export.parent.parent
        run_dir = parent if (parent / "checkpoints").is_dir() else None
        config = _run_config(run_dir) if run_dir else None
        return Source(model, load_tokenizer(export.parent), export, run_dir, config, None)
    found, problems = checkpoint.find_intact(path)
    if found is None and (path / "export" / "model.safetensors").is_file():
        return load_source(path / "export", tp_group, mesh)
    if found is None:
        problem = "; ".join(problems) or "nothing to load (no model.safetensors, no checkpoint)"
        raise ConfigError(f"{path}: {problem}")
    meta = checkpoint.read_meta(found)
    model = GPT.from_config(GPTConfig(**meta["model"]), tp_group=tp_group)
    checkpoint.load_model(found, model, mesh)
    run_dir = found.parent.parent
    config = meta.get("config") or _run_config(run_dir)
    return Source(model, load_tokenizer(run_dir), found, run_dir, config, meta["step"])
