"""Contrastive image-text losses (CLIP, ALIGN, ConVIRT), in one process or across ranks.

All three are InfoNCE in both directions over the similarity matrix of a batch of pairs: image i must pick text i
among all texts (image→text) and text i must pick image i among all images (text→image). They differ only in the
weight of the two directions and in the temperature: CLIP averages them with a learned temperature, ConVIRT
weights them λ and 1-λ with a fixed one.

Across ranks (open_clip's `ClipLoss`), with world size W, local batch N and global batch G = W*N:

* `gather=False`: each rank contrasts its own N pairs only (N-1 negatives per row).
* naive (`gather=True, local_loss=False`): every rank gathers all G pairs and computes the whole [G, G] loss.
  Memory and compute grow as G².
* `local_loss=True`: rank r takes its own N rows against the G gathered columns; the positive of local row i is
  column r*N + i. Memory grows as N·G, i.e. linearly in G at a fixed per-device batch.

Exact relation to one process on the concatenated batch, whose loss is L (tested in tests/test_distributed.py);
x is a feature owned by rank r:

* loss: naive returns L on every rank; `local_loss` returns per-rank values whose mean over ranks is L.
* `gather_with_grad=True` (both modes): the gradient on rank r is W * dL/dx. DDP averages gradients over ranks,
  so the model's gradient equals the single-process one.
* `gather_with_grad=False`, naive: the gathered copies are detached except the local slice, which is replaced by
  the local, grad-carrying features (as open_clip does). The gradient on rank r is exactly dL/dx, so after DDP's
  averaging the model's gradient is dL/dθ / W — the same as a learning rate divided by W.
* `gather_with_grad=False`, `local_loss`: the local slice is likewise replaced (open_clip does not, and so also
  drops the column gradients of the local rows). The gradient on rank r is d(loss on rank r)/dx: it misses the
  terms where x is a negative in other ranks' rows — an approximation that saves the backward communication.

Logits and cross-entropies are computed in fp32 even under bf16 autocast: a bf16 logit at scale 100 is off by up
to 0.25, enough to reorder near-tied candidates. All ranks must pass the same N (an all-gather requirement).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp_lightning.distributed import all_gather_no_grad, all_gather_with_grad, rank, world_size


def clip_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    gather: bool = True,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    label_smoothing: float = 0.0,
) -> Tensor:
    """CLIP's symmetric cross-entropy over scaled cosine similarities (Radford et al. 2021, Fig. 3).

    The mean of the image→text and text→image cross-entropies of `logit_scale * image @ text.T`. ALIGN's normalised
    softmax loss (Jia et al. 2021, sec. 4.1) is the same pair of cross-entropies with temperature 1/logit_scale,
    each smoothed with `label_smoothing` = 0.1 (sec. 5): the target puts 1 - 0.1 on the pair and 0.1 spread evenly
    over all G candidates (PyTorch's `cross_entropy(label_smoothing=...)`).

    Args:
        image_features: [N, D] L2-normalised image embeddings of the local batch.
        text_features: [N, D] L2-normalised text embeddings, row i paired with image row i.
        logit_scale: exp of the learned log-scale (init 1/0.07, clamped at 100 by the caller, sec. 2.5).
        gather: contrast against the pairs of every rank (module docstring); no effect in one process.
        local_loss: local rows against gathered columns, memory N·G instead of G².
        gather_with_grad: let the gradient flow through the other ranks' gathered features.
        label_smoothing: ε of both cross-entropies (0: CLIP, 0.1: ALIGN).
    """
    return _two_way_infonce(
        image_features,
        text_features,
        logit_scale,
        image_to_text_weight=0.5,
        gather=gather,
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        label_smoothing=label_smoothing,
    )


def convirt_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    temperature: float = 0.1,
    image_to_text_weight: float = 0.75,
    *,
    gather: bool = True,
    local_loss: bool = False,
    gather_with_grad: bool = True,
) -> Tensor:
    """ConVIRT's bidirectional contrastive loss (Zhang et al. 2020, eq. 2-4).

    With v the image and u the text projections and <v, u> their cosine similarity:
    eq. 2: l_i(v→u) = -log( exp(<v_i, u_i>/τ) / Σ_k exp(<v_i, u_k>/τ) ),
    eq. 3: l_i(u→v) = -log( exp(<u_i, v_i>/τ) / Σ_k exp(<u_i, v_k>/τ) ),
    eq. 4: L = 1/N Σ_i ( λ l_i(v→u) + (1-λ) l_i(u→v) ), with τ = 0.1 and λ = 0.75 in the paper.
    The features are normalised here, so raw projections are fine (normalising twice changes nothing).

    Args:
        image_features: [N, D] image projections v of the local batch.
        text_features: [N, D] text projections u, row i paired with image row i.
        temperature: τ, fixed.
        image_to_text_weight: λ in [0, 1], the weight of the image→text term.
        gather, local_loss, gather_with_grad: the distributed forms, as in `clip_contrastive_loss`.
    """
    if not 0.0 <= image_to_text_weight <= 1.0:
        raise ValueError(f"image_to_text_weight (λ in ConVIRT eq. 4) must lie in [0, 1], got {image_to_text_weight}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    return _two_way_infonce(
        F.normalize(image_features, dim=-1),
        F.normalize(text_features, dim=-1),
        1.0 / temperature,
        image_to_text_weight=image_to_text_weight,
        gather=gather,
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
    )


@torch.no_grad()
def contrastive_accuracy(image_features: Tensor, text_features: Tensor, *, gather: bool = True) -> tuple[Tensor, Tensor]:
    """Top-1 accuracy of the local rows against all (gathered) candidates: (image→text, text→image).

    A cheap training signal next to the loss: chance is 1/G, and it reaches 1 when every pair is the nearest.
    """
    all_images, all_texts, first_label = _gather_pairs(image_features, text_features, gather, gather_with_grad=False)
    labels = torch.arange(image_features.shape[0], device=image_features.device) + first_label
    image_to_text = (image_features @ all_texts.T).argmax(dim=1) == labels
    text_to_image = (text_features @ all_images.T).argmax(dim=1) == labels
    return image_to_text.float().mean(), text_to_image.float().mean()


def weighted_two_way_infonce(
    image_features: Tensor,
    text_features: Tensor,
    all_image_features: Tensor,
    all_text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    first_label: int,
    local_loss: bool,
    image_to_text_weight: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """The loss of one rank given the features it already gathered: w·CE(image→text) + (1-w)·CE(text→image).

    `all_*_features` are [G, D] with this rank's [N, D] rows at `first_label`. Naive mode builds the [G, G] logits
    and labels 0..G-1; `local_loss` builds the two [N, G] blocks of this rank's rows and labels first_label + 0..N-1.
    Public so a benchmark can stand in for one rank of a large world with fake gathered features.
    """
    if isinstance(logit_scale, Tensor):
        logit_scale = logit_scale.float()
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        if local_loss:
            image_to_text = logit_scale * image_features.float() @ all_text_features.float().T  # [N, G]
            text_to_image = logit_scale * text_features.float() @ all_image_features.float().T  # [N, G]
            labels = torch.arange(image_features.shape[0], device=image_features.device) + first_label
        else:
            image_to_text = logit_scale * all_image_features.float() @ all_text_features.float().T  # [G, G]
            text_to_image = image_to_text.T
            labels = torch.arange(all_image_features.shape[0], device=image_features.device)
        image_to_text_loss = F.cross_entropy(image_to_text, labels, label_smoothing=label_smoothing)
        text_to_image_loss = F.cross_entropy(text_to_image, labels, label_smoothing=label_smoothing)
        return image_to_text_weight * image_to_text_loss + (1.0 - image_to_text_weight) * text_to_image_loss


def _two_way_infonce(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    image_to_text_weight: float,
    gather: bool,
    local_loss: bool,
    gather_with_grad: bool,
    label_smoothing: float = 0.0,
) -> Tensor:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}; ALIGN uses 0.1.")
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            "image_features and text_features must both be [N, D] with row i of one paired with row i of the other, "
            f"got {tuple(image_features.shape)} and {tuple(text_features.shape)}."
        )
    all_images, all_texts, first_label = _gather_pairs(image_features, text_features, gather, gather_with_grad)
    return weighted_two_way_infonce(
        image_features,
        text_features,
        all_images,
        all_texts,
        logit_scale,
        first_label=first_label,
        local_loss=local_loss,
        image_to_text_weight=image_to_text_weight,
        label_smoothing=label_smoothing,
    )


def _gather_pairs(
    image_features: Tensor, text_features: Tensor, gather: bool, gather_with_grad: bool
) -> tuple[Tensor, Tensor, int]:
    """Gathered [G, D] images and texts, and the global index of this rank's first row."""
    if not gather or world_size() == 1:
        return image_features, text_features, 0
    first_label = rank() * image_features.shape[0]
    if gather_with_grad:
        return all_gather_with_grad(image_features), all_gather_with_grad(text_features), first_label
    return (
        _with_local_slice(all_gather_no_grad(image_features), image_features, first_label),
        _with_local_slice(all_gather_no_grad(text_features), text_features, first_label),
        first_label,
    )


def _with_local_slice(gathered: Tensor, local: Tensor, start: int) -> Tensor:
    """`gathered` with rows start..start+N replaced by the grad-carrying local features."""
    return torch.cat([gathered[:start], local, gathered[start + local.shape[0] :]], dim=0)
