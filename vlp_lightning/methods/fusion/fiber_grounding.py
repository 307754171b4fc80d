"""FIBER's fine-grained stage, its parts: the phrase prompt and the grounding head on the fused image tokens.

The prompt (GLIP, Li et al. 2022, sec. 3.1): an image's phrases joined into one text, "p_1. p_2. ... p_K.", fused
with the image once; phrase k is the span of its tokens (without its full stop), a phrase that no longer fits the
context is left out. The head, one region query per fused image patch token o_q: a box
b̂_q = σ(MLP(o_q) + (logit c_x, logit c_y, 0, 0)), (cx, cy, w, h) normalised, starting at the patch's centre c; and the
alignment scores of GLIP eq. 3, S_ground = O Pᵀ, the projected region features O [Q, d] against the projected fused
token features P [L, d], scaled by 1/√d, each phrase's score the mean of its tokens' (GLIP's `SCORE_AGG: MEAN`),
plus a learned bias starting at the focal-loss prior −log(99) (a match probability of 0.01).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vlp_lightning.modules.tokenizers import Tokenizer, pad_token_lists


def phrase_prompts(tokenizer: Tokenizer, phrases: list[list[str]]) -> tuple[dict[str, Tensor], Tensor, list[int]]:
    """Each image's phrases as one prompt (module doc) -> tokens ([N, L] ids and mask), span weights [N, K_max, L]
    (phrase k's tokens at 1 / its length, 0 elsewhere) and how many of each image's phrases fit."""
    start, stop, context = tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.context_length
    token_lists, spans = [], []
    for sample in phrases:
        ids, sample_spans = [start], []
        if sample:
            pieces = tokenizer([f"{phrase}." for phrase in sample])
            for row, length in enumerate(pieces["attention_mask"].sum(1).tolist()):
                content = pieces["input_ids"][row, 1 : length - 1].tolist()  # without its start and end tokens
                if len(ids) + len(content) + 1 > context:
                    break
                sample_spans.append((len(ids), len(ids) + max(len(content) - 1, 1)))  # the full stop left out
                ids += content
        token_lists.append(ids + [stop])
        spans.append(sample_spans)
    weights = torch.zeros(len(phrases), max([len(sample) for sample in phrases] + [1]), context)
    for image, sample_spans in enumerate(spans):
        for phrase, (first, end) in enumerate(sample_spans):
            weights[image, phrase, first:end] = 1.0 / (end - first)
    return pad_token_lists(token_lists, context, stop), weights, [len(sample_spans) for sample_spans in spans]


class GroundingHead(nn.Module):
    """A box and an alignment logit per phrase for every fused image patch token (module doc).

    Args:
        image_width, text_width: widths of the fused image tokens and the fused text states.
        dim: d, the shared space of region and token features (GLIP's 256).
    """

    def __init__(self, image_width: int, text_width: int, dim: int) -> None:
        super().__init__()
        self.box = nn.Sequential(  # DETR's 3-layer box MLP
            nn.Linear(image_width, image_width), nn.ReLU(), nn.Linear(image_width, image_width), nn.ReLU(),
            nn.Linear(image_width, 4),
        )
        nn.init.zeros_(self.box[-1].weight)
        nn.init.zeros_(self.box[-1].bias)
        self.region_projection = nn.Linear(image_width, dim)
        self.token_projection = nn.Linear(text_width, dim)
        self.bias = nn.Parameter(torch.tensor(-math.log(99.0)))

    def forward(self, image_tokens: Tensor, text_states: Tensor, spans: Tensor) -> tuple[Tensor, Tensor]:
        """Patch tokens [N, Q, W_img] (a square grid), text states [N, L, W], span weights [N, K, L] -> boxes
        [N, Q, 4] (normalised cxcywh) and alignment logits [N, Q, K]."""
        side = math.isqrt(image_tokens.shape[1])
        centres = (torch.arange(side, device=image_tokens.device, dtype=torch.float32) + 0.5) / side
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        prior = torch.stack([cx.flatten(), cy.flatten(), *torch.full((2, side * side), 0.5, device=cx.device)], -1)
        boxes = (self.box(image_tokens).float() + torch.logit(prior)).sigmoid()
        regions, tokens = self.region_projection(image_tokens), self.token_projection(text_states)
        token_logits = regions @ tokens.transpose(1, 2) / math.sqrt(regions.shape[-1])  # S_ground = O Pᵀ [N, Q, L]
        return boxes, (token_logits.float() @ spans.transpose(1, 2)) + self.bias
