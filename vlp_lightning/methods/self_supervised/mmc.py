"""MMC: "Masked Momentum Contrastive Learning for Zero-shot Semantic Understanding" (Wu, Mo, Awais, Atito, Feng,
Kittler 2023).

The abstract names three objectives on one ViT, summed here (`LM + LD + LC`, weights `*_weight`):

* **M**asked image modelling "for encouraging similarity of local features": the student encodes the global crops
  with a share of their patches replaced by a learned mask token (`vit_forward_with_mask_tokens`) and a linear head
  predicts the pixels of the masked patches (`masked_reconstruction_loss`, MSE on masked patches);
* **M**omentum self-distillation "for transferring semantics from global to local features": an EMA teacher
  (`MomentumMethod`) sees the unmasked global crops and the student matches its centred, sharpened distribution
  on the other global crop and on every local crop (DINO's multi-crop objective, `dino_distillation_loss`; the
  local-to-global correspondence of Caron et al. 2021, sec. 3.1), so MMC is DINO plus the two terms below;
* global **C**ontrast "for promoting semantics of global features": InfoNCE between the student's projection of one
  global crop and the teacher's of the other, over the global batch, symmetrised (MoCo v3's loss,
  `moco_v3_contrastive_loss`, without MoCo v3's predictor on the query side: the abstract names none).

One student pass over the masked global crops serves all three terms (as iBOT's student sees masked crops only);
the local crops are not masked.

Its evaluation, zero-shot segmentation from a prompt patch, is `callbacks.ZeroShotSegmentation`, on the patch
features of the backbone (`patch_features`).

Not verified (only the abstract of the paper was reachable here, no official code was found): the MIM target and
masking (SimMIM-style mask tokens, random patches, ratio 0.5, normalised-pixel targets are choices), whether the
distillation reads class or patch tokens (class tokens here), the form of the contrast (MoCo v3-style against the
teacher here), the loss weights (1, 1, 1 here), the head sizes and the paper's schedule; the paper-size recipe
therefore takes DINO's ViT-S/16 recipe.
"""

from __future__ import annotations

import itertools

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.losses.instance_contrastive import moco_v3_contrastive_loss
from vlp_lightning.losses.masked_modeling import masked_reconstruction_loss
from vlp_lightning.losses.self_distillation import dino_distillation_loss
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.momentum import momentum_copy
from vlp_lightning.methods.self_supervised.common import expect_views
from vlp_lightning.methods.self_supervised.dino import DINO
from vlp_lightning.modules.heads import MLPHead
from vlp_lightning.modules.masking import (
    num_masked_patches,
    patchify,
    pool_tokens,
    random_masking,
    vit_forward_with_mask_tokens,
)
from vlp_lightning.modules.vision import VisionEncoder


class MMC(DINO):
    """DINO's multi-crop self-distillation plus masked image modelling and a global contrast (module doc).

    Args:
        vision, output_dim, hidden_dim, bottleneck_dim, student_temperature, teacher_temperature,
            warmup_teacher_temperature, teacher_temperature_warmup_steps, centre_momentum, freeze_last_layer_steps,
            num_local_crops, local_crop_size, base_momentum, final_momentum, norm_last_layer: as `DINO`.
        mask_ratio: share of each global crop's patches masked for the student (not verified, module doc).
        normalize_target: per-patch normalised pixel targets of the masked-image-modelling term.
        projection_dim: output size of the contrast projector (its hidden width is `hidden_dim`).
        contrast_temperature: τ of the global contrast.
        reconstruction_weight, distillation_weight, contrast_weight: weights of the three terms.
    """

    paper = Paper(
        "Masked Momentum Contrastive Learning for Zero-shot Semantic Understanding",
        "Wu et al.", 2023, note="objective from the abstract; see its docstring",
    )
    family = "momentum teacher"
    view_kind = "multi-crop"

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        output_dim: int = 64,
        hidden_dim: int = 64,
        bottleneck_dim: int = 32,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        teacher_temperature_warmup_steps: int = 0,
        centre_momentum: float = 0.9,
        freeze_last_layer_steps: int = 0,
        num_local_crops: int = 2,
        local_crop_size: int | None = None,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        norm_last_layer: bool = True,
        mask_ratio: float = 0.5,
        normalize_target: bool = True,
        projection_dim: int = 32,
        contrast_temperature: float = 0.2,
        reconstruction_weight: float = 1.0,
        distillation_weight: float = 1.0,
        contrast_weight: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(
            vision, output_dim, hidden_dim, bottleneck_dim, student_temperature, teacher_temperature,
            warmup_teacher_temperature, teacher_temperature_warmup_steps, centre_momentum, freeze_last_layer_steps,
            num_local_crops, local_crop_size, base_momentum, final_momentum, norm_last_layer, optimizer=optimizer,
            lr_scheduler=lr_scheduler, compile=compile,
        )
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        vit = self.vision.model
        if self.vision.patch_size is None:
            raise ValueError(f"MMC needs a ViT-like timm model (one with patch_embed); got {type(vit).__name__}")
        self.num_patches = int(vit.patch_embed.num_patches)
        num_masked_patches(self.num_patches, mask_ratio)  # fail at construction, not at the first step
        self.mask_ratio = mask_ratio
        self.normalize_target = normalize_target
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.pixel_head = nn.Linear(vit.embed_dim, self.vision.patch_size**2 * 3)
        self.projector = MLPHead(self.vision.num_features, hidden_dim, projection_dim, layers=2, norm="bn")
        self.teacher_projector = momentum_copy(self.projector)
        self.contrast_temperature = contrast_temperature
        self.reconstruction_weight = reconstruction_weight
        self.distillation_weight = distillation_weight
        self.contrast_weight = contrast_weight

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().momentum_pairs, (self.projector, self.teacher_projector)]

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        views = expect_views(batch, 2 + self.num_local_crops, "MMC", "MultiCrop")
        batch_size, vit, patch = len(views[0]), self.vision.model, self.vision.patch_size
        global_crops = torch.cat(views[:2])  # [2N, 3, S, S]
        if global_crops.shape[-1] * global_crops.shape[-2] != self.num_patches * patch * patch:
            raise ValueError(f"MMC masks {self.image_size} px global crops, got {global_crops.shape[-1]} px")
        mask = random_masking(len(global_crops), self.num_patches, self.mask_ratio, global_crops.device).mask
        tokens = vit_forward_with_mask_tokens(vit, global_crops, mask, self.mask_token)  # [2N, P + L, width]
        predicted = self.pixel_head(tokens[:, vit.num_prefix_tokens :])  # [2N, L, p*p*3]
        reconstruction = masked_reconstruction_loss(
            predicted, patchify(global_crops, patch), mask, normalize_target=self.normalize_target
        )
        student_global = pool_tokens(vit, tokens)  # [2N, width]
        student_local = [
            self.vision(torch.cat(list(group)))
            for _, group in itertools.groupby(views[2:], key=lambda view: view.shape)  # one pass per resolution
        ]
        student_logits = self.head(torch.cat([student_global, *student_local])).split(batch_size)
        teacher_features = self.forward_teacher(self.teacher[0], global_crops)  # [2N, width]
        teacher_logits = self.forward_teacher(self.teacher[1], teacher_features).split(batch_size)
        temperature = self.current_teacher_temperature()
        distillation = dino_distillation_loss(
            teacher_logits, student_logits, self.centre, temperature, self.student_temperature
        )
        queries = self.projector(student_global).split(batch_size)
        keys = self.forward_teacher(self.teacher_projector, teacher_features).split(batch_size)
        contrast = moco_v3_contrastive_loss(queries[0], keys[1], self.contrast_temperature) + moco_v3_contrastive_loss(
            queries[1], keys[0], self.contrast_temperature
        )
        if self.training:
            self._teacher_logits = teacher_logits  # the centre moves after backward (DINO.on_after_backward)
        loss = (
            self.reconstruction_weight * reconstruction
            + self.distillation_weight * distillation
            + self.contrast_weight * contrast
        )
        return {"loss": loss, "reconstruction": reconstruction, "distillation": distillation, "contrast": contrast}
