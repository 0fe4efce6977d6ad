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
Other commands: python -m train.sample | train.evaluate | train.compare | train.export | train.rerun (--help each).
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
