"""A space-time ViT over tube tokens, and VideoMAE's tube masking, for the masked video models (SIGMA and its
VideoMAE pixel baseline).

* Tube tokens (VideoMAE, Tong et al. 2022, sec. 3.3 "cube embedding"; ViViT's tubelet embedding): a clip
  [B, T, 3, H, W] is cut into tubes of `tubelet_size` frames x `patch_size` x `patch_size` pixels, each embedded by
  one Conv3d of that kernel and stride; tokens are ordered (time, row, column), N = T/t x H/p x W/p of them. A fixed
  1D sine-cosine table over the N positions is added (the released `get_sinusoid_encoding_table`: angle
  pos / 10000^(2 (j // 2) / d), sine on even channels, cosine on odd ones; no class token).
* Blocks: timm's `Block` (qkv bias, LayerNorm eps 1e-6, MLP ratio 4), a final LayerNorm on every token; Linear
  weights xavier-uniform with zero biases, LayerNorms 1 / 0, as the released `_init_weights`.
* Tube masking (VideoMAE sec. 3.3): one random set of round(ratio x H/p x W/p) spatial positions per clip, masked in
  every tubelet, so a masked tube stays masked over the whole clip and cannot be copied from a neighbouring frame.
  `tube_masking` draws it from torch's global RNG with MAE's per-sample shuffle (`modules.masking.random_masking`)
  and lifts it to token indices.
* `tube_pixels`: the pixels of every tube, [B, N, t x p x p x 3], laid out (frame, row, column, channel) as the
  released code's `rearrange(... 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c')`, and VideoMAE's normalised
  target (each tube and channel by its own mean and unbiased standard deviation, + 1e-6 on the deviation).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from data_modules.views import IMAGENET_MEAN, IMAGENET_STD
from vlp_lightning.modules.masking import PatchMask, gather_patches, random_masking


def sinusoid_table(positions: int, width: int) -> Tensor:
    """[1, positions, width] fixed 1D sine-cosine position embeddings (VideoMAE's `get_sinusoid_encoding_table`)."""
    position = torch.arange(positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(width) // 2) / width
    angles = position / torch.pow(10000.0, exponent)[None]
    angles[:, 0::2], angles[:, 1::2] = angles[:, 0::2].sin(), angles[:, 1::2].cos()
    return angles.float()[None]


def transformer_blocks(width: int, depth: int, heads: int, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0
                       ) -> nn.Sequential:
    """`depth` timm blocks as VideoMAE's encoder and decoder build them (qkv bias, LayerNorm eps 1e-6, stochastic
    depth rising linearly to `drop_path_rate`)."""
    rates = torch.linspace(0, drop_path_rate, depth).tolist()
    return nn.Sequential(*[Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rate,
                                 norm_layer=partial(nn.LayerNorm, eps=1e-6)) for rate in rates])


def videomae_init(module: nn.Module) -> None:
    """The released `_init_weights`: Linear xavier-uniform with zero bias, LayerNorm weight 1 and bias 0."""
    for child in module.modules():
        if isinstance(child, nn.Linear):
            nn.init.xavier_uniform_(child.weight)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.LayerNorm):
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)


def tube_masking(batch_size: int, tubelets: int, positions: int, ratio: float, device: torch.device | None = None
                 ) -> PatchMask:
    """One spatial mask per clip repeated over its `tubelets` temporal slots, as token indices of the (time, row,
    column) order: `ids_keep` [B, tubelets x visible], `ids_masked` [B, tubelets x masked], `mask` [B, N] (1 where
    masked)."""
    spatial = random_masking(batch_size, positions, ratio, device=device)
    offsets = torch.arange(tubelets, device=device)[None, :, None] * positions  # [1, t, 1]
    ids_keep = (offsets + spatial.ids_keep[:, None]).flatten(1)
    ids_masked = (offsets + spatial.ids_masked[:, None]).flatten(1)
    mask = spatial.mask[:, None].expand(-1, tubelets, -1).flatten(1)
    return PatchMask(ids_keep, ids_masked, torch.cat([ids_keep, ids_masked], dim=1).argsort(dim=1), mask)


def tube_pixels(video: Tensor, tubelet_size: int, patch_size: int, normalize: bool = True) -> Tensor:
    """video [B, T, 3, H, W] (pixels in [0, 1]) -> [B, N, tubelet x p x p x 3] (module doc); `normalize`: each tube's
    channel by its mean and unbiased standard deviation (VideoMAE sec. 3.3 / the released `normlize_target`)."""
    batch, frames, channels, height, width = video.shape
    if frames % tubelet_size or height % patch_size or width % patch_size:
        raise ValueError(f"a clip of {frames} frames of {height}x{width} does not split into tubes of "
                         f"{tubelet_size} frames x {patch_size} x {patch_size} pixels")
    tubes = video.reshape(batch, frames // tubelet_size, tubelet_size, channels, height // patch_size, patch_size,
                          width // patch_size, patch_size)
    tubes = tubes.permute(0, 1, 4, 6, 2, 5, 7, 3).reshape(batch, -1, tubelet_size * patch_size ** 2, channels)
    if normalize:
        tubes = (tubes - tubes.mean(dim=-2, keepdim=True)) / (tubes.var(dim=-2, keepdim=True).sqrt() + 1e-6)
    return tubes.flatten(2)


class VideoVisionTransformer(nn.Module):
    """A ViT on tube tokens of a clip (module doc): `forward` gives the mean of its tokens [B, width].

    Args:
        img_size: frame side in pixels; patch_size, tubelet_size: the tube (p x p pixels, t frames).
        num_frames: frames of a training clip (the position table covers num_frames / tubelet_size slots).
        width, depth, num_heads, mlp_ratio, drop_path_rate: the ViT (ViT-B: 768, 12, 12, 4).
        mean, std: the statistics clips are normalised with (the views read them; targets undo them).
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 8,
        tubelet_size: int = 2,
        num_frames: int = 4,
        width: int = 64,
        depth: int = 2,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size} and num_frames "
                             f"{num_frames} of tubelet_size {tubelet_size}")
        self.img_size, self.patch_size, self.tubelet_size, self.num_frames = img_size, patch_size, tubelet_size, \
            num_frames
        self.grid_size = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_positions = self.grid_size[1] * self.grid_size[2]  # spatial positions per tubelet slot
        self.num_features = self.width = width
        self.mean, self.std = tuple(mean), tuple(std)
        self.tube_embed = nn.Conv3d(3, width, (tubelet_size, patch_size, patch_size),
                                    stride=(tubelet_size, patch_size, patch_size))
        self.register_buffer("pos_embed", sinusoid_table(self.grid_size[0] * self.num_positions, width),
                             persistent=False)
        self.blocks = transformer_blocks(width, depth, num_heads, mlp_ratio, drop_path_rate)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        videomae_init(self)

    def as_clip(self, video: Tensor) -> Tensor:
        """[B, T, 3, H, W] as is; a still image [B, 3, H, W] as a clip of `tubelet_size` copies of itself."""
        return video if video.ndim == 5 else video.unsqueeze(1).expand(-1, self.tubelet_size, -1, -1, -1)

    def embed(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] -> tube tokens with their position embedding [B, N, width]; a clip shorter than
        `num_frames` takes the first slots of the table."""
        video = self.as_clip(video)
        if video.shape[1] % self.tubelet_size or video.shape[1] > self.num_frames or \
                video.shape[-1] != self.img_size or video.shape[-2] != self.img_size:
            raise ValueError(f"clip of {video.shape[1]} frames of {video.shape[-2]}x{video.shape[-1]}: this "
                             f"VideoVisionTransformer takes up to {self.num_frames} frames (a multiple of "
                             f"{self.tubelet_size}) of {self.img_size}x{self.img_size}")
        tokens = self.tube_embed(video.transpose(1, 2)).flatten(2).transpose(1, 2)  # [B, N, width], (t, h, w)
        return tokens + self.pos_embed[:, : tokens.shape[1]].to(tokens.dtype)

    def forward_tokens(self, video: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """Encoded tokens [B, N or K, width] after the final norm; with `ids_keep` [B, K] only those tokens enter
        the blocks (VideoMAE's encoder sees the visible tubes only)."""
        tokens = self.embed(video)
        if ids_keep is not None:
            tokens = gather_patches(tokens, ids_keep)
        return self.norm(self.blocks(tokens))

    def forward(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] (or images [B, 3, H, W]) -> the mean of the encoded tokens [B, width]."""
        return self.forward_tokens(video).mean(dim=1)
