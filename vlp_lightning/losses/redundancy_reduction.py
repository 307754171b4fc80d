"""Redundancy-reduction losses between two views (Barlow Twins, VICReg), pure functions, over the global batch.

* `barlow_twins_loss` — Zbontar et al. 2021, eq. 1 and Algorithm 1: the cross-correlation matrix C of the two
  batch-standardised embeddings should be the identity: Σ_i (1 - C_ii)² + λ Σ_i Σ_{j≠i} C_ij², λ = 5e-3.
  Standardisation and C use the statistics of the *global* batch (the official code has SyncBatchNorm and
  all-reduces C / global batch), gathered here with gradient.
* `vicreg_loss` — Bardes et al. 2022, eq. 1-6: λ s(Z, Z') + μ [v(Z) + v(Z')] + ν [c(Z) + c(Z')], with the invariance
  s the MSE of the local pairs and the variance v / covariance c over the global batch (official
  `FullGatherLayer`); λ = μ = 25, ν = 1, γ = 1, ε = 1e-4. v is the mean hinge of the standard deviations, averaged
  over the two branches as the official code does ((v(Z) + v(Z')) / 2), c sums the squared off-diagonal covariances
  divided by d.

Both are computed in fp32: the variances of d-dimensional embeddings over a batch lose everything in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp_lightning.distributed import all_gather_with_grad


def barlow_twins_loss(
    view_a: Tensor, view_b: Tensor, redundancy_weight: float = 5e-3, *, gather: bool = True
) -> Tensor:
    """Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij² with C the cross-correlation over the global batch (eq. 1-2).

    Args:
        view_a, view_b: [N, D] embeddings z^A, z^B of the two views.
        redundancy_weight: λ (5e-3).
        gather: use the batch of every rank (no effect in one process).
    """
    with torch.autocast(device_type=view_a.device.type, enabled=False):
        a, b = view_a.float(), view_b.float()
        if gather:
            a, b = all_gather_with_grad(a), all_gather_with_grad(b)
        a = (a - a.mean(dim=0)) / torch.sqrt(a.var(dim=0, unbiased=False) + 1e-5)  # BatchNorm1d(affine=False)
        b = (b - b.mean(dim=0)) / torch.sqrt(b.var(dim=0, unbiased=False) + 1e-5)
        correlation = a.T @ b / a.shape[0]  # [D, D]
        on_diagonal = (torch.diagonal(correlation) - 1).pow(2).sum()
        off_diagonal = correlation.pow(2).sum() - torch.diagonal(correlation).pow(2).sum()
        return on_diagonal + redundancy_weight * off_diagonal


def vicreg_loss(
    view_a: Tensor,
    view_b: Tensor,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    epsilon: float = 1e-4,
    *,
    gather: bool = True,
) -> Tensor:
    """λ s(Z, Z') + μ (v(Z) + v(Z')) / 2 + ν (c(Z) + c(Z')) (eq. 6 with the official code's averaging of v).

    Args:
        view_a, view_b: [N, D] expander outputs Z, Z' of the two views.
        invariance_weight, variance_weight, covariance_weight: λ, μ, ν (25, 25, 1).
        epsilon: ε inside the standard deviation (1e-4).
        gather: variance and covariance over the batch of every rank (no effect in one process).
    """
    with torch.autocast(device_type=view_a.device.type, enabled=False):
        a, b = view_a.float(), view_b.float()
        invariance = F.mse_loss(a, b)
        if gather:
            a, b = all_gather_with_grad(a), all_gather_with_grad(b)
        variance = (_variance_hinge(a, epsilon) + _variance_hinge(b, epsilon)) / 2
        covariance = _covariance_penalty(a) + _covariance_penalty(b)
        return invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance


def _variance_hinge(z: Tensor, epsilon: float) -> Tensor:
    """v(Z) = mean_j max(0, γ - sqrt(Var(z_j) + ε)), γ = 1 (eq. 1)."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + epsilon)).mean()


def _covariance_penalty(z: Tensor) -> Tensor:
    """c(Z) = (1/d) Σ_{i≠j} C(Z)_ij², C the unbiased covariance (eq. 3-4)."""
    z = z - z.mean(dim=0)
    covariance = z.T @ z / (z.shape[0] - 1)  # [D, D]
    return (covariance.pow(2).sum() - torch.diagonal(covariance).pow(2).sum()) / z.shape[1]
