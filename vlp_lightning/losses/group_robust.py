"""Group-robust objectives over known subgroups (group = (class, spurious attribute)).

Online GroupDRO (Sagawa, Koh, Hashimoto, Liang 2020, "Distributionally Robust Neural Networks for Group Shifts",
Algorithm 1): with L_g the mean loss of the batch's samples of group g,

    q_g <- q_g exp(eta L_g)    then q <- q / sum(q),      loss = sum_g q_g L_g,

an exponentiated-gradient ascent step on the group weights q followed by a descent step on the q-weighted loss.
Groups absent from the batch have L_g = 0 (their weight only shrinks relative to the others), as in the official
`loss.py` (`compute_group_avg`) that FFR's code reuses (`utils.DROLossComputer`, without its generalisation
adjustment C / sqrt(n_g), which defaults to 0). The weights are updated with the losses detached: q is not trained
by backpropagation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_mean_losses(losses: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group means [G] of per-sample `losses` [N] over `groups` [N] (0 for a group without samples) and the
    sample counts [G]."""
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        raise ValueError(f"group indices must lie in [0, {num_groups}), got {groups.min().item()}..."
                         f"{groups.max().item()}; check that the data's group field matches the group names")
    counts = torch.bincount(groups, minlength=num_groups).to(losses.dtype)
    sums = torch.zeros(num_groups, dtype=losses.dtype, device=losses.device).index_add(0, groups, losses)
    return sums / counts.clamp(min=1), counts


def group_dro_loss(losses: Tensor, groups: Tensor, weights: Tensor, step_size: float) -> tuple[Tensor, Tensor]:
    """Online GroupDRO (module doc): the q-weighted loss and the updated weights q [G] (sum 1).

    `losses` [N] per-sample losses, `groups` [N] group indices, `weights` [G] the current q, `step_size` eta."""
    if step_size < 0:
        raise ValueError(f"GroupDRO's step_size eta must be >= 0, got {step_size}; Sagawa et al. use 0.01")
    group_losses, _ = group_mean_losses(losses, groups, weights.numel())
    updated = weights * torch.exp(step_size * group_losses.detach())
    updated = updated / updated.sum()
    return (updated * group_losses).sum(), updated
