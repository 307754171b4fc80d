"""Losses of the masked image modeling family (MAE, Selfie, SiT): pure functions, no Lightning.

* `masked_reconstruction_loss` — MAE (He et al. 2021, sec. 3 "Reconstruction target"): mean squared error between
  predicted and target pixels, per patch, averaged over the masked patches only; optionally with each target patch
  normalised by its own mean and standard deviation ("normalized pixels", Table 1d).
* `patch_selection_loss` — Selfie (Trinh et al. 2019, sec. 2): for each masked location the query (summary of the
  visible patches + position embedding of the location) must pick the true patch among the other masked patches of
  the same image, a softmax cross-entropy over (scaled) dot products (CPC-style classification among distractors).
* (SiT's contrastive token of two views uses SimCLR's NT-Xent, `losses.instance_contrastive.nt_xent_loss`.)
* `uncertainty_weighted_sum` — task weighting by learned homoscedastic uncertainty (Kendall et al. 2018, eq. 7 / 10),
  how SiT combines its rotation, contrastive and reconstruction losses.

Similarities and cross-entropies are computed in fp32 even under bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor



def masked_reconstruction_loss(
    predicted: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    normalize_target: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """MAE's loss: MSE per patch, mean over masked patches only.

    Args:
        predicted: [N, L, p*p*C] predicted pixels of every patch.
        target: [N, L, p*p*C] true pixels (`patchify` of the input images).
        mask: [N, L] 1 where the patch was masked (the loss counts), 0 where it was visible (ignored).
        normalize_target: per-patch normalised pixel targets (MAE's default for its best results).
        eps: added to the per-patch variance before the square root.
    """
    predicted, target = predicted.float(), target.float()
    if normalize_target:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (predicted - target).pow(2).mean(dim=-1)  # [N, L]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()


def patch_selection_loss(queries: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
    """Selfie's objective: query i of an image must select candidate i among that image's M candidates.

    The logits are dot products scaled by 1/sqrt(D), as in scaled dot-product attention. The paper states no scale;
    without one, the logits of 512- or 1024-d convolutional features start in the hundreds and the first steps
    diverge.

    Args:
        queries: [N, M, D] one query per masked location (attention-pooled summary + location embedding).
        candidates: [N, M, D] patch-network features of the masked patches, candidate i is the truth of query i;
            the other M-1 are the distractors (patches of the same image).

    Returns:
        (mean cross-entropy over the N*M queries, accuracy of the selection).
    """
    logits = torch.einsum("nqd,nkd->nqk", queries.float(), candidates.float()) / queries.shape[-1] ** 0.5  # [N, M, M]
    labels = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    accuracy = (logits.argmax(dim=-1) == labels).float().mean()
    return loss, accuracy


def uncertainty_weighted_sum(losses: Sequence[Tensor], log_variances: Tensor, scales: Sequence[float]) -> Tensor:
    """sum_t scale_t * exp(-s_t) * L_t + s_t / 2 with learned s_t = log sigma_t^2 (Kendall et al. 2018, eq. 7 / 10).

    `scale_t` is 1 for a classification (cross-entropy) task and 1/2 for a regression task, per eq. 7 and 10; the
    s_t / 2 term stops the weights from vanishing.
    """
    total = log_variances.new_zeros(())
    for loss, log_variance, scale in zip(losses, log_variances, scales, strict=True):
        total = total + scale * torch.exp(-log_variance) * loss + 0.5 * log_variance
    return total
