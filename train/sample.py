"""Sample text from a trained model, streamed to stdout as it is generated.

    python -m train.sample SOURCE [--prompt TEXT | --prompt @FILE] [--max-new-tokens 200] [--temperature 0.8]
                                  [--top-k 50] [--top-p 0.95] [--num-samples 1] [--seed 0]      (also: tp-sample)
    torchrun --nproc_per_node 2 -m train.sample SOURCE --tp 2 ...                                the same text

SOURCE is a run directory, one of its checkpoints or an export; the tokenizer is the run's. Each sample
draws from its own generator seeded with `seed + i`, so a sample is the same at every tp (at tp > 1 the
token drawn on TP rank 0 is used by every rank); rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from tp_attention.generation import check_sampling
from train.checkpoints.sources import load_source
from train.cli import command_errors, parallel_groups, read_prompt
from train.run.ranks import is_main_process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run directory, checkpoint or export")
    parser.add_argument("--prompt", default="\n", help="the text to continue, or @FILE to read it from a file")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size under torchrun (default: all ranks)")
    return parser.parse_args(argv)


class Printer:
    """Prints the text of the tokens so far as it grows (holding back a partial UTF-8 character)."""

    def __init__(self, tokenizer, prompt_ids: list[int], enabled: bool) -> None:
        self.tokenizer, self.ids, self.enabled = tokenizer, list(prompt_ids), enabled
        self.printed = len(tokenizer.decode(self.ids))

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids)
        if self.enabled and not text.endswith("\ufffd"):
            sys.stdout.write(text[self.printed :])
            sys.stdout.flush()
            self.printed = len(text)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad options before anything is loaded or printed (ValueError, one line)."""
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    for name, value in (("--num-samples", args.num_samples), ("--tp", args.tp)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def sample(args: argparse.Namespace) -> list[str]:
    """Generate `args.num_samples` continuations (streamed on rank 0); returns their full texts."""
    check_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    groups = parallel_groups(args.tp or world)
    source = load_source(args.source, groups.tp_group if groups else None, groups.mesh if groups else None)
    device = next(source.model.parameters()).device
    printing = is_main_process()
    prompt_ids = source.tokenizer.encode(read_prompt(args.prompt)) or [0]
    texts = []
    for i in range(args.num_samples):
        if printing and args.num_samples > 1:
            sys.stdout.write(f"--- sample {i + 1} of {args.num_samples} ---\n")
        printer = Printer(source.tokenizer, prompt_ids, printing)
        if printing:
            sys.stdout.write(source.tokenizer.decode(prompt_ids))
        generator = torch.Generator(device=device).manual_seed(args.seed + i)
        out = source.model.generate(
            torch.tensor([prompt_ids], device=device),
            args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
            streamer=printer,
        )
        texts.append(source.tokenizer.decode(out[0].tolist()))
        if printing:
            sys.stdout.write(texts[-1][printer.printed :] + "\n")
    return texts


def main() -> None:
    args = parse_args()
    with command_errors("sample"):
        sample(args)


if __name__ == "__main__":
    main()
