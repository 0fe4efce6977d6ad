"""tp-attention: tensor-parallel multi-head attention and a small GPT built on it."""

from tp_attention.attention import KVCache, MultiHeadAttention
from tp_attention.distributed import ParallelGroups, init_parallel_groups
from tp_attention.groups import TPGroup, tp_rank, tp_size
from tp_attention.layers import ColumnParallelLinear, RowParallelLinear
from tp_attention.mappings import (
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
)
from tp_attention.model import GPT, GPTConfig
from tp_attention.sharding import ShardSpec
from tp_attention.shm import with_shared_memory
from tp_attention.state_dict import full_grads, full_state_dict, gather_full, load_full_state_dict
from tp_attention.vocab import VocabParallelEmbedding, vocab_parallel_cross_entropy

__all__ = [
    "GPT",
    "ColumnParallelLinear",
    "GPTConfig",
    "KVCache",
    "MultiHeadAttention",
    "ParallelGroups",
    "RowParallelLinear",
    "ShardSpec",
    "TPGroup",
    "VocabParallelEmbedding",
    "copy_to_tp",
    "full_grads",
    "full_state_dict",
    "gather_from_sp",
    "gather_from_tp",
    "gather_full",
    "init_parallel_groups",
    "load_full_state_dict",
    "reduce_from_tp",
    "reduce_scatter_to_sp",
    "scatter_to_tp",
    "tp_rank",
    "tp_size",
    "vocab_parallel_cross_entropy",
    "with_shared_memory",
]
