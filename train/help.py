"""`python -m train --help`: every config group and field with its type, default and description."""

from __future__ import annotations

import dataclasses
import typing

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train.config import CONF_DIR, SECTIONS, describe, register

USAGE = """usage: python -m train [GROUP=OPTION ...] [section.field=VALUE ...]      (also: tp-train)
       python -m train -m optim.lr=1e-3,2e-3 ...                           a sweep: one job per value
       torchrun --nproc_per_node N -m train parallel.tp=T ...             N processes, dp = N / T

Hydra's own flags (--cfg job, --config-dir DIR, ...): python -m train --hydra-help.
Other commands (--help each):
  python -m train.sample    generate text from a run, checkpoint, export or Hugging Face directory
  python -m train.evaluate  loss and perplexity on a text file or the run's validation split
  python -m train.compare   a table and plots of runs or a sweep
  python -m train.export    a checkpoint as one unsharded model file
  python -m train.convert   between our export and Hugging Face's formats
  python -m train.rerun     repeat a run from its run.json
  python -m train.status    the state of the run a command line would use
  python -m train.memory    the per-rank memory of a layout, before it runs
  python -m train.dry_run   play one rank of an N-rank job on the fake backend: its groups, bytes, collectives
"""


def _type_name(annotation: object) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    return text.replace("typing.", "").replace(" | None", "?")


def print_help() -> None:
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        defaults = OmegaConf.to_container(compose(config_name="config"), resolve=False)
    print(USAGE)
    groups = sorted(p for p in CONF_DIR.iterdir() if p.is_dir())
    print("groups (choose one option each):")
    for group in groups:
        options = ", ".join(sorted(f.stem for f in group.glob("*.yaml")))
        print(f"  {group.name}={options}")
    for section, schema in SECTIONS.items():
        print(f"\n{section}:")
        hints = typing.get_type_hints(schema) if section != "model" else {}
        for f in dataclasses.fields(schema):
            kind = _type_name(hints.get(f.name, f.type))
            default = defaults[section][f.name]
            print(f"  {section}.{f.name}: {kind} = {default!r}\n      {describe(schema, f.name)}")
