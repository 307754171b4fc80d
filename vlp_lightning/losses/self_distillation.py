"""Self-distillation losses: a student matches a momentum teacher (BYOL, DINO), pure functions.

* `byol_regression_loss` — BYOL's normalised mean squared error between the online prediction and the target
  projection (Grill et al. 2020, eq. 2): ||q̄ - z̄'||² = 2 - 2 <q, z'> / (||q|| ||z'||), symmetrised by the caller.
* `dino_distillation_loss` — DINO's cross-entropy between the centred, sharpened teacher distribution and the
  student's over multi-crop views (Caron et al. 2021, eq. 1-3 and Algorithm 1); `dino_centre` is the centre's EMA
  update (eq. 4), with the batch mean taken over the *global* batch: sum over ranks / (B × world), the trap of a
  per-rank centre that each rank lets drift on its own.
* `feature_reconstruction_loss` — UNIT's L_vis (Zhu et al. 2024): a student's decoded tokens match a frozen
  teacher's, token by token, with a cosine and an L1 term, L_cos + μ L_1.

Everything is computed in fp32: the teacher temperature 0.04 multiplies logit errors by 25 before the softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp_lightning.distributed import all_reduce_sum, world_size


def byol_regression_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of 2 - 2 cos(prediction, target) (BYOL eq. 2); the target carries no gradient.

    Args:
        prediction: [N, D] online predictions q_θ(z_θ).
        target: [N, D] target projections z'_ξ of the other view.
    """
    prediction = F.normalize(prediction.float(), dim=-1)
    target = F.normalize(target.detach().float(), dim=-1)
    return (2 - 2 * (prediction * target).sum(dim=-1)).mean()


def dino_distillation_loss(
    teacher_logits: Sequence[Tensor],
    student_logits: Sequence[Tensor],
    centre: Tensor,
    teacher_temperature: float = 0.04,
    student_temperature: float = 0.1,
) -> Tensor:
    """Σ over (teacher view t, student view s ≠ t) of H(P_t, P_s), averaged over pairs and samples (eq. 3).

    P_t = softmax((g_θt(x_t) - c) / τ_t) (centring and sharpening, sec. 3.1), P_s = softmax(g_θs(x_s) / τ_s). The
    teacher sees the global crops only (the first `len(teacher_logits)` views), the student sees every crop; pairs
    of the same view are skipped (Algorithm 1, official `DINOLoss`).

    Args:
        teacher_logits: G tensors [N, K], one per global crop, from the teacher (no gradient).
        student_logits: V >= G tensors [N, K], the global crops first, from the student.
        centre: [K] (or [1, K]) the running centre c.
        teacher_temperature: τ_t (0.04 warmed up to 0.07 by the caller in the paper).
        student_temperature: τ_s (0.1).
    """
    if len(student_logits) < len(teacher_logits) or len(student_logits) < 2:
        raise ValueError(
            f"dino_distillation_loss needs at least 2 student views and one per teacher view; got "
            f"{len(teacher_logits)} teacher and {len(student_logits)} student views"
        )
    with torch.autocast(device_type=centre.device.type, enabled=False):
        centre = centre.float().reshape(1, -1)
        teacher = [F.softmax((t.detach().float() - centre) / teacher_temperature, dim=-1) for t in teacher_logits]
        student = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student_logits]
        cross_entropies = [
            -(teacher[t] * student[s]).sum(dim=-1).mean()
            for t in range(len(teacher))
            for s in range(len(student))
            if s != t
        ]
        return torch.stack(cross_entropies).mean()


@torch.no_grad()
def dino_centre(centre: Tensor, teacher_logits: Sequence[Tensor], momentum: float = 0.9) -> Tensor:
    """The new centre c ← m c + (1 - m) mean of the teacher logits over the global batch (eq. 4).

    The mean is the sum over views, samples and ranks divided by (views × B × world), so every rank holds the
    same centre (the official `update_center` all-reduces the batch sum and divides by B × world).
    """
    stacked = torch.cat([t.detach().float() for t in teacher_logits])  # [G*N, K]
    batch_centre = all_reduce_sum(stacked.sum(dim=0)) / (stacked.shape[0] * world_size())
    return centre.float().reshape(-1) * momentum + batch_centre * (1 - momentum)


def feature_reconstruction_loss(prediction: Tensor, target: Tensor, l1_weight: float = 1.0) -> Tensor:
    """UNIT's L_vis: mean over images and tokens of (1 - cos(x̂, f_π(x))) + μ mean |x̂ - f_π(x)| (the L1 averaged over
    the channels), fp32; the target carries no gradient.

    Args:
        prediction: [N, L, D] the vision decoder's reconstruction x̂ of every token.
        target: [N, L, D] the frozen teacher's tokens f_π(x) of the same images.
        l1_weight: μ.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must have one shape")
    prediction, target = prediction.float(), target.detach().float()
    cosine = 1 - F.cosine_similarity(prediction, target, dim=-1)  # [N, L]
    return (cosine + l1_weight * (prediction - target).abs().mean(-1)).mean()
