"""A plain nanoGPT-style GPT with no tensor-parallel code: the baseline the TP model must equal.

Same architecture as `tp_attention.model.GPT` with tied embeddings, ffn_mult 4 and
emb_size == num_heads * head_size; parameter names are nanoGPT's, so
`tp_attention.convert.to_nanogpt` output loads into it directly. `split_qkv=True` gives separate
`q`, `k`, `v` projections instead of the fused `c_attn`: the shape PyTorch's DTensor TP plans expect,
and the attention reshapes with `-1` heads, so it runs on local heads once parallelized (torchtitan's way).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, emb: int, heads: int, dropout: float, bias: bool, split_qkv: bool = False) -> None:
        super().__init__()
        if split_qkv:
            self.q, self.k, self.v = (nn.Linear(emb, emb, bias=bias) for _ in range(3))
        else:
            self.c_attn = nn.Linear(emb, 3 * emb, bias=bias)
        self.c_proj = nn.Linear(emb, emb, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.head_size, self.split_qkv = emb // heads, split_qkv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        if self.split_qkv:
            q, k, v = self.q(x), self.k(x), self.v(x)  # local heads when parallelized
        else:
            q, k, v = self.c_attn(x).chunk(3, dim=2)
        q, k, v = (t.view(batch, seq, -1, self.head_size).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(batch, seq, -1)))


class MLP(nn.Module):
    def __init__(self, emb: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(emb, 4 * emb, bias=bias)
        self.c_proj = nn.Linear(4 * emb, emb, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, emb: int, heads: int, dropout: float, bias: bool, split_qkv: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(emb, bias=bias)
        self.attn = CausalSelfAttention(emb, heads, dropout, bias, split_qkv)
        self.ln_2 = nn.LayerNorm(emb, bias=bias)
        self.mlp = MLP(emb, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_embd: int,
        n_head: int,
        n_layer: int,
        dropout: float = 0.0,
        bias: bool = True,
        split_qkv: bool = False,
    ) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(dropout),
                h=nn.ModuleList(Block(n_embd, n_head, dropout, bias, split_qkv) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(n_embd, bias=bias),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)


def parallelize_with_dtensor(model: NanoGPT, tp_mesh) -> NanoGPT:
    """PyTorch-native TP of a `split_qkv=True` model, as torchtitan writes it (without sequence parallel).

    Q/K/V and the MLP up-projection column-wise, both output projections row-wise; each block's
    attention and MLP input is made a replicated DTensor once, so its gradient is all-reduced once.
    Embeddings, LM head and loss stay replicated.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        parallelize_module,
    )

    prepare = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),))
    plan = {
        "attn": prepare,
        "attn.q": ColwiseParallel(),
        "attn.k": ColwiseParallel(),
        "attn.v": ColwiseParallel(),
        "attn.c_proj": RowwiseParallel(),
        "mlp": prepare,
        "mlp.c_fc": ColwiseParallel(),
        "mlp.c_proj": RowwiseParallel(),
    }
    for block in model.transformer.h:
        parallelize_module(block, tp_mesh, plan)
    return model
