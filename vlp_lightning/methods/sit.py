"""SiT: self-supervised vision transformer (Ahmed et al. 2021, "SiT: Self-supervised vIsion Transformer").

A ViT is trained on three tasks at once (sec. 3), each view of an image being rotated and corrupted first:

* rotation prediction: the view is turned by 0, 90, 180 or 270 degrees and a rotation token predicts which
  (4-way cross-entropy);
* contrastive learning: a contrastive token of two augmented views of the same image is pulled together against the
  other images of the batch (SimCLR's NT-Xent, temperature 0.5 in the released code);
* image reconstruction: the view is corrupted and the transformer, used as an autoencoder, restores the whole clean
  view from its patch tokens through a linear per-patch head (the released code's transposed convolution with
  kernel = stride = patch size is the same map); l1 loss.

Views and corruption follow the released code (github.com/Sara-Ahmed/SiT, v1 of 2021, commit 1aacd6a):

* views (`datasets/prepare_datasets.py` `build_transform`: timm's `create_transform` with SSL settings): two
  independent random resized crops of 0.08-1 of the area, aspect 3/4-4/3, bicubic; horizontal flip 0.5; colour
  jitter 0.4 on brightness, contrast and saturation, no hue, always applied; no grayscale, blur or solarisation;
  ImageNet normalisation. Then the rotation (`datasets_utils.py` `getItem`).
* corruption (`engine.py` `distortImages`, on the normalised batch), per image and in this order: one rectangle
  turned grey (channel mean, `rgb2gray_patch`); one rectangle blurred with a Gaussian of odd kernel 3-15 and
  sigma U(0.1, 5.1) (`smooth_patch`); rectangles of N(0, 1) noise until their summed area reaches U(0, 0.3) of the
  image (`drop_rand_patches`); rectangles of another random image's pixels at the same place, again until U(0, 0.3)
  (skipped when the draw picks the image itself). The grey and blur rectangles have sides in [5%, 100%) of the image
  side, the noise and replacement ones in [5%, 25%) (`max_rectangle_side`), height and width drawn independently,
  corners uniform, cut at the image border. Nothing is aligned with the patch grid.

Remaining differences from the release: crops are resized with OpenCV (bicubic when enlarging, area averaging when
shrinking, where PIL's bicubic is antialiased), and the colour jitter is one composed colour map (see
`data_modules.views`) where torchvision applies the three factors in random order; the blur reads the pixels
around its rectangle (the release blurs the rectangle alone, reflecting at its edges); the replacement pixels come
from the other image uncorrupted (the release copies from the batch being corrupted in place, so from an already
corrupted image when it comes earlier in the batch); rectangles are at least 1 px a side on images under 20 px
(the release's 5% rounds to 0 there); at 32 px inputs the release replaces the resized crop by a 4-px-padded
random crop, which is not done here.

The three losses are combined with learned uncertainty weights (Kendall et al. 2018), as in the released code:
exp(-s) * L + s/2 for the two classification tasks and 0.5 * exp(-s) * L + s/2 for the l1 reconstruction.

The rotation token is the ViT's own class token; the contrastive token is added after it. `probe_features` returns both
tokens of the unrotated, uncorrupted image, concatenated: the released evaluation puts one linear head on each token
and averages their logits, which is one linear classifier on the concatenation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from data_modules.views import TwoCrops, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.instance_contrastive import nt_xent_loss
from vlp_lightning.losses.masked_modeling import uncertainty_weighted_sum
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.modules.masking import unpatchify, vit_tokens, vit_transformer
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit

#: per-task scale of the uncertainty weighting: rotation (cross-entropy), contrastive (cross-entropy), l1.
TASK_SCALES = (1.0, 1.0, 0.5)
#: the released code's smallest rectangle side, as a fraction of the image side (`tolr`).
MIN_RECTANGLE_SIDE = 0.05
#: the released code's blur draws (`smooth_patch`): odd kernel sizes 3..15, sigma in [0.1, 5.1).
MAX_BLUR_KERNEL = 15
BLUR_SIGMA_RANGE = (0.1, 5.1)


class SiT(VLPMethod):
    """Rotation prediction + contrastive learning + corrupted image reconstruction on one ViT.

    Args:
        vision: the ViT (default: `tiny_vit()`, 2 blocks of width 64 on 32 px, patch 8); it must have a class token (the rotation token).
        max_corrupted_area: the noise rectangles, and separately the other-image rectangles, add up to U(0, this)
            of the image area (0.3 in the released code, `max_drop`).
        max_rectangle_side: upper bound of a noise / other-image rectangle's side, as a fraction of the image side
            (0.25 in the released code, `max_block_sz`).
        contrastive_dim: output size of the linear contrastive head (512 in the released code).
        temperature: NT-Xent temperature (0.5 in the released code).
        init_log_variance: initial s of every task's uncertainty weight (1.0 in the released code).
    """

    paper = Paper("SiT: Self-supervised vIsion Transformer", "Ahmed et al.", 2021)
    family = "masked image modelling"
    view_kind = "two crops"

    no_weight_decay_names = (*VLPMethod.no_weight_decay_names, "contrastive_token")

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        max_corrupted_area: float = 0.3,
        max_rectangle_side: float = 0.25,
        contrastive_dim: int = 128,
        temperature: float = 0.5,
        init_log_variance: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or tiny_vit()
        vit = self.vision.model
        if self.vision.patch_size is None:
            raise ValueError(f"SiT needs a ViT-like timm model (one with patch_embed); got {type(vit).__name__}")
        if vit.cls_token is None:
            raise ValueError("SiT uses the ViT's class token as its rotation token; pick a ViT with a class token")
        self.grid_size: tuple[int, int] = tuple(vit.patch_embed.grid_size)
        if not 0 < max_corrupted_area <= 1 or not 0 < max_rectangle_side <= 1:
            raise ValueError(
                f"max_corrupted_area={max_corrupted_area} and max_rectangle_side={max_rectangle_side} are fractions "
                "of the image: choose each in (0, 1]"
            )
        self.max_corrupted_area = max_corrupted_area
        self.max_rectangle_side = max_rectangle_side
        self.temperature = temperature
        self.patch_size: int = self.vision.patch_size
        width = vit.embed_dim
        self.contrastive_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.rotation_head = nn.Linear(width, 4)
        self.contrastive_head = nn.Linear(width, contrastive_dim)
        self.reconstruction_head = nn.Linear(width, self.patch_size * self.patch_size * 3)
        self.log_variances = nn.Parameter(torch.full((len(TASK_SCALES),), init_log_variance))

    def train_views(self) -> Views:
        """Two crops of each image as the released code augments them (module doc): crop 0.08-1 bicubic, flip, colour
        jitter 0.4 without hue at p 1, no grayscale or blur."""
        return TwoCrops(
            scale=(0.08, 1.0),
            color_jitter=0.5,  # factors in [1 - 0.8 * 0.5, 1 + 0.8 * 0.5] = torchvision's ColorJitter(0.4, 0.4, 0.4)
            color_jitter_prob=1.0,
            grayscale_prob=0.0,
            blur_prob=0.0,
            max_hue_shift=0.0,
            interpolation="bicubic",
            mean=self.vision.mean,
            std=self.vision.std,
        )

    def forward_tokens(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] -> [N, P + 1 + L, width]: prefix (class = rotation) tokens, the contrastive token,
        then the patch tokens."""
        prefix, patches = vit_tokens(self.vision.model, images)
        contrastive = self.contrastive_token.expand(images.shape[0], -1, -1)
        return vit_transformer(self.vision.model, torch.cat([prefix, contrastive, patches], dim=1))

    def probe_features(self, images: Tensor) -> Tensor:
        """[N, 2 * width]: the rotation (class) token and the contrastive token."""
        tokens = self.forward_tokens(images)
        return torch.cat([tokens[:, 0], tokens[:, self.vision.model.num_prefix_tokens]], dim=1)

    def corrupt(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] (normalised) -> corrupted copies: grey, blur, noise, then another image's pixels, in
        rectangles drawn as the released code's `distortImages` (module doc); randomness from torch's global RNG."""
        n, _, height, width = images.shape
        device = images.device

        def one_rectangle() -> Tensor:  # [N, 1, H, W]: a rectangle of sides in [5%, 100%) of the image side
            return rectangle_masks(n, height, width, max_area=None, max_side=1.0, device=device)[:, None]

        def up_to_area() -> Tensor:  # [N, 1, H, W]: rectangles until their summed area reaches U(0, max) of the image
            return rectangle_masks(n, height, width, self.max_corrupted_area, self.max_rectangle_side, device)[:, None]

        corrupted = torch.where(one_rectangle(), images.mean(dim=1, keepdim=True), images)
        corrupted = torch.where(one_rectangle(), random_gaussian_blur(corrupted), corrupted)
        corrupted = torch.where(up_to_area(), torch.randn_like(images), corrupted)
        source = torch.randint(0, n, (n,), device=device)
        replaced = up_to_area() & (source != torch.arange(n, device=device)).view(n, 1, 1, 1)
        return torch.where(replaced, images[source], corrupted)

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
        # each view's batch is corrupted on its own (as `train_SSL` does): the partner is another image, never the
        # other view of the same one
        corrupted = torch.cat([self.corrupt(view) for view in rotated.chunk(2)])
        tokens = self.forward_tokens(corrupted)
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


def rectangle_masks(
    count: int, height: int, width: int, max_area: float | None, max_side: float, device: torch.device | None = None
) -> Tensor:
    """[count, H, W] bool: random axis-aligned rectangles per image, drawn as the released SiT code does
    (`engine.py` `drop_rand_patches`; `rgb2gray_patch` / `smooth_patch` for a single one).

    Top-left corner uniform in [0, H - t) x [0, W - t), height in [t, max_side * H) and width in [t, max_side * W)
    drawn independently (t = 5% of the side, at least 1 px), cut at the image border. With `max_area`, rectangles are
    drawn while their summed area (overlaps counted twice, as there) is below a target of U(0, max_area) x H x W;
    with None, one rectangle per image."""
    min_height, min_width = max(1, int(MIN_RECTANGLE_SIDE * height)), max(1, int(MIN_RECTANGLE_SIDE * width))
    max_height = max(min_height + 1, int(max_side * height))
    max_width = max(min_width + 1, int(max_side * width))
    # every rectangle covers at least min_height x min_width pixels, which bounds how many can be needed
    slots = 1 if max_area is None else math.ceil(max_area * height * width / (min_height * min_width)) + 1
    top = torch.randint(0, height - min_height, (count, slots), device=device)
    left = torch.randint(0, width - min_width, (count, slots), device=device)
    bottom = (top + torch.randint(min_height, max_height, (count, slots), device=device)).clamp_(max=height)
    right = (left + torch.randint(min_width, max_width, (count, slots), device=device)).clamp_(max=width)
    if max_area is None:
        drawn = torch.ones(count, slots, dtype=torch.bool, device=device)
    else:
        target = torch.rand(count, 1, device=device) * max_area * height * width
        areas = (bottom - top) * (right - left)
        drawn = areas.cumsum(dim=1) - areas < target  # the loop draws rectangle k while the total so far is short
    # coverage by a 2D difference array: +1 / -1 at the corners, then prefix sums over rows and columns
    corners = torch.zeros(count, height + 1, width + 1, device=device)
    images = torch.arange(count, device=device).view(count, 1).expand(-1, slots)
    weight = drawn.float()
    for rows, columns, sign in ((top, left, 1), (top, right, -1), (bottom, left, -1), (bottom, right, 1)):
        corners.index_put_((images, rows, columns), sign * weight, accumulate=True)
    return corners.cumsum(dim=1).cumsum(dim=2)[:, :height, :width] > 0.5


def random_gaussian_blur(images: Tensor) -> Tensor:
    """[N, C, H, W] -> each image blurred by a Gaussian of its own draw, as the released SiT code's `smooth_patch`:
    odd kernel size 2 * (randint(3, 15) // 2) + 1, sigma uniform in [0.1, 5.1), separable, reflect padding."""
    n, channels, height, width = images.shape
    device = images.device
    half_sizes = torch.randint(3, MAX_BLUR_KERNEL + 1, (n, 1), device=device) // 2
    low, high = BLUR_SIGMA_RANGE
    sigma = low + (high - low) * torch.rand(n, 1, device=device)
    half = MAX_BLUR_KERNEL // 2
    offsets = torch.arange(-half, half + 1, device=device).view(1, -1)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2)) * (offsets.abs() <= half_sizes)  # [N, 15], zero past k // 2
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(images.dtype).repeat_interleave(channels, dim=0)
    flat = F.pad(images.reshape(1, n * channels, height, width), (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * channels)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * channels)
    return flat.view(n, channels, height, width)
