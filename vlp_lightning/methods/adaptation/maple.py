"""MaPLe: Multi-modal Prompt Learning (Khattak et al. 2023, CVPR).

Prompts in both towers of a frozen CLIP, the vision prompts made from the language prompts so the two stay coupled:

* language: the first layer's input is `[SOS] P_0 (fixed words) [CLASS] . [EOS]` with P_0 the n_ctx learned context
  vectors (sec. 3.1, eq. 1); before each block i = 1 .. J-1 the outputs at the prompt positions are replaced by new
  learnable P_i (deep prompting, eq. 2-3); from block J on the prompts are processed like any token (eq. 4).
* vision: the prompts P~_i = F_i(P_i) come from the language prompts through a linear coupling function per depth
  (sec. 3.2.3, eq. 7; text width -> image width), appended to the class and patch tokens at the first layer and
  replaced before blocks 1 .. J-1 (eq. 5-6); they are dropped before pooling.

The loss is CLIP's cross-entropy over scaled cosines (eq. 3 of CoOp). Official code (`trainers/maple.py`): n_ctx 2
initialised from the first two tokens of "a photo of a" (the words "of a" stay fixed), deep text prompts N(0, 0.02^2),
J - 1 couplings deep-copied from one Linear (identical at the start) plus one for the first layer.

Paper setting (`vit_b16_c2_ep5_batch4_2ctx.yaml`): J = 9 of 12 layers, n_ctx 2, SGD lr 0.0035, batch 4, 5 epochs,
cosine, one warmup epoch at 1e-5, 16 shots of the base classes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.adaptation.base import TrainClasses
from vlp_lightning.methods.adaptation.prompt_learning import PromptLearning
from vlp_lightning.methods.base import WarmupCosineLR


class MaPLe(PromptLearning):
    """Deep language prompts and coupled vision prompts for a frozen CLIP (module doc; arguments: `PromptLearning`,
    plus `prompt_depth`: J, the layers that get new prompts, at most the shallower tower's depth)."""

    paper = Paper("MaPLe: Multi-modal Prompt Learning", "Khattak et al.", 2023)

    def __init__(
        self,
        pretrained: str,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        train_classes: TrainClasses = "all",
        n_ctx: int | None = 2,
        ctx_init: str | None = "a photo of a",
        prompt_depth: int = 9,
        pretrained_config: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(
            pretrained, classnames, classnames_from, label_field, train_classes, n_ctx, ctx_init, False, "end",
            pretrained_config, crop_scale, optimizer, lr_scheduler, compile,
        )
        vision, text = self.pretrained.vision, self.pretrained.text
        blocks = getattr(vision.model, "blocks", None)
        if blocks is None or not hasattr(self.pretrained, "image_projection"):
            raise ValueError(
                f"MaPLe prompts a ViT image tower; pretrained={pretrained} has {type(vision.model).__name__}: "
                "pretrain a CLIP with a timm ViT (model_name vit_*)"
            )
        depth = min(len(blocks), len(text.transformer["resblocks"]))
        if not 1 <= prompt_depth <= depth:
            raise ValueError(f"prompt_depth={prompt_depth} must be in 1..{depth} (the shallower tower's layers)")
        self.prompt_depth = prompt_depth
        text_width, image_width = self.prompts.ctx.shape[-1], vision.model.embed_dim
        count = self.prompts.n_ctx
        self.deep_text_prompts = nn.ParameterList(
            nn.Parameter(torch.empty(count, text_width).normal_(std=0.02)) for _ in range(prompt_depth - 1)
        )
        self.first_coupling = nn.Linear(text_width, image_width)
        coupling = nn.Linear(text_width, image_width)
        self.deep_couplings = nn.ModuleList(copy.deepcopy(coupling) for _ in range(prompt_depth - 1))

    def vision_prompts(self) -> list[Tensor]:
        """P~_0 = F_0(P_0), P~_i = F_i(P_i) for i = 1 .. J-1 (eq. 7)."""
        first = self.first_coupling(self.prompts.ctx)
        return [first, *(coupling(prompt) for coupling, prompt in zip(self.deep_couplings, self.deep_text_prompts))]

    def text_before_block(self) -> Callable[[int, Tensor], Tensor]:
        """Before text block i = 1 .. J-1, the prompt positions 1 .. n_ctx take P_i (eq. 2)."""
        count = self.prompts.n_ctx

        def replace(index: int, x: Tensor) -> Tensor:
            if not 0 < index < self.prompt_depth:
                return x
            prompt = self.deep_text_prompts[index - 1].to(x.dtype).expand(x.shape[0], -1, -1)
            return torch.cat([x[:, :1], prompt, x[:, 1 + count:]], dim=1)

        return replace

    def prompted_image_features(self, images: Tensor) -> Tensor:
        """The image tower's pooled features with the vision prompts in its sequence."""
        return self.pretrained.vision.forward_with_prompts(images, self.vision_prompts())

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.pretrained.image_projection(self.prompted_image_features(images)), dim=-1)

    def probe_features(self, images: Tensor) -> Tensor:
        """The adapted image representation: the prompted tower's pooled features."""
        return self.prompted_image_features(images)
