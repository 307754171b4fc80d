"""The shared base of adaptation methods: a method that starts from a pretrained one and trains only what it adds.

`AdaptationMethod(pretrained=...)` rebuilds the method a checkpoint was trained as (any suite method, from the model
config the checkpoint stores, `vlp_lightning.pretrained.load_method`; loaded `weights_only`), keeps it as the
submodule `pretrained`, frozen (`requires_grad=False`) and in eval mode whatever the trainer asks (its BatchNorm
statistics and dropout never change), so its weights stay bit-identical; the model summary shows it as non-trainable
and in eval mode. The documented path is two `vlp fit` runs: a pretraining recipe, then an adaptation recipe whose
`pretrained:` names the first run's `last.ckpt`.

Classification adaptation needs class names and labels: `ClassNames` resolves the names (given, or from the
`manifest.json` of a shard set) and the label field (`cls`, or an integer field of the samples' `.json`, e.g. the
emoji's `subcategory_id`), and the base / novel split of the base-to-novel protocol (CoCoOp, Zhou et al. 2022,
sec. 5.1: the classes sorted by label, the first ceil(C / 2) are base, the rest novel).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.pipeline import batch_labels
from data_modules.views import SingleCrop, Views
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR

PretrainedKind = Literal["image", "joint"]
TrainClasses = Literal["all", "base"]

_PRETRAIN_HINT = (
    "e.g. runs/clip/emoji_tiny/checkpoints/last.ckpt after `vlp fit --config experiments/clip/emoji_tiny.yaml`"
)


class AdaptationMethod(VLPMethod):
    """A method that adapts a frozen pretrained one (module doc).

    Args:
        pretrained: checkpoint of the method to adapt (written by `vlp fit`).
        pretrained_config: the config it was trained with, for checkpoints that do not store theirs.
        crop_scale: area range of the training crops (random resized crop and flip, CoOp's augmentation;
            (0.08, 1) is torchvision's and Dassl's default).
        optimizer, lr_scheduler, compile: see `VLPMethod`.
    """

    family = "adaptation"
    view_kind = "one crop"
    #: what the pretrained method must have: "image" (any method: an image tower) or "joint" (an image-text space).
    pretrained_needs: PretrainedKind = "image"

    def __init__(
        self,
        pretrained: str,
        pretrained_config: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        from vlp_lightning.pretrained import load_method  # here: it imports the CLI, which imports this index

        method, _ = load_method(pretrained, pretrained_config, name="pretrained", config_option="pretrained_config")
        self.check_pretrained(method, pretrained)
        method.requires_grad_(False)
        self.pretrained = method.eval()
        self.tokenizer = method.tokenizer
        self.crop_scale = tuple(crop_scale)

    def check_pretrained(self, method: VLPMethod, path: str) -> None:
        """Stop, in one sentence, on a pretrained method of the wrong kind (an image-only method under CoOp)."""
        if self.pretrained_needs == "joint" and not method.has_joint_space():
            raise ValueError(
                f"{type(self).__name__} adapts a method with an image-text space, but pretrained={path} holds a "
                f"{type(method).__name__} ({method.family or 'image-only'}), which has none; give a checkpoint of a "
                f"CLIP-family method ({_PRETRAIN_HINT})"
            )

    @property
    def vision(self) -> nn.Module:
        """The pretrained image tower (frozen)."""
        return self.pretrained.vision

    @property
    def image_size(self) -> int:
        return self.pretrained.image_size

    def train(self, mode: bool = True) -> AdaptationMethod:
        """Train mode for what is adapted; the pretrained method stays in eval mode (frozen statistics)."""
        super().train(mode)
        self.pretrained.eval()
        return self

    def train_views(self) -> Views:
        return SingleCrop(scale=self.crop_scale, hflip=True, mean=self.vision.mean, std=self.vision.std)

    def frozen_dim(self, representation: Literal["probe", "joint"]) -> int:
        """The width of the frozen model's probe features or joint image embedding."""
        encode = self.pretrained.encode_image if representation == "joint" else self.pretrained.probe_features
        with torch.no_grad():
            return encode(torch.zeros(1, 3, self.image_size, self.image_size)).shape[-1]

    def frozen_prototypes(self, shards: str | None, representation: Literal["probe", "joint"], max_samples: int,
                          **clustering) -> Tensor:
        """Cluster prototypes [M, D] of the frozen model's `representation` features of up to `max_samples` images
        of `shards` (`modules.visual_prompts.cluster_prototypes` with `clustering`); without shards one zero
        prototype, i.e. one prompt for every image (DAMVP, RobustMAE)."""
        if shards is None:
            return torch.zeros(1, self.frozen_dim(representation))
        from vlp_lightning.callbacks.features import extract_features
        from vlp_lightning.modules.visual_prompts import cluster_prototypes

        features = extract_features(self.pretrained, shards, max_samples=max_samples, representation=representation)
        return cluster_prototypes(features.image, **clustering)

    def classification_loss(self, batch: dict) -> dict[str, Tensor]:
        """The cross-entropy and top-1 of `classify` (the method's class logits) on the batch's images and labels
        (`self.classes`): the `forward_loss` of the classifiers (PEFTClassifier, FineTune, DAMVP)."""
        labels = self.classes.labels(batch).to(self.device)
        logits = self.classify(batch["image"])
        accuracy = (logits.argmax(1) == labels).float().mean()
        return {"loss": F.cross_entropy(logits.float(), labels), "accuracy": accuracy}

    def zero_loss(self) -> Tensor:
        """A zero that depends on every trainable parameter: the loss of a batch with nothing to learn from, so
        every rank's backward still reaches the same parameters (DDP)."""
        return sum((param.sum() * 0.0 for param in self.parameters() if param.requires_grad), torch.zeros(()))


class ClassNames:
    """The class names and labels an adaptation method classifies with (module doc).

    Args:
        classnames: one name per label; None reads `classnames[label_field]` from the manifest of `classnames_from`.
        classnames_from: a shard pattern whose `manifest.json` (written by `vlp-data`) names the classes.
        label_field: `cls` (the `.cls` member, batch key `label`) or an integer field of the samples' `.json`.
        train_classes: "all", or "base": the first ceil(C / 2) classes only (base-to-novel; other samples of a batch
            are left out of the loss).
    """

    def __init__(
        self,
        classnames: list[str] | None,
        classnames_from: str | None,
        label_field: str,
        train_classes: TrainClasses,
        method: str,
    ) -> None:
        if train_classes not in ("all", "base"):
            raise ValueError(f"train_classes must be 'all' or 'base', got {train_classes!r}")
        if classnames is None:
            if classnames_from is None:
                raise ValueError(
                    f"{method} needs the class names: set classnames: [...] or classnames_from: a shard pattern whose "
                    "manifest.json names them (e.g. data/emoji/train-000000.tar)"
                )
            from vlp_lightning.callbacks.zero_shot import read_classnames

            classnames = read_classnames(classnames_from, label_field)
        if len(classnames) < 2:
            raise ValueError(f"{method} needs at least 2 classes, got {classnames!r}")
        self.all = list(classnames)
        self.label_field = label_field
        self.train_classes = train_classes
        self.base = self.all[: base_class_count(len(self.all))]
        self.novel = self.all[len(self.base):]

    @property
    def trained(self) -> list[str]:
        return self.base if self.train_classes == "base" else self.all

    def labels(self, batch: dict) -> Tensor:
        """The batch's labels in `label_field`, [N] long."""
        return batch_labels(batch, self.label_field)


def base_class_count(num_classes: int) -> int:
    """Base classes of the base-to-novel split: the first ceil(C / 2) (CoCoOp's `subsample_classes`)."""
    return math.ceil(num_classes / 2)
