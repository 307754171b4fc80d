"""FFR: "From Fake to Real: Pretraining on Balanced Synthetic Images to Prevent Spurious Correlations in Image
Recognition" (Qraitem, Saenko, Plummer, ECCV 2024; arXiv 2308.04553).

FFR is a two-step pipeline, not a new loss. Only the paper's abstract was reachable here, so the steps below come
from the abstract and from the official code (github.com/mqraitem/From-Fake-to-Real: `training_code/
train_erm_ffr_1.py`, `train_{erm,groupdro}_ffr_2.py`, `trainer.py`, `utils.py`), not from the paper's method section:

1. pretrain a classifier on synthetic images that are balanced over the subgroups (class Y x bias attribute B), with
   ERM (cross-entropy), never showing it a real image (`ffr_1`: the same number of synthetic images per group);
2. fine-tune the whole model (backbone and classifier, nothing frozen; `ffr_2` loads every weight of step 1) on the
   biased real training set with ERM or a loss-based bias mitigation method: GroupDRO (Sagawa et al. 2020,
   `losses.group_robust.group_dro_loss`), resampling, DFR.

Keeping the two domains in separate steps is the point: trained on a mix, the model can key on the pair
(B, real / synthetic) instead of Y (abstract). Both steps are this class: step 1 without `start_from`, step 2 with
`start_from` naming step 1's checkpoint (`experiments/ffr/`); the baselines are step 2 from scratch (no
pretraining) and step 2 after step 1 on the real biased set. GroupDRO's weights q restart uniform in every step.

The official schedule (its scripts' argparse defaults): an ImageNet-pretrained ResNet-50 at 224 px,
Adam with weight decay 1e-5, batch 128, 50 epochs per step, learning rate 1e-4 in step 1 and searched in step 2
(default 1e-3), GroupDRO step size 0.01, no augmentation (resize only; the flip is commented out), and each step's
checkpoint chosen by the worst-group accuracy on the real, balanced validation split (`callbacks.GroupAccuracy` +
`ModelCheckpoint`). Here the image towers train from scratch (no ImageNet weights exist in this suite), which
`experiments/ffr/` states; the logits are a linear layer on the tower's pooled features, as ResNet-50's fc.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import SingleCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.group_robust import group_dro_loss, group_mean_losses
from vlp_lightning.methods.adaptation.base import ClassNames
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR, load_earlier_stage
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit

Objective = Literal["erm", "groupdro"]


class FFR(VLPMethod):
    """A supervised classifier trained with ERM or GroupDRO, optionally from an earlier step (module doc).

    Args:
        vision: backbone (default: a tiny 2-block ViT at 32 px; ResNet-50 in the paper).
        classnames / classnames_from / label_field: the classes (`adaptation.base.ClassNames`).
        objective: `erm` (cross-entropy) or `groupdro` (online GroupDRO over the groups).
        group_names: one name per group; None reads `classnames[group_field]` from the manifest of
            `classnames_from` (`vlp-data ffr` writes them). Needed by `groupdro`; with `erm` the per-group losses are
            only logged when the names are known.
        group_field: the integer field of the samples' `.json` holding the group.
        dro_step_size: GroupDRO's eta (Sagawa et al. and FFR's code: 0.01).
        start_from: the checkpoint of the earlier step (an FFR run with the same backbone and classes) whose every
            weight this run starts from; None starts from random weights.
        crop_scale / hflip: training views (FFR's code: the whole image, no flip).
        optimizer, lr_scheduler, compile: see `VLPMethod`.
    """

    paper = Paper(
        "From Fake to Real: Pretraining on Balanced Synthetic Images to Prevent Spurious Correlations in Image "
        "Recognition", "Qraitem et al.", 2024,
        note="two steps: ERM on balanced synthetic data, then ERM / GroupDRO on the biased real data",
    )
    family = "supervised pretraining"
    view_kind = "one crop"
    required_keys = ("image", "label")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        classnames: list[str] | None = None,
        classnames_from: str | None = None,
        label_field: str = "cls",
        objective: Objective = "erm",
        group_names: list[str] | None = None,
        group_field: str = "group",
        dro_step_size: float = 0.01,
        start_from: str | None = None,
        crop_scale: tuple[float, float] = (1.0, 1.0),
        hflip: bool = False,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        if objective not in ("erm", "groupdro"):
            raise ValueError(f"objective must be 'erm' or 'groupdro', got {objective!r}")
        if dro_step_size < 0:
            raise ValueError(f"dro_step_size must be >= 0, got {dro_step_size}; FFR and Sagawa et al. use 0.01")
        self.classes = ClassNames(classnames, classnames_from, label_field, "all", type(self).__name__)
        self.groups: ClassNames | None = None
        if objective == "groupdro" or group_names is not None:
            if group_names is None and classnames_from is None:
                raise ValueError("FFR with objective groupdro needs the groups: set group_names: [...] or "
                                 "classnames_from: shards whose manifest names them (vlp-data ffr writes `group`)")
            self.groups = ClassNames(group_names, classnames_from, group_field, "all", type(self).__name__)
        self.objective = objective
        self.dro_step_size = dro_step_size
        self.vision = vision or tiny_vit()
        self.head = nn.Linear(self.vision.num_features, len(self.classes.all))
        self.crop_scale, self.hflip = tuple(crop_scale), hflip
        #: GroupDRO's q (uniform at the start of every step; saved in checkpoints so a resumed run continues it).
        self.register_buffer("group_weights", torch.full((len(self.groups.all) if self.groups else 0,),
                                                         1 / max(1, len(self.groups.all) if self.groups else 1)))
        if start_from is not None:
            load_earlier_stage(self, start_from, "runs/ffr/<step 1 recipe>/checkpoints/last.ckpt",
                               restart="group_weights")

    def train_views(self) -> Views:
        """The whole image resized (FFR's code trains without augmentation); `crop_scale` / `hflip` add some."""
        return SingleCrop(scale=self.crop_scale, ratio=(1.0, 1.0), hflip=self.hflip, mean=self.vision.mean,
                          std=self.vision.std)

    def classify(self, images: Tensor) -> Tensor:
        """Class logits [N, C] (what `callbacks.GroupAccuracy` and `AdversarialRobustness` score)."""
        return self.head(self.vision(images))

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        labels = self.classes.labels(batch).to(self.device)
        logits = self.classify(batch["image"]).float()  # [N, C]
        losses = F.cross_entropy(logits, labels, reduction="none")  # [N]
        outputs = {"accuracy": (logits.argmax(1) == labels).float().mean()}
        if self.groups is None:
            return {"loss": losses.mean(), **outputs}
        groups = self.groups.labels(batch).to(self.device)
        if self.objective == "groupdro":
            loss, weights = group_dro_loss(losses, groups, self.group_weights, self.dro_step_size)
            if self.training:
                self.group_weights.copy_(weights)
        else:
            loss = losses.mean()
        group_losses, counts = group_mean_losses(losses.detach(), groups, len(self.groups.all))
        outputs["worst_group_loss"] = group_losses[counts > 0].max()
        if self.objective == "groupdro":
            outputs["max_group_weight"] = self.group_weights.max()
        return {"loss": loss, **outputs}
