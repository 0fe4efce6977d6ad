"""Export a training checkpoint as one unsharded model file (`GPT.save` format), in one process.

    python -m train.export CHECKPOINT [OUT]      (also: tp-export)

CHECKPOINT is a `checkpoints/step_N` directory (`step_1000` or `step_00001000`) or a run directory
(its newest intact checkpoint).
OUT defaults to `<run dir>/export-step_<N>`. The run's tokenizer.json (BPE) is copied alongside.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from tp_attention.model import GPT, GPTConfig
from train.checkpoints import checkpoint
from train.config import ConfigError


def export(source: Path, out: Path | None = None) -> Path:
    """Write the model of checkpoint (or run dir) `source` to `out`; returns `out`.

    Raises:
        FileNotFoundError: no intact checkpoint at `source`.
        ConfigError: the checkpoint is refused (its metadata names code, or it holds another model shape).
    """
    source = checkpoint.normalize_path(source)
    path = source if (source / checkpoint.META).is_file() else checkpoint.latest_valid([source])[0]
    problem = "no checkpoint found" if path is None else checkpoint.verify(path)
    if problem:
        raise FileNotFoundError(f"cannot export {source}: {problem}")
    run_dir = path.parent.parent
    meta = checkpoint.read_meta(path)
    model = GPT.from_config(GPTConfig(**meta["model"]))
    checkpoint.load_model(path, model)
    out = out or run_dir / f"export-{path.name}"
    model.save(out)
    if (run_dir / "tokenizer.json").is_file():
        shutil.copy(run_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    args = parser.parse_args()
    try:
        print(f"wrote {export(args.checkpoint, args.out)}")
    except (FileNotFoundError, ConfigError) as e:
        print(f"export error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
