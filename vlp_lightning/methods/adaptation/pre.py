"""PRE: Prompt Learning with Reparameterization Encoder (Pham Xuan et al. 2023, "PRE: Vision-Language Prompt Learning
with Reparameterization Encoder").

Instead of optimising CoOp's context vectors directly, PRE passes them through a prompt encoder and feeds its output
to the frozen text tower: with the context V = [v_1 ... v_M] read as one sequence, a bidirectional LSTM of hidden size
width / 2 (so both directions together are `width` wide) reparameterises it, with a residual connection:

    V' = BiLSTM(V) + V

and the prompts are CoOp's, `[SOS] v'_1 ... v'_M [CLASS] . [EOS]`, classified by CLIP's scaled cosine and trained with
cross-entropy. Context and encoder train; CLIP is frozen. (Official `trainers/pre.py`, the released scripts'
`ENCODER=LSTM1`, `RESIDUAL=True`: one LSTM layer, no MLP after it, PyTorch's default LSTM initialisation.)

Paper setting (`configs/trainers/PRE/vit_b16_ep50_ctxv1.yaml`): M = 4 from "a photo of a", SGD lr 0.002, momentum 0.9,
weight decay 5e-4, batch 32, 50 epochs, cosine, one warmup epoch at 1e-5, 16 shots of the base classes.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.adaptation.base import TrainClasses
from vlp_lightning.methods.adaptation.prompt_learning import PromptLearning
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.modules.prompts import ClassTokenPosition


class PromptEncoder(nn.Module):
    """V' = BiLSTM(V) + V over the M context vectors as one sequence ([M, width] or [C, M, width])."""

    def __init__(self, width: int) -> None:
        super().__init__()
        if width % 2:
            raise ValueError(f"PRE's bidirectional encoder needs an even text width, got {width}")
        self.lstm = nn.LSTM(width, width // 2, num_layers=1, bidirectional=True, batch_first=True)

    def forward(self, ctx: Tensor) -> Tensor:
        sequences = ctx if ctx.ndim == 3 else ctx[None]
        encoded, _ = self.lstm(sequences)
        return (encoded + sequences).reshape(ctx.shape)


class PRE(PromptLearning):
    """CoOp's context, reparameterised by a residual BiLSTM prompt encoder (module doc; arguments:
    `PromptLearning`)."""

    paper = Paper("PRE: Vision-Language Prompt Learning with Reparameterization Encoder", "Pham Xuan et al.", 2023)

    def __init__(
        self,
        pretrained: str,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        train_classes: TrainClasses = "all",
        n_ctx: int | None = None,
        ctx_init: str | None = "a photo of a",
        class_specific: bool = False,
        class_token_position: ClassTokenPosition = "end",
        pretrained_config: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(
            pretrained, classnames, classnames_from, label_field, train_classes, n_ctx, ctx_init, class_specific,
            class_token_position, pretrained_config, crop_scale, optimizer, lr_scheduler, compile,
        )
        self.prompt_encoder = PromptEncoder(self.prompts.ctx.shape[-1])

    def context(self, image_features: Tensor) -> Tensor:
        ctx = self.prompt_encoder(self.prompts.ctx)
        return ctx[None] if self.prompts.class_specific else ctx[None, None]
