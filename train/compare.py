"""Compare runs: a table and one plot of their loss curves.

    python -m train.compare RUN_OR_SWEEP_DIR... [--out compare.png]              (also: tp-compare)

Each argument is a run directory or any directory above runs (a sweep: every job in it is found, failed
ones included). The table has one row per run: the overrides that differ between the runs, the final
train and validation loss, the best validation loss, the median tokens/s, the steps done and the state.
The plot overlays every run's train loss (lines) and validation loss (dots); it goes into the first
directory given unless --out names another file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from train.cli import command_errors
from train.reporting.metrics import read_records
from train.reporting.plots import save_curves


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (a metrics.jsonl, or a sweep job's error.txt) at or below `paths`, in order."""
    runs: list[Path] = []
    for path in paths:
        marks = [path / "metrics.jsonl", path / "error.txt"]
        found = (
            [path]
            if any(m.is_file() for m in marks)
            else sorted({m.parent for name in ("metrics.jsonl", "error.txt") for m in path.rglob(name)})
        )
        runs += [r for r in found if r not in runs]
    return runs


def overrides(run: Path) -> dict[str, str]:
    file = run / ".hydra" / "overrides.yaml"
    items = OmegaConf.to_container(OmegaConf.load(file)) if file.is_file() else []
    return dict(item.split("=", 1) for item in items if "=" in item)


def read_state(status: Path) -> str:
    """The `state` a run's status.json records.

    Raises:
        ValueError: the file is not a JSON object with a state (damaged), naming it.
    """
    try:
        state = json.loads(status.read_text(errors="replace")).get("state")
    except (ValueError, AttributeError):
        state = None
    if not isinstance(state, str):
        raise ValueError(f"{status} is damaged (not a JSON object with a state): remove it or the run")
    return state


def summarize(run: Path) -> dict[str, Any]:
    records = read_records(run / "metrics.jsonl")
    train = [r["loss"] for r in records if r.get("loss") is not None]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    status = run / "status.json"
    state = read_state(status) if status.is_file() else "failed" if (run / "error.txt").is_file() else "?"
    error = (run / "error.txt").read_text().strip().splitlines()[-1] if (run / "error.txt").is_file() else None
    return {
        "run": run,
        "records": records,
        "final_train": train[-1] if train else None,
        "final_val": val[-1] if val else None,
        "best_val": min(val) if val else None,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "steps": records[-1]["step"] if records else 0,
        "state": state,
        "error": error,
        "overrides": overrides(run),
    }


def differing(rows: list[dict[str, Any]]) -> list[str]:
    """The override keys whose values are not the same in every run."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    return [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]


def label(row: dict[str, Any], keys: list[str], root: Path) -> str:
    shown = " ".join(f"{k}={row['overrides'].get(k, '-')}" for k in keys)
    return shown or str(row["run"].relative_to(root) if row["run"].is_relative_to(root) else row["run"].name)


def table(rows: list[dict[str, Any]], keys: list[str], root: Path) -> str:
    def number(value: float | None, spec: str = ".4f") -> str:
        return "-" if value is None else format(value, spec)

    header = ["run", "final train", "final val", "best val", "tokens/s", "steps", "state"]
    lines = [
        [
            label(r, keys, root),
            number(r["final_train"]),
            number(r["final_val"]),
            number(r["best_val"]),
            number(r["tokens_per_s"], ",.0f"),
            str(r["steps"]),
            r["state"] + (f": {r['error']}" if r["error"] else ""),
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *lines]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="the PNG (default: <first dir>/compare.png)")
    args = parser.parse_args(argv)
    runs = find_runs(args.dirs)
    if not runs:
        print(f"compare error: no runs (metrics.jsonl) under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        sys.exit(2)
    with command_errors("compare"):  # every run is read before anything is printed or written
        rows = [summarize(r) for r in runs]
    keys, root = differing(rows), args.dirs[0]
    print(table(rows, keys, root))
    out = args.out or root / "compare.png"
    save_curves(
        {label(r, keys, root): r["records"] for r in rows if r["records"]},
        out,
        title=f"{len(rows)} runs" + (f": {', '.join(keys)}" if keys else ""),
    )
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
