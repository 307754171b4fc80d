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

GRAIN (Halbe et al. 2024) matches by the box terms alone (λ_align = 0: its region queries carry an embedding, not
phrase scores) and contrasts each matched query's embedding with the batch's region descriptions
(`region_description_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def box_matching_cost(boxes: Tensor, targets: Tensor, l1_weight: float, giou_weight: float) -> Tensor:
    """The box terms of the matching cost (module doc), predicted boxes [Q, 4] against true boxes [K, 4] (both
    normalised cxcywh) -> [Q, K]: λ_L1 · ‖b̂_q − b_k‖₁ − λ_GIoU · GIoU(b̂_q, b_k) (DETR eq. 1 without its constant)."""
    return l1_weight * torch.cdist(boxes, targets, p=1) - giou_weight * generalized_box_iou(
        box_convert(boxes, "cxcywh", "xyxy"), box_convert(targets, "cxcywh", "xyxy"))


def hungarian(cost: Tensor) -> tuple[Tensor, Tensor]:
    """The cheapest one-to-one assignment of a cost [Q, K] (`scipy.optimize.linear_sum_assignment`) -> (row index
    [K'], column index [K']), K' = min(Q, K)."""
    rows, columns = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(columns, dtype=torch.long)


def match_predictions(
    logits: Tensor, boxes: Tensor, targets: Tensor, align_weight: float, l1_weight: float, giou_weight: float
) -> tuple[Tensor, Tensor]:
    """One image: alignment logits [Q, K] of Q queries against its K phrases, predicted boxes [Q, 4] and the phrases'
    true boxes [K, 4] (both normalised cxcywh) -> (query index [K'], phrase index [K']) of the cheapest one-to-one
    assignment (module doc), K' = min(Q, K)."""
    return hungarian(align_weight * focal_alignment_cost(logits)
                     + box_matching_cost(boxes, targets, l1_weight, giou_weight))


def box_regression_loss(predicted: Tensor, true: Tensor, num_boxes: int) -> tuple[Tensor, Tensor]:
    """Matched boxes [M, 4] and their true boxes [M, 4] (normalised cxcywh) -> (L1, GIoU loss), each summed and
    divided by `num_boxes` (DETR eq. 2's box terms)."""
    predicted, true = predicted.float(), true.float()
    loss_l1 = (predicted - true).abs().sum() / num_boxes
    loss_giou = generalized_box_iou_loss(box_convert(predicted, "cxcywh", "xyxy"), box_convert(true, "cxcywh", "xyxy"),
                                         reduction="sum") / num_boxes
    return loss_l1, loss_giou


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
        loss_l1, loss_giou = box_regression_loss(torch.cat(matched_boxes), torch.cat(matched_targets), num_boxes)
    else:
        loss_l1 = loss_giou = boxes.sum() * 0.0
    loss = align_weight * loss_align + l1_weight * loss_l1 + giou_weight * loss_giou
    return {"loss": loss, "align": loss_align.detach(), "l1": loss_l1.detach(), "giou": loss_giou.detach()}


def region_description_loss(
    boxes: Tensor,
    regions: Tensor,
    targets: list[Tensor],
    descriptions: Tensor,
    logit_scale: Tensor,
    l1_weight: float = 1.0,
    giou_weight: float = 1.0,
    match_l1_weight: float = 5.0,
    match_giou_weight: float = 2.0,
) -> dict[str, Tensor]:
    """GRAIN's region terms (Halbe et al. 2024, sec. 3: L_box and L_rd of L_total = L_ic + L_box + L_rd).

    Predicted boxes [N, Q, 4] and unit region embeddings [N, Q, D] of Q region queries per image, each image's true
    boxes `targets[i]` [K_i, 4] (normalised cxcywh) and the unit embeddings of the batch's region descriptions
    [ΣK_i, D], image after image (description k of image i describes `targets[i][k]`) -> `box` = λ_L1·L1 +
    λ_GIoU·L_GIoU, `region` (L_rd), their parts `l1`, `giou` and `region_accuracy` (the share of matched queries whose
    most similar description is their own).

    Queries are matched to boxes by the box cost alone (`box_matching_cost` with 5 and 2, the official
    `HungarianMatcher(cost_bbox=5, cost_giou=2)` called with `exclude_class=True`: GRAIN's queries have no class).
    L_box is DETR's L1 + GIoU on the matched pairs over their number; L_rd the cross-entropy of each matched query's
    region embedding against every description of the batch, scaled by `logit_scale` (CLIP's temperature), its own
    box's description the target (the official `WordContrastiveLoss`: region -> description only, local batch).
    An unmatched query gets no loss: there is no "no object" class (the official cardinality term is only logged).
    """
    matched_boxes, matched_targets, matched_regions, labels = [], [], [], []
    offset = 0
    for image, target in enumerate(targets):
        if target.shape[0]:
            queries, objects = hungarian(box_matching_cost(boxes[image].float(), target.float(), match_l1_weight,
                                                           match_giou_weight))
            matched_boxes.append(boxes[image, queries])
            matched_targets.append(target[objects])
            matched_regions.append(regions[image, queries])
            labels.append(objects.to(boxes.device) + offset)
        offset += target.shape[0]
    if offset != descriptions.shape[0]:
        raise ValueError(f"region_description_loss: the targets hold {offset} boxes but {descriptions.shape[0]} "
                         "descriptions were given; give one description per true box, image after image")
    if not matched_boxes:
        zero = boxes.sum() * 0.0 + regions.sum() * 0.0
        return {"box": zero, "region": zero, "l1": zero.detach(), "giou": zero.detach(),
                "region_accuracy": zero.detach()}
    labels = torch.cat(labels)
    loss_l1, loss_giou = box_regression_loss(torch.cat(matched_boxes), torch.cat(matched_targets), labels.numel())
    logits = logit_scale * torch.cat(matched_regions).float() @ descriptions.float().T  # [M, ΣK]
    loss_region = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(1) == labels).float().mean()
    return {"box": l1_weight * loss_l1 + giou_weight * loss_giou, "region": loss_region, "l1": loss_l1.detach(),
            "giou": loss_giou.detach(), "region_accuracy": accuracy.detach()}
