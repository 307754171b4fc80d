"""A memory bank: a first-in-first-out queue of keys `[K, D]` shared by every rank (MoCo's queue of negatives,
He et al. 2020, sec. 3.2; the neighbours of LOOK).

Each step, the keys of the *global* batch are gathered from every rank and written at the pointer, so every rank holds
the same bank (lightly's and MoCo's `concat_all_gather` before `_dequeue_and_enqueue`; a per-rank bank would silently
hold rank 0's keys on one rank and rank 1's on another). K must be a multiple of the global batch, so a batch never
wraps around the end (MoCo's `assert self.K % batch_size == 0`). The bank and its pointer are persistent buffers,
so a checkpoint resumes the queue exactly. The initial bank is random unit vectors drawn from a fixed seed, the same
on every rank without a broadcast (MoCo starts from random normalised keys too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp_lightning.distributed import all_gather_no_grad


class MemoryBank(nn.Module):
    """Queue of `size` keys of dimension `dim`, newest written at `pointer`.

    Args:
        size: K, the number of keys (a multiple of the global batch).
        dim: D, the key dimension.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"MemoryBank needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("bank", F.normalize(torch.randn(size, dim, generator=generator), dim=1))  # [K, D]
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Gather `keys` [N, D] from every rank (rank order) and write the [G, D] global batch at the pointer."""
        gathered = all_gather_no_grad(keys.contiguous())
        global_batch = gathered.shape[0]
        if self.size % global_batch:
            raise ValueError(
                f"MemoryBank size {self.size} is not divisible by the global batch {global_batch} (batch per rank x "
                "ranks); choose a queue length that is a multiple of the global batch"
            )
        start = int(self.pointer)
        self.bank[start : start + global_batch] = gathered.to(self.bank.dtype)
        self.pointer.fill_((start + global_batch) % self.size)
