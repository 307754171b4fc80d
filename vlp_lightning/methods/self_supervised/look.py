"""LOOK: "Rethinking Supervised Pre-training for Better Downstream Transferring" (Feng, Jiang, Tang, Jin, Gao, ICLR
2022).

Supervised pretraining without a classifier over class centres: each image only has to share its label with most of
its k nearest neighbours (a leave-one-out kNN vote, `leave_one_out_knn_loss`), so a class may stay multi-modal and
keep the intra-class differences that transfer (abstract, sec. 3). The neighbours come from the current batch and a
memory bank of past embeddings with their labels (`MemoryBank`, gathered from every rank, so each rank votes over
the same bank), which is the paper's "efficient implementation that scales well to large datasets" in the form this
suite has.

Not verified (the paper's method section was not reachable here): whether the bank holds the online network's
features (here: detached embeddings of the network being trained, as Wu et al. 2018's memory bank) or those of a
momentum encoder, the projection head (a 2-layer MLP here), k, τ and the bank size, and the views (one random
resized crop and flip, the standard supervised ImageNet recipe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from data_modules.views import SingleCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.nearest_neighbour import leave_one_out_knn_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.modules.heads import MLPHead
from vlp_lightning.modules.memory_bank import MemoryBank
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class LOOK(VLPMethod):
    """Leave-one-out kNN classification of each embedding among the batch and a labelled memory bank.

    Args:
        vision: backbone (default: a tiny 2-block ViT at 32 px; ResNet-50 in the paper).
        hidden_dim: hidden width of the projection head.
        projection_dim: embedding size the neighbours are found in.
        bank_size: embeddings kept in the memory bank (a multiple of the global batch).
        k: neighbours of each vote.
        temperature: τ of the vote weights exp(s / τ).
    """

    paper = Paper(
        "Rethinking Supervised Pre-training for Better Downstream Transferring",
        "Feng et al.", 2022, note="objective from the abstract; see its docstring",
    )
    family = "supervised pretraining"
    view_kind = "one crop"

    required_keys = ("image", "label")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        hidden_dim: int = 64,
        projection_dim: int = 32,
        bank_size: int = 64,
        k: int = 8,
        temperature: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or tiny_vit()
        self.projector = MLPHead(self.vision.num_features, hidden_dim, projection_dim, layers=2, norm="bn")
        self.bank = MemoryBank(bank_size, projection_dim)
        self.bank_labels = MemoryBank(bank_size, 1)
        self.bank_labels.bank.fill_(-1)  # empty slots: never neighbours
        self.k = k
        self.temperature = temperature
        self._to_enqueue: tuple[Tensor, Tensor] | None = None

    def train_views(self) -> Views:
        """A random resized crop (scale 0.08-1) and a flip, the supervised ImageNet recipe (module doc)."""
        return SingleCrop(scale=(0.08, 1.0), mean=self.vision.mean, std=self.vision.std)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        images, labels = batch["image"], batch["label"]
        embeddings = F.normalize(self.projector(self.vision(images)), dim=1)  # [N, D]
        bank_labels = self.bank_labels.bank[:, 0].round().long()  # [K]
        loss, accuracy = leave_one_out_knn_loss(
            embeddings, labels, self.bank.bank, bank_labels, self.k, self.temperature
        )
        if self.training:
            self._to_enqueue = (embeddings.detach(), labels)
        return {"loss": loss, "knn_accuracy": accuracy}

    def on_after_backward(self) -> None:
        """Enqueue the batch's embeddings and labels once its loss went backward (the bank was read by it), before a
        checkpoint at the end of the batch can be written (as `MoCoV2`)."""
        if self._to_enqueue is not None:
            embeddings, labels = self._to_enqueue
            self.bank.enqueue(embeddings)
            self.bank_labels.enqueue(labels[:, None].float())
            self._to_enqueue = None
