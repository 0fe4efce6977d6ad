"""Per-head attention weights of a MultiHeadAttention as a picture, gathered from every TP rank.

    python examples/attention_heatmap.py --out attention.png
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/attention_heatmap.py --out attention.png

Every rank owns num_heads / tp heads; `get_attention_weights(x, gather=True)` all-gathers them, and
rank 0 draws one heatmap per head. The picture is the same at every tp (one seed, tp-independent init).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from tp_attention import MultiHeadAttention
from train.reporting.plots import save_attention_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="attention.png", help="PNG file to write")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    group = None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    torch.manual_seed(args.seed)  # same seed on every rank: same full weights, same input
    mha = MultiHeadAttention(num_heads=args.heads, emb_size=64, head_size=16, max_seq_len=64, tp_group=group)
    x = torch.randn(1, args.seq_len, 64)
    key_padding = torch.ones(1, args.seq_len, dtype=torch.bool)
    key_padding[:, :2] = False  # hide the first two keys: their columns stay dark
    with torch.no_grad():
        weights = mha.get_attention_weights(x, key_padding, gather=True)[0]  # (num_heads, T, T)
    if group is None or dist.get_rank() == 0:
        tp = 1 if group is None else dist.get_world_size()
        path = save_attention_grid(weights, args.out, title=f"{args.heads} heads, tp={tp}, causal + key padding")
        print(f"wrote {path}")
    if group is not None:
        dist.barrier()  # rank 0 has drawn: no rank tears its connections down while another still uses them
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
