"""Vision-Flan (Xu et al. 2024, "Vision-Flan: Scaling Human-Labeled Tasks in Visual Instruction Tuning"): the LLaVA
architecture (a frozen CLIP tower, LLaVA-1.5's MLP projector pre-trained by LLaVA's stage 1, the LLM) tuned in two
stages:

1. on Vision-Flan: 187 academic tasks, each with an expert-written instruction template (1.6 M instances), the
   projector and the LLM training;
2. on a small set (about 1,000) of GPT-4-synthesised chat conversations, which the paper finds mostly adjusts the
   answer format to human preference.

Here stage 1 is `vlp-data instructions` shards (several human-written templates per task over the labels of the
shards: captions, class names, multiple choice, yes / no) and stage 2 a small conversation set (the recipe says
which); each stage starts from the previous one's checkpoint (`start_from`).
"""

from __future__ import annotations

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.language.base import FrozenLMMethod


class VisionFlan(FrozenLMMethod):
    """LLaVA's architecture, the two-stage Vision-Flan tuning (module doc; arguments: `FrozenLMMethod`)."""

    paper = Paper("Vision-Flan: Scaling Human-Labeled Tasks in Visual Instruction Tuning", "Xu et al.", 2024)
