"""Convert a model between our formats and Hugging Face's, in one process.

    python -m train.convert SOURCE OUT --to hf        a directory transformers loads (GPT-2 or Llama layout)
    python -m train.convert SOURCE OUT --to export    our GPT.save format (what train.sample etc. read)
    (also: tp-convert)

SOURCE is anything `train.sample` reads: a Hugging Face directory, an export, a checkpoint
(`<run>/checkpoints/step_N`) or a run directory (its newest intact checkpoint). The tokenizer
(`tokenizer.json`) comes along. A Hugging Face directory can be written only for a model that fits
one of its layouts; otherwise the error names the fields in the way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.checkpoints.sources import Source, load_source
from train.cli import command_errors
from train.config import ConfigError

FORMATS = ("hf", "export")


def convert(source: Path, out: Path, to: str) -> Path:
    """Write the model at `source` to `out` in format `to` (`hf` | `export`); returns `out`.

    Raises:
        ConfigError: nothing loadable at `source`, an unknown `to`, or a model no Hugging Face layout fits.
    """
    if to not in FORMATS:
        raise ConfigError(f"--to {to!r} must be one of {', '.join(FORMATS)}")
    return write(load_source(source), out, to)


def write(loaded: Source, out: Path, to: str) -> Path:
    """Write a loaded model and its tokenizer to `out` in format `to` (`hf` | `export`); returns `out`."""
    try:
        loaded.model.save_pretrained(out) if to == "hf" else loaded.model.save(out)
    except ValueError as e:
        raise ConfigError(
            f"cannot write {loaded.path} as {'a Hugging Face directory' if to == 'hf' else 'an export'}: {e}"
        ) from None
    loaded.tokenizer.save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--to", required=True, choices=FORMATS, help="hf: Hugging Face; export: GPT.save")
    args = parser.parse_args()
    with command_errors("convert"):
        print(f"wrote {convert(args.source, args.out, args.to)}")


if __name__ == "__main__":
    main()
