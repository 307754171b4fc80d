"""SwAV's losses: online codes by Sinkhorn-Knopp and the swapped prediction (Caron et al. 2020, "Unsupervised
Learning of Visual Features by Contrasting Cluster Assignments").

Notation of the paper: features z (L2-normalised), prototypes C (L2-normalised), scores z^T C. The codes Q of a batch
of B features solve an entropy-regularised optimal transport problem whose marginals split the batch equally among
the K prototypes (sec. 3.1, "Online clustering"); three Sinkhorn-Knopp iterations with ε = 0.05 approximate its
solution Q* = Diag(u) exp(C^T Z / ε) Diag(v) (sec. 3.1 and Appendix A.1). Every view then predicts, through a
softmax at temperature τ = 0.1, the codes of the other views of the same image (eq. 1-2).

Across ranks the codes are computed on the global batch without gathering features: the per-prototype sums that
Sinkhorn-Knopp needs are summed over ranks (`all_reduce_sum`), as the official implementation does. In one process
every collective is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp_lightning.distributed import all_gather_no_grad, all_reduce_sum


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Soft codes [B, K] from local scores z^T C [B, K], computed over the global batch (sec. 3.1, Appendix A.1).

    Q = Diag(u) exp(C^T Z / ε) Diag(v) is rescaled alternately so that every prototype receives 1/K of the mass
    (equal partition of the batch) and every sample 1/B; the result is multiplied by B so that each sample's row is
    a distribution over prototypes. After the last iteration the sample marginals hold exactly and the prototype
    marginals (column sums B/K) approximately — exactly in the limit of many iterations.

    B is the number of rows summed over ranks, so ranks may hold different numbers of rows (e.g. a queue). Before
    the exponential each prototype's scores are shifted by their maximum over the global batch: the first prototype
    normalisation divides that factor out again, so the codes are unchanged while exp() stays finite for any ε.
    """
    scores = scores.detach().float()
    global_max = all_gather_no_grad(scores.max(dim=0, keepdim=True).values).max(dim=0).values  # [K]
    codes = torch.exp((scores - global_max) / epsilon)  # [B_local, K]
    num_prototypes = codes.shape[1]
    num_samples = all_reduce_sum(torch.tensor(float(codes.shape[0]), device=codes.device))
    for _ in range(iterations):
        codes /= all_reduce_sum(codes.sum(dim=0, keepdim=True)) * num_prototypes  # each prototype: 1/K
        codes /= codes.sum(dim=1, keepdim=True) * num_samples  # each sample: 1/B
    return codes * num_samples


def swav_loss(scores_per_view: Sequence[Tensor], codes_per_view: Sequence[Tensor], temperature: float = 0.1) -> Tensor:
    """Swapped prediction over multi-crop views (eq. 1-2, and sec. 3.2 for multi-crop).

    `codes_per_view[i]` are the codes of view i — codes exist only for the first views (the global crops). Each of
    them is predicted by every other view v from `softmax(scores_per_view[v] / τ)` with a cross-entropy; the loss is
    the mean over all (coded view, predicting view) pairs, which equals the official implementation's average over
    the V-1 predicting views and then over the coded views.

    Args:
        scores_per_view: V tensors [N, K] of z^T C, one per view, in the same sample order.
        codes_per_view: G <= V tensors [N, K] (rows sum to 1) for views 0..G-1; they carry no gradient.
        temperature: τ of the softmax, 0.1 in the paper.
    """
    if not 0 < len(codes_per_view) <= len(scores_per_view) or len(scores_per_view) < 2:
        raise ValueError(
            f"swav_loss needs at least 2 views and codes for 1..V of them; got {len(scores_per_view)} views "
            f"and {len(codes_per_view)} codes"
        )
    cross_entropies = []
    for coded_view, codes in enumerate(codes_per_view):
        for view, scores in enumerate(scores_per_view):
            if view == coded_view:
                continue
            log_predictions = F.log_softmax(scores.float() / temperature, dim=1)
            cross_entropies.append(-(codes.detach() * log_predictions).sum(dim=1).mean())
    return torch.stack(cross_entropies).mean()
