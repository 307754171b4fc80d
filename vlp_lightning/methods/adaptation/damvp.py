"""DAM-VP: Diversity-Aware Meta Visual Prompting (Huang et al. 2023, CVPR).

A frozen pretrained model is adapted by *pixel* prompts only. The downstream training images are clustered on the
frozen model's features of the un-prompted images (agglomerative, average linkage, distance threshold τ: diverse
data gets more clusters, sec. 3.2); every cluster gets its own padding prompt P_m (a learnable frame of width p added
to the normalised image), and an image x takes the prompt of the prototype nearest to its frozen feature, in
training and at test (sec. 3.3):

    m(x) = argmin_m ||f(x) - c_m||,      logits = h(f(x + P_m(x))),      L = CE(logits, y)

with h the head: CLIP's text classifier of "a photo of a {class}" for a CLIP-family model (the official
`adapter_clip.py`), or a linear head trained with the prompts ("head tuning", the ViT-22k / Swin / MoCo setting).
Blocks: `modules.visual_prompts` (PadPrompt, ClusterPrompts, cluster_prototypes); `PixelPrompting` is what DAMVP and
its meta-prompt training (`damvp_meta.DAMVPMeta`) share: the prompt's size, the two heads and the frozen features.

All prompts start from the meta-prompt (sec. 3.4): `meta_prompt` names the last.ckpt of a `DAMVPMeta` run (the
Reptile-trained prompt across upstream datasets, the official `meta-training/`), whose meta prompt θ becomes every
cluster prompt; the last.ckpt of an earlier DAMVP run is accepted too (the mean of its cluster prompts). Without it
the prompts start from N(0, 1) as the official `PadPrompter`'s `randn`. The clusters are computed when the method is
built, from up to `max_cluster_samples` images of `cluster_shards` (the official code uses the first 1,000 training
images); without `cluster_shards` there is one prompt (the paper's "w/o diversity" ablation).

Paper setting (official README / `task_adapting/adapter.py`): ViT-B/16, 224 px, prompt width 30, τ per backbone
(vit-b-1k 31, CLIP per dataset 6-75), 50 epochs, batch 128, SGD (momentum 0.9 for CLIP), 10 warmup epochs then
cosine; the per-dataset learning rates of the paper's Tables 13-14 are not in the repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlp_lightning.catalog import Paper
from vlp_lightning.methods.adaptation.base import AdaptationMethod, ClassNames
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.modules.prompts import class_name_text
from vlp_lightning.modules.visual_prompts import ClusterPrompts, PadPrompt

Head = Literal["text", "linear"]


class PixelPrompting(AdaptationMethod):
    """Padding prompts of a frozen model read through one of DAM-VP's two heads (module doc): what DAMVP and
    DAMVPMeta share.

    Args:
        pretrained: checkpoint of a suite method (CLIP-family for `head: text`).
        head: "text" (CLIP's zero-shot classifier of `template`, frozen) or "linear" (trained linear heads on
            `probe_features`).
        template: the text head's prompt ("a photo of a {}" in the official code).
        prompt_width: p, the frame's width in pixels (30 at 224 px; None: the same fraction of the image size).
        pretrained_config, crop_scale, optimizer, lr_scheduler, compile: see `AdaptationMethod`.
    """

    def __init__(
        self,
        pretrained: str,
        head: Head,
        template: str,
        prompt_width: int | None,
        pretrained_config: str | None,
        crop_scale: tuple[float, float],
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        compile: bool,
    ) -> None:
        super().__init__(pretrained, pretrained_config, crop_scale, optimizer, lr_scheduler, compile)
        if head not in ("text", "linear"):
            raise ValueError(f"head must be 'text' or 'linear', got {head!r}")
        if head == "text" and not self.pretrained.has_joint_space():
            raise ValueError(
                f"{type(self).__name__}'s text head needs an image-text space, but pretrained={pretrained} holds a "
                f"{type(self.pretrained).__name__}; use head: linear or a CLIP-family checkpoint"
            )
        self.head_kind, self.template = head, template
        self.prompt_width = prompt_width or max(1, round(self.image_size * 30 / 224))
        self._text_classifiers: dict[tuple[str, ...], Tensor] = {}

    def make_prompt(self) -> PadPrompt:
        """A padding prompt of this method's width for the frozen model's image size."""
        return PadPrompt(self.image_size, self.prompt_width)

    @property
    def representation(self) -> Literal["joint", "probe"]:
        """The frozen features the head reads and the clusters live in: joint embeddings for the text head, probe
        features for the linear head."""
        return "joint" if self.head_kind == "text" else "probe"

    def frozen_features(self, images: Tensor) -> Tensor:
        """The frozen model's features of un-prompted images: what clusters and selects (`representation`)."""
        with torch.no_grad():
            if self.head_kind == "text":
                return self.pretrained.encode_image(images)
            return self.pretrained.probe_features(images)

    def text_classifier(self, classnames: list[str]) -> Tensor:
        """CLIP's zero-shot classifier [C, D] of `template` over `classnames` (built once per class list)."""
        key = tuple(classnames)
        if key not in self._text_classifiers:
            from vlp_lightning.callbacks.zero_shot import build_zero_shot_classifier

            names = [class_name_text(name) for name in classnames]
            self._text_classifiers[key] = build_zero_shot_classifier(self.pretrained, self.tokenizer, names,
                                                                     [self.template])
        return self._text_classifiers[key].to(self.device)

    def head_logits(self, prompted: Tensor, classnames: list[str], head: nn.Module | None) -> Tensor:
        """Class logits [N, C] of prompted images: `head` on their probe features, or (text head, `head` None)
        CLIP's scaled cosine with the text classifier of `classnames`."""
        if head is not None:
            return head(self.pretrained.probe_features(prompted))
        scale = self.pretrained.logit_scale.detach().float().exp()
        return scale * self.pretrained.encode_image(prompted) @ self.text_classifier(classnames).T


class DAMVP(PixelPrompting):
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
        meta_prompt: last.ckpt of a DAMVPMeta run, whose meta prompt starts every prompt (or of an earlier DAMVP
            run: its mean prompt; module doc).
        pretrained_config, crop_scale, optimizer, lr_scheduler, compile: see `AdaptationMethod`.
    """

    paper = Paper("Diversity-Aware Meta Visual Prompting", "Huang et al.", 2023)

    def __init__(
        self,
        pretrained: str,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        head: Head = "text",
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
        super().__init__(pretrained, head, template, prompt_width, pretrained_config, crop_scale, optimizer,
                         lr_scheduler, compile)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.classes = ClassNames(classnames, classnames_from, label_field, "all", type(self).__name__)
        prototypes = self.frozen_prototypes(cluster_shards, self.representation, max_cluster_samples,
                                            distance_threshold=distance_threshold)
        self.cluster_prompts = ClusterPrompts(prototypes, self.make_prompt)
        if meta_prompt is not None:
            self.cluster_prompts.start_from(load_meta_prompt(meta_prompt, self.make_prompt()))
        self.head = nn.Linear(self.frozen_dim("probe"), len(self.classes.all)) if head == "linear" else None

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

    def classify(self, images: Tensor) -> Tensor:
        """Class logits [N, C] of the prompted images."""
        return self.head_logits(self.prompted(images), self.classes.all, self.head)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        return self.classification_loss(batch)


def load_meta_prompt(checkpoint_path: str, like: PadPrompt) -> dict[str, Tensor]:
    """The prompt a `meta_prompt:` checkpoint starts every cluster prompt from, as a state dict of `like`'s shape: a
    DAMVPMeta run's meta prompt θ (`meta_prompt.*`), or the mean of a DAMVP run's cluster prompts; anything else,
    or a prompt of another size, is one sentence."""
    hint = "give the last.ckpt of a DAMVPMeta run (e.g. runs/damvpmeta/emoji_tiny/checkpoints/last.ckpt)"
    if not Path(checkpoint_path).is_file():
        raise ValueError(f"meta_prompt={checkpoint_path} is not a file; {hint}")
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True).get("state_dict", {})
    prompt = {key.removeprefix("meta_prompt."): value for key, value in state.items()
              if key.startswith("meta_prompt.")}
    if not prompt:
        parts: dict[str, list[Tensor]] = {}
        for key, value in state.items():
            if key.startswith("cluster_prompts.prompts."):
                parts.setdefault(key.rsplit(".", 1)[1], []).append(value)
        prompt = {name: torch.stack(values).mean(0) for name, values in parts.items()}
    if not prompt:
        raise ValueError(f"meta_prompt={checkpoint_path} holds neither a DAMVPMeta meta prompt (meta_prompt.*) nor "
                         f"DAMVP cluster prompts (cluster_prompts.prompts.*); {hint}")
    shapes = {name: tuple(value.shape) for name, value in prompt.items()}
    expected = {name: tuple(value.shape) for name, value in like.state_dict().items()}
    if shapes != expected:
        raise ValueError(f"meta_prompt={checkpoint_path} holds a prompt of shapes {shapes}, not the {expected} of "
                         f"a {like.width} px frame around {like.size} px images; meta-train with the same pretrained "
                         "model and prompt_width")
    return prompt
