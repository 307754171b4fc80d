"""CoOp: Context Optimization (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models", IJCV), as PRE's
paper (Pham Xuan et al. 2023) describes its baseline.

The prompt of class c is `t_c = [V]_1 [V]_2 ... [V]_M [CLASS_c] .` (eq. 2; "end" position, or "middle" / "front",
sec. 3.2), the M context vectors shared by all classes or one set per class (class-specific context, CSC); the class
probability is CLIP's softmax over scaled cosines (eq. 3), trained with cross-entropy while CLIP stays frozen. Only
the context vectors train (`PromptLearning`).

Paper setting (official `configs/trainers/CoOp/rn50.yaml`, `vit_b16.yaml`): M = 16 random N(0, 0.02^2) vectors (or
"a photo of a" for the base-to-novel comparison of CoCoOp), SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 32,
cosine decay, one warmup epoch at a constant 1e-5, 200 epochs at 16 shots; random resized crop and flip.
"""

from __future__ import annotations

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.adaptation.prompt_learning import PromptLearning


class CoOp(PromptLearning):
    """Learnable text context for a frozen CLIP (module doc; arguments: `PromptLearning`)."""

    paper = Paper("Learning to Prompt for Vision-Language Models", "Zhou et al.", 2022)
