"""Every layer's per-head attention weights of a GPT for one prompt, as a PNG grid.

    python examples/gpt_attention_maps.py --model outputs/<run>/export --prompt "def main():"
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/gpt_attention_maps.py --model DIR

`--model` is a directory written by `GPT.save` (the training script's export); without it a freshly
initialised tiny model is used. Under torchrun each rank holds num_heads / tp heads; the maps are
gathered so that rank 0 draws all of them.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from tp_attention.model import GPT, GPTConfig
from train.data.tokenizer import ByteTokenizer, load_tokenizer
from train.reporting.plots import save_attention_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="directory written by GPT.save (default: a fresh tiny model)")
    parser.add_argument("--prompt", default="import torch\n")
    parser.add_argument("--out", default="attention_maps.png")
    args = parser.parse_args()

    group = None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    if args.model:
        model, tokenizer = GPT.load(args.model, tp_group=group), load_tokenizer(args.model)
    else:
        torch.manual_seed(0)
        model, tokenizer = GPT.from_config(GPTConfig(), tp_group=group), ByteTokenizer()
    ids = tokenizer.encode(args.prompt)[-model.config.max_seq_len :]
    maps = model.eval().attention_maps(torch.tensor([ids]))[:, 0]  # (L, H, T, T)
    if group is None or dist.get_rank() == 0:
        labels = [tokenizer.decode([i]) for i in ids]
        path = save_attention_grid(maps, args.out, tokens=labels, title=f"attention maps for {args.prompt!r}")
        print(f"wrote {path}")
    if group is not None:
        dist.barrier()  # rank 0 has drawn: no rank tears its connections down while another still uses them
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
