"""Image towers: any `timm` model, built without downloading, resizable for CPU-sized runs.

`VisionEncoder` wraps `timm.create_model(name, pretrained=False, num_classes=0)`, so `forward` returns the pooled
pre-logits features every method projects from. ViT-like models (those timm builds for a fixed input size) take
`img_size`, `patch_size` and width/depth/heads overrides, which is how a tiny ViT (`vit_tiny_patch16_224` at
32 px with 8 px patches) runs in tests in milliseconds. A local checkpoint can be loaded; nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import Literal

import timm
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from data_modules.views import IMAGENET_MEAN, IMAGENET_STD


class LockableEncoder(nn.Module):
    """An encoder that can be locked: frozen weights and eval mode for good (LiT, Zhai et al. 2022, sec. 3 —
    a locked pretrained tower keeps its representation, including normalisation statistics, while the other
    tower learns to match it)."""

    locked: bool = False

    def lock(self) -> None:
        self.locked = True
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LockableEncoder:
        return super().train(mode and not self.locked)


class VisionEncoder(LockableEncoder):
    """A timm backbone returning pooled features [N, num_features].

    Args:
        model_name: any timm model name, e.g. "vit_tiny_patch16_224", "resnet18", "vit_base_patch16_clip_224".
        img_size: input resolution; passed to ViT-like models (fixed input size), only recorded for CNNs.
        patch_size: ViT patch size override.
        width, depth, num_heads, mlp_ratio: ViT architecture overrides (timm's embed_dim, depth, num_heads,
            mlp_ratio), e.g. to reproduce an open_clip tower of any size.
        pretrained_path: local checkpoint (.safetensors, or a torch state dict loaded with weights_only=True).
        locked: freeze the tower (LiT).
        pool: "token" (class token) or "avg" (mean of patch tokens); None keeps the model's default.
        grad_checkpointing: recompute block activations in backward to save memory.
        drop_path_rate: stochastic depth rate.
        pre_norm: LayerNorm after the patch embedding, before the blocks (CLIP's ln_pre).
        dynamic_img_size: let a ViT take other resolutions than img_size (position embeddings interpolated),
            e.g. SwAV's small local crops next to the global ones.
        head_conv: keep the 1x1 head convolution (and its norm) of EfficientNet / MobileNet-like models. ALIGN
            (Jia et al. 2021, sec. 4) pools the last block's output without it (640 channels for B7, its embedding
            size; Hugging Face's AlignVisionEncoder has no head conv either).
        mean, std: the per-channel statistics the tower's inputs are normalised with, like its `img_size` a property
            of the tower (open_clip's `visual.image_mean` / `image_std`, timm's `pretrained_cfg`): ImageNet's by
            default, OpenAI CLIP's for BiomedCLIP (`data_modules.views.OPENAI_CLIP_MEAN` / `_STD`). The CLIP family's
            `train_views()` normalise with them, and evaluation normalises as the training views do.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        img_size: int | None = None,
        patch_size: int | None = None,
        width: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        pretrained_path: str | None = None,
        locked: bool = False,
        pool: Literal["token", "avg"] | None = None,
        grad_checkpointing: bool = False,
        drop_path_rate: float = 0.0,
        pre_norm: bool = False,
        dynamic_img_size: bool = False,
        head_conv: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not timm.is_model(model_name):
            raise ValueError(f"{model_name!r} is not a timm model name; see timm.list_models()")
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
        fixed_input_size = bool(pretrained_cfg and pretrained_cfg.fixed_input_size)
        vit_overrides = {
            "img_size": img_size,
            "patch_size": patch_size,
            "embed_dim": width,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "pre_norm": pre_norm or None,
            "dynamic_img_size": dynamic_img_size or None,
        }
        vit_overrides = {name: value for name, value in vit_overrides.items() if value is not None}
        if not fixed_input_size:
            vit_overrides.pop("img_size", None)
            if vit_overrides:
                raise ValueError(
                    f"{model_name!r} is not a ViT-like timm model, so {sorted(vit_overrides)} cannot be set; "
                    "leave them unset (convolutional models take any input resolution) or pick a ViT model"
                )
        pool_override = {} if pool is None else {"global_pool": pool}
        self.model = timm.create_model(
            model_name,
            pretrained=False,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            **vit_overrides,
            **pool_override,
        )
        if pretrained_path is not None:
            load_timm_checkpoint(self.model, pretrained_path)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if not head_conv:
            if not isinstance(getattr(self.model, "conv_head", None), nn.Conv2d):
                raise ValueError(
                    f"head_conv=False drops the 1x1 head convolution of EfficientNet-like models; {model_name!r} has "
                    "none (no conv_head): leave head_conv at true"
                )
            self.model.num_features = self.model.conv_head.in_channels
            self.model.conv_head, self.model.bn2 = nn.Identity(), nn.Identity()
        self.head_conv = head_conv
        self.num_features: int = self.model.num_features
        self.img_size: int = img_size or self.model.pretrained_cfg["input_size"][-1]
        self.mean, self.std = tuple(mean), tuple(std)
        patch_embed = getattr(self.model, "patch_embed", None)
        self.patch_size: int | None = patch_embed.patch_size[0] if patch_embed is not None else None
        if locked:
            self.lock()

    def forward(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] -> pooled features [N, num_features]."""
        return self.model(images)

    def forward_with_prompts(self, images: Tensor, prompts: list[Tensor]) -> Tensor:
        """images [N, 3, H, W] and prompt tokens per layer ([P, width] each, len(prompts) <= depth) -> pooled
        features [N, num_features] of a timm ViT whose sequence carries P learned tokens (MaPLe, Khattak et al. 2023,
        sec. 3.2, eq. 5-6): `prompts[0]` is appended after the class and patch tokens (without a position
        embedding), before the pre-norm; `prompts[i]` replaces them before block i; later blocks carry them on. The
        prompt tokens are dropped before pooling, so the class token or the patch mean pools as without prompts."""
        model = self.model
        if not hasattr(model, "blocks") or not hasattr(model, "_pos_embed"):
            raise ValueError(f"{type(model).__name__} is not a timm ViT: vision prompts need one (model_name vit_*)")
        if len(prompts) > len(model.blocks):
            raise ValueError(f"{len(prompts)} layers of vision prompts for a ViT of {len(model.blocks)} blocks")
        count = prompts[0].shape[0]
        x = model.patch_drop(model._pos_embed(model.patch_embed(images)))
        x = model.norm_pre(torch.cat([x, prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1))
        for index, block in enumerate(model.blocks):
            if 0 < index < len(prompts):
                x = torch.cat([x[:, :-count], prompts[index].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
            x = block(x)
        return model.forward_head(model.norm(x)[:, :-count])

    def forward_sequence(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] -> every token after the final norm [N, prefix + L, width] (a ViT's class token
        first; a CNN's flattened feature map): what fusion layers cross-attend to (ALBEF, CoCa)."""
        features = self.model.forward_features(images)
        return features.flatten(2).transpose(1, 2) if features.ndim == 4 else features

    def pool(self, sequence: Tensor) -> Tensor:
        """`forward_sequence` output -> the pooled features `forward` returns (the model's own pooling)."""
        if sequence.ndim == 3 and not hasattr(self.model, "num_prefix_tokens"):  # CNN: back to [N, C, H, W]
            side = int(sequence.shape[1] ** 0.5)
            sequence = sequence.transpose(1, 2).reshape(sequence.shape[0], -1, side, side)
        return self.model.forward_head(sequence)

    def forward_tokens(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] -> spatial tokens [N, L, width] after the final norm (class/register tokens
        dropped; a CNN feature map is flattened row-major), for methods that work on patches (MAE-like)."""
        features = self.model.forward_features(images)
        if features.ndim == 4:  # CNN: [N, C, H, W] -> [N, H*W, C]
            return features.flatten(2).transpose(1, 2)
        return features[:, self.model.num_prefix_tokens :]


def frozen_image_tower(vision: VisionEncoder | None, checkpoint: str | None, option: str = "pretrained_clip",
                       teacher: bool = False) -> VisionEncoder:
    """A locked image tower for methods that read a frozen one (VEDIT, TemAdapter-like, SIGMA's DINO target):
    `vision` (default `tiny_vit()`), or the tower of the suite checkpoint `checkpoint` (given as option `option`):
    its `vision`, or with `teacher` the EMA teacher's tower where the method has one (DINO, BYOL, MoCo: the weights
    those papers release), else its `vision`."""
    if checkpoint is None:
        tower = vision or tiny_vit()
    else:
        from vlp_lightning.pretrained import load_method  # here: it imports the CLI, which imports the method index

        method, _ = load_method(checkpoint, name=option, config_option=option)
        towers = [module for _, teacher_module in (getattr(method, "momentum_pairs", None) or [])
                  for module in teacher_module.modules() if isinstance(module, VisionEncoder)] if teacher else []
        tower = towers[0] if towers else getattr(method, "vision", None)
        if not isinstance(tower, VisionEncoder):
            raise ValueError(f"{option}={checkpoint} holds a {type(method).__name__} without an image tower "
                             "(`vision`); give a checkpoint of a method that has one, e.g. "
                             "runs/clip/emoji_tiny/checkpoints/last.ckpt")
    tower.lock()
    return tower


def takes_any_input_size(vision: VisionEncoder) -> bool:
    """CNNs take any resolution; a timm ViT only when built with `dynamic_img_size`."""
    return vision.patch_size is None or getattr(vision.model, "dynamic_img_size", False)


def multi_crop_local_size(vision: VisionEncoder, local_crop_size: int | None, method: str) -> int:
    """The local crops' side for multi-crop methods (SwAV, DINO): `local_crop_size`, or by default 96/224 of the
    global size as in SwAV (sec. 3.2) and DINO (sec. 3.1), in whole patches for a ViT.

    A ViT built for one input size (e.g. a CLIP recipe's tower when the method is swapped by class path) gets local
    crops at the global size instead, with a warning: still small regions of the image, at more compute. Asking such
    a ViT for other sizes is one error naming the fix.
    """
    size = vision.img_size
    if takes_any_input_size(vision):
        patch = vision.patch_size or 1
        return local_crop_size or max(patch, size * 96 // 224 // patch * patch)
    if local_crop_size not in (None, size):
        raise ValueError(
            f"{method} local crops of {local_crop_size} px need a backbone that takes several input sizes, but "
            f"this ViT only takes {size} px; build it with dynamic_img_size=true"
        )
    rank_zero_warn(
        f"{method}: the ViT only takes {size} px inputs, so the local crops are {size} px too; build it with "
        "dynamic_img_size=true for the paper's smaller local crops"
    )
    return size


def load_timm_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local timm-format checkpoint strictly, ignoring its classifier (we build with num_classes=0)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained_path {path!r} is not a file; VisionEncoder loads local checkpoints only")
    state_dict = timm.models.load_state_dict(path, weights_only=True)
    classifier = model.pretrained_cfg.get("classifier") or "head"
    classifiers = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
    state_dict = {
        key: value for key, value in state_dict.items() if not any(key.startswith(f"{name}.") for name in classifiers)
    }
    model.load_state_dict(state_dict, strict=True)

def tiny_vit(dynamic_img_size: bool = False) -> VisionEncoder:
    """The constructor default: a 2-block ViT of width 64 on 32 px images, 8 px patches (a CPU step in
    milliseconds); recipes pass the paper's backbone (ResNet-50, ViT-S/16, ...)."""
    return VisionEncoder(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        width=64,
        depth=2,
        num_heads=2,
        dynamic_img_size=dynamic_img_size,
    )
