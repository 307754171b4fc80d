"""Losses over the sub-captions of a long caption: DreamLIP (Zheng et al. 2024, "DreamLIP: Language-Image
Pre-training with Long Captions", sec. 3.2-3.3).

A long caption is split into sentences (sub-captions), each of which likely describes part of the image; K of them
are drawn per image per step. Two losses use them:

* `multi_positive_contrastive_loss` — every sub-caption of an image is a positive of that image (sec. 3.2, multiple
  positive pairs). Image -> text: a softmax over all G*K texts of the (gathered) batch whose target spreads 1/K over
  the image's K texts, i.e. -1/K Σ_k log p(t_ik | v_i); text -> image: each of the G*K texts picks its image among
  the G images. With K = 1 this is exactly CLIP's symmetric InfoNCE (`clip_contrastive_loss`, tested).
* `subcaption_grouping_loss` — the subcaption-specific grouping loss (sec. 3.3): each sub-caption t_ik weights the
  patch embeddings z_ip of its own image by their similarity, min-max normalised over the patches to [0, 1] and
  sparsified (weights under a threshold σ set to zero), the weights normalised to sum to 1; the weighted sum
  g_ik = Σ_p a_ikp z_ip is the sub-caption's grouped patch embedding, and a symmetric InfoNCE over the N*K
  (g_ik, t_ik) pairs of the local batch aligns each sub-caption with its own group and not with the others'.
  This is the weighting of SPARC (Bica et al. 2024, "Improving fine-grained understanding in image-text
  pre-training", eq. 2-4), which DreamLIP builds on; σ = 1/P (P patches) is SPARC's choice.

Assumed where the paper text was not reachable (only the abstract was): the form of the multi-positive loss above
(the released code, github.com/zyf0619sjtu/DreamLIP `open_clip/loss.py`, also contains a circle-loss variant that
is not used here), and the grouping contrast over the local batch only (the released code gathers the patches of
other ranks but contrasts within the local batch too). Logits and cross-entropies are computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp_lightning.losses.contrastive import _gather_pairs


def multi_positive_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    gather: bool = True,
    local_loss: bool = False,
    gather_with_grad: bool = True,
) -> Tensor:
    """DreamLIP's multi-positive image-text contrastive loss (module doc), the mean of its two directions.

    Args:
        image_features: [N, D] L2-normalised image embeddings of the local batch.
        text_features: [N, K, D] L2-normalised embeddings of K positive texts per image (row i: image i's).
        logit_scale: exp of the learned log-scale (CLIP's temperature).
        gather, local_loss, gather_with_grad: the distributed forms of `clip_contrastive_loss`: contrast against
            every rank's pairs; only the local rows against the gathered columns; gradient through the gather.
    """
    if image_features.ndim != 2 or text_features.ndim != 3 or text_features.shape[0] != image_features.shape[0] \
            or text_features.shape[2] != image_features.shape[1]:
        raise ValueError(
            "multi_positive_contrastive_loss needs image_features [N, D] and text_features [N, K, D] (K positives "
            f"per image), got {tuple(image_features.shape)} and {tuple(text_features.shape)}."
        )
    positives, width = text_features.shape[1:]
    all_images, all_texts, first = _gather_pairs(image_features, text_features, gather, gather_with_grad)
    if isinstance(logit_scale, Tensor):
        logit_scale = logit_scale.float()
    device = image_features.device
    with torch.autocast(device_type=device.type, enabled=False):
        images = (image_features if local_loss else all_images).float()  # [Q, D] query images
        texts = (text_features if local_loss else all_texts).float()  # [Q, K, D] their texts
        owners = torch.arange(images.shape[0], device=device) + (first if local_loss else 0)  # global image index
        flat_texts = all_texts.float().reshape(-1, width)  # [G*K, D], text j*K + k belongs to image j
        image_to_text = logit_scale * images @ flat_texts.T  # [Q, G*K]
        text_owner = torch.arange(flat_texts.shape[0], device=device) // positives  # [G*K]
        targets = (owners[:, None] == text_owner[None, :]).float() / positives  # 1/K on the K positives
        image_to_text_loss = F.cross_entropy(image_to_text, targets)
        text_to_image = logit_scale * texts.reshape(-1, width) @ all_images.float().T  # [Q*K, G]
        text_to_image_loss = F.cross_entropy(text_to_image, owners.repeat_interleave(positives))
    return 0.5 * (image_to_text_loss + text_to_image_loss)


def subcaption_grouping_weights(similarity: Tensor, threshold: float | None = None) -> Tensor:
    """Sparse patch weights of each sub-caption (sec. 3.3; SPARC eq. 2-3): `similarity` [..., P] of a sub-caption
    with the P patches of its image -> weights [..., P] >= 0 that sum to 1 over the patches.

    The similarities are min-max normalised over the patches to [0, 1]; values under `threshold` (σ; None: 1/P)
    become 0, the rest are divided by their sum. The most similar patch always keeps weight > 0 (it normalises to
    1), so no sub-caption is left without a group; the least similar one always gets 0 when σ > 0.
    """
    patches = similarity.shape[-1]
    sigma = 1.0 / patches if threshold is None else threshold
    if not 0.0 <= sigma < 1.0:
        raise ValueError(f"the grouping threshold σ must lie in [0, 1) (min-max normalised similarities), got {sigma}")
    low = similarity.amin(dim=-1, keepdim=True)
    high = similarity.amax(dim=-1, keepdim=True)
    normalised = (similarity - low) / (high - low).clamp_min(1e-6)
    sparse = torch.where(normalised >= sigma, normalised, torch.zeros_like(normalised))
    return sparse / sparse.sum(dim=-1, keepdim=True).clamp_min(1e-6)


def subcaption_grouping_loss(
    patch_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    threshold: float | None = None,
) -> Tensor:
    """DreamLIP's subcaption-specific grouping loss (module doc; sec. 3.3).

    Args:
        patch_features: [N, P, D] patch embeddings in the joint space (normalised here).
        text_features: [N, K, D] L2-normalised sub-caption embeddings, row i: image i's K sub-captions.
        logit_scale: exp of the log-scale of the contrast between grouped patches and sub-captions.
        threshold: σ of `subcaption_grouping_weights` (None: 1/P).
    """
    if patch_features.ndim != 3 or text_features.ndim != 3 or patch_features.shape[0] != text_features.shape[0] \
            or patch_features.shape[2] != text_features.shape[2]:
        raise ValueError(
            "subcaption_grouping_loss needs patch_features [N, P, D] and text_features [N, K, D], got "
            f"{tuple(patch_features.shape)} and {tuple(text_features.shape)}."
        )
    if isinstance(logit_scale, Tensor):
        logit_scale = logit_scale.float()
    with torch.autocast(device_type=patch_features.device.type, enabled=False):
        patches = F.normalize(patch_features.float(), dim=-1)
        texts = text_features.float()
        weights = subcaption_grouping_weights(texts @ patches.transpose(1, 2), threshold)  # [N, K, P]
        grouped = F.normalize(weights @ patches, dim=-1).reshape(-1, texts.shape[-1])  # [N*K, D]
        flat_texts = texts.reshape(-1, texts.shape[-1])  # [N*K, D]
        logits = logit_scale * grouped @ flat_texts.T  # [N*K, N*K]
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
