"""Phrase grounding as set prediction: predictions (one box and one alignment score per phrase for each region query)
matched one-to-one to the true boxes, then scored (DETR, Carion et al. 2020, sec. 3.1; GLIP, Li et al. 2022, eq. 3).

Boxes: a prediction is (cx, cy, w, h) normalised to [0, 1] by the image side; the data's boxes are
[x0, y0, x1, y1] in pixels (`boxes_to_normalised` / `normalised_to_boxes` convert). For one image with queries q
and phrases k (phrase k names true box b_k), the matching cost (DETR eq. 1 with Deformable DETR's focal class cost)

    C[q, k] = λ_align · (focal⁺(s_qk) − focal⁻(s_qk)) + λ_L1 · ‖b̂_q − b_k‖₁ + λ_GIoU · (1 − GIoU(b̂_q, b_k))

is minimised by `scipy.optimize.linear_sum_assignment` (Hungarian). The loss (DETR eq. 2) is a sigmoid focal loss
(α 0.25, γ 2, GLIP's token loss and RetinaNet's) on every alignment score, 1 for a matched (query, its phrase) and 0
for every other pair, so an unmatched query learns "no object" by scoring every phrase low, plus L1 and GIoU on the
matched boxes, each summed and divided by the number of true boxes.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


def boxes_to_normalised(boxes: Tensor, height: int, width: int) -> Tensor:
    """[K, 4] x0, y0, x1, y1 in pixels -> cx, cy, w, h in [0, 1]."""
    scale = boxes.new_tensor([width, height, width, height])
    return box_convert(boxes / scale, "xyxy", "cxcywh")


def normalised_to_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """[..., 4] cx, cy, w, h in [0, 1] -> x0, y0, x1, y1 in pixels."""
    return box_convert(boxes, "cxcywh", "xyxy") * boxes.new_tensor([width, height, width, height])


def focal_alignment_cost(logits: Tensor) -> Tensor:
    """Deformable DETR's class cost: the focal loss of calling the pair a match minus that of calling it none."""
    probability = logits.sigmoid()
    positive = FOCAL_ALPHA * (1 - probability) ** FOCAL_GAMMA * -(probability + 1e-8).log()
    negative = (1 - FOCAL_ALPHA) * probability**FOCAL_GAMMA * -(1 - probability + 1e-8).log()
    return positive - negative


def match_predictions(
    logits: Tensor, boxes: Tensor, targets: Tensor, align_weight: float, l1_weight: float, giou_weight: float
) -> tuple[Tensor, Tensor]:
    """One image: alignment logits [Q, K] of Q queries against its K phrases, predicted boxes [Q, 4] and the phrases'
    true boxes [K, 4] (both normalised cxcywh) -> (query index [K'], phrase index [K']) of the cheapest one-to-one
    assignment (module doc), K' = min(Q, K)."""
    cost = (align_weight * focal_alignment_cost(logits) + l1_weight * torch.cdist(boxes, targets, p=1)
            - giou_weight * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                box_convert(targets, "cxcywh", "xyxy")))
    queries, phrases = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return torch.as_tensor(queries, dtype=torch.long), torch.as_tensor(phrases, dtype=torch.long)


def grounding_loss(
    logits: Tensor,
    boxes: Tensor,
    targets: list[Tensor],
    align_weight: float = 2.0,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
) -> dict[str, Tensor]:
    """Alignment logits [N, Q, K_max] (phrase k of image i is column k; columns past K_i are ignored), predicted
    boxes [N, Q, 4] and each image's true boxes `targets[i]` [K_i, 4] (normalised cxcywh) -> the weighted `loss` and
    its `align`, `l1`, `giou` terms (module doc; weights DETR's / Deformable DETR's 2, 5, 2)."""
    align_targets = torch.zeros_like(logits, dtype=torch.float32)
    valid = torch.zeros_like(align_targets, dtype=torch.bool)
    matched_boxes, matched_targets = [], []
    for image, target in enumerate(targets):
        count = target.shape[0]
        valid[image, :, :count] = True
        if count == 0:
            continue
        queries, phrases = match_predictions(logits[image, :, :count], boxes[image], target, align_weight,
                                             l1_weight, giou_weight)
        align_targets[image, queries, phrases] = 1.0
        matched_boxes.append(boxes[image, queries])
        matched_targets.append(target[phrases])
    num_boxes = max(sum(target.shape[0] for target in targets), 1)
    focal = sigmoid_focal_loss(logits.float(), align_targets, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="none")
    loss_align = focal[valid].sum() / num_boxes
    if matched_boxes:
        predicted, true = torch.cat(matched_boxes).float(), torch.cat(matched_targets).float()
        loss_l1 = (predicted - true).abs().sum() / num_boxes
        loss_giou = generalized_box_iou_loss(box_convert(predicted, "cxcywh", "xyxy"),
                                             box_convert(true, "cxcywh", "xyxy"), reduction="sum") / num_boxes
    else:
        loss_l1 = loss_giou = boxes.sum() * 0.0
    loss = align_weight * loss_align + l1_weight * loss_l1 + giou_weight * loss_giou
    return {"loss": loss, "align": loss_align.detach(), "l1": loss_l1.detach(), "giou": loss_giou.detach()}
