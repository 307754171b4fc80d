"""Instance-discrimination losses between two views of each image (SimCLR, MoCo v2, MoCo v3), pure functions.

* `nt_xent_loss` — SimCLR's normalised temperature-scaled cross-entropy (Chen et al. 2020, eq. 1): every view must
  pick its partner among the 2N - 1 other views of the batch, gathered over ranks with gradient.
* `moco_queue_loss` — MoCo's InfoNCE with a queue of negatives (He et al. 2020, eq. 1; MoCo v2, Chen et al. 2020):
  the query's positive is its key, the negatives are the queue's K keys; the keys carry no gradient.
* `moco_v3_contrastive_loss` — MoCo v3's InfoNCE between queries and the keys of the global batch (Chen, Xie, He
  2021, Algorithm 1): query i's positive is key rank × N + i; the loss is multiplied by 2τ, as the official code does
  (`nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)`), so that its gradient does not scale with 1/τ.

Logits and cross-entropies are computed in fp32 even under autocast (the temperatures 0.1-0.2 amplify errors).
Across ranks, gathered features carry gradient (`all_gather_with_grad`): each rank's gradient then sums what every
rank's loss asks of its features, and DDP's averaging gives the gradient of the global batch's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp_lightning.distributed import all_gather_no_grad, all_gather_with_grad, rank


def nt_xent_loss(view_a: Tensor, view_b: Tensor, temperature: float = 0.1, *, gather: bool = True) -> Tensor:
    """NT-Xent over the 2N views of the local batch against the 2G views of the global batch (SimCLR eq. 1).

    ℓ(i, j) = -log exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ), averaged over all 2N local views. Local view
    i of rank r is global row r × N + i, so its own similarity is masked at that column and its partner sits in the
    other view's block at the same row.

    Args:
        view_a, view_b: [N, D] projections z of the two views (normalised here), row i of each from image i.
        temperature: τ (0.1 for the batch-4096 ImageNet runs, sec. B.9; 0.5 in the paper's ablations).
        gather: contrast against the views of every rank (no effect in one process).
    """
    with torch.autocast(device_type=view_a.device.type, enabled=False):
        local = F.normalize(torch.cat([view_a, view_b]).float(), dim=-1)  # [2N, D]
        batch_size = view_a.shape[0]
        if gather:
            all_a = all_gather_with_grad(local[:batch_size])
            all_b = all_gather_with_grad(local[batch_size:])
            first = rank() * batch_size
        else:
            all_a, all_b, first = local[:batch_size], local[batch_size:], 0
        candidates = torch.cat([all_a, all_b])  # [2G, D]
        global_batch = all_a.shape[0]
        logits = local @ candidates.T / temperature  # [2N, 2G]
        rows = torch.arange(2 * batch_size, device=local.device)
        own = torch.cat([rows[:batch_size] + first, rows[:batch_size] + first + global_batch])  # column of itself
        partner = torch.cat([own[batch_size:], own[:batch_size]])
        logits = logits.masked_fill(F.one_hot(own, 2 * global_batch).bool(), float("-inf"))
        return F.cross_entropy(logits, partner)


def moco_queue_loss(queries: Tensor, keys: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """InfoNCE with the key as positive and the queue as negatives (MoCo eq. 1; τ 0.2 in MoCo v2).

    Args:
        queries: [N, D] L2-normalised queries q of the encoder being trained.
        keys: [N, D] L2-normalised keys k+ of the momentum encoder (no gradient).
        queue: [K, D] L2-normalised keys of past batches (no gradient).
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries = queries.float()
        positives = (queries * keys.detach().float()).sum(dim=-1, keepdim=True)  # [N, 1]
        negatives = queries @ queue.detach().float().T  # [N, K]
        logits = torch.cat([positives, negatives], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long, device=queries.device))


def moco_v3_contrastive_loss(queries: Tensor, keys: Tensor, temperature: float = 0.2) -> Tensor:
    """2τ · CE(q · concat_all_gather(k)ᵀ / τ, labels rank × N + arange(N)) (MoCo v3, Algorithm 1).

    Args:
        queries: [N, D] predictions q of the base encoder (normalised here).
        keys: [N, D] projections k of the momentum encoder (normalised here, no gradient, gathered).
        temperature: τ (0.2 for ViT, appendix A of the paper; the official ResNet-50 recipes use 1.0).
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries = F.normalize(queries.float(), dim=-1)
        all_keys = F.normalize(all_gather_no_grad(keys.float()), dim=-1)  # [G, D]
        logits = queries @ all_keys.T / temperature  # [N, G]
        labels = torch.arange(len(queries), device=queries.device) + rank() * len(queries)
        return F.cross_entropy(logits, labels) * (2 * temperature)
