"""How a parameter is split over the tensor-parallel group: the layers record it, the initialisation
draws by it, and the state-dict and checkpoint code gather, scatter and wrap shards by it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """A parameter split into `num_shards` contiguous chunks along `dim`.

    TP rank `r` of `tp` holds chunk `r * num_shards // tp`. Usually `num_shards == tp`; with
    `num_shards < tp` each chunk is replicated on `tp / num_shards` neighbouring ranks (the KV heads
    of grouped-query attention when there are fewer KV heads than ranks). `full_size`, when set,
    is the logical size along `dim`: the shards then hold a copy zero-padded to a multiple of
    `num_shards` (a vocabulary that tp does not divide).
    """

    dim: int
    num_shards: int
    full_size: int | None = None

    def index(self, rank: int, tp: int) -> int:
        return rank * self.num_shards // tp

    def padded_size(self, size: int) -> int:
        return -(-size // self.num_shards) * self.num_shards

    def slice(self, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """This rank's chunk of the full (logical, unpadded) tensor."""
        pad = self.padded_size(full.size(self.dim)) - full.size(self.dim)
        if pad:
            shape = list(full.shape)
            shape[self.dim] = pad
            full = torch.cat([full, full.new_zeros(shape)], dim=self.dim)
        return full.chunk(self.num_shards, dim=self.dim)[self.index(rank, tp)]

    def extent(self, local_size: int, rank: int, tp: int) -> tuple[int, int]:
        """`(logical size along dim, how many of this rank's local_size entries are real)`: the ones past
        `full_size` are padding. For `num_shards == tp`."""
        full = self.full_size or local_size * tp
        return full, max(0, min(local_size, full - rank * local_size))

    def trim(self, padded: torch.Tensor) -> torch.Tensor:
        """The logical tensor from the concatenated (padded) shards."""
        return padded if self.full_size is None else padded.narrow(self.dim, 0, self.full_size)
