"""SwAV: swapping assignments between views (Caron et al. 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments").

Every view of an image goes through the backbone, an MLP head and L2 normalisation to z; its scores against K
learnable prototypes C are z^T C. For the two global crops, codes q are computed online by Sinkhorn-Knopp on the
batch (equal partition among prototypes, sec. 3.1); every other view — the other global crop and the small local crops
of multi-crop (sec. 3.2) — predicts them (swapped prediction, eq. 1-2). Training details of the paper and of its
official implementation:

* the prototypes are L2-normalised before every step (Algorithm 1 in the appendix) and stay frozen for the first
  `freeze_prototypes_steps` optimizer steps (one epoch, Appendix A.1) so that the assignments can settle first;
* with small batches, features of past batches kept in a queue (`queue_length`, summed over ranks; about 3k in
  sec. 3.1, "Working with small batches") join the batch in Sinkhorn-Knopp only, once the queue is full; it is
  started after `queue_start_steps` (epoch 15 in the official batch-256 runs);
* across ranks the codes are computed on the global batch by summing Sinkhorn-Knopp's statistics over ranks;
* the prototype scores z^T C are computed in fp32 whatever the precision: they enter exp(s / ε) with ε = 0.05
  (a bf16 score off by 2^-8 moves exp(s / ε) by 8 %), as the contrastive losses compute their logits in fp32;
* the optimizer is LARS (`timm.optim.Lars`, trust coefficient 0.001, no clipping: the official LARC wrapper around
  SGD) with weight decay on every parameter, biases, norms and prototypes included (the official
  `main_swav.py` passes `model.parameters()` to SGD with `weight_decay=1e-6`): `exempt_gains_and_biases = False`.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import MultiCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.distributed import world_size
from vlp_lightning.losses.swav import sinkhorn_knopp, swav_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.modules.heads import MLPHead
from vlp_lightning.modules.vision import VisionEncoder, multi_crop_local_size, tiny_vit


class SwAV(VLPMethod):
    """Online clustering with swapped prediction over multi-crop views.

    Args:
        vision: backbone (default: `tiny_vit(dynamic_img_size=True)`, 32 px, patch 8, any input size for the local crops).
        hidden_dim: hidden width of the MLP head (2048 in the paper).
        projection_dim: size of z (128 in the paper).
        head_layers: linear layers of the head (2 in the paper, Linear-BN-ReLU-Linear).
        num_prototypes: K (3000 for ImageNet in the paper).
        temperature: τ of the swapped prediction (0.1).
        sinkhorn_epsilon: ε of the entropic regularisation (0.05).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
        freeze_prototypes_steps: optimizer steps during which the prototypes get no update.
        queue_length: features kept from past batches for Sinkhorn-Knopp, over all ranks (0 disables the queue).
        queue_start_steps: optimizer step from which the queue is filled.
        num_global_crops: full-resolution crops; codes are computed for these (2 in the paper).
        num_local_crops: low-resolution crops that only predict (6 in the paper).
        local_crop_size: side of the local crops; default 96/224 of `image_size`, rounded down to whole patches.
    """

    paper = Paper("Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", "Caron et al.", 2020)
    family = "clustering"
    view_kind = "multi-crop"

    required_keys = ("image",)
    exempt_gains_and_biases = False  # the official SGD + LARC decays every parameter (module doc)

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        hidden_dim: int = 256,
        projection_dim: int = 64,
        head_layers: int = 2,
        num_prototypes: int = 64,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        freeze_prototypes_steps: int = 100,
        queue_length: int = 0,
        queue_start_steps: int = 0,
        num_global_crops: int = 2,
        num_local_crops: int = 6,
        local_crop_size: int | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        if num_global_crops < 1 or num_global_crops + num_local_crops < 2:
            raise ValueError(
                "SwAV needs at least one global crop and two views in all, got "
                f"num_global_crops={num_global_crops}, num_local_crops={num_local_crops}"
            )
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or tiny_vit(dynamic_img_size=True)
        self.projector = MLPHead(self.vision.num_features, hidden_dim, projection_dim, layers=head_layers, norm="bn")
        self.prototypes = nn.Linear(projection_dim, num_prototypes, bias=False)
        self.temperature = temperature
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.queue_length = queue_length
        self.queue_start_steps = queue_start_steps
        self.num_global_crops = num_global_crops
        self.num_local_crops = num_local_crops
        self.local_crop_size = multi_crop_local_size(self.vision, local_crop_size, "SwAV")
        # [num_global_crops, queue_length / world size, projection_dim], newest first; allocated when the queue starts.
        self.register_buffer("queue", None, persistent=False)
        self.queued_rows = 0

    # ------------------------------------------------------------------ protocol
    def train_views(self) -> Views:
        """2 global crops (scale 0.14-1) and 6 local crops (scale 0.05-0.14) at 96/224 of the size (sec. 3.2, A.1)."""
        return MultiCrop(
            num_global=self.num_global_crops,
            num_local=self.num_local_crops,
            local_size=self.local_crop_size,
            mean=self.vision.mean,
            std=self.vision.std,
        )

    def probe_features(self, images: Tensor) -> Tensor:
        """Backbone features: SwAV is evaluated on the pooled backbone output, not on z (sec. 4.1)."""
        return self.vision(images)

    # ------------------------------------------------------------------ model
    def embed_views(self, views: list[Tensor]) -> Tensor:
        """Views V x [N,3,H_v,W_v] -> z [V*N, projection_dim], L2-normalised, in view order.

        Consecutive views of one resolution go through the backbone as one batch (the global crops, then the local
        crops), as the official multi-crop forward does; the head sees all views at once (BatchNorm over all).
        """
        features = [self.vision(torch.cat(list(group))) for _, group in itertools.groupby(views, key=lambda v: v.shape)]
        return F.normalize(self.projector(torch.cat(features)), dim=1)

    def prototype_scores(self, embeddings: Tensor) -> Tensor:
        """z [M, D] -> z^T C [M, K] in fp32, outside autocast (module doc: the scores feed exp(s / ε))."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return F.linear(embeddings.float(), self.prototypes.weight.float())

    def codes(self, scores: Tensor, global_view: int) -> Tensor:
        """Sinkhorn-Knopp codes [N, K] of one global view; a full queue joins the batch (its rows are dropped after)."""
        batch_size = scores.shape[0]
        if self.training and self.queue is not None and self.queued_rows == self.queue.shape[1]:
            with torch.no_grad():
                scores = torch.cat([self.prototype_scores(self.queue[global_view]), scores])
        return sinkhorn_knopp(scores, self.sinkhorn_epsilon, self.sinkhorn_iterations)[-batch_size:]

    @torch.no_grad()
    def enqueue(self, global_embeddings: Tensor) -> None:
        """Push z of the global crops [num_global_crops, N, D] into the queue, dropping the oldest rows."""
        if self.queue is None:
            rows_per_rank = self.queue_length // world_size()
            shape = (self.num_global_crops, rows_per_rank, global_embeddings.shape[-1])
            self.queue = global_embeddings.new_zeros(shape, dtype=torch.float32)
        capacity = self.queue.shape[1]
        self.queue = torch.cat([global_embeddings.float(), self.queue], dim=1)[:, :capacity]
        self.queued_rows = min(capacity, self.queued_rows + global_embeddings.shape[1])

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        views = batch["image"]
        if isinstance(views, Tensor) or len(views) != self.num_global_crops + self.num_local_crops:
            found = "one image tensor" if isinstance(views, Tensor) else f"{len(views)} views"
            raise ValueError(
                f"SwAV expects `image` as a list of {self.num_global_crops} global + {self.num_local_crops} local "
                f"crops but got {found}; let the data module use SwAV.train_views() (MultiCrop) or set matching views"
            )
        batch_size = len(views[0])
        embeddings = self.embed_views(views)  # [V*N, D]
        scores_per_view = self.prototype_scores(embeddings).split(batch_size)  # V x [N, K]
        codes_per_view = [self.codes(scores_per_view[view], view) for view in range(self.num_global_crops)]
        loss = swav_loss(scores_per_view, codes_per_view, self.temperature)
        if self.training and self.queue_length > 0 and self.global_step >= self.queue_start_steps:
            global_embeddings = embeddings[: self.num_global_crops * batch_size].detach()
            self.enqueue(global_embeddings.unflatten(0, (self.num_global_crops, batch_size)))
        return {"loss": loss}

    # ------------------------------------------------------------------ optimisation rules of the paper
    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """Project the prototypes back onto the unit sphere before each step (Algorithm 1 in the appendix)."""
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def on_after_backward(self) -> None:
        """No prototype update during the first steps: their gradient is dropped, so the optimizer skips them."""
        if self.global_step < self.freeze_prototypes_steps:
            self.prototypes.weight.grad = None

