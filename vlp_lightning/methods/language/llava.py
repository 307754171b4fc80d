"""LLaVA (Liu et al. 2023, "Visual Instruction Tuning"; LLaVA-1.5: Liu et al. 2024, "Improved Baselines with Visual
Instruction Tuning"): a frozen CLIP image tower, a projector into the LM's embedding space, and the LM trained on
the answers of instruction conversations: p(X_a | X_v, X_instruct) = prod_i p(x_i | X_v, X_instruct, X_a,<i)
(eq. 3), only the assistant's tokens carrying the loss.

Two stages (sec. 4.2):

1. **Feature alignment** ("pre-training"): tower and LM frozen, only the projector W trains, on image-caption pairs
   turned into single-turn instructions (a brief-description prompt drawn per sample, the caption as the answer;
   `caption_prompts`). Official LLaVA-1.5: 558k pairs, 1 epoch, batch 256, lr 1e-3, cosine, warmup 3 %, no weight
   decay.
2. **Visual instruction tuning**: the projector and the LM train (full, or LoRA r 128 alpha 256 in the LoRA
   recipe), the tower stays frozen; 665k conversations, 1 epoch, batch 128, lr 2e-5 (LoRA 2e-4, projector 2e-5),
   same schedule. Stage 2 starts from stage 1's checkpoint (`start_from`).

The projector: LLaVA-1's single Linear (`modules.LinearConnector(mode="tokens", dropout=0)`), LLaVA-1.5's
two-layer MLP with GELU (`MLPConnector`, the default). The tower's features are its patch tokens without the class
token (LLaVA reads CLIP ViT-L/14's penultimate layer; here the last layer after the final norm,
`VisionEncoder.forward_tokens`). The tower here is a suite checkpoint (`image_tower`) as no CLIP weights are
reachable offline.
"""

from __future__ import annotations

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.language.base import FrozenLMMethod


class LLaVA(FrozenLMMethod):
    """LLaVA-1.5: MLP projector, two stages (module doc; arguments: `FrozenLMMethod`)."""

    paper = Paper("Visual Instruction Tuning", "Liu et al.", 2023)
