"""Views: the crops one image becomes (one crop, two crops, multi-crop, or the deterministic evaluation crop).

A method declares its views (`method.train_views()`) and the data module builds them at the method's resolution:
`views.build(image_size)` returns a `ViewTransform`, a callable `PIL.Image -> Tensor | list[Tensor]` of normalised
float images `[3, S, S]` (a list for multi-view recipes).

Speed: on this class of CPU a 64 px PNG decodes in ~0.1 ms, about what one bilinear resize costs, and every
elementwise pass over a float image costs another ~10%, so every view is split in two halves and all but the
resize runs once per batch, vectorised, instead of once per image:

* `ViewTransform.crop(image, rng)` — per image: random resized crop (Inception-style, Szegedy et al. 2015; the
  torchvision sampling rule) as one PIL antialiased bilinear resize of the crop box, to uint8;
* `ViewTransform.finish(crops, generator)` — per batch, vectorised over the images with per-image random
  parameters: horizontal flip, colour jitter, grayscale, Gaussian blur, solarisation (the SimCLR / BYOL recipe,
  Chen et al. 2020 appendix A, Grill et al. 2020 table 6) and normalisation.

Randomness comes from the `random.Random` / `torch.Generator` the caller passes, so the pipeline can make every
batch's augmentations a pure function of (seed, epoch, rank, worker, batch index) without touching global RNGs.
Calling the transform on a single image draws its seed from torch's global RNG.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ; a hue shift is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


@dataclass(frozen=True)
class Augment:
    """Per-crop photometric augmentation, applied batched by `ViewTransform.finish`.

    `color_jitter` is the SimCLR strength s: brightness, contrast and saturation factors in [1-0.8s, 1+0.8s] and
    a hue shift in [-0.2s, 0.2s] of a turn, applied together with probability `color_jitter_prob` (composed into one
    colour map, see `_color_jitter`; the hue shift rotates the YIQ chroma plane). The Gaussian blur kernel is 10% of the crop side with
    sigma in [0.1, 2.0]; solarisation inverts values >= 0.5. `mean` / `std` normalise the [0, 1] image.
    """

    hflip_prob: float = 0.5
    color_jitter: float = 0.0
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    solarize_prob: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class Crop:
    """One output view: a square of side `size`.

    `scale=(lo, hi)` samples a random resized crop covering lo..hi of the image area with aspect ratio in `ratio`;
    `scale=None` takes the centred square of side `center_fraction` x the shorter side (resize + centre crop).
    """

    size: int
    scale: tuple[float, float] | None
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    augment: Augment = field(default_factory=Augment)
    center_fraction: float = 1.0

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


class ViewTransform:
    """`PIL.Image -> Tensor | list[Tensor]`, split into a per-image `crop` and a per-batch `finish` (module doc)."""

    def __init__(self, crops: tuple[Crop, ...], single: bool) -> None:
        self.crops = crops
        self.single = single

    def crop(self, image: Image.Image, rng: random.Random) -> list[Tensor]:
        """RGB image -> one uint8 tensor [size, size, 3] per crop (PIL's antialiased bilinear resize of the box,
        as torchvision's RandomResizedCrop on PIL images; on this CPU class it beats the tensor kernels)."""
        crops = []
        for crop in self.crops:
            top, left, crop_height, crop_width = crop.box(*image.size, rng)
            box = (left, top, left + crop_width, top + crop_height)
            if (crop_height, crop_width) == (crop.size, crop.size):
                region = image.crop(box)
            else:
                region = image.resize((crop.size, crop.size), Image.BILINEAR, box=box)
            crops.append(torch.frombuffer(bytearray(region.tobytes()), dtype=torch.uint8).view(crop.size, crop.size, 3))
        return crops

    def finish(self, crops: list[list[Tensor]], generator: torch.Generator) -> Tensor | list[Tensor]:
        """Per-image crops (outer list: images) -> normalised float batch [N, 3, S, S] per crop."""
        views = [
            _photometric(
                # stacking [S, S, 3] crops is a plain copy; one transposing pass then makes [N, 3, S, S]
                torch.stack([image_crops[index] for image_crops in crops]).permute(0, 3, 1, 2).contiguous(),
                crop.augment,
                generator,
            )
            for index, crop in enumerate(self.crops)
        ]
        return views[0] if self.single else views

    def __call__(self, image: Image.Image) -> Tensor | list[Tensor]:
        seed = int(torch.randint(2**62, ()).item())
        views = self.finish([self.crop(image.convert("RGB"), random.Random(seed))], torch.Generator().manual_seed(seed))
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

    def crops(self, image_size: int) -> tuple[Crop, ...]:
        raise NotImplementedError

    def build(self, image_size: int) -> ViewTransform:
        return ViewTransform(self.crops(image_size), self.single)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


class SingleCrop(Views):
    """One random resized crop: CLIP (`scale=(0.9, 1.0)` in open_clip), MAE (`scale=(0.2, 1.0)`)."""

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
    ) -> None:
        super().__init__(hflip, color_jitter, color_jitter_prob, grayscale_prob, blur_prob, solarize_prob, mean, std)
        self.scale = scale
        self.ratio = ratio

    def crops(self, image_size: int) -> tuple[Crop, ...]:
        return (Crop(image_size, self.scale, self.ratio, self.augment),)


class TwoCrops(Views):
    """Two random resized crops of the same image (SimCLR, MoCo v2, BYOL), by default with MoCo v2's augmentation
    (jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, blur 0.5). `second_blur_prob` / `second_solarize_prob` make
    the second view differ (BYOL table 6: blur 1.0 / 0.1, solarise 0.0 / 0.2)."""

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
    ) -> None:
        super().__init__(hflip, color_jitter, color_jitter_prob, grayscale_prob, blur_prob, solarize_prob, mean, std)
        self.scale = scale
        self.ratio = ratio
        self.second_augment = replace(
            self.augment,
            blur_prob=blur_prob if second_blur_prob is None else second_blur_prob,
            solarize_prob=solarize_prob if second_solarize_prob is None else second_solarize_prob,
        )

    def crops(self, image_size: int) -> tuple[Crop, ...]:
        return (
            Crop(image_size, self.scale, self.ratio, self.augment),
            Crop(image_size, self.scale, self.ratio, self.second_augment),
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
    """uint8 [N, 3, S, S] -> augmented, normalised float [N, 3, S, S], each op with its own per-image draw."""
    count = images.shape[0]

    def chosen(probability: float) -> Tensor:  # [N] bool, always drawn so the stream of draws is fixed
        return torch.rand(count, generator=generator) < probability

    flip = chosen(augment.hflip_prob)
    if flip.any():
        images[flip] = images[flip].flip(-1)
    pixels = images.float()
    mean = torch.tensor(augment.mean).view(1, 3, 1, 1)
    std = torch.tensor(augment.std).view(1, 3, 1, 1)
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
        hue = torch.where(jitter, 0.2 * augment.color_jitter * (2 * torch.rand(count, generator=generator) - 1), 0.0)
        pixels = _color_jitter(pixels, brightness, contrast, saturation, hue)
    grayscale = chosen(augment.grayscale_prob)
    if grayscale.any():
        pixels[grayscale] = _luma(pixels[grayscale]).expand(-1, 3, -1, -1)
    blur = chosen(augment.blur_prob)
    sigma = 0.1 + 1.9 * torch.rand(count, generator=generator)
    if blur.any():
        pixels[blur] = _gaussian_blur(pixels[blur], sigma[blur])
    solarize = chosen(augment.solarize_prob)
    if solarize.any():
        pixels[solarize] = torch.where(pixels[solarize] >= 0.5, 1 - pixels[solarize], pixels[solarize])
    return pixels.sub_(mean).div_(std)


def _luma(pixels: Tensor) -> Tensor:
    """[N, 3, H, W] -> [N, 1, H, W]."""
    weights = torch.tensor(_LUMA, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels * weights).sum(1, keepdim=True)


def _color_jitter(pixels: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor, hue: Tensor) -> Tensor:
    """Colour jitter with per-image factors [N], as one affine colour map per image.

    Brightness b scales, contrast c blends with the mean luma, saturation s blends each pixel with its luma, hue
    rotates the YIQ chroma plane by `hue` turns. All four are linear and keep gray gray, so together they are
    x -> c b H S x + (1 - c) b mean_luma(x), applied in one pass and clamped once to [0, 1]. (torchvision clamps after
    every step; the two agree unless an intermediate step saturates.)
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
    matrix = (contrast * brightness).view(count, 1, 1) * (rotate @ saturate)  # [N, 3, 3]
    offset = ((1 - contrast) * brightness).view(count, 1, 1, 1) * _luma(pixels).mean((2, 3), keepdim=True)
    return torch.einsum("nij,njhw->nihw", matrix, pixels).add_(offset).clamp_(0, 1)


def _gaussian_blur(pixels: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur, kernel ~10% of the side (SimCLR appendix A), one sigma per image, reflect padding."""
    count, channels, height, width = pixels.shape
    half = max(1, round(0.05 * min(height, width)))
    offsets = torch.arange(-half, half + 1, dtype=pixels.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))  # [N, K]
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # [N*3, K]
    flat = F.pad(pixels.reshape(1, count * channels, height, width), (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=count * channels)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=count * channels)
    return flat.view(count, channels, height, width)
