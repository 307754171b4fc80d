"""Views of clips: which frames (the `FrameSampler`), one spatial crop and flip per clip, and VideoMAE's tube mask.

A video method declares its views as image methods do (`method.train_views()` returns `ClipViews`) and the
VideoDataModule builds them at the method's resolution: `views.build(image_size)` gives a `ClipTransform`. The work
is split as for images (`data_modules.views`):

* per clip, in the loader worker: the sampled frame indices (`sample`; temporal jitter is the samplers' random
  offsets, drawn only with `temporal_jitter`), then `crop`: ONE random resized crop box drawn per clip and cut out of
  every frame (each frame cropped by `ViewTransform.crop_regions` with the same replayed draws, so the geometry is
  exactly the images');
* per batch, in the worker: `pack` stacks the clips into uint8 `[B, T, S, S, 3]`, mirrors the clips its draws pick
  (the whole clip, every frame) and draws the tube masks;
* per batch, on the device: `ClipRecipe.finish` normalises to float `[B, T, 3, S, S]` (`finish_views`).

Tube masking (VideoMAE, Tong et al. 2022, sec. 3.3): one random mask of the `(S / patch_size)^2` patch positions per
clip, exactly round(ratio x positions) of them masked, the same for every tubelet of `tubelet_size` frames; emitted
as the batch field `tube_mask`, bool `[B, T / tubelet_size, (S / patch_size)^2]`, True where masked (constant over
its second axis; flattened it is the token mask of a tubelet-embedded clip).

Only normalisation follows the crop: colour jitter and the other photometric options of image views would need
one draw per clip rather than per frame, and the video recipes this serves (VideoMAE, ViViT fine-tuning) use none.
"""

from __future__ import annotations

import copy

import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from data_modules.clips import FrameSampler
from data_modules.views import IMAGENET_MEAN, IMAGENET_STD, Augment, Crop, ViewTransform


@dataclass(frozen=True)
class TubeMasking:
    """VideoMAE's tube mask: `ratio` of the patch positions masked, the same for every tubelet (module doc)."""

    ratio: float = 0.9
    patch_size: int = 16
    tubelet_size: int = 2

    def draw(self, num_frames: int, size: int, generator: torch.Generator) -> Tensor:
        """bool [num_frames / tubelet_size, (size / patch_size)^2], True where masked."""
        positions = (size // self.patch_size) ** 2
        masked = round(positions * self.ratio)
        spatial = torch.zeros(positions, dtype=torch.bool)
        spatial[torch.randperm(positions, generator=generator)[:masked]] = True
        return spatial.expand(num_frames // self.tubelet_size, positions)


class ClipRecipe:
    """How to finish a packed batch of clips: normalise uint8 `[B, T, S, S, 3]` to float `[B, T, 3, S, S]`.

    A plain object (as `ViewRecipe`) so Lightning's batch transfer carries it over untouched; `field` names the
    batch entry `finish_views` finishes with it."""

    __slots__ = ("mean", "std")
    field = "video"

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        self.mean = mean
        self.std = std

    def finish(self, packed: list[Tensor]) -> Tensor:
        (video,) = packed
        mean = torch.tensor(self.mean, device=video.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(self.std, device=video.device).view(1, 1, 3, 1, 1)
        pixels = video.permute(0, 1, 4, 2, 3).to(torch.float32, memory_format=torch.contiguous_format)
        return pixels.mul_(1 / (255 * std)).sub_(mean / std)


class ClipTransform:
    """One clip -> its frame indices (`sample`) and crop (`crop`); a batch of crops -> packed uint8 (`pack`)."""

    def __init__(self, sampler: FrameSampler, temporal_jitter: bool, crop: Crop, masking: TubeMasking | None
                 ) -> None:
        self.sampler = sampler
        self.temporal_jitter = temporal_jitter
        self.crop_view = ViewTransform((crop,), single=True)
        self.size = crop.size
        self.augment = crop.augment
        self.masking = masking

    @property
    def clip_bytes(self) -> int:
        """Bytes of one packed uint8 clip."""
        return self.sampler.num_frames * self.size * self.size * 3

    def sample(self, count: int, rng: random.Random) -> list[int]:
        return self.sampler.indices(count, rng if self.temporal_jitter else None)

    def crop(self, frames: np.ndarray, rng: random.Random) -> np.ndarray:
        """uint8 [T, H, W, 3] -> [T, S, S, 3]: one crop box drawn for the clip, cut out of every frame."""
        draws = rng.getrandbits(64)
        return np.stack([self.crop_view.crop(frame, random.Random(draws))[0] for frame in frames])

    def pack(self, clips: list[np.ndarray], seed: int) -> tuple[list[Tensor], ClipRecipe, Tensor | None]:
        """Cropped clips -> ([uint8 [B, T, S, S, 3]], recipe, tube mask or None); half the clips (by the
        `hflip_prob` draws) mirrored, every frame of a clip alike."""
        generator = torch.Generator().manual_seed(seed)
        flips = (torch.rand(len(clips), generator=generator) < self.augment.hflip_prob).tolist()
        stacked = np.stack([clip[:, :, ::-1] if flip else clip for clip, flip in zip(clips, flips)])
        masks = None
        if self.masking is not None:
            num_frames = self.sampler.num_frames
            masks = torch.stack([self.masking.draw(num_frames, self.size, generator) for _ in clips])
        return [torch.from_numpy(stacked)], ClipRecipe(self.augment.mean, self.augment.std), masks


class ClipViews:
    """A recipe for the clips one training video becomes; `build(image_size)` makes the `ClipTransform`.

    `sampling` / `num_frames` / `strides` choose the frames (`data_modules.clips.FrameSampler`), randomly offset only
    with `temporal_jitter`; `scale` / `ratio` the random resized crop drawn once per clip (None: the centred square of
    the shorter side, as `EvalView`), `hflip` mirrors half the clips; `mask_ratio` (e.g. 0.9) adds VideoMAE's tube
    mask of `patch_size` patches over tubelets of `tubelet_size` frames; `mean` / `std` normalise.
    """

    def __init__(
        self,
        num_frames: int = 8,
        sampling: Literal["uniform", "segments", "stride"] = "segments",
        strides: tuple[int, ...] = (1,),
        temporal_jitter: bool = True,
        scale: tuple[float, float] | None = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        mask_ratio: float | None = None,
        patch_size: int = 16,
        tubelet_size: int = 2,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        self.sampler = FrameSampler(sampling, num_frames, tuple(strides))
        self.temporal_jitter = temporal_jitter
        self.scale = scale
        self.ratio = ratio
        self.augment = Augment(hflip_prob=0.5 if hflip else 0.0, mean=tuple(mean), std=tuple(std))
        self.masking = None
        if mask_ratio is not None:
            if not 0 < mask_ratio < 1 or num_frames % tubelet_size:
                raise ValueError(f"mask_ratio {mask_ratio} must lie in (0, 1) and num_frames {num_frames} be a "
                                 f"multiple of tubelet_size {tubelet_size}")
            self.masking = TubeMasking(mask_ratio, patch_size, tubelet_size)

    @property
    def normalization(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        return self.augment.mean, self.augment.std

    def for_evaluation(self) -> ClipViews:
        """The same frames and normalisation, deterministically: no temporal jitter, the centred square, no flip,
        no tube mask (what `vlp predict` of clips decodes with)."""
        views = copy.copy(self)
        views.temporal_jitter, views.scale, views.masking = False, None, None
        views.augment = Augment(hflip_prob=0.0, mean=self.augment.mean, std=self.augment.std)
        return views

    def build(self, image_size: int) -> ClipTransform:
        if self.masking is not None and image_size % self.masking.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the tube mask's patch_size "
                             f"{self.masking.patch_size}")
        crop = Crop(image_size, self.scale, self.ratio, self.augment)
        return ClipTransform(self.sampler, self.temporal_jitter, crop, self.masking)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({fields})"
