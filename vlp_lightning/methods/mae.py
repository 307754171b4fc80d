"""MAE: masked autoencoders (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

A large random subset of patches is masked (75%, sec. 3 and Fig. 5) by per-sample shuffling; the ViT encoder runs
on the visible patches only (plus its class token); a light decoder receives the encoded visible tokens and a shared
learned mask token at every masked position, each with a fixed 2D sine-cosine position embedding (sec. 3, App. A.1),
and predicts the pixels of every patch; the loss is the MSE on the masked patches only, against per-patch
normalised pixels (sec. 3 "Reconstruction target"). The encoder is a timm ViT driven piece by piece
(`modules.masking.vit_tokens` / `vit_transformer`); the decoder is built from timm's `Block`.

Initialisation follows the released code (models_mae.py, `MaskedAutoencoderViT.initialize_weights` /
`_init_weights`), not timm's ViT init nor PyTorch's defaults: every Linear of encoder and decoder xavier-uniform with
zero bias (as the JAX ViT), every LayerNorm weight 1 / bias 0, the patch-embedding convolution xavier-uniform on its
weight viewed as a Linear [width, 3*p*p] (its bias keeps PyTorch's default, as there), class and mask tokens
N(0, 0.02). Position embeddings are fixed 2D sine-cosine in encoder and decoder (`get_2d_sincos_pos_embed`, zeros at
the class token); timm's `build_sincos2d_pos_embed` used here orders the same sin / cos channels differently
(sin h, sin w, cos h, cos w instead of sin w, cos w, sin h, cos h), a fixed permutation of the width that the
permutation-invariant init of the blocks cannot tell apart.

The paper's learning rate rule is lr = base_lr * global_batch / 256 (App. A.1: base_lr 1.5e-4, AdamW beta2 0.95,
weight decay 0.05); the YAML configs write the resulting lr with the arithmetic in a comment.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from data_modules.views import SingleCrop, Views
from vlp_lightning.catalog import Paper
from vlp_lightning.losses.masked_modeling import masked_reconstruction_loss
from vlp_lightning.methods.base import VLPMethod, WarmupCosineLR
from vlp_lightning.modules.masking import (
    PatchMask,
    gather_patches,
    num_masked_patches,
    patchify,
    random_masking,
    vit_tokens,
    vit_transformer,
)
from vlp_lightning.modules.vision import VisionEncoder, tiny_vit


class MAE(VLPMethod):
    """Masked autoencoder pretraining of a timm ViT.

    Args:
        vision: the ViT encoder (default: `tiny_vit()`, 2 blocks of width 64 on 32 px, patch 8).
        mask_ratio: fraction of patches masked per image (0.75 in the paper).
        decoder_width: decoder token width (512 in the paper).
        decoder_depth: decoder Transformer blocks (8 in the paper).
        decoder_heads: decoder attention heads (16 in the paper).
        normalize_target: per-patch normalised pixel targets (the paper's best setting, Table 1d).
        sincos_pos_embed: replace the encoder's learned position embedding by a frozen 2D sine-cosine one, as the
            paper does (App. A.1); turn off to keep a loaded checkpoint's position embedding.
        initialize_weights: re-initialise encoder and decoder as the released code does (module doc); turn off to
            keep a loaded checkpoint's encoder weights.
    """

    paper = Paper("Masked Autoencoders Are Scalable Vision Learners", "He et al.", 2021)
    family = "masked image modelling"
    view_kind = "one crop"

    def __init__(
        self,
        vision: VisionEncoder | None = None,
        mask_ratio: float = 0.75,
        decoder_width: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        normalize_target: bool = True,
        sincos_pos_embed: bool = True,
        initialize_weights: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, compile=compile)
        self.save_hyperparameters(ignore=["vision", "optimizer", "lr_scheduler"])
        self.vision = vision or tiny_vit()
        vit = self.vision.model
        if self.vision.patch_size is None:
            raise ValueError(f"MAE needs a ViT-like timm model (one with patch_embed); got {type(vit).__name__}")
        self.grid_size: tuple[int, int] = tuple(vit.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        num_masked_patches(self.num_patches, mask_ratio)  # fail at construction, not at the first step
        self.mask_ratio = mask_ratio
        self.normalize_target = normalize_target
        self.patch_size: int = self.vision.patch_size
        width = vit.embed_dim
        if sincos_pos_embed:
            _freeze_sincos_pos_embed(vit, self.grid_size)

        self.decoder_embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.register_buffer(
            "decoder_pos_embed", build_sincos2d_pos_embed(list(self.grid_size), decoder_width)[None], persistent=False
        )
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_width, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_width)
        self.decoder_pred = nn.Linear(decoder_width, self.patch_size * self.patch_size * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        if initialize_weights:
            self._initialize_weights()

    def _initialize_weights(self) -> None:
        """models_mae.py `initialize_weights` + `_init_weights` (module doc); position embeddings are set apart."""
        weight = self.vision.model.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.data.view(weight.shape[0], -1))  # the patch embedding as a Linear
        if self.vision.model.cls_token is not None:
            nn.init.normal_(self.vision.model.cls_token, std=0.02)  # the mask token is drawn so in __init__
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def train_views(self) -> Views:
        """MAE trains with random resized crops (scale 0.2-1) and flips only (App. A.1: "no color jittering")."""
        return SingleCrop(scale=(0.2, 1.0), mean=self.vision.mean, std=self.vision.std)

    def probe_features(self, images: Tensor) -> Tensor:
        """The encoder on the whole, unmasked image, pooled as configured (class token by default, as the paper's
        linear probe)."""
        return self.vision(images)

    def forward_encoder(self, images: Tensor, mask: PatchMask) -> Tensor:
        """images [N, 3, H, W] -> encoded [N, P + K, width]: prefix tokens then the K visible patches, in
        `mask.ids_keep` order. Masked patches never enter the blocks."""
        prefix, patches = vit_tokens(self.vision.model, images)
        visible = gather_patches(patches, mask.ids_keep)  # [N, K, width]
        return vit_transformer(self.vision.model, torch.cat([prefix, visible], dim=1))

    def forward_decoder(self, encoded: Tensor, mask: PatchMask) -> Tensor:
        """encoded [N, P + K, width] -> predicted pixels of every patch [N, L, p*p*3], in grid order."""
        num_prefix = encoded.shape[1] - mask.ids_keep.shape[1]
        tokens = self.decoder_embed(encoded)
        prefix, visible = tokens[:, :num_prefix], tokens[:, num_prefix:]
        mask_tokens = self.mask_token.expand(visible.shape[0], mask.ids_masked.shape[1], -1)
        patches = gather_patches(torch.cat([visible, mask_tokens], dim=1), mask.ids_restore)  # unshuffle: [N, L, D]
        patches = patches + self.decoder_pos_embed.to(patches.dtype)
        tokens = self.decoder_norm(self.decoder_blocks(torch.cat([prefix, patches], dim=1)))
        return self.decoder_pred(tokens[:, num_prefix:])

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        images = batch["image"]
        mask = random_masking(images.shape[0], self.num_patches, self.mask_ratio, device=images.device)
        predicted = self.forward_decoder(self.forward_encoder(images, mask), mask)
        target = patchify(images, self.patch_size)
        loss = masked_reconstruction_loss(predicted, target, mask.mask, normalize_target=self.normalize_target)
        return {"loss": loss}


def _freeze_sincos_pos_embed(vit: nn.Module, grid_size: tuple[int, int]) -> None:
    """Fixed 2D sine-cosine position embedding for the patches, zeros for prefix tokens that have a slot in it."""
    if vit.pos_embed is None:
        raise ValueError("sincos_pos_embed=True needs a ViT with an absolute position embedding (pos_embed)")
    sincos = build_sincos2d_pos_embed(list(grid_size), vit.pos_embed.shape[-1])
    with torch.no_grad():
        vit.pos_embed.zero_()
        vit.pos_embed[0, -sincos.shape[0] :] = sincos.to(vit.pos_embed.dtype)
    vit.pos_embed.requires_grad_(False)
