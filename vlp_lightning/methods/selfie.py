"""Selfie: self-supervised pretraining for image embedding (Trinh et al. 2019, "Selfie: Self-supervised Pretraining
for Image Embedding").

Masked patch prediction as classification rather than regression (sec. 2, Fig. 2). The image is cut into a grid of
patches; a convolutional patch network P turns every patch into a vector h. Some positions are masked:

* the encoder summarises the visible patches with an attention pooling network A — Transformer layers over
  (u0, h_1 + pos_1, ..., h_n + pos_n) with a learned u0, whose output at u0 is the summary u (sec. 2.2);
* for each masked location j the query is v_j = u + pos_j, and the decoder side is P applied to the masked patches
  themselves, without pooling: v_j must select its own patch among all masked patches of the same image (the
  others are the distractors), a softmax over dot products — all masked locations are predicted at once, as the
  paper's efficient implementation does (sec. 2.1).

Position embeddings are factorised into a row and a column embedding, summed (sec. 2.2); they start N(0, 1)
(`nn.Embedding`'s default), on the scale of the LayerNorm-ed summary u, so that the location matters from the first
step. Note that with v_j = u + pos_j the summary adds the same logit u.h_k to candidate k for every query of an
image: telling the masked locations apart rests on pos_j.h_k, i.e. on what a patch's content says about where it
belongs in this kind of image. The patch network is any timm model wrapped in `VisionEncoder` that pools its
features (the paper uses the first three stages of ResNet-50; here the whole given network, a small ResNet by
default).

What is transferred is the patch network, run on the whole image: the paper finetunes a ResNet-50 on full images
whose first blocks are the pretrained patch network (sec. 3, experimental setup). `probe_features` therefore applies
the convolutional patch network to the whole image and pools it globally (`probe_representation="whole_image"`, the
default); `"patch_mean"` averages the features of every patch encoded on its own instead, the pretraining-time view
of the image. A frozen probe of the whole image reads batch norm statistics gathered on patches, which a finetuned
ResNet re-estimates.

On CPU, train Selfie in fp32 (`precision: 32-true`): PyTorch's bf16 CPU convolution sporadically returns non-finite
weight gradients for a 3x3 stride-2 convolution on a 1x1 map, which is what the last stage of a stride-32 ResNet
sees on a patch smaller than 32 px.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from data_modules.views import SingleCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.masked_modeling import patch_selection_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.modules.masking import PatchMask, gather_patches, num_masked_patches, patchify, random_masking
from vlp_lightning.modules.vision import VisionEncoder


class Selfie(VLPMethod):
    """Patch network + attention pooling trained to pick masked patches among distractors from the same image.

    Args:
        patch_network: encodes one patch image [M, 3, p, p] into [M, num_features] (default: timm resnet10t,
            for 64px images).
        patch_size: side of the square patches; the image side must be a multiple of it (the paper: 8 px on
            32 px images and 32 px on 224 px images, a 4x4 and a 7x7 grid; default 16 px on 64 px, a 4x4 grid).
        mask_ratio: fraction of the patches masked per image (they are also each other's distractors).
        pooling_depth: Transformer blocks of the attention pooling network.
        pooling_heads: attention heads of the pooling network (must divide the patch network's num_features).
        probe_representation: what kNN / linear probes read (module doc): the patch network on the whole image
            ("whole_image", as the paper transfers it) or the mean of the per-patch features ("patch_mean").
    """

    paper = Paper("Selfie: Self-supervised Pretraining for Image Embedding", "Trinh et al.", 2019)
    family = "masked image modelling"
    view_kind = "one crop"

    no_weight_decay_names = (*VLPMethod.no_weight_decay_names, "row_embedding", "column_embedding", "summary_token")

    def __init__(
        self,
        patch_network: VisionEncoder | None = None,
        patch_size: int = 16,
        mask_ratio: float = 0.25,
        pooling_depth: int = 2,
        pooling_heads: int = 4,
        probe_representation: Literal["whole_image", "patch_mean"] = "whole_image",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["patch_network", "optimizer", "lr_scheduler"])
        # stored as `vision`, the name under which the base class compiles the image tower
        self.vision = patch_network or VisionEncoder("resnet10t", img_size=64)
        if self.vision.img_size % patch_size:
            raise ValueError(f"image size {self.vision.img_size} is not a multiple of patch_size={patch_size}")
        self.patch_size = patch_size
        self.grid_side = self.vision.img_size // patch_size
        self.num_patches = self.grid_side**2
        num_masked_patches(self.num_patches, mask_ratio)  # fail at construction, not at the first step
        self.mask_ratio = mask_ratio
        if probe_representation not in ("whole_image", "patch_mean"):
            raise ValueError(f"probe_representation={probe_representation!r}: choose 'whole_image' or 'patch_mean'")
        self.probe_representation = probe_representation
        width = self.vision.num_features
        self.row_embedding = nn.Parameter(torch.randn(self.grid_side, 1, width))
        self.column_embedding = nn.Parameter(torch.randn(1, self.grid_side, width))
        self.summary_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)  # u0
        self.pooling_blocks = nn.Sequential(
            *[Block(width, pooling_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(pooling_depth)]
        )
        self.pooling_norm = nn.LayerNorm(width)

    def train_views(self) -> Views:
        """One random resized crop with flips; the paper shifts CIFAR images by pad-and-crop (sec. 2.1) so that
        patch borders fall at random image positions."""
        return SingleCrop(scale=(0.25, 1.0), mean=self.vision.mean, std=self.vision.std)

    def position_embeddings(self) -> Tensor:
        """pos [L, D] for the row-major grid: row embedding + column embedding (sec. 2.2)."""
        return (self.row_embedding + self.column_embedding).flatten(0, 1)

    def encode_patches(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] -> patch-network features h [N, L, D], every patch encoded on its own."""
        n = images.shape[0]
        patches = patchify(images, self.patch_size).view(n * self.num_patches, 3, self.patch_size, self.patch_size)
        return self.vision(patches).view(n, self.num_patches, -1)

    def attention_pool(self, features: Tensor) -> Tensor:
        """Patch features with their position embedding [N, K, D] -> summary u [N, D] (the output at u0)."""
        tokens = torch.cat([self.summary_token.expand(features.shape[0], -1, -1), features], dim=1)
        return self.pooling_norm(self.pooling_blocks(tokens))[:, 0]

    def probe_features(self, images: Tensor) -> Tensor:
        """[N, D]: the patch network on the whole image, globally pooled (the network the paper finetunes on full
        images, sec. 3), or the mean of its per-patch features (`probe_representation`)."""
        if self.probe_representation == "patch_mean":
            return self.encode_patches(images).mean(dim=1)
        return self.vision(images)

    def queries_and_candidates(self, images: Tensor, mask: PatchMask) -> tuple[Tensor, Tensor]:
        """-> (queries v = u + pos [N, M, D] of the masked locations, candidates h [N, M, D] of the masked patches).
        Only the visible patches reach the attention pooling network."""
        features = self.encode_patches(images)  # [N, L, D]
        positions = self.position_embeddings().expand_as(features)
        summary = self.attention_pool(gather_patches(features + positions, mask.ids_keep))  # [N, D]
        queries = summary.unsqueeze(1) + gather_patches(positions, mask.ids_masked)
        return queries, gather_patches(features, mask.ids_masked)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        images = batch["image"]
        mask = random_masking(images.shape[0], self.num_patches, self.mask_ratio, device=images.device)
        loss, accuracy = patch_selection_loss(*self.queries_and_candidates(images, mask))
        return {"loss": loss, "patch_accuracy": accuracy}
