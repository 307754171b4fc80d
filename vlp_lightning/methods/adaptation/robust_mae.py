"""RobustMAE: test-time frequency-domain prompting for the adversarial robustness of a frozen MAE (Huang et al. 2023,
ICCV, "Improving Adversarial Robustness of Masked Autoencoders via Test-time Frequency-domain Prompting").

Why (abstract and sec. 1): MAE's pixel-reconstruction target makes its fine-tuned ViT lean on the medium / high
frequencies of the image, so ℓ∞ PGD noise, which lives there too, hurts it far more than BEiT's or PeCo's (11.5
points of ImageNet top-1, Fig. 1). The remedy "occupies" those frequencies with domain knowledge extracted from the
data, which narrows the room the perturbation has: the data are grouped into clusters, every cluster learns a
visual prompt in the frequency domain, and at test time an image takes the prompt of its nearest prototype.

What is built (the blocks are `modules.visual_prompts`):

    clusters      c_1..c_K = k-means centres of f(x) over `cluster_shards`  (f: the frozen model's probe features)
    selection     m(x) = argmin_k ||f(x) - c_k||                            (on the image as given, un-prompted)
    prompt        x~ = F^-1(F(x) + M P_m(x)) = x + F^-1(M P_m(x))           (combine: add)
                  x~ = F^-1((1 - M) F(x) + M P_m(x))                        (combine: replace)
    logits        h(x~),  L = CE(h(x~), y) [+ λ_adv CE(h(x~_adv), y)]

M is the high-pass mask (frequencies of normalised radius >= `low_frequency_radius`, 1 = Nyquist; the low
frequencies of the image are never changed), F the orthonormal 2-D FFT of the normalised image, P_k a learnable
half spectrum per cluster (zeros at the start: the prompted model starts as the model). Only the prompts (and the
linear head with `head: linear`) train; the pretrained model stays bit-identical.

The head h. In the paper the MAE is fine-tuned on ImageNet-1k and then frozen while the prompts are optimised; here
`head: pretrained` is that setting: `pretrained:` is a classifier checkpoint of the suite (a method with
`classify(images)`, e.g. a PEFTClassifier run on an MAE checkpoint, our stand-in for the fine-tuned MAE), frozen
whole. `head: linear` starts from any image method (an MAE pretraining run) and trains a linear head on its probe
features together with the prompts (DAM-VP's "head tuning"); the two-stage path (head first, then prompts) is
`bench/adaptation.py`'s "robust" section.

Threat model of the evaluation (`callbacks.AdversarialRobustness`): white-box ℓ∞ PGD on the pixels against the
whole prompted pipeline, the prompt selection recomputed on the attacked image at every step (its argmin passes no
gradient; the prompt's path does). `classify_unprompted` is the same classifier without prompts, scored by the same
callback as the "no prompt" row.

Paper fidelity. Only the abstract and the opening of sec. 1 (with Fig. 1) could be read here; the method section,
its equations and hyper-parameters were not reachable, and the official repository (shikiw/RobustMAE) holds a README
only, no code. So no equation numbers are cited, and these are our reading, stated as choices: k-means on the
frozen model's features (the paper clusters the pretraining data: `cluster_shards` is any shard set), Euclidean
nearest prototype, an additive masked spectrum (`combine: replace` overwrites the medium / high frequencies
instead), a circular mask of radius 0.25 by default, the prompts trained by the clean cross-entropy (the model
frozen); `adversarial_steps > 0` adds the PGD min-max (Madry et al. 2018) on the prompted pipeline, an option, not a
claim about the paper.
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
from vlp_lightning.modules.visual_prompts import ClusterPrompts, FrequencyPrompt, high_pass


class RobustMAE(AdaptationMethod):
    """Per-cluster medium / high-frequency prompts for a frozen (MAE) classifier (module doc).

    Args:
        pretrained: checkpoint of a suite method: any image method with `head: linear`, a classifier (a method with
            `classify(images)`, e.g. PEFTClassifier) with `head: pretrained`.
        classnames / classnames_from / label_field: the classes (`adaptation.base.ClassNames`); with
            `head: pretrained` they default to the classifier's.
        head: "linear" (a linear head on the probe features, trained with the prompts) or "pretrained" (the frozen
            classifier's own `classify`).
        low_frequency_radius: r, the normalised radial frequency below which nothing is prompted (1 = Nyquist).
        combine: "add" (F(x) + M P) or "replace" ((1 - M) F(x) + M P).
        cluster_shards: shards whose frozen features are clustered (None: one prompt).
        num_clusters: K of the k-means.
        max_cluster_samples: images clustered.
        adversarial_steps: PGD steps of the adversarial term of the loss (0: the clean cross-entropy only).
        adversarial_weight: λ_adv of that term.
        epsilon, step_size: of those training attacks, in pixel units.
        pretrained_config, crop_scale, optimizer, lr_scheduler, compile: see `AdaptationMethod`.
    """

    paper = Paper("Improving Adversarial Robustness of Masked Autoencoders via Test-time Frequency-domain Prompting",
                  "Huang et al.", 2023, "built from the abstract and introduction only; the method section's "
                  "equations and hyper-parameters were not reachable (module doc)")

    def __init__(
        self,
        pretrained: str,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        head: Literal["linear", "pretrained"] = "linear",
        low_frequency_radius: float = 0.25,
        combine: Literal["add", "replace"] = "add",
        cluster_shards: str | None = None,
        num_clusters: int = 8,
        max_cluster_samples: int = 1000,
        adversarial_steps: int = 0,
        adversarial_weight: float = 1.0,
        epsilon: float = 4 / 255,
        step_size: float = 1 / 255,
        pretrained_config: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(pretrained, pretrained_config, crop_scale, optimizer, lr_scheduler, compile)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if head not in ("linear", "pretrained"):
            raise ValueError(f"head must be 'linear' or 'pretrained', got {head!r}")
        if combine not in ("add", "replace"):
            raise ValueError(f"combine must be 'add' or 'replace', got {combine!r}")
        if adversarial_steps < 0 or epsilon < 0 or step_size <= 0:
            raise ValueError(f"adversarial training needs adversarial_steps >= 0, epsilon >= 0 and step_size > 0, "
                             f"got {adversarial_steps}, {epsilon}, {step_size}")
        if head == "pretrained" and not hasattr(self.pretrained, "classify"):
            raise ValueError(
                f"RobustMAE's head: pretrained needs a classifier checkpoint (a method with classify(images), e.g. a "
                f"PEFTClassifier run on an MAE), but pretrained={pretrained} holds a "
                f"{type(self.pretrained).__name__}; use head: linear or a classifier's checkpoint"
            )
        own_classes = getattr(self.pretrained, "classes", None) if head == "pretrained" else None
        if isinstance(own_classes, ClassNames) and classnames is None and classnames_from is None:
            classnames, label_field = own_classes.all, own_classes.label_field
        self.classes = ClassNames(classnames, classnames_from, label_field, "all", type(self).__name__)
        self.head_kind, self.combine = head, combine
        self.adversarial_steps, self.adversarial_weight = adversarial_steps, adversarial_weight
        self.epsilon, self.step_size = epsilon, step_size
        size = self.image_size
        prototypes = self.frozen_prototypes(cluster_shards, "probe", max_cluster_samples, num_clusters=num_clusters)
        self.cluster_prompts = ClusterPrompts(prototypes, lambda: FrequencyPrompt(size, low_frequency_radius))
        self.head = nn.Linear(prototypes.shape[1], len(self.classes.all)) if head == "linear" else None

    # ------------------------------------------------------------------ clusters and prompts
    def frozen_features(self, images: Tensor) -> Tensor:
        """f(x): the frozen model's probe features of the un-prompted images (what clusters and selects)."""
        with torch.no_grad():
            return self.pretrained.probe_features(images)

    def prompted(self, images: Tensor) -> Tensor:
        """x~: each normalised image with its nearest prototype's frequency prompt (module doc)."""
        mask = self.cluster_prompts.prompts[0].mask  # the prompts' high-pass mask M
        base = images if self.combine == "add" else images - high_pass(images, mask)
        return self.cluster_prompts(base, self.frozen_features(images))

    # ------------------------------------------------------------------ representations and loss
    def logits(self, images: Tensor) -> Tensor:
        if self.head is None:
            return self.pretrained.classify(images)
        return self.head(self.pretrained.probe_features(images))

    def classify(self, images: Tensor) -> Tensor:
        """Class logits [N, C] of the prompted images."""
        return self.logits(self.prompted(images))

    def classify_unprompted(self, images: Tensor) -> Tensor:
        """Class logits [N, C] of the same classifier without prompts (the "no prompt" baseline)."""
        return self.logits(images)

    def probe_features(self, images: Tensor) -> Tensor:
        return self.pretrained.probe_features(self.prompted(images))

    def adversarial_images(self, images: Tensor, labels: Tensor) -> Tensor:
        """PGD (`callbacks.adversarial.pgd_attack`) of the normalised training images against the prompted
        pipeline, in pixel units; back in the normalised space."""
        from vlp_lightning.callbacks.adversarial import pgd_attack

        mean = torch.tensor(self.vision.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.vision.std, device=images.device).view(1, 3, 1, 1)
        pixels = (images * std + mean).clamp(0, 1)
        adversarial = pgd_attack(self.classify, pixels, labels, lambda x: (x - mean) / std, self.epsilon,
                                 self.step_size, self.adversarial_steps)
        return (adversarial - mean) / std

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        labels = self.classes.labels(batch).to(self.device)
        images = batch["image"]
        logits = self.classify(images)
        loss = F.cross_entropy(logits.float(), labels)
        outputs = {"accuracy": (logits.argmax(1) == labels).float().mean()}
        if self.adversarial_steps:
            adversarial_logits = self.classify(self.adversarial_images(images, labels))
            loss = loss + self.adversarial_weight * F.cross_entropy(adversarial_logits.float(), labels)
            outputs["adversarial_accuracy"] = (adversarial_logits.argmax(1) == labels).float().mean()
        return {"loss": loss, **outputs}
