"""Export a training checkpoint as one unsharded model file (`GPT.save` format), in one process.

    python -m train.export CHECKPOINT [OUT]      (also: tp-export)

CHECKPOINT is a `checkpoints/step_N` directory (`step_1000` or `step_00001000`) or a run directory
(its newest intact checkpoint). OUT defaults to `<run dir>/export-step_<N>`. The run's tokenizer.json
(BPE) is copied alongside. The same as `python -m train.convert CHECKPOINT OUT --to export`, with OUT
defaulted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.checkpoints.sources import load_source
from train.cli import command_errors
from train.config import ConfigError
from train.convert import write


def export(source: Path, out: Path | None = None) -> Path:
    """Write the model of checkpoint (or run dir) `source` to `out`; returns `out`.

    Raises:
        ConfigError: no intact checkpoint at `source`, or it is refused (its metadata names code, or it
            holds another model shape), or `out` is missing for a source that is not a checkpoint.
    """
    loaded = load_source(source)
    if out is None:
        if loaded.step is None:
            raise ConfigError(f"{source} is not a training checkpoint: name OUT, or use train.convert")
        out = loaded.run_dir / f"export-{loaded.path.name}"
    return write(loaded, out, "export")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    args = parser.parse_args()
    with command_errors("export"):
        print(f"wrote {export(args.checkpoint, args.out)}")


if __name__ == "__main__":
    main()
