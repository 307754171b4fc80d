"""SiT: self-supervised vision transformer (Ahmed et al. 2021, "SiT: Self-supervised vIsion Transformer").

A ViT is trained on three tasks at once (sec. 3), each view of an image being rotated and corrupted first:

* rotation prediction: the view is turned by 0, 90, 180 or 270 degrees and a rotation token predicts which
  (4-way cross-entropy);
* contrastive learning: a contrastive token of two augmented views of the same image is pulled together against the
  other images of the batch (SimCLR's NT-Xent, temperature 0.5 in the released code);
* image reconstruction: patches of the view are corrupted (here: replaced by noise or by the same patch of another
  image of the batch) and the transformer, used as an autoencoder, restores the whole clean view from its patch
  tokens through a linear per-patch head (the released code's transposed convolution with kernel = stride = patch
  size is the same map); l1 loss.

The three losses are combined with learned uncertainty weights (Kendall et al. 2018), as in the released code:
exp(-s) * L + s/2 for the two classification tasks and 0.5 * exp(-s) * L + s/2 for the l1 reconstruction.

The rotation token is the ViT's own class token; the contrastive token is added after it. `encode_image` returns both
tokens of the unrotated, uncorrupted image, concatenated: the released evaluation puts one linear head on each token
and averages their logits, which is one linear classifier on the concatenation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import TwoCrops, Views
from vlp_lightning.losses.masked_modeling import nt_xent_loss, uncertainty_weighted_sum
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.modules.masking import (
    num_masked_patches,
    patchify,
    random_masking,
    unpatchify,
    vit_tokens,
    vit_transformer,
)
from vlp_lightning.modules.vision import VisionEncoder

#: per-task scale of the uncertainty weighting: rotation (cross-entropy), contrastive (cross-entropy), l1.
TASK_SCALES = (1.0, 1.0, 0.5)


class SiT(VLPMethod):
    """Rotation prediction + contrastive learning + corrupted image reconstruction on one ViT.

    Args:
        vision: the ViT (default: a tiny timm ViT, 64px, patch 8); it must have a class token (the rotation token).
        corruption_ratio: fraction of the patches of each view that are corrupted.
        noise_fraction: of the corrupted patches, the share replaced by Gaussian noise; the rest get the same
            patch of another image of the batch.
        contrastive_dim: output size of the linear contrastive head (512 in the released code).
        temperature: NT-Xent temperature (0.5 in the released code).
        init_log_variance: initial s of every task's uncertainty weight (1.0 in the released code).
    """

    no_weight_decay_names = (*VLPMethod.no_weight_decay_names, "contrastive_token")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        corruption_ratio: float = 0.3,
        noise_fraction: float = 0.5,
        contrastive_dim: int = 128,
        temperature: float = 0.5,
        init_log_variance: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or VisionEncoder("vit_tiny_patch16_224", img_size=64, patch_size=8)
        vit = self.vision.model
        if self.vision.patch_size is None:
            raise ValueError(f"SiT needs a ViT-like timm model (one with patch_embed); got {type(vit).__name__}")
        if vit.cls_token is None:
            raise ValueError("SiT uses the ViT's class token as its rotation token; pick a ViT with a class token")
        self.grid_size: tuple[int, int] = tuple(vit.patch_embed.grid_size)
        num_masked_patches(self.grid_size[0] * self.grid_size[1], corruption_ratio)
        self.corruption_ratio = corruption_ratio
        self.noise_fraction = noise_fraction
        self.temperature = temperature
        self.patch_size: int = self.vision.patch_size
        width = vit.embed_dim
        self.contrastive_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.rotation_head = nn.Linear(width, 4)
        self.contrastive_head = nn.Linear(width, contrastive_dim)
        self.reconstruction_head = nn.Linear(width, self.patch_size * self.patch_size * 3)
        self.log_variances = nn.Parameter(torch.full((len(TASK_SCALES),), init_log_variance))

    @property
    def image_size(self) -> int:
        return self.vision.img_size

    def train_views(self) -> Views:
        """Two augmented crops of each image for the contrastive task."""
        return TwoCrops()

    def forward_tokens(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] -> [N, P + 1 + L, width]: prefix (class = rotation) tokens, the contrastive token,
        then the patch tokens."""
        prefix, patches = vit_tokens(self.vision.model, images)
        contrastive = self.contrastive_token.expand(images.shape[0], -1, -1)
        return vit_transformer(self.vision.model, torch.cat([prefix, contrastive, patches], dim=1))

    def encode_image(self, images: Tensor) -> Tensor:
        """[N, 2 * width]: the rotation (class) token and the contrastive token."""
        tokens = self.forward_tokens(images)
        return torch.cat([tokens[:, 0], tokens[:, self.vision.model.num_prefix_tokens]], dim=1)

    def corrupt(self, images: Tensor) -> Tensor:
        """Replace a random `corruption_ratio` of each image's patches by noise or by another image's patch."""
        n = images.shape[0]
        patches = patchify(images, self.patch_size)  # [N, L, p*p*3]
        mask = random_masking(n, patches.shape[1], self.corruption_ratio, device=images.device).mask.bool()
        use_noise = torch.rand(mask.shape, device=images.device) < self.noise_fraction
        replacement = torch.where(use_noise[..., None], torch.randn_like(patches), patches.roll(1, dims=0))
        corrupted = torch.where(mask[..., None], replacement, patches)
        return unpatchify(corrupted, self.patch_size, self.grid_size)

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        views = batch["image"]
        if not isinstance(views, (list, tuple)) or len(views) != 2:
            raise ValueError(
                "SiT needs two views of every image (batch['image'] as a list of two tensors, TwoCrops views); "
                "remove the explicit `views` from the data config so the data module uses SiT's own"
            )
        images = torch.cat(list(views))  # [2N, 3, H, W]: both views in one pass
        turns = torch.randint(0, 4, (images.shape[0],), device=images.device)
        rotated = rotate_quarter_turns(images, turns)
        tokens = self.forward_tokens(self.corrupt(rotated))
        num_prefix = self.vision.model.num_prefix_tokens
        rotation_logits = self.rotation_head(tokens[:, 0]).float()
        first, second = self.contrastive_head(tokens[:, num_prefix]).chunk(2)
        patch_pixels = self.reconstruction_head(tokens[:, num_prefix + 1 :])  # [2N, L, p*p*3]
        reconstructed = unpatchify(patch_pixels, self.patch_size, self.grid_size)

        rotation_loss = F.cross_entropy(rotation_logits, turns)
        contrastive_loss = nt_xent_loss(first, second, self.temperature)
        reconstruction_loss = F.l1_loss(reconstructed.float(), rotated.float())
        losses = (rotation_loss, contrastive_loss, reconstruction_loss)
        return {
            "loss": uncertainty_weighted_sum(losses, self.log_variances, TASK_SCALES),
            "rotation_loss": rotation_loss,
            "contrastive_loss": contrastive_loss,
            "reconstruction_loss": reconstruction_loss,
            "rotation_accuracy": (rotation_logits.argmax(dim=1) == turns).float().mean(),
        }


def rotate_quarter_turns(images: Tensor, turns: Tensor) -> Tensor:
    """Rotate image i of [N, C, S, S] counter-clockwise by turns[i] x 90 degrees."""
    rotated = images.clone()
    for quarter_turns in range(1, 4):
        selected = turns == quarter_turns
        if selected.any():
            rotated[selected] = torch.rot90(images[selected], quarter_turns, dims=(2, 3))
    return rotated
