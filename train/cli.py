"""What the commands (`train.sample`, `.evaluate`, `.convert`, ...) share: their process groups, `--prompt`
files, JSON results and one-line errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tp_attention.distributed import ParallelGroups, default_device_type, init_parallel_groups
from tp_attention.shm import with_shared_memory_groups
from train.config import ConfigError


def read_prompt(value: str) -> str:
    """`--prompt` as given, or the contents of FILE for `@FILE`."""
    if value.startswith("@"):
        file = Path(value[1:]).expanduser()
        if not file.is_file():
            raise ConfigError(f"--prompt {value!r}: no file {file}")
        return file.read_text(errors="replace")
    return value


def dump(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def parallel_groups(tp: int) -> ParallelGroups | None:
    """Under torchrun, the `(dp, tp)` groups of this world (CPU: TP collectives in shared memory); else None.

    Raises:
        ConfigError: tp does not divide the world size.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    device_type = default_device_type()
    try:
        groups = init_parallel_groups(tp, device_type)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return with_shared_memory_groups(groups) if device_type == "cpu" else groups


@contextmanager
def command_errors(name: str) -> Iterator[None]:
    """The body of command `name`: a ConfigError, ValueError or FileNotFoundError becomes one line
    (`<name> error: ...`) and exit status 2; the process group (under torchrun) is destroyed either way."""
    try:
        yield
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"{name} error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
