"""HVP: "Heuristic Vision Pre-Training with Self-Supervised and Supervised Multi-Task Learning" (Qian 2023).

One backbone, several pretext tasks at once (abstract): supervised multi-label classification "to explore the
detailed information of an image (image types, objects, part of semantic relations)", and two self-supervised tasks,
masked image modelling "to learn pixel details" and contrastive learning "to learn patch correlations". The loss is
their weighted sum,

    L = w_cls · Σ_c BCE(sigmoid(W h(x))_c, y_c) + w_mim · L_MIM + w_con · L_NT-Xent   (the `*_weight` arguments),

each term one of the suite's existing pieces: the classification is a linear head on the pooled features with a
binary cross-entropy per class, summed over the classes and averaged over the images (multi-label; a `.cls` label
is its one-hot target, the data here having one label per image; a mean over the C classes as well would shrink the
supervised gradient C-fold next to the other two terms at equal weights); MIM replaces a share of the first crop's
patches by a mask token in the encoder and regresses their pixels with a linear head (SimMIM's mask token and head,
`vit_forward_with_mask_tokens`, with MAE's MSE on per-patch normalised pixels, `masked_reconstruction_loss`, where
SimMIM has an L1 loss on raw pixels); the contrast is NT-Xent between
projections of the two crops (`nt_xent_loss`, SimCLR). The first crop's masked pass serves the MIM, the contrast and
the classification (the second crop is unmasked and serves the last two).

Not verified (only the abstract was reachable here): the paper's loss weights (1, 1, 1 here), which MIM and
contrastive formulations it uses, its multi-label targets (built from ImageNet-21K-like tags in the paper; one-hot
`.cls` here), mask ratio, heads and the "3D" / style pretext tasks the abstract mentions as motivation. The backbone
of its headline results is Swin-B; the paper-size recipe uses a ViT-B/16 because the masked forward needs a ViT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import TwoCrops, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.instance_contrastive import nt_xent_loss
from vlp_lightning.losses.masked_modeling import masked_reconstruction_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.methods.self_supervised.common import expect_views
from vlp_lightning.modules.heads import MLPHead
from vlp_lightning.modules.masking import (
    num_masked_patches,
    patchify,
    pool_tokens,
    random_masking,
    vit_forward_with_mask_tokens,
)
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class HVP(VLPMethod):
    """Multi-label classification, masked image modelling and a contrast of two crops on one backbone.

    Args:
        vision: a timm ViT (default: a tiny 2-block ViT at 32 px; Swin-B in the paper, module doc).
        num_classes: classes of the (multi-)label head; `.cls` labels must lie below it.
        mask_ratio: share of the first crop's patches masked.
        normalize_target: per-patch normalised pixel targets of the MIM term.
        hidden_dim, projection_dim: contrast projector widths.
        temperature: τ of NT-Xent.
        classification_weight, reconstruction_weight, contrast_weight: the weights of the three terms.
        gather: contrast against the crops of every rank.
    """

    paper = Paper(
        "Heuristic Vision Pre-Training with Self-Supervised and Supervised Multi-Task Learning",
        "Qian", 2023, note="objective from the abstract; see its docstring",
    )
    family = "supervised pretraining"
    view_kind = "two crops"

    required_keys = ("image", "label")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        num_classes: int = 10,
        mask_ratio: float = 0.5,
        normalize_target: bool = True,
        hidden_dim: int = 64,
        projection_dim: int = 32,
        temperature: float = 0.1,
        classification_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        contrast_weight: float = 1.0,
        gather: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or tiny_vit()
        vit = self.vision.model
        if self.vision.patch_size is None:
            raise ValueError(f"HVP needs a ViT-like timm model (one with patch_embed); got {type(vit).__name__}")
        self.num_patches = int(vit.patch_embed.num_patches)
        num_masked_patches(self.num_patches, mask_ratio)  # fail at construction, not at the first step
        self.num_classes = num_classes
        self.mask_ratio = mask_ratio
        self.normalize_target = normalize_target
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.pixel_head = nn.Linear(vit.embed_dim, self.vision.patch_size**2 * 3)
        self.classifier = nn.Linear(self.vision.num_features, num_classes)
        self.projector = MLPHead(self.vision.num_features, hidden_dim, projection_dim, layers=2, norm="bn")
        self.temperature = temperature
        self.classification_weight = classification_weight
        self.reconstruction_weight = reconstruction_weight
        self.contrast_weight = contrast_weight
        self.gather = gather

    def train_views(self) -> Views:
        """Two crops (scale 0.2-1) with SimCLR's colour distortion at half strength (not verified, module doc)."""
        return TwoCrops(
            scale=(0.2, 1.0), color_jitter=0.5, grayscale_prob=0.2, blur_prob=0.5, mean=self.vision.mean,
            std=self.vision.std,
        )

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        masked_view, view = expect_views(batch, 2, "HVP", "TwoCrops")
        labels, vit, patch = batch["label"], self.vision.model, self.vision.patch_size
        if int(labels.max()) >= self.num_classes:
            raise ValueError(f"HVP: label {int(labels.max())} needs num_classes > {int(labels.max())}, not "
                             f"{self.num_classes}; set model.init_args.num_classes")
        mask = random_masking(len(masked_view), self.num_patches, self.mask_ratio, masked_view.device).mask
        tokens = vit_forward_with_mask_tokens(vit, masked_view, mask, self.mask_token)  # [N, P + L, width]
        predicted = self.pixel_head(tokens[:, vit.num_prefix_tokens :])  # [N, L, p*p*3]
        reconstruction = masked_reconstruction_loss(
            predicted, patchify(masked_view, patch), mask, normalize_target=self.normalize_target
        )
        features = torch.cat([pool_tokens(vit, tokens), self.vision(view)])  # [2N, width]
        targets = F.one_hot(labels, self.num_classes).float().repeat(2, 1)  # [2N, C]
        logits = self.classifier(features).float()
        classification = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(logits)
        projection_a, projection_b = self.projector(features).split(len(view))
        contrast = nt_xent_loss(projection_a, projection_b, self.temperature, gather=self.gather)
        loss = (
            self.classification_weight * classification
            + self.reconstruction_weight * reconstruction
            + self.contrast_weight * contrast
        )
        return {"loss": loss, "classification": classification, "reconstruction": reconstruction,
                "contrast": contrast}
