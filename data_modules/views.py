"""Views: the crops one image becomes (one crop, two crops, multi-crop, or the deterministic evaluation crop).

A method declares its views (`method.train_views()`) and the data module builds them at the method's resolution:
`views.build(image_size)` returns a `ViewTransform`; calling it on one image (PIL or uint8 RGB array) gives normalised
float images `[3, S, S]` (a list for multi-view recipes).

Speed: a loader worker spends its time on the per-image work; everything else runs once per batch, vectorised, on
the device the batch goes to. The work is split three ways:

* `ViewTransform.crop(image, rng)` — per image, in the worker: the random resized crop (Inception-style, Szegedy et
  al. 2015; the torchvision sampling rule) of the uint8 RGB array, resized with OpenCV — bilinear when enlarging,
  area averaging when shrinking (antialiased like PIL's resize) — to uint8 `[S, S, 3]`;
* `ViewTransform.pack(crops, seed)` — per batch, in the worker: the crops, half of them flipped horizontally,
  stacked into uint8 tensors (one per crop size, `[N, k, S, S, 3]`) and a `ViewRecipe` (the photometric options
  and a random seed for their draws);
* `finish_views(batch)` / `ViewRecipe.finish(images)` — per batch, wherever the batch is: on the accelerator in
  training (the DataModule's `on_after_batch_transfer`), else in the loader's own process. Vectorised over the
  images with per-image random parameters: colour jitter, grayscale, Gaussian blur, solarisation
  (the SimCLR / BYOL recipe, Chen et al. 2020 appendix A, Grill et al. 2020 table 6) and normalisation.

A uint8 batch is a quarter of the bytes a float one is, through the worker's pipe and to the device, and float
image arithmetic is free on a GPU (timm's PrefetchLoader normalises on the device for the same reason).

Randomness comes from the `random.Random` (crop boxes) and the seed (photometric draws, made on the CPU whatever the
device) the caller passes, so the pipeline can make every batch's augmentations a pure function of (seed, epoch,
rank, worker, batch index) without touching global RNGs. Calling the transform on a single image draws its seed
from torch's global RNG.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# Loader workers are processes of their own: one OpenCV thread each, as torch's DataLoader does for torch.
cv2.setNumThreads(1)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP's image statistics (open_clip `OPENAI_DATASET_MEAN/STD`); the released BiomedCLIP normalises with them.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ITU-R 601 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ; a hue shift is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


@dataclass(frozen=True)
class Augment:
    """Per-crop augmentation after the crop: the flip (`hflip_prob`) when the crops are packed, the rest batched by
    `ViewRecipe.finish`.

    `color_jitter` is the SimCLR strength s: brightness, contrast and saturation factors in [1-0.8s, 1+0.8s] and
    a hue shift in [-0.2s, 0.2s] of a turn, applied together with probability `color_jitter_prob` (composed into one
    colour map, see `_color_jitter`; the hue shift rotates the YIQ chroma plane). `jitter_saturation=False` keeps the
    saturation (with `max_hue_shift=0`: brightness and contrast only, ConVIRT's jitter for monochrome X-rays). The
    Gaussian blur kernel is 10% of the crop side with sigma uniform in `blur_sigma` (SimCLR's [0.1, 2.0] by
    default); solarisation inverts values >= 0.5. `mean` / `std` normalise the [0, 1] image. `max_hue_shift`
    overrides the hue range (None: SimCLR's 0.2s; 0: no hue shift, as timm's `create_transform` colour jitter that
    DeiT-style recipes use).
    """

    hflip_prob: float = 0.5
    color_jitter: float = 0.0
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    solarize_prob: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_hue_shift: float | None = None
    jitter_saturation: bool = True
    blur_sigma: tuple[float, float] = (0.1, 2.0)


@dataclass(frozen=True)
class RandomAffine:
    """A random affine map of a crop about its centre (torchvision's `RandomAffine`): rotation uniform in
    [-degrees, degrees], horizontal and vertical shifts uniform in [-translate, translate] x the side, isotropic
    scale uniform in `scale`; uncovered pixels are black. The defaults are ConVIRT's (Zhang et al. 2020, appendix,
    image transformations: rotation [-20, 20] degrees, translation 0.1 of the size, scale [0.95, 1.05])."""

    degrees: float = 20.0
    translate: float = 0.1
    scale: tuple[float, float] = (0.95, 1.05)

    def apply(self, image: np.ndarray, rng: random.Random) -> np.ndarray:
        """uint8 [H, W, 3] -> the same size, warped in one bilinear OpenCV pass."""
        height, width = image.shape[:2]
        angle = rng.uniform(-self.degrees, self.degrees)
        shift_x = rng.uniform(-self.translate, self.translate) * width
        shift_y = rng.uniform(-self.translate, self.translate) * height
        matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, rng.uniform(*self.scale))
        matrix[:, 2] += (shift_x, shift_y)
        return cv2.warpAffine(
            image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )


@dataclass(frozen=True)
class Crop:
    """One output view: a square of side `size`.

    `scale=(lo, hi)` samples a random resized crop covering lo..hi of the image area with aspect ratio in `ratio`;
    `scale=None` takes the centred square of side `center_fraction` x the shorter side (resize + centre crop).
    `interpolation` is the resize filter when enlarging (OpenCV's bilinear or bicubic, the latter as timm / DeiT
    recipes crop); shrinking always averages areas. `affine` then warps the resized crop (a geometric op, so it
    runs with the crop, in the loader worker).
    """

    size: int
    scale: tuple[float, float] | None
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    augment: Augment = field(default_factory=Augment)
    center_fraction: float = 1.0
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    affine: RandomAffine | None = None

    def box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, crop_height, crop_width) of the region to resize."""
        if self.scale is None:
            side = max(1, round(min(width, height) * self.center_fraction))
            return (height - side) // 2, (width - side) // 2, side, side
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                return rng.randint(0, height - crop_height), rng.randint(0, width - crop_width), crop_height, crop_width
        # Fallback (as torchvision): the whole image, cut to the nearest allowed aspect ratio.
        crop_width, crop_height = width, height
        if width / height < self.ratio[0]:
            crop_height = round(width / self.ratio[0])
        elif width / height > self.ratio[1]:
            crop_width = round(height * self.ratio[1])
        return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


class ViewRecipe:
    """How to finish a packed batch of crops: the photometric options of every crop, which crops share a stacked
    tensor, and the batch's seed for the per-image draws.

    `flips[crop][row]` says which crops `pack` mirrored (boxes and instance masks follow them). A plain object (not a
    dataclass) so that Lightning's batch transfer carries it over untouched.
    """

    __slots__ = ("augments", "groups", "single", "seed", "flips")
    field = "image"

    def __init__(
        self,
        augments: tuple[Augment, ...],
        groups: tuple[tuple[int, ...], ...],
        single: bool,
        seed: int,
        flips: tuple[tuple[bool, ...], ...],
    ) -> None:
        self.augments = augments
        self.groups = groups
        self.single = single
        self.seed = seed
        self.flips = flips

    def finish(self, images: list[Tensor]) -> Tensor | list[Tensor]:
        """Packed uint8 groups `[N, k, S, S, 3]` (any device) -> normalised float `[N, 3, S, S]` per crop."""
        generator = torch.Generator().manual_seed(self.seed)
        place = {crop: (group, slot) for group, crops in enumerate(self.groups) for slot, crop in enumerate(crops)}
        views = []
        for crop, augment in enumerate(self.augments):  # crop order: a fixed stream of draws
            group, slot = place[crop]
            views.append(_photometric(images[group][:, slot], augment, generator))
        return views[0] if self.single else views


#: the batch entry holding the recipe of a packed entry (`image`; `video` for clips, `data_modules.clip_views`)
#: until `finish_views` consumes it.
VIEWS_FIELD = "__views__"


def finish_views(batch: dict) -> dict:
    """Finish a packed batch in place (uint8 crops -> augmented, normalised float views); no-op when finished. The
    recipe's `field` names the entry it finishes."""
    recipe = batch.pop(VIEWS_FIELD, None)
    if recipe is not None:
        batch[recipe.field] = recipe.finish(batch[recipe.field])
    return batch


class ViewTransform:
    """One image -> its crops (per image, `crop`), crops of a batch -> packed uint8 tensors (`pack`), finished
    per batch by `ViewRecipe.finish` (module doc)."""

    def __init__(self, crops: tuple[Crop, ...], single: bool) -> None:
        self.crops = crops
        self.single = single
        sizes = list(dict.fromkeys(crop.size for crop in crops))
        self.groups = tuple(tuple(index for index, crop in enumerate(crops) if crop.size == size) for size in sizes)

    def crop(self, image: np.ndarray, rng: random.Random) -> list[np.ndarray]:
        """uint8 RGB array [H, W, 3] -> one uint8 array [size, size, 3] per crop."""
        return self.crop_regions(image, rng)[0]

    def crop_regions(
        self, image: np.ndarray, rng: random.Random
    ) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
        """The crops and the region (top, left, height, width) of the image each one resizes, for what must follow
        the image's geometry (boxes and instance masks, `data_modules.instances`)."""
        height, width = image.shape[:2]
        crops, regions = [], []
        for crop in self.crops:
            top, left, crop_height, crop_width = crop.box(width, height, rng)
            regions.append((top, left, crop_height, crop_width))
            region = image[top : top + crop_height, left : left + crop_width]
            if (crop_height, crop_width) != (crop.size, crop.size):
                shrinking = crop_height > crop.size and crop_width > crop.size
                enlarge = cv2.INTER_CUBIC if crop.interpolation == "bicubic" else cv2.INTER_LINEAR
                region = cv2.resize(
                    region, (crop.size, crop.size), interpolation=cv2.INTER_AREA if shrinking else enlarge
                )
            if crop.affine is not None:
                region = crop.affine.apply(region, rng)
            crops.append(region)
        return crops, regions

    def pack(self, crops: list[list[np.ndarray]], seed: int) -> tuple[list[Tensor], ViewRecipe]:
        """Per-image crops (outer list: images) -> uint8 tensors `[N, k, S, S, 3]`, one per crop size, and their
        recipe. The horizontal flips happen here, in the copy that stacks the crops anyway. Few tensors, because each
        one costs a shared-memory handover between a worker and the main process."""
        generator = torch.Generator().manual_seed(seed)
        flips = [
            (torch.rand(len(crops), generator=generator) < crop.augment.hflip_prob).tolist() for crop in self.crops
        ]
        packed = []
        for group in self.groups:
            size = self.crops[group[0]].size
            stacked = np.empty((len(crops), len(group), size, size, 3), dtype=np.uint8)
            for row, image_crops in enumerate(crops):
                for slot, index in enumerate(group):
                    if flips[index][row]:
                        cv2.flip(image_crops[index], 1, dst=stacked[row, slot])  # 10x numpy's reversed-stride copy
                    else:
                        stacked[row, slot] = image_crops[index]
            packed.append(torch.from_numpy(stacked))
        photometric_seed = int(torch.randint(2**62, (), generator=generator))
        augments = tuple(crop.augment for crop in self.crops)
        mirrored = tuple(tuple(row_flips) for row_flips in flips)
        return packed, ViewRecipe(augments, self.groups, self.single, photometric_seed, mirrored)

    def __call__(self, image: Image.Image | np.ndarray) -> Tensor | list[Tensor]:
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        seed = int(torch.randint(2**62, ()).item())
        packed, recipe = self.pack([self.crop(image, random.Random(seed))], seed)
        views = recipe.finish(packed)
        return views[0] if self.single else [view[0] for view in views]


class Views:
    """A recipe for the crops one training image becomes; `build(image_size)` makes the transform.

    The photometric options are shared by every recipe (see `Augment`): `hflip` flips half the crops, `color_jitter`
    is the SimCLR strength applied with `color_jitter_prob`, then grayscale, blur and solarise probabilities, and the
    normalisation `mean` / `std` (ImageNet's by default, as `EvalView`, so evaluation sees the same statistics).
    """

    #: one tensor per image instead of a list of views.
    single: bool = False

    def __init__(
        self,
        hflip: bool = True,
        color_jitter: float = 0.0,
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.0,
        blur_prob: float = 0.0,
        solarize_prob: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        self.augment = Augment(
            hflip_prob=0.5 if hflip else 0.0,
            color_jitter=color_jitter,
            color_jitter_prob=color_jitter_prob,
            grayscale_prob=grayscale_prob,
            blur_prob=blur_prob,
            solarize_prob=solarize_prob,
            mean=tuple(mean),
            std=tuple(std),
        )

    @property
    def normalization(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(mean, std) these views normalise with; evaluation normalises the same way (`EvalView`)."""
        return self.augment.mean, self.augment.std

    def crops(self, image_size: int) -> tuple[Crop, ...]:
        raise NotImplementedError(f"{type(self).__name__} must define crops(image_size)")

    def build(self, image_size: int) -> ViewTransform:
        return ViewTransform(self.crops(image_size), self.single)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


class SingleCrop(Views):
    """One random resized crop: CLIP (`scale=(0.9, 1.0)` in open_clip), MAE (`scale=(0.2, 1.0)`), ConVIRT (with an
    `affine` warp, brightness / contrast jitter and blur sigma up to 3). `max_hue_shift`, `jitter_saturation` and
    `blur_sigma` as in `Augment`, `affine` as in `Crop`."""

    single = True

    def __init__(
        self,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        color_jitter: float = 0.0,
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.0,
        blur_prob: float = 0.0,
        solarize_prob: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        max_hue_shift: float | None = None,
        jitter_saturation: bool = True,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        affine: RandomAffine | None = None,
    ) -> None:
        super().__init__(hflip, color_jitter, color_jitter_prob, grayscale_prob, blur_prob, solarize_prob, mean, std)
        self.scale = scale
        self.ratio = ratio
        self.affine = affine
        self.augment = replace(
            self.augment, max_hue_shift=max_hue_shift, jitter_saturation=jitter_saturation, blur_sigma=tuple(blur_sigma)
        )

    def crops(self, image_size: int) -> tuple[Crop, ...]:
        return (Crop(image_size, self.scale, self.ratio, self.augment, affine=self.affine),)


class TwoCrops(Views):
    """Two random resized crops of the same image (SimCLR, MoCo v2, BYOL), by default with MoCo v2's augmentation
    (jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, blur 0.5). `second_blur_prob` / `second_solarize_prob` make
    the second view differ (BYOL table 6: blur 1.0 / 0.1, solarise 0.0 / 0.2). `max_hue_shift` and
    `interpolation` as in `Augment` / `Crop` (e.g. SiT's timm-style crops: no hue, bicubic)."""

    def __init__(
        self,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        color_jitter: float = 0.5,
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        solarize_prob: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        second_blur_prob: float | None = None,
        second_solarize_prob: float | None = None,
        max_hue_shift: float | None = None,
        interpolation: Literal["bilinear", "bicubic"] = "bilinear",
    ) -> None:
        super().__init__(hflip, color_jitter, color_jitter_prob, grayscale_prob, blur_prob, solarize_prob, mean, std)
        self.scale = scale
        self.ratio = ratio
        self.interpolation = interpolation
        self.augment = replace(self.augment, max_hue_shift=max_hue_shift)
        self.second_augment = replace(
            self.augment,
            blur_prob=blur_prob if second_blur_prob is None else second_blur_prob,
            solarize_prob=solarize_prob if second_solarize_prob is None else second_solarize_prob,
        )

    def crops(self, image_size: int) -> tuple[Crop, ...]:
        return (
            Crop(image_size, self.scale, self.ratio, self.augment, interpolation=self.interpolation),
            Crop(image_size, self.scale, self.ratio, self.second_augment, interpolation=self.interpolation),
        )


class MultiCrop(Views):
    """SwAV multi-crop (Caron et al. 2020, sec. 3.2): `num_global` crops at `image_size` plus `num_local` small
    crops of `local_size` (default 96/224 of `image_size`), covering `global_scale` / `local_scale` of the image,
    all with SwAV's colour distortion (strength 1.0 with p 0.8, grayscale 0.2, blur 0.5) by default."""

    def __init__(
        self,
        num_global: int = 2,
        num_local: int = 6,
        global_scale: tuple[float, float] = (0.14, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.14),
        local_size: int | None = None,
        hflip: bool = True,
        color_jitter: float = 1.0,
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        solarize_prob: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(hflip, color_jitter, color_jitter_prob, grayscale_prob, blur_prob, solarize_prob, mean, std)
        self.num_global = num_global
        self.num_local = num_local
        self.global_scale = global_scale
        self.local_scale = local_scale
        self.local_size = local_size

    def crops(self, image_size: int) -> tuple[Crop, ...]:
        local_size = self.local_size or max(8, round(image_size * 96 / 224))
        global_crop = Crop(image_size, self.global_scale, augment=self.augment)
        local_crop = Crop(local_size, self.local_scale, augment=self.augment)
        return (global_crop,) * self.num_global + (local_crop,) * self.num_local


class EvalView(Views):
    """Deterministic evaluation view: the centred square of `crop_fraction` x the shorter side, resized, normalised."""

    single = True

    def __init__(
        self,
        crop_fraction: float = 1.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(hflip=False, mean=mean, std=std)
        self.crop_fraction = crop_fraction

    def crops(self, image_size: int) -> tuple[Crop, ...]:
        return (Crop(image_size, None, augment=self.augment, center_fraction=self.crop_fraction),)


def _photometric(images: Tensor, augment: Augment, generator: torch.Generator) -> Tensor:
    """uint8 [N, S, S, 3] (already flipped, see `ViewTransform.pack`) on any device -> augmented, normalised float
    [N, 3, S, S], each op with its own per-image draw; the draws come from `generator` on the CPU (the same stream
    whatever the device)."""
    count, device = images.shape[0], images.device

    def chosen(probability: float) -> Tensor:  # [N] bool on the CPU, always drawn so the stream of draws is fixed
        return torch.rand(count, generator=generator) < probability

    def rows(mask: Tensor) -> Tensor:
        return mask.nonzero().squeeze(1).to(device)

    pixels = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    mean = torch.tensor(augment.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(augment.std, device=device).view(1, 3, 1, 1)
    photometric = (augment.color_jitter, augment.grayscale_prob, augment.blur_prob, augment.solarize_prob)
    if not any(photometric):
        return pixels.mul_(1 / (255 * std)).sub_(mean / std)
    pixels.div_(255)
    if augment.color_jitter:
        jitter = chosen(augment.color_jitter_prob)
        spread = 0.8 * augment.color_jitter

        def factor() -> Tensor:  # uniform in [1 - spread, 1 + spread], 1 where no jitter is applied
            values = (1 + spread * (2 * torch.rand(count, generator=generator) - 1)).clamp_(min=0)
            return torch.where(jitter, values, 1.0)

        brightness, contrast, saturation = factor(), factor(), factor()
        if not augment.jitter_saturation:  # drawn all the same, so the stream of draws does not change
            saturation = torch.ones(count)
        max_hue_shift = 0.2 * augment.color_jitter if augment.max_hue_shift is None else augment.max_hue_shift
        hue = torch.where(jitter, max_hue_shift * (2 * torch.rand(count, generator=generator) - 1), 0.0)
        pixels = _color_jitter(pixels, brightness, contrast, saturation, hue)
    grayscale = chosen(augment.grayscale_prob)
    if grayscale.any():
        index = rows(grayscale)
        pixels[index] = _luma(pixels[index]).expand(-1, 3, -1, -1)
    blur = chosen(augment.blur_prob)
    low, high = augment.blur_sigma
    sigma = low + (high - low) * torch.rand(count, generator=generator)
    if blur.any():
        index = rows(blur)
        pixels[index] = _gaussian_blur(pixels[index], sigma[blur])
    solarize = chosen(augment.solarize_prob)
    if solarize.any():
        index = rows(solarize)
        pixels[index] = torch.where(pixels[index] >= 0.5, 1 - pixels[index], pixels[index])
    return pixels.sub_(mean).div_(std)


def _luma(pixels: Tensor) -> Tensor:
    """[N, 3, H, W] -> [N, 1, H, W]."""
    weights = torch.tensor(_LUMA, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels * weights).sum(1, keepdim=True)


def _color_jitter(pixels: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor, hue: Tensor) -> Tensor:
    """Colour jitter with per-image factors [N], as one affine colour map per image.

    Brightness b scales, contrast c blends with the mean luma, saturation s blends each pixel with its luma, hue
    rotates the YIQ chroma plane by `hue` turns. All four are linear and keep gray gray, so together they are
    x -> c b H S x + (1 - c) b mean_luma(x), applied in one pass and clamped once to [0, 1]. (torchvision clamps after
    every step; the two agree unless an intermediate step saturates.) The factors live on the CPU, the pixels anywhere.
    """
    count = pixels.shape[0]
    luma = torch.tensor(_LUMA, dtype=pixels.dtype)
    saturate = saturation.view(count, 1, 1) * torch.eye(3) + (1 - saturation).view(count, 1, 1) * luma.expand(3, 3)
    angle = 2 * math.pi * hue
    rotation = torch.zeros(count, 3, 3)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1] = rotation[:, 2, 2] = torch.cos(angle)
    rotation[:, 1, 2], rotation[:, 2, 1] = -torch.sin(angle), torch.sin(angle)
    rotate = _YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ
    matrix = ((contrast * brightness).view(count, 1, 1) * (rotate @ saturate)).to(pixels)  # [N, 3, 3]
    offset = ((1 - contrast) * brightness).view(count, 1, 1, 1).to(pixels) * _luma(pixels).mean((2, 3), keepdim=True)
    return torch.einsum("nij,njhw->nihw", matrix, pixels).add_(offset).clamp_(0, 1)


def _gaussian_blur(pixels: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur, kernel ~10% of the side (SimCLR appendix A), one sigma per image (on the CPU),
    reflect padding."""
    count, channels, height, width = pixels.shape
    half = max(1, round(0.05 * min(height, width)))
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].float() ** 2))  # [N, K]
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0).to(pixels)  # [N*3, K]
    flat = F.pad(pixels.reshape(1, count * channels, height, width), (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=count * channels)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=count * channels)
    return flat.view(count, channels, height, width)
