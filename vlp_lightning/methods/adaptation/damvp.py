"""DAM-VP: Diversity-Aware Meta Visual Prompting (Huang et al. 2023, CVPR).

A frozen pretrained model is adapted by *pixel* prompts only. The downstream training images are clustered on the
frozen model's features of the un-prompted images (agglomerative, average linkage, distance threshold τ: diverse
data gets more clusters, sec. 3.2); every cluster gets its own padding prompt P_m (a learnable frame of width p added
to the normalised image), and an image x takes the prompt of the prototype nearest to its frozen feature, in
training and at test (sec. 3.3):

    m(x) = argmin_m ||f(x) - c_m||,      logits = h(f(x + P_m(x))),      L = CE(logits, y)

with h the head: CLIP's text classifier of "a photo of a {class}" for a CLIP-family model (the official
`adapter_clip.py`), or a linear head trained with the prompts ("head tuning", the ViT-22k / Swin / MoCo setting).
Blocks: `modules.visual_prompts` (PadPrompt, ClusterPrompts, cluster_prototypes). All prompts start from the
meta-prompt (sec. 3.4).

Not built here: the meta-prompt's Reptile training across six upstream datasets (official `meta-training/`):
`meta_prompt` starts every cluster prompt from the mean prompt of an earlier DAMVP run's checkpoint instead, and
without it the prompts start from N(0, 1) as the official `PadPrompter`'s `randn`. The clusters are computed when
the method is built, from up to `max_cluster_samples` images of `cluster_shards` (the official code uses the first
1,000 training images); without `cluster_shards` there is one prompt (the paper's "w/o diversity" ablation).

Paper setting (official README / `task_adapting/adapter.py`): ViT-B/16, 224 px, prompt width 30, τ per backbone
(vit-b-1k 31, CLIP per dataset 6-75), 50 epochs, batch 128, SGD (momentum 0.9 for CLIP), 10 warmup epochs then
cosine; the per-dataset learning rates of the paper's Tables 13-14 are not in the repository.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.adaptation.base import AdaptationMethod, ClassNames
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.modules.prompts import class_name_text
from vlp_lightning.modules.visual_prompts import ClusterPrompts, PadPrompt


class DAMVP(AdaptationMethod):
    """Per-cluster pixel prompts for a frozen model (module doc).

    Args:
        pretrained: checkpoint of a suite method (CLIP-family for `head: text`).
        classnames / classnames_from / label_field: the classes (`adaptation.base.ClassNames`).
        head: "text" (CLIP's zero-shot classifier of `template`, frozen) or "linear" (a trained linear head on
            `probe_features`).
        template: the text head's prompt ("a photo of a {}" in the official code).
        prompt_width: p, the frame's width in pixels (30 at 224 px; None: the same fraction of the image size).
        cluster_shards: training shards whose frozen features are clustered (None: one prompt).
        distance_threshold: τ of the agglomerative clustering (in the units of the frozen features).
        max_cluster_samples: images clustered (1,000 in the official code).
        meta_prompt: checkpoint of an earlier DAMVP run whose mean prompt starts every prompt (module doc).
        pretrained_config, crop_scale, optimizer, lr_scheduler, compile: see `AdaptationMethod`.
    """

    paper = Paper("Diversity-Aware Meta Visual Prompting", "Huang et al.", 2023)

    def __init__(
        self,
        pretrained: str,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        head: Literal["text", "linear"] = "text",
        template: str = "a photo of a {}",
        prompt_width: int | None = None,
        cluster_shards: str | None = None,
        distance_threshold: float | None = None,
        max_cluster_samples: int = 1000,
        meta_prompt: str | None = None,
        pretrained_config: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(pretrained, pretrained_config, crop_scale, optimizer, lr_scheduler, compile)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if head not in ("text", "linear"):
            raise ValueError(f"head must be 'text' or 'linear', got {head!r}")
        if head == "text" and not self.pretrained.has_joint_space():
            raise ValueError(
                f"DAMVP's text head needs an image-text space, but pretrained={pretrained} holds a "
                f"{type(self.pretrained).__name__}; use head: linear or a CLIP-family checkpoint"
            )
        self.classes = ClassNames(classnames, classnames_from, label_field, "all", type(self).__name__)
        self.head_kind, self.template = head, template
        size = self.image_size
        width = prompt_width or max(1, round(size * 30 / 224))
        prototypes = self.frozen_prototypes(cluster_shards, "joint" if head == "text" else "probe",
                                            max_cluster_samples, distance_threshold=distance_threshold)
        self.cluster_prompts = ClusterPrompts(prototypes, lambda: PadPrompt(size, width))
        if meta_prompt is not None:
            self.cluster_prompts.start_from(mean_prompt(meta_prompt))
        self.head = nn.Linear(self.frozen_dim("probe"), len(self.classes.all)) if head == "linear" else None
        self._text_classifier: Tensor | None = None

    # ------------------------------------------------------------------ clusters
    def frozen_features(self, images: Tensor) -> Tensor:
        """The frozen model's features of un-prompted images: what clusters and selects (joint embedding with the
        text head, probe features with the linear head)."""
        with torch.no_grad():
            if self.head_kind == "text":
                return self.pretrained.encode_image(images)
            return self.pretrained.probe_features(images)

    def prompted(self, images: Tensor) -> Tensor:
        """x + P_m(x) (module doc)."""
        return self.cluster_prompts(images, self.frozen_features(images))

    # ------------------------------------------------------------------ representations and loss
    def encode_image(self, images: Tensor) -> Tensor:
        return self.pretrained.encode_image(self.prompted(images))

    def encode_text(self, text: dict[str, Tensor]) -> Tensor:
        return self.pretrained.encode_text(text)

    def has_joint_space(self) -> bool:
        return self.pretrained.has_joint_space()

    def probe_features(self, images: Tensor) -> Tensor:
        return self.pretrained.probe_features(self.prompted(images))

    def text_classifier(self) -> Tensor:
        if self._text_classifier is None:
            from vlp_lightning.callbacks.zero_shot import build_zero_shot_classifier

            names = [class_name_text(name) for name in self.classes.all]
            self._text_classifier = build_zero_shot_classifier(self.pretrained, self.tokenizer, names, [self.template])
        return self._text_classifier.to(self.device)

    def classify(self, images: Tensor) -> Tensor:
        """Class logits [N, C] of the prompted images."""
        if self.head is not None:
            return self.head(self.probe_features(images))
        scale = self.pretrained.logit_scale.detach().float().exp()
        return scale * self.encode_image(images) @ self.text_classifier().T

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        labels = self.classes.labels(batch).to(self.device)
        logits = self.classify(batch["image"])
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "accuracy": (logits.argmax(1) == labels).float().mean()}


def mean_prompt(checkpoint_path: str) -> dict[str, Tensor]:
    """The mean of the cluster prompts of a DAMVP checkpoint, as one `PadPrompt` state dict."""
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    parts: dict[str, list[Tensor]] = {}
    for key, value in state.items():
        if key.startswith("cluster_prompts.prompts."):
            parts.setdefault(key.rsplit(".", 1)[1], []).append(value)
    if not parts:
        raise ValueError(f"meta_prompt={checkpoint_path} holds no DAMVP prompts (cluster_prompts.prompts.*); give the "
                         "last.ckpt of a DAMVP run")
    return {name: torch.stack(values).mean(0) for name, values in parts.items()}

