"""DINO: self-distillation with no labels ("Emerging Properties in Self-Supervised Vision Transformers", Caron et al.
2021).

A student (backbone + `DINOHead`) sees every crop of multi-crop (2 global, 8 local; sec. 3.1); the teacher, an EMA
of the student with τ from 0.996 to 1 on a cosine (sec. 3.1, "Teacher network"), sees the global crops only. The
student matches the teacher's centred and sharpened distribution by cross-entropy over all pairs of different views
(eq. 3, `dino_distillation_loss`); the centre is an EMA (m 0.9) of the teacher's mean output over the global batch
(eq. 4, `dino_centre`: averaged across ranks), moved after each batch's loss. Training details of the paper and the
official code:

* the teacher temperature warms up linearly from 0.04 to 0.07 over the first 30 epochs
  (`teacher_temperature_warmup_steps`), the student's is 0.1;
* the last layer of the head gets no update during the first epoch (`freeze_last_layer_steps`), which the paper
  finds helps optimisation;
* the head's last layer is weight-normalised with its row norms fixed at 1 (`norm_last_layer=True`, the official
  default) or learnt (`False`, the official code's advice for ViT-S: "better performance but can make the training
  unstable");
* AdamW without weight decay on biases and norms (the official `get_params_groups`); its weight-decay cosine
  0.04 → 0.4 is not reproduced here (one fixed weight decay, recipe comment).
"""

from __future__ import annotations

import itertools

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import MultiCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.self_distillation import dino_centre, dino_distillation_loss
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.momentum import MomentumMethod, momentum_copy
from vlp_lightning.methods.self_supervised.common import expect_views
from vlp_lightning.modules.heads import DINOHead
from vlp_lightning.modules.vision import VisionEncoder, multi_crop_local_size, tiny_vit


class DINO(MomentumMethod):
    """Student over multi-crop views distilled from an EMA teacher over the global crops.

    Args:
        vision: backbone (default: a tiny 2-block ViT at 32 px with dynamic input size; ViT-S/16 in the paper).
        output_dim: K, the head's outputs (65,536).
        hidden_dim: hidden width of the head's MLP (2048).
        bottleneck_dim: bottleneck before the last layer (256).
        student_temperature: τ_s (0.1).
        teacher_temperature: τ_t after warm-up (0.04 to 0.07).
        warmup_teacher_temperature: τ_t at the first step (0.04).
        teacher_temperature_warmup_steps: optimizer steps of the linear warm-up (30 epochs).
        centre_momentum: m of the centre (0.9).
        freeze_last_layer_steps: optimizer steps without updates of the head's last layer (1 epoch).
        num_local_crops: local crops (8 in the paper's best setting; 2 x 224 + 10 x 96 in the ViT-S recipe).
        local_crop_size: side of the local crops; default 96/224 of `image_size` in whole patches (the global size
            for a ViT that takes one input size, `multi_crop_local_size`).
        base_momentum: τ_base of the teacher (0.996), rising to `final_momentum` (1.0).
        norm_last_layer: the head's last layer keeps unit-norm rows (True, the official default and ViT-B setting);
            False learns their norms (the official ViT-S setting, faster to start, less stable; `DINOHead`).
    """

    paper = Paper("Emerging Properties in Self-Supervised Vision Transformers", "Caron et al.", 2021)
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
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(base_momentum, final_momentum, optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or tiny_vit(dynamic_img_size=True)
        self.head = DINOHead(self.vision.num_features, output_dim, hidden_dim, bottleneck_dim, norm_last_layer)
        self.teacher = momentum_copy(nn.Sequential(self.vision, self.head))
        self.register_buffer("centre", torch.zeros(output_dim))
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.teacher_temperature_warmup_steps = teacher_temperature_warmup_steps
        self.centre_momentum = centre_momentum
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.num_local_crops = num_local_crops
        self._teacher_logits: tuple[Tensor, ...] | None = None
        self.local_crop_size = multi_crop_local_size(self.vision, local_crop_size, "DINO")

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(nn.Sequential(self.vision, self.head), self.teacher)]

    def train_views(self) -> Views:
        """2 global crops (scale 0.4-1) and the local crops (scale 0.05-0.4) at 96/224 of the size, with BYOL's
        colour distortion (the official `DataAugmentationDINO`; its per-crop blur 1.0 / 0.1 / 0.5 and solarisation
        of the second global crop are one blur probability 0.5 here: `MultiCrop` shares one augmentation)."""
        return MultiCrop(
            num_global=2, num_local=self.num_local_crops, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
            local_size=self.local_crop_size, color_jitter=0.5, grayscale_prob=0.2, blur_prob=0.5,
            mean=self.vision.mean, std=self.vision.std,
        )

    def current_teacher_temperature(self) -> float:
        """τ_t: linear from the warm-up value to the final one over the warm-up steps, then constant."""
        steps = self.teacher_temperature_warmup_steps
        if self._trainer is None or steps <= 0 or self.global_step >= steps:
            return self.teacher_temperature
        progress = self.global_step / steps
        return self.warmup_teacher_temperature + progress * (self.teacher_temperature - self.warmup_teacher_temperature)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        views = expect_views(batch, 2 + self.num_local_crops, "DINO", "MultiCrop")
        batch_size = len(views[0])
        student = torch.cat([
            self.head(self.vision(torch.cat(list(group))))
            for _, group in itertools.groupby(views, key=lambda view: view.shape)  # one pass per resolution
        ]).split(batch_size)
        teacher = self.forward_teacher(self.teacher, torch.cat(views[:2])).split(batch_size)
        temperature = self.current_teacher_temperature()
        loss = dino_distillation_loss(teacher, student, self.centre, temperature, self.student_temperature)
        if self.training:
            self._teacher_logits = teacher
        return {"loss": loss, "teacher_temperature": torch.tensor(temperature)}

    def on_after_backward(self) -> None:
        """Move the centre once this batch's loss used the old one (as the official `DINOLoss` does), before a
        checkpoint at the end of the batch can be written; and no update of the head's last layer during the first
        steps (official `cancel_gradients_last_layer`)."""
        if self._teacher_logits is not None:
            self.centre.copy_(dino_centre(self.centre, self._teacher_logits, self.centre_momentum))
            self._teacher_logits = None
        if self.global_step < self.freeze_last_layer_steps:
            for param in self.head.last_layer.parameters():
                param.grad = None
