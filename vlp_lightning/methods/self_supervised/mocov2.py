"""MoCo v2: Momentum Contrast with an MLP head and stronger augmentation (Chen, Fan, Girshick, He 2020, "Improved
Baselines with Momentum Contrastive Learning"; MoCo: He et al. 2020).

A query encoder (backbone + MLP head 2048-ReLU-128, MoCo v2 sec. 2) and a key encoder, its EMA with m = 0.999
(MoCo eq. 2, constant: `final_momentum` = `base_momentum`), encode two crops; InfoNCE (MoCo eq. 1,
`moco_queue_loss`, τ 0.2) contrasts each query's key against a queue of K = 65,536 keys of past batches
(`MemoryBank`, gathered from every rank before they are enqueued, sec. 3.2). Under DDP the keys are computed with
shuffling BN (sec. 3.3): the key encoder sees the global batch in a random order, so its BatchNorm statistics
cannot leak which sample is whose positive. The paper trains with SGD, lr 0.03 x batch / 256, momentum 0.9,
weight decay 1e-4 on every parameter (the official `main_moco.py`): `exempt_gains_and_biases = False`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import TwoCrops, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.distributed import all_gather_no_grad, rank, world_size
from vlp_lightning.losses.instance_contrastive import moco_queue_loss
from vlp_lightning.methods.base import WarmupCosineLR
from vlp_lightning.methods.momentum import MomentumMethod, momentum_copy
from vlp_lightning.methods.self_supervised.common import expect_views
from vlp_lightning.modules.heads import MLPHead
from vlp_lightning.modules.memory_bank import MemoryBank
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class MoCoV2(MomentumMethod):
    """Query encoder against a momentum key encoder and a queue of negatives.

    Args:
        vision: backbone (default: a tiny 2-block ViT at 32 px; ResNet-50 in the paper).
        hidden_dim: hidden width of the MLP head (2048).
        projection_dim: key size (128).
        queue_length: K, keys in the queue (65,536; a multiple of the global batch).
        temperature: τ (0.2).
        momentum: m of the key encoder (0.999, constant).
        shuffle_batchnorm: shuffle the key encoder's batch across ranks (sec. 3.3; no effect in one process).
    """

    paper = Paper("Improved Baselines with Momentum Contrastive Learning", "Chen et al.", 2020)
    family = "instance contrastive"
    view_kind = "two crops"

    exempt_gains_and_biases = False  # the official SGD decays every parameter (module doc)

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        hidden_dim: int = 64,
        projection_dim: int = 32,
        queue_length: int = 256,
        temperature: float = 0.2,
        momentum: float = 0.999,
        shuffle_batchnorm: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(momentum, momentum, optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or tiny_vit()
        self.projector = MLPHead(self.vision.num_features, hidden_dim, projection_dim, layers=2, norm="none")
        self.key_encoder = momentum_copy(nn.Sequential(self.vision, self.projector))
        self.queue = MemoryBank(queue_length, projection_dim)
        self.temperature = temperature
        self.shuffle_batchnorm = shuffle_batchnorm
        self._keys_to_enqueue: Tensor | None = None

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(nn.Sequential(self.vision, self.projector), self.key_encoder)]

    def train_views(self) -> Views:
        """MoCo v2's augmentation (sec. 2; `TwoCrops` defaults): scale 0.2-1, jitter 0.4/0.4/0.4/0.1 with p 0.8,
        grayscale 0.2, blur 0.5."""
        return TwoCrops(mean=self.vision.mean, std=self.vision.std)

    def encode_keys(self, images: Tensor) -> Tensor:
        """L2-normalised keys [N, D] of the key encoder, its batch shuffled across ranks when asked (ShuffleBN)."""
        if not (self.shuffle_batchnorm and self.training and world_size() > 1):
            return F.normalize(self.forward_teacher(self.key_encoder, images), dim=1)
        gathered = all_gather_no_grad(images)  # [G, ...]
        order = torch.randperm(gathered.shape[0], device=images.device)
        dist.broadcast(order, src=0)  # one permutation for all ranks
        mine = order.view(world_size(), -1)[rank()]
        keys = all_gather_no_grad(F.normalize(self.forward_teacher(self.key_encoder, gathered[mine]), dim=1))
        return keys[torch.argsort(order)].view(world_size(), -1, keys.shape[-1])[rank()]

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        views = expect_views(batch, 2, "MoCoV2", "TwoCrops")
        queries = F.normalize(self.projector(self.vision(views[0])), dim=1)  # [N, D]
        keys = self.encode_keys(views[1])  # [N, D]
        loss = moco_queue_loss(queries, keys, self.queue.bank, self.temperature)
        if self.training:
            self._keys_to_enqueue = keys
        return {"loss": loss}

    def on_after_backward(self) -> None:
        """Enqueue this batch's keys once its loss went backward (MoCo's `_dequeue_and_enqueue`, Algorithm 1): not
        earlier, because backward still reads the queue, and not later, so that a checkpoint written at the end of
        the batch already holds them."""
        if self._keys_to_enqueue is not None:
            self.queue.enqueue(self._keys_to_enqueue)
            self._keys_to_enqueue = None
