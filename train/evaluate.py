"""Validation loss, perplexity and bits per byte of a trained model, on its run's validation split or any text.

    python -m train.evaluate SOURCE [--data FILE_OR_DIR] [--seq-len T] [--batch-size B] [--max-tokens N]
                                    [--out eval.json]                                         (also: tp-evaluate)
    torchrun --nproc_per_node 4 -m train.evaluate SOURCE --tp 2                               dp=2 x tp=2

SOURCE is a run directory, one of its checkpoints or an export. Without --data the run's own validation
split is used (an export needs --data). The text is cut into consecutive windows of seq_len + 1 tokens
(every token predicted once, up to --max-tokens); DP ranks share the windows. Prints one line and writes
eval.json (beside the source unless --out says where). Bits per byte: the total loss in bits over the UTF-8
bytes of the predicted text (for the byte tokenizer, loss / ln 2).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from train.checkpoints.sources import Source, load_source
from train.cli import command_errors, dump, parallel_groups
from train.config import ConfigError, DataConfig
from train.data.corpus import documents, prepare_data
from train.run.ranks import barrier, is_main_process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run directory, checkpoint or export")
    parser.add_argument("--data", help="a text file or a directory of them (default: the run's validation split)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the run's trainer.seq_len")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass on each rank")
    parser.add_argument("--max-tokens", type=int, default=1_000_000, help="evaluate at most this many tokens")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size under torchrun (default: all)")
    parser.add_argument("--out", type=Path, help="where to write eval.json")
    return parser.parse_args(argv)


def tokens_of(source: Source, data: str | None, seq_len: int) -> tuple[np.ndarray, str]:
    """The token ids to evaluate and a description of where they come from."""
    if data is not None:
        cfg = DataConfig(source="text", path=data)
        ids = [np.asarray(source.tokenizer.encode(text), dtype=np.int64) for _, text in documents(cfg)]
        return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), str(data)
    if source.config is None:
        raise ConfigError(
            f"{source.run_dir or 'this export'} has no training config to find its validation split: "
            "pass --data FILE_OR_DIR"
        )
    cfg = DataConfig(**source.config["data"])
    split = prepare_data(cfg, is_main_process(), barrier, seq_len)
    return np.asarray(split.val, dtype=np.int64), f"validation split of {split.directory}"


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    groups = parallel_groups(args.tp or world)
    source = load_source(args.source, groups.tp_group if groups else None, groups.mesh if groups else None)
    model, device = source.model.eval(), next(source.model.parameters()).device
    seq_len = args.seq_len or (source.config or {}).get("trainer", {}).get("seq_len") or model.config.max_seq_len
    tokens, where = tokens_of(source, args.data, seq_len)
    count = min(len(tokens) - 1, args.max_tokens) // seq_len  # whole windows
    if count < 1:
        raise ConfigError(f"{where} has {len(tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
    if tokens.max() >= model.config.vocab_size:
        raise ConfigError(
            f"{where} has token id {tokens.max()}, outside the model's vocabulary of {model.config.vocab_size}: "
            "its tokenizer is not the one the model was trained with"
        )
    dp, dp_rank = (groups.dp_size, groups.dp_rank) if groups else (1, 0)
    nats, text_bytes = torch.zeros((), dtype=torch.float64, device=device), 0
    mine = list(range(dp_rank, count, dp))
    with torch.no_grad():
        for start in range(0, len(mine), args.batch_size):
            rows = [tokens[w * seq_len : w * seq_len + seq_len + 1] for w in mine[start : start + args.batch_size]]
            batch = torch.from_numpy(np.stack(rows)).to(device)
            x, y = batch[:, :-1], batch[:, 1:]
            nats += model(x, y).double() * y.numel()
            text_bytes += sum(len(source.tokenizer.decode(row[1:].tolist()).encode()) for row in rows)
    totals = torch.tensor([nats.item(), float(text_bytes)], dtype=torch.float64, device=device)
    if groups is not None and dp > 1:
        dist.all_reduce(totals, group=groups.dp_group)
    predicted = count * seq_len
    loss = totals[0].item() / predicted
    return {
        "source": str(args.source),
        "data": where,
        "tokens": predicted,
        "seq_len": seq_len,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": totals[0].item() / math.log(2) / totals[1].item(),
        "step": source.step,
        "tp": groups.tp_size if groups else 1,
        "dp": dp,
    }


def output_path(args: argparse.Namespace, source_path: Path) -> Path:
    if args.out is not None:
        return args.out
    base = source_path if source_path.is_dir() else source_path.parent
    return base / "eval.json"


def main() -> None:
    args = parse_args()
    with command_errors("evaluate"):
        result = evaluate(args)
        if is_main_process():
            out = output_path(args, Path(args.source))
            dump(result, out)
            print(
                f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
                f"{result['bits_per_byte']:.4f} bits/byte | {result['tokens']:,} tokens of {result['data']} "
                f"| {out}"
            )


if __name__ == "__main__":
    main()
