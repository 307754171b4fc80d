"""Rank helpers and collectives that also work in a single process.

Losses call these unconditionally: without an initialised process group (a plain script, a test, a one-device
trainer) every helper is the identity, so no `dist.*` call ever needs an `if` around it. With a group — the default
one that Lightning's DDP / FSDP strategies create — they act on the whole world. All ranks must pass tensors of
the same shape (an all-gather requirement).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distributed_autograd
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group, 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group, 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` [N, ...] from every rank in rank order into [world * N, ...], keeping the graph.

    Backward sums the gradients that all ranks computed for slice `rank` and returns that sum to its owner
    (reduce-scatter on NCCL, all-to-all elsewhere, e.g. gloo). So when every rank's loss uses the gathered tensor,
    each rank's local gradient is d(sum of all ranks' losses)/dx, which DDP's gradient averaging turns into
    d(mean of the ranks' losses)/dx — the gradient of the global batch (open_clip's `gather_with_grad`).
    """
    if not is_distributed():
        return x
    return torch.cat(distributed_autograd.all_gather(x), dim=0)


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` [N, ...] from every rank in rank order into [world * N, ...], detached from the graph."""
    if not is_distributed():
        return x.detach()
    gathered = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(gathered, x.detach().contiguous())
    return torch.cat(gathered, dim=0)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Element-wise sum of `x` over all ranks, as a new detached tensor (`x` is left unchanged).

    Meant for statistics computed without gradient, e.g. the row / column sums of distributed Sinkhorn-Knopp.
    """
    total = x.detach().clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
