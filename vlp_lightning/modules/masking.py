"""Patches, random masks and partial ViT forwards shared by the masked image modeling methods (MAE, Selfie, SiT).

* `patchify` / `unpatchify`: images [N, C, H, W] <-> patch rows [N, L, C*p*p], row-major over the patch grid, each
  row laid out (channel, row, column) so that `rows.view(N * L, C, p, p)` is a batch of patch images.
* `random_masking`: MAE's random sampling by per-sample shuffling (He et al. 2021, sec. 3, "Masking" and the
  "Simple implementation" paragraph): sort per-sample uniform noise, keep the first L - M indices, mask the rest.
  Exactly M = round(L * mask_ratio) patches are masked in every sample, so the kept tokens stack into one tensor.
* `vit_tokens` / `vit_transformer`: the pieces of a timm `VisionTransformer` (patch_embed with its position
  embedding and prefix tokens, blocks, norm) so that a method can drop patches (MAE's encoder sees visible patches
  only) or insert its own tokens (SiT's contrastive token) between embedding and blocks, without re-implementing a ViT.
* `vit_forward_with_mask_tokens` / `pool_tokens`: the SimMIM-style masked forward (Xie et al. 2022, sec. 3.1: masked
  patches are replaced by one learned mask token and the encoder sees every position), and the pooled
  representation of its output as the model pools it, for methods that add a masked view to other objectives (MMC,
  HVP).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from timm.models import checkpoint_seq
from torch import Tensor, nn


class PatchMask(NamedTuple):
    """One random mask per sample; indices refer to row-major patch positions 0..L-1."""

    ids_keep: Tensor  # [N, L - M] visible positions, in shuffled order
    ids_masked: Tensor  # [N, M] masked positions, in shuffled order
    ids_restore: Tensor  # [N, L] inverse permutation: cat(kept, masked) gathered with it is back in grid order
    mask: Tensor  # [N, L] 1.0 where masked, 0.0 where visible, in grid order


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """M = round(L * mask_ratio); at least one patch must stay visible and one must be masked."""
    num_masked = round(num_patches * mask_ratio)
    if not 0 < num_masked < num_patches:
        raise ValueError(
            f"mask_ratio={mask_ratio} masks {num_masked} of {num_patches} patches; "
            "choose a ratio that masks at least one patch and keeps at least one visible"
        )
    return num_masked


def random_masking(
    batch_size: int, num_patches: int, mask_ratio: float, device: torch.device | None = None
) -> PatchMask:
    """Uniformly random mask of exactly round(L * mask_ratio) patches per sample, drawn from torch's global RNG."""
    num_masked = num_masked_patches(num_patches, mask_ratio)
    noise = torch.rand(batch_size, num_patches, device=device)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the smallest noise values are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    num_keep = num_patches - num_masked
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :num_keep] = 0
    mask = mask.gather(1, ids_restore)
    return PatchMask(ids_shuffle[:, :num_keep], ids_shuffle[:, num_keep:], ids_restore, mask)


def gather_patches(tokens: Tensor, ids: Tensor) -> Tensor:
    """tokens [N, L, D], ids [N, K] -> the tokens at those positions [N, K, D]."""
    return tokens.gather(1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """images [N, C, H, W] -> patch rows [N, (H/p)*(W/p), C*p*p]."""
    n, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size={patch_size}")
    grid_h, grid_w = h // patch_size, w // patch_size
    patches = images.reshape(n, c, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(n, grid_h * grid_w, c * patch_size * patch_size)


def unpatchify(patches: Tensor, patch_size: int, grid_size: tuple[int, int], channels: int = 3) -> Tensor:
    """patch rows [N, L, C*p*p] -> images [N, C, grid_h*p, grid_w*p]; the inverse of `patchify`."""
    n = patches.shape[0]
    grid_h, grid_w = grid_size
    images = patches.reshape(n, grid_h, grid_w, channels, patch_size, patch_size)
    return images.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, grid_h * patch_size, grid_w * patch_size)


def vit_tokens(vit: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Embed images with a timm ViT up to its first block.

    Returns (prefix tokens [N, P, width] — class / register tokens, with their position embedding when the model
    has one — and patch tokens [N, L, width] with their position embedding), the same values the model's own
    `forward_features` feeds its blocks. timm's `_pos_embed` is used because it is the one place that knows the
    model's prefix-token and position-embedding layout (class token inside or outside `pos_embed`, dynamic size).
    timm's optional patch dropout is not applied: the caller's masking takes its place.
    """
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    return tokens[:, : vit.num_prefix_tokens], tokens[:, vit.num_prefix_tokens :]


def vit_transformer(vit: nn.Module, tokens: Tensor) -> Tensor:
    """Run a timm ViT's blocks and final norm on any token sequence [N, T, width] (honours grad checkpointing).

    With `global_pool="avg"` timm moves the final LayerNorm after the pooling (`fc_norm`, `norm` is Identity);
    it is applied to every token here, so a decoder still reads normalised tokens."""
    if vit.grad_checkpointing and torch.is_grad_enabled():
        tokens = checkpoint_seq(vit.blocks, tokens)
    else:
        tokens = vit.blocks(tokens)
    norm = vit.norm if not isinstance(vit.norm, nn.Identity) else getattr(vit, "fc_norm", vit.norm)
    return norm(tokens)



def vit_forward_with_mask_tokens(vit: nn.Module, images: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """images [N, 3, H, W], mask [N, L] (1 = masked), mask_token [1, 1, width] -> encoded tokens [N, P + L, width].

    The patch embedding of each masked position is replaced by `mask_token` before the position embedding is
    added (SimMIM's order: the token marks "masked", the position embedding says where)."""
    patches = vit.patch_embed(images)  # [N, L, width], or [N, h, w, width] for a dynamic-size ViT
    shape = patches.shape
    flat = patches.reshape(shape[0], -1, shape[-1])
    flat = torch.where(mask.unsqueeze(-1).bool(), mask_token.to(flat.dtype), flat)
    tokens = vit.norm_pre(vit._pos_embed(flat.reshape(shape)))
    return vit_transformer(vit, tokens)


def pool_tokens(vit: nn.Module, tokens: Tensor) -> Tensor:
    """`vit_transformer` output [N, P + L, width] -> pooled [N, width] as the ViT pools (class token or the mean of
    the patch tokens; the final norm is already applied to every token)."""
    if vit.global_pool == "token":
        return tokens[:, 0]
    return tokens[:, vit.num_prefix_tokens :].mean(dim=1)
