"""Nearest-neighbour classification losses, pure functions.

* `leave_one_out_knn_loss` — LOOK ("Rethinking Supervised Pre-training for Better Downstream Transferring", Feng et
  al. 2022, sec. 3): each sample is classified by a vote of its k nearest neighbours among the other samples (leave
  one out: never itself), neighbour j weighing exp(s_ij / τ) with s_ij the cosine similarity; the loss is the
  negative log of the vote share of its own class. A sample only has to agree with *most of its neighbours*, not
  with a class centre, so a class may keep several modes (its sub-categories) instead of collapsing into one
  cluster, which the paper argues is what makes supervised features transfer worse.

Implementation choices where the paper text was not available here: the candidates are the current batch (with
gradient; the diagonal is the left-out sample) and a memory bank of past features (without gradient; `bank_labels`
−1 marks slots not yet written); the k neighbours are chosen by similarity without gradient through the choice (a
top-k), and the vote is the softmax over the chosen k; a sample with no neighbour of its own class among its k
contributes nothing (its loss would be infinite and its gradient zero). Computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def leave_one_out_knn_loss(
    features: Tensor,
    labels: Tensor,
    bank_features: Tensor,
    bank_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> tuple[Tensor, Tensor]:
    """−log of the weighted vote share of each sample's own class among its k nearest other samples (module doc).

    Args:
        features: [N, D] embeddings of the batch (normalised here).
        labels: [N] class indices of the batch.
        bank_features: [K, D] embeddings of past batches (normalised here, no gradient).
        bank_labels: [K] their classes; −1 marks empty slots, never neighbours.
        k: neighbours per sample (fewer when fewer candidates exist).
        temperature: τ of the vote weights exp(s / τ).

    Returns:
        (mean loss over the samples with a same-class neighbour among their k, leave-one-out kNN accuracy).
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        queries = F.normalize(features.float(), dim=-1)
        candidates = torch.cat([queries, F.normalize(bank_features.detach().float(), dim=-1)])  # [N + K, D]
        candidate_labels = torch.cat([labels, bank_labels.to(labels.dtype)])
        similarity = queries @ candidates.T / temperature  # [N, N + K]
        excluded = (candidate_labels < 0).expand_as(similarity).clone()
        excluded[:, : len(queries)] |= torch.eye(len(queries), dtype=torch.bool, device=queries.device)  # itself
        similarity = similarity.masked_fill(excluded, float("-inf"))
        k = min(k, int((~excluded[0]).sum()) if len(queries) else 0)
        if k < 1:
            raise ValueError("leave_one_out_knn_loss needs at least one other sample (a batch of 2, or a bank)")
        scores, neighbours = similarity.topk(k, dim=1)  # [N, k]
        same_class = candidate_labels[neighbours] == labels[:, None]  # [N, k]
        log_all = torch.logsumexp(scores, dim=1)
        log_same = torch.logsumexp(scores.masked_fill(~same_class, float("-inf")), dim=1)
        voted = same_class.any(dim=1)
        loss = (log_all - log_same)[voted].mean() if voted.any() else scores.sum() * 0
        num_classes = int(candidate_labels.max()) + 1
        votes = torch.zeros(len(queries), num_classes, device=queries.device).scatter_add_(
            1, candidate_labels[neighbours], scores.detach().softmax(dim=1)
        )
        accuracy = (votes.argmax(dim=1) == labels).float().mean()
        return loss, accuracy
