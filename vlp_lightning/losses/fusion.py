"""Losses of fusion-encoder pretraining (ALBEF, Li et al. 2021, "Align before Fuse", and the methods after it).

ALBEF trains an image encoder, a text encoder and a fusion (cross-attention) encoder with three losses (sec. 3.2):

* ITC — image-text contrastive over the unimodal [CLS] features, with momentum distillation (sec. 3.3, L^mod_itc):
  `momentum_targets` builds the soft targets from the momentum model, `distilled_contrastive_loss` applies them.
* ITM — image-text matching on the fusion [CLS]: a binary classifier (`itm_loss`) over the positive pairs and one
  hard negative per image and per text, sampled by contrastive similarity (`sample_hard_negatives`).
* MLM — masked language modeling conditioned on the image: BERT masking (`mask_tokens`, or whole words / entities
  with `mask_spans`: ARL's whole-entity masking) and cross-entropy over the masked tokens, optionally distilled
  from the momentum model's predictions (`mlm_loss`).

CoCa's captioning loss (Yu et al. 2022, sec. 3.1, L_Cap), next-token cross-entropy ignoring padding, is `caption_loss`.

Pure functions, no Lightning, no module state: the momentum model, the queues and the α ramp (ALBEF ramps α from 0
to 0.4 over the first epoch) belong to the caller. Softmaxes and cross-entropies are computed in fp32 even under
fp16 / bf16 autocast. Labels follow PyTorch's convention: -100 marks a position without a target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


@torch.no_grad()
def sample_hard_negatives(
    similarity: Tensor,
    row_ids: Tensor,
    column_ids: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One negative column per row, drawn with probability softmax(similarity) over the columns of another id.

    ALBEF sec. 3.2 / official `model_pretrain.py`: each image's negative text for ITM is drawn from the same batch
    following the contrastive image-to-text similarity, so texts more similar to the image — harder negatives — are
    likelier; the same with the roles swapped for each text (call this twice: with sim_i2t, then sim_t2i). The
    official code takes `softmax(sim_i2t[:, :bs])`, zeroes the diagonal (the positive) and calls `torch.multinomial`
    once per row; its retrieval fine-tuning (`model_retrieval.py`, `masked_fill_(torch.eq(idx, idx.T), 0)`) zeroes
    every column of the same image id, as done here, so a second caption of the same image is never drawn as a
    "negative". One vectorised `torch.multinomial` draws all rows at once; the masked softmax equals the official
    softmax-then-zero after multinomial's renormalisation.

    Weights are computed in fp32 whatever the input dtype. A non-finite similarity (NaN, ±Inf) gets weight 0; a row
    whose finite candidates are all masked falls back to uniform over its columns of a different id.

    Args:
        similarity: [B, G] similarity of each row to each candidate column (e.g. image→text logits `sim_i2t` of the
            local batch, or against the batch gathered from all ranks, G = B × world). Pass only the columns whose
            embeddings the caller can feed to the fusion encoder, not a queue.
        row_ids: [B] integer id of each row's sample (image id / key index); row i's positives are the columns
            with `column_ids == row_ids[i]`, wherever they are.
        column_ids: [G] integer id of each column's sample.
        generator: optional generator on `similarity`'s device, for reproducible draws.

    Returns:
        [B] long column index of the sampled negative of each row.
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be [B, G], got shape {tuple(similarity.shape)}.")
    rows, columns = similarity.shape
    if row_ids.shape != (rows,) or column_ids.shape != (columns,):
        raise ValueError(
            f"row_ids must be [{rows}] and column_ids [{columns}] to match similarity {tuple(similarity.shape)}, "
            f"got {tuple(row_ids.shape)} and {tuple(column_ids.shape)}."
        )
    candidate = row_ids.to(similarity.device)[:, None] != column_ids.to(similarity.device)[None, :]  # [B, G]
    has_candidate = candidate.any(dim=1)
    if not bool(has_candidate.all()):
        row = int((~has_candidate).nonzero()[0])
        raise ValueError(
            f"Row {row} (id {int(row_ids[row])}) has no column of a different id to sample a negative from, i.e. every "
            "sample in the batch is the same image; use a larger or shuffled batch with more than one distinct image."
        )
    with torch.autocast(device_type=similarity.device.type, enabled=False):
        similarity = similarity.float()
        usable = candidate & torch.isfinite(similarity)
        weights = torch.softmax(similarity.masked_fill(~usable, float("-inf")), dim=1)  # NaN in rows with no usable
        weights = torch.where(usable.any(dim=1, keepdim=True), weights, candidate.float())
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Sequence[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masking for MLM (Devlin et al. 2019, sec. 3.1; ALBEF sec. 3.2 uses probability 0.15).

    Each eligible token is chosen with `probability`; a chosen token becomes `mask_token_id` 80 % of the time, a
    random token 10 % and stays unchanged 10 %. Eligible means a real token (attention_mask 1) whose id is not in
    `special_token_ids` nor `mask_token_id` (which is always treated as special). Random replacements are uniform
    over the ids of [0, vocab_size) that are not special, drawn in one vectorised call.

    Two deliberate differences from the references: ALBEF's `mask` only protects [PAD] and [CLS] (its [SEP] can be
    masked) and both ALBEF and transformers' `DataCollatorForLanguageModeling` draw random replacements from the
    whole vocabulary, specials included; here no special token is ever chosen or inserted. The 80/10/10 split comes
    from one uniform per token (the references use two Bernoulli draws: the same distribution).

    Args:
        input_ids: [N, L] integer token ids.
        attention_mask: [N, L] 1 (or True) at real tokens, 0 at padding.
        mask_token_id: id of [MASK], in [0, vocab_size).
        vocab_size: size of the vocabulary of the MLM head.
        special_token_ids: ids never chosen nor drawn as replacements (start / end / cls / sep / pad / mask).
        probability: chance of choosing each eligible token, in (0, 1).
        generator: optional generator on `input_ids`' device; the same generator state gives the same result.

    Returns:
        (masked_ids [N, L], labels [N, L]): the corrupted ids, and the original id at chosen positions, -100
        elsewhere (the MLM loss counts chosen positions only, `mlm_loss`).
    """
    _check_masking(input_ids, attention_mask, probability, mask_token_id, vocab_size)
    specials = _special_ids(special_token_ids, mask_token_id, input_ids.device)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, specials)
    choose, action = torch.rand((2, *input_ids.shape), generator=generator, device=input_ids.device)
    return _corrupt(input_ids, eligible & (choose < probability), action, specials, vocab_size, mask_token_id,
                    generator)


def mask_spans(
    input_ids: Tensor,
    attention_mask: Tensor,
    spans: Sequence[Sequence[tuple[int, int, bool]]],
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Sequence[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Whole-span masking: whole words and whole entities are masked or kept together (ARL's knowledge-induced
    MLM, Chen et al. 2022, sec. 3.4; the official `DataCollatorForWholeEntityMask` marks the tokens of an entity as
    one word for BERT's whole-word masking), then BERT's 80 % [MASK] / 10 % random / 10 % kept (`mask_tokens`).

    Per row, the units are drawn in random order, *preferred* units (entities) before the others, and masked
    while the row's budget max(1, round(probability x its eligible tokens)) is not exceeded; a unit that would
    exceed it is skipped, except the first (every row with a unit masks one: with short captions the reference's
    rule, which skips it, masks nothing). Only eligible tokens (real, not special) of a unit are ever chosen.

    Args:
        input_ids, attention_mask: [N, L] as for `mask_tokens`.
        spans: per row, its units as (start, end, preferred) token ranges, end exclusive.
        mask_token_id, vocab_size, special_token_ids, probability, generator: as for `mask_tokens`.

    Returns:
        (masked_ids [N, L], labels [N, L]) as `mask_tokens`.
    """
    _check_masking(input_ids, attention_mask, probability, mask_token_id, vocab_size)
    if len(spans) != input_ids.shape[0]:
        raise ValueError(f"spans must give the units of each of the {input_ids.shape[0]} rows, got {len(spans)}.")
    specials = _special_ids(special_token_ids, mask_token_id, input_ids.device)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, specials)
    chosen = torch.zeros_like(eligible)
    for row, units in enumerate(spans):
        budget = max(1, round(probability * int(eligible[row].sum())))
        order = torch.randperm(len(units), generator=generator, device=input_ids.device).tolist()
        order.sort(key=lambda index: not units[index][2])  # stable: preferred units first, each group shuffled
        masked = 0
        for index in order:
            start, end, _ = units[index]
            size = int(eligible[row, start:end].sum())
            if size == 0 or (masked and masked + size > budget):
                continue
            chosen[row, start:end] = eligible[row, start:end]
            masked += size
            if masked >= budget:
                break
    action = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    return _corrupt(input_ids, chosen, action, specials, vocab_size, mask_token_id, generator)


def _check_masking(
    input_ids: Tensor, attention_mask: Tensor, probability: float, mask_token_id: int, vocab_size: int
) -> None:
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must lie in (0, 1), got {probability}; BERT and ALBEF use 0.15.")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [N, L], got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}."
        )
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; pass a LongTensor.")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id must lie in [0, vocab_size={vocab_size}), got {mask_token_id}.")


def _special_ids(special_token_ids: Sequence[int], mask_token_id: int, device: torch.device) -> Tensor:
    return torch.tensor(sorted({int(i) for i in special_token_ids} | {mask_token_id}), device=device)


def _corrupt(
    input_ids: Tensor,
    chosen: Tensor,
    action: Tensor,
    specials: Tensor,
    vocab_size: int,
    mask_token_id: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """BERT's 80 / 10 / 10 on the `chosen` tokens, by the uniforms `action`; (masked_ids, labels)."""
    device = input_ids.device
    specials_in_vocab = specials[(specials >= 0) & (specials < vocab_size)]  # sorted, distinct
    ordinary_count = vocab_size - specials_in_vocab.numel()
    if ordinary_count == 0:
        raise ValueError(
            f"Every id of [0, vocab_size={vocab_size}) is special, so no random replacement can be drawn; pass the "
            "true vocab_size of the MLM head."
        )
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)

    # The r-th non-special id is r + (number of specials below it): with s_k the k-th special, s_k - k non-special ids
    # precede s_k, so that number is how many s_k - k are <= r.
    rank = torch.randint(ordinary_count, input_ids.shape, generator=generator, device=device)
    offsets = specials_in_vocab - torch.arange(specials_in_vocab.numel(), device=device)
    random_ids = rank + torch.searchsorted(offsets, rank, right=True)

    masked_ids = torch.where(to_mask, mask_token_id, torch.where(to_random, random_ids.to(input_ids.dtype), input_ids))
    labels = torch.where(chosen, input_ids.long(), IGNORE_INDEX)
    return masked_ids, labels


def mlm_loss(logits: Tensor, labels: Tensor, soft_targets: Tensor | None = None, alpha: float = 0.0) -> Tensor:
    """Cross-entropy over the labelled (masked) positions, optionally distilled from a momentum model (ALBEF).

    Without `soft_targets`: the mean cross-entropy over positions with a label (not -100), as BERT's MLM. With them,
    ALBEF's momentum-distilled MLM (sec. 3.3, L^mod_mlm; official `xbert.BertForMaskedLM.forward`):
    (1 - α) · CE(labels) + α · mean over labelled positions of -Σ_v soft_targets · log_softmax(logits), where
    `loss_distill = -torch.sum(F.log_softmax(prediction_scores, dim=-1) * soft_labels, dim=-1)` is masked to
    `labels != -100` and averaged. This soft cross-entropy differs from KL(soft_targets ‖ p) by the entropy of the
    targets only, a constant: same gradient. The targets are detached (the momentum model takes no gradient).

    A batch with no labelled position (possible with 15 % masking of short captions) returns 0 with the graph kept
    (the sum of the empty selection of logits, so even a NaN logit at an unlabelled position cannot leak in), where
    a mean-reduced cross-entropy would return NaN.

    Args:
        logits: [N, L, V] MLM-head logits.
        labels: [N, L] target ids at the masked positions, -100 elsewhere (`mask_tokens`).
        soft_targets: optional [N, L, V] probabilities, `softmax(momentum_logits)`.
        alpha: α in [0, 1], the distillation weight (ALBEF: 0.4, ramped up over the first epoch); > 0 needs
            `soft_targets`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}; ALBEF uses 0.4.")
    if alpha > 0 and soft_targets is None:
        raise ValueError(f"alpha={alpha} distils from the momentum model, so soft_targets must be given (or alpha=0).")
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [N, L, V] and labels [N, L], got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    if soft_targets is not None and soft_targets.shape != logits.shape:
        raise ValueError(
            f"soft_targets must have the shape of logits {tuple(logits.shape)}, got {tuple(soft_targets.shape)}."
        )
    labelled = labels != IGNORE_INDEX
    if not bool(labelled.any()):
        return logits[labelled].sum()  # 0 with a grad_fn
    with torch.autocast(device_type=logits.device.type, enabled=False):
        selected = logits[labelled].float()  # [M, V]
        loss = F.cross_entropy(selected, labels[labelled].long())
        if soft_targets is None:
            return loss
        distill = -(F.log_softmax(selected, dim=-1) * soft_targets[labelled].detach().float()).sum(dim=-1).mean()
        return (1.0 - alpha) * loss + alpha * distill


@torch.no_grad()
def momentum_targets(momentum_sim: Tensor, positive: Tensor, alpha: float) -> Tensor:
    """ALBEF's ITC targets (sec. 3.3): α · softmax(momentum_sim) + (1 - α) · positive / positive.sum(1).

    The ground truth is the one-hot positive of each row (pretraining, `sim_targets.fill_diagonal_(1)`) or, when a
    row has several positives (retrieval fine-tuning: all captions of the same image id, in the batch and in the
    queue), the uniform distribution over them (`sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)`). It is mixed
    with the momentum model's own softmax over the same candidates (momentum_sim = s'(I, T) / τ). fp32, no gradient.

    Args:
        momentum_sim: [B, K] similarity logits of the momentum encoders (already divided by the temperature), over
            the batch and the queue.
        positive: [B, K] bool, True where column k is a positive of row b; every row needs at least one.
        alpha: α in [0, 1] (ALBEF: 0.4; 0 gives the plain one-hot / multi-positive targets).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}; ALBEF uses 0.4.")
    if momentum_sim.ndim != 2 or positive.shape != momentum_sim.shape or positive.dtype != torch.bool:
        raise ValueError(
            f"momentum_sim must be [B, K] and positive a bool tensor of the same shape, got "
            f"{tuple(momentum_sim.shape)} and {tuple(positive.shape)} {positive.dtype}."
        )
    counts = positive.sum(dim=1, keepdim=True)
    if not bool((counts > 0).all()):
        row = int((counts.squeeze(1) == 0).nonzero()[0])
        raise ValueError(f"Row {row} of positive has no True entry; mark each row's own pair (and same-id pairs) True.")
    with torch.autocast(device_type=momentum_sim.device.type, enabled=False):
        ground_truth = positive.float() / counts
        if alpha == 0:
            return ground_truth
        return alpha * torch.softmax(momentum_sim.float(), dim=1) + (1.0 - alpha) * ground_truth


def distilled_contrastive_loss(sim_i2t: Tensor, sim_t2i: Tensor, targets_i2t: Tensor, targets_t2i: Tensor) -> Tensor:
    """ALBEF's ITC with soft targets (sec. 3.3, L^mod_itc; official `model_pretrain.py`).

    L = ½ (mean_b -Σ_k targets_i2t · log_softmax(sim_i2t) + mean_b -Σ_k targets_t2i · log_softmax(sim_t2i)),
    i.e. `loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()` and likewise for
    t2i. With one-hot targets (`momentum_targets(..., alpha=0)`) it is CLIP's symmetric InfoNCE. The paper writes
    the distilled loss as (1 - α) L_itc + α/2 (KL(q^i2t ‖ p^i2t) + KL(q^t2i ‖ p^t2i)); the official soft
    cross-entropy against α q + (1 - α) y equals it plus the entropy of q, a constant, so the gradient is the same.
    The targets are used as given (build them without gradient, as `momentum_targets` does); fp32 internally.

    Args:
        sim_i2t: [B, K] image→text logits s(I, T) / τ over the batch and the text queue.
        sim_t2i: [B, K] text→image logits s(T, I) / τ over the batch and the image queue.
        targets_i2t, targets_t2i: [B, K] target distributions (rows summing to 1), e.g. `momentum_targets`.
    """
    if sim_i2t.ndim != 2 or sim_t2i.ndim != 2 or targets_i2t.shape != sim_i2t.shape or (
        targets_t2i.shape != sim_t2i.shape
    ):
        raise ValueError(
            "sim_i2t, sim_t2i and their targets must all be [B, K] with each target shaped like its logits, got "
            f"{tuple(sim_i2t.shape)}, {tuple(sim_t2i.shape)}, {tuple(targets_i2t.shape)}, {tuple(targets_t2i.shape)}."
        )
    with torch.autocast(device_type=sim_i2t.device.type, enabled=False):
        loss_i2t = -(F.log_softmax(sim_i2t.float(), dim=1) * targets_i2t.float()).sum(dim=1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i.float(), dim=1) * targets_t2i.float()).sum(dim=1).mean()
        return 0.5 * (loss_i2t + loss_t2i)


def queue_contrastive_loss(
    image_features: Tensor, text_features: Tensor, image_queue: Tensor, text_queue: Tensor, temperature: Tensor | float
) -> Tensor:
    """Two-way InfoNCE of the local batch against itself and a queue of past features, without distillation
    (ALBEF's ITC with α = 0; FIBER's coarse-grained ITC, official code: a queue of detached features, no momentum
    encoder): image i's positive is text i among the B texts and the K queued ones, and conversely.

    Args:
        image_features, text_features: [B, D] L2-normalised features of the local batch (with gradient).
        image_queue, text_queue: [K, D] queued features (no gradient).
        temperature: τ; the logits are cosine / τ.
    """
    texts = torch.cat([text_features, text_queue.to(text_features.dtype)])  # [B + K, D]
    images = torch.cat([image_features, image_queue.to(image_features.dtype)])
    positive = torch.eye(image_features.shape[0], texts.shape[0], dtype=torch.bool, device=image_features.device)
    targets = positive.float()
    return distilled_contrastive_loss(image_features @ texts.T / temperature, text_features @ images.T / temperature,
                                      targets, targets)


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Image-text matching: 2-way cross-entropy on the fusion [CLS] (ALBEF sec. 3.2, L_itm), in fp32.

    Args:
        logits: [M, 2] ITM-head logits; ALBEF stacks B positive pairs, B (image, hard-negative text) and
            B (hard-negative image, text) pairs, M = 3B.
        labels: [M] long, 1 for a matched pair and 0 for a negative (the official `itm_labels`).
    """
    if logits.ndim != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [M, 2] and labels [M], got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.cross_entropy(logits.float(), labels.long())


def caption_loss(logits: Tensor, targets: Tensor, pad_mask: Tensor) -> Tensor:
    """CoCa's captioning loss (Yu et al. 2022, sec. 3.1, L_Cap): next-token cross-entropy, mean over non-padded tokens.

    No shift happens here: `logits[:, t]` must already predict `targets[:, t]`. The caller shifts, as open_clip's
    CoCa does (`labels = text[:, 1:]` against the decoder's logits of positions 0..L-2) before its `CoCaLoss`,
    `CrossEntropyLoss(ignore_index=pad_id)`, which is the same mean over non-padded targets. Padding is given as a
    mask rather than a pad id, so a pad id that is also a real token (open_clip's 0 is "!") is not a problem. A batch
    that is all padding returns 0 with the graph kept. fp32 internally; the loss weight (CoCa: 2) is the caller's.

    Args:
        logits: [N, L, V] decoder logits, position t predicting target t.
        targets: [N, L] target token ids.
        pad_mask: [N, L] True (or 1) where the target is padding and must not count — the inverse of an attention
            mask.
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2] or pad_mask.shape != targets.shape:
        raise ValueError(
            f"logits must be [N, L, V] and targets and pad_mask [N, L], got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)} and {tuple(pad_mask.shape)}."
        )
    counted = ~pad_mask.bool()
    if not bool(counted.any()):
        return logits[counted].sum()  # 0 with a grad_fn
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.cross_entropy(logits[counted].float(), targets[counted].long())
