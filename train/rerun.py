"""Run a run again from its record alone: `python -m train.rerun RUN_DIR [--out-dir DIR] [--run-id ID]`.

Reads `RUN_DIR/run.json` (written at the start of every run) and starts the training job with every value of
the recorded, resolved config given as an override, so neither conf/ nor its defaults need to be as they were;
a run that used several processes is started with `torchrun --standalone` on as many. The new run goes to
`<out dir>/<run id>` (default: beside the original, named `<its name>-rerun`); its exit code is returned.
The loss curve is the original's (bitwise on CPU in fp32, as any run with the same seed and layout).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from train.run.records import overrides_for


def rerun_command(run_dir: Path, out_dir: Path | None) -> tuple[list[str], int]:
    """The command that repeats `run_dir` (into `out_dir` when given) and its world size."""
    record = json.loads((run_dir / "run.json").read_text())
    config = {k: v for k, v in record["config"].items() if k != "run_id"}
    overrides = overrides_for(config)
    if out_dir is not None:
        overrides.append(f"trainer.out_dir='{out_dir}'")
    world = int(record.get("world_size", 1))
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        if world > 1
        else [sys.executable]
    )
    return [*launcher, "-m", "train", *overrides], world


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out-dir", type=Path, help="parent of the new run (default: the original's parent)")
    parser.add_argument("--run-id", help="name of the new run directory (default: <original>-rerun)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "run.json").is_file():
        print(f"rerun error: {args.run_dir} has no run.json (a run record)", file=sys.stderr)
        sys.exit(2)
    command, world = rerun_command(args.run_dir, args.out_dir or args.run_dir.parent)
    env = dict(os.environ, TP_RUN_ID=args.run_id or f"{args.run_dir.name}-rerun")
    if world > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    print(" ".join(command[:8]) + f" ... ({len(command) - 8} more overrides)", file=sys.stderr)
    sys.exit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
