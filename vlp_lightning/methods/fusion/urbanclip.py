"""UrbanCLIP (Yan et al. 2024, "UrbanCLIP: Learning Text-enhanced Urban Region Profiling with Contrastive
Language-Image Pretraining from the Web", WWW '24): CoCa trained on satellite images with LLM-written captions.

The model is CoCa (`fusion.coca.CoCa`, same encoder, poolers and decoder); what differs is the recipe of the
official code (github.com/StupidBuluchacha/UrbanCLIP, `main.py`):

* the objective is open_clip's `CoCaLoss` with both weights 1 (`--caption_loss_weight 1.0`,
  `--contrastive_loss_weight 1.0`), summed: L = L_con + L_LM, L_con CLIP's symmetric InfoNCE of the normalised
  image and text embeddings, L_LM the next-token cross-entropy of the multimodal decoder on the caption
  (CoCa's own recipe weights them λ_Con = 1, λ_Cap = 2);
* AdamW over every parameter (`model.parameters()`: biases and norms decayed too), lr 3e-4, weight decay 0.01,
  constant (no schedule), batch 2, 100 epochs, starting from LAION's `coca_ViT-L-14` weights (fine-tuned on
  MS-COCO: `mscoco_finetuned_laion2B-s13B-b90k`);
* the learned temperature is clamped after every step to exp(logit_scale) in [1, 100] (`clamp_(0, ln 100)`);
* it trains on open_clip's evaluation preprocessing (resize + centre crop, no augmentation): here one full-image
  square crop without flip.

Downstream (the official `mlp.py`): the trained model frozen, its normalised `encode_image` embedding ->
Linear(D, 256) -> ReLU -> Dropout(0.01) -> Linear(256, 1), MSE on the indicator (carbon, population, GDP) z-scored
with the training split's mean / std, AdamW lr 3e-4 wd 0.01, batch 2, 100 epochs, an 80 / 20 train / validation
split choosing the epoch; R², RMSE, MAE, MAPE. That probe is `callbacks.RegressionProbe` (`representation="joint"`).
Representations are CoCa's: `encode_image` / `encode_text` the contrastive space, `probe_features` the image
encoder's pooled output.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from data_modules.views import SingleCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.methods.fusion.coca import CoCa
from vlp_lightning.modules.tokenizers import Tokenizer
from vlp_lightning.modules.vision import VisionEncoder


class UrbanCLIP(CoCa):
    """CoCa with UrbanCLIP's objective L = L_con + L_LM and training recipe (module doc).

    Args:
        init_logit_scale, min_logit_scale, max_logit_scale: exp of the learned inverse temperature at the start, its
            floor and its cap (1 / 0.07, 1 and 100: the official `logit_scale.clamp_(0, ln 100)`).
        caption_weight, contrastive_weight: the weights of L_LM and L_con (1.0 and 1.0 in the official code).
        See `CoCa` for the others; `lr_scheduler` is None (constant learning rate) as in the official loop.
    """

    paper = Paper(
        "UrbanCLIP: Learning Text-enhanced Urban Region Profiling with Contrastive Language-Image Pretraining from "
        "the Web", "Yan et al.", 2024,
    )
    family = "fusion and captioning"
    view_kind = "one crop"
    exempt_gains_and_biases = False  # the official AdamW decays every parameter (module doc)

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        tokenizer: Tokenizer | None = None,
        width: int = 64,
        unimodal_layers: int = 1,
        multimodal_layers: int = 1,
        heads: int = 2,
        n_queries: int = 8,
        embed_dim: int = 32,
        caption_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        init_logit_scale: float = 1 / 0.07,
        min_logit_scale: float = 1.0,
        max_logit_scale: float = 100.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
    ) -> None:
        if not 0 < min_logit_scale <= max_logit_scale:
            raise ValueError(
                f"min_logit_scale={min_logit_scale} must be positive and at most max_logit_scale={max_logit_scale}; "
                "the official clamp is [1, 100]"
            )
        super().__init__(
            vision=vision,
            tokenizer=tokenizer,
            width=width,
            unimodal_layers=unimodal_layers,
            multimodal_layers=multimodal_layers,
            heads=heads,
            n_queries=n_queries,
            embed_dim=embed_dim,
            caption_weight=caption_weight,
            contrastive_weight=contrastive_weight,
            init_logit_scale=init_logit_scale,
            max_logit_scale=max_logit_scale,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            compile=compile,
        )
        self.min_logit_scale = min_logit_scale

    def train_views(self) -> Views:
        """The whole image as one square crop, no flip (the official loop trains on open_clip's eval preprocessing:
        resize and centre crop)."""
        return SingleCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, mean=self.vision.mean, std=self.vision.std)

    def after_optimizer_step(self) -> None:
        """Keep exp(logit_scale) in [`min_logit_scale`, `max_logit_scale`] (official: `clamp_(0, ln 100)`)."""
        with torch.no_grad():
            self.logit_scale.clamp_(math.log(self.min_logit_scale), math.log(self.max_logit_scale))
