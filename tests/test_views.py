"""Views: shapes of every recipe, the crop sampling rule, batched photometric ops against references."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from data_modules.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    Crop,
    EvalView,
    MultiCrop,
    SingleCrop,
    VIEWS_FIELD,
    TwoCrops,
    ViewTransform,
    _color_jitter,
    _gaussian_blur,
    finish_views,
)


def noise_image(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy())


def test_recipes_give_the_declared_crops():
    image = noise_image()
    single = SingleCrop().build(24)(image)
    assert single.shape == (3, 24, 24) and single.dtype == torch.float32
    two = TwoCrops().build(24)(image)
    assert [view.shape for view in two] == [(3, 24, 24)] * 2
    multi = MultiCrop(num_global=2, num_local=3, local_size=10).build(24)(image)
    assert [view.shape for view in multi] == [(3, 24, 24)] * 2 + [(3, 10, 10)] * 3
    assert MultiCrop().crops(224)[-1].size == 96  # SwAV's 224 / 96


def test_random_resized_crop_follows_scale_and_ratio():
    crop = Crop(16, scale=(0.2, 0.5), ratio=(0.5, 2.0))
    rng = random.Random(0)
    for _ in range(300):
        top, left, height, width = crop.box(64, 48, rng)
        assert 0 <= top <= 48 - height and 0 <= left <= 64 - width
        assert 0.2 * 0.9 <= height * width / (64 * 48) <= 0.5 * 1.1  # rounding to whole pixels
        assert 0.5 * 0.9 <= width / height <= 2.0 * 1.1


def test_eval_view_is_the_centre_square_resized_then_imagenet_normalisation():
    image = noise_image(40, 30)
    centre = TF.pil_to_tensor(image)[None, :, :, 5:35].float() / 255  # the centred 30x30 square

    def expected(pixels: torch.Tensor) -> torch.Tensor:
        return TF.normalize(pixels[0], list(IMAGENET_MEAN), list(IMAGENET_STD))

    one_level = 1 / 255 / min(IMAGENET_STD) + 1e-5  # the crops are uint8: rounding moves a pixel one level
    # shrinking is area averaging: an exact 2x reduction is the mean of each 2x2 block
    assert torch.allclose(EvalView().build(15)(image), expected(F.avg_pool2d(centre, 2)), atol=one_level)
    # enlarging is bilinear with pixel centres aligned (torch's align_corners=False)
    enlarged = F.interpolate(centre, size=(45, 45), mode="bilinear", align_corners=False)
    assert torch.allclose(EvalView().build(45)(image), expected(enlarged), atol=one_level)
    assert torch.equal(EvalView().build(20)(image), EvalView().build(20)(image))  # deterministic


def test_batched_views_are_reproducible_from_the_generators():
    transform = TwoCrops().build(16)
    images = [noise_image(seed=seed) for seed in range(4)]

    def run(seed: int) -> list[torch.Tensor]:
        rng = random.Random(seed)
        return finish(transform, [transform.crop(np.asarray(image), rng) for image in images], seed)

    assert all(torch.equal(a, b) for a, b in zip(run(0), run(0)))
    assert not torch.equal(run(0)[0], run(1)[0])


def finish(transform: ViewTransform, crops: list[list[np.ndarray]], seed: int = 0) -> torch.Tensor | list[torch.Tensor]:
    packed, recipe = transform.pack(crops, seed)
    return recipe.finish(packed)


def test_packed_batches_group_crops_by_size_and_survive_workers_and_device_transfer():
    transform = MultiCrop(num_global=2, num_local=3, local_size=8).build(16)
    crops = [transform.crop(np.asarray(noise_image(seed=seed)), random.Random(seed)) for seed in range(5)]
    packed, recipe = transform.pack(crops, seed=7)
    assert [(tuple(group.shape), group.dtype) for group in packed] == [
        ((5, 2, 16, 16, 3), torch.uint8), ((5, 3, 8, 8, 3), torch.uint8)]
    reference = recipe.finish(packed)
    # a worker pickles the batch; Lightning's transfer walks it and must hand the recipe over untouched
    batch = pickle.loads(pickle.dumps({"image": packed, VIEWS_FIELD: recipe}))
    batch = finish_views(move_data_to_device(batch, torch.device("cpu")))
    assert VIEWS_FIELD not in batch
    assert [view.shape for view in batch["image"]] == [(5, 3, 16, 16)] * 2 + [(5, 3, 8, 8)] * 3
    assert all(torch.equal(a, b) for a, b in zip(batch["image"], reference))
    assert finish_views(batch) is batch  # finished batches pass through


def plain(**augment: float) -> ViewTransform:
    """A whole-image crop (no geometry) with the given photometric ops, normalised with mean 0 / std 1."""
    return ViewTransform((Crop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), augment=Augment(
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **{"hflip_prob": 0.0, **augment})),), single=True)


def test_flip_grayscale_and_solarize_match_their_definitions():
    image = noise_image(8, 8)
    crops = [plain().crop(np.asarray(image), random.Random(0))]
    reference = finish(plain(), crops)[0]
    assert torch.allclose(reference, TF.pil_to_tensor(image).float() / 255)
    assert torch.equal(finish(plain(hflip_prob=1.0), crops)[0], reference.flip(-1))
    gray = finish(plain(grayscale_prob=1.0), crops)[0]
    luma = (reference * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    assert torch.allclose(gray, luma.expand(3, -1, -1), atol=1e-6)
    solarized = finish(plain(solarize_prob=1.0), crops)[0]
    assert torch.allclose(solarized, torch.where(reference >= 0.5, 1 - reference, reference), atol=1e-6)


def test_color_jitter_matches_torchvision_steps_and_keeps_gray_gray():
    pixels = 0.3 + 0.3 * torch.rand(3, 3, 8, 8)  # mid-range: no step saturates, so no intermediate clamp matters
    brightness, contrast, saturation = torch.tensor([1.0, 1.2, 0.8]), torch.tensor([1.0, 0.9, 1.15]), torch.tensor(
        [1.0, 1.1, 0.85])
    jittered = _color_jitter(pixels, brightness, contrast, saturation, torch.zeros(3))
    for index in range(3):
        expected = TF.adjust_brightness(pixels[index], brightness[index].item())
        expected = TF.adjust_contrast(expected, contrast[index].item())
        expected = TF.adjust_saturation(expected, saturation[index].item())
        assert torch.allclose(jittered[index], expected, atol=1e-3)
    assert torch.allclose(jittered[0], pixels[0], atol=1e-6)  # factors 1: identity
    hue_only = _color_jitter(pixels, torch.ones(3), torch.ones(3), torch.ones(3), torch.tensor([0.0, 0.1, -0.2]))
    assert torch.allclose(hue_only[0], pixels[0], atol=1e-5) and not torch.allclose(hue_only[1], pixels[1], atol=1e-2)
    gray = torch.full((2, 3, 4, 4), 0.5)  # hue and saturation cannot colour a gray image
    gray_jittered = _color_jitter(gray, torch.ones(2), torch.ones(2), torch.tensor([1.5, 0.5]), torch.tensor([0.2, -0.1]))
    assert torch.allclose(gray_jittered, gray, atol=1e-5)


def test_gaussian_blur_matches_torchvision_kernel():
    pixels = torch.rand(2, 3, 20, 20)
    sigma = torch.tensor([0.8, 1.7])
    blurred = _gaussian_blur(pixels, sigma)
    for index in range(2):
        expected = TF.gaussian_blur(pixels[index], kernel_size=[3, 3], sigma=[sigma[index].item()] * 2)
        assert torch.allclose(blurred[index], expected, atol=1e-5)
    assert blurred.std() < pixels.std()


@pytest.mark.parametrize("views", [SingleCrop(), TwoCrops(), MultiCrop(num_local=2)])
def test_views_output_is_normalised_and_finite(views):
    output = views.build(16)(noise_image())
    output = output if isinstance(output, list) else [output]
    for view in output:
        assert torch.isfinite(view).all()
        assert view.min() >= (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD) - 1e-4
        assert view.max() <= (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD) + 1e-4
    assert not math.isclose(float(output[0].std()), 0.0)


def test_random_affine_warps_the_crop_within_its_ranges():
    """ConVIRT's affine (Zhang et al. 2020, appendix): identity parameters leave the crop unchanged; a shift-only
    map moves a dot by at most 0.1 x the side, in both directions; a rotation leaves black corners."""
    from data_modules.views import RandomAffine

    image = np.zeros((21, 21, 3), dtype=np.uint8)
    image[10, 10] = 255
    rng = random.Random(0)
    assert np.array_equal(RandomAffine(degrees=0.0, translate=0.0, scale=(1.0, 1.0)).apply(image, rng), image)
    shifts = []
    for _ in range(40):
        moved = RandomAffine(degrees=0.0, translate=0.1, scale=(1.0, 1.0)).apply(image, rng).astype(float)[..., 0]
        rows, cols = np.indices(moved.shape)
        shifts.append(((moved * cols).sum() / moved.sum() - 10, (moved * rows).sum() / moved.sum() - 10))
    shifts = np.array(shifts)
    assert np.abs(shifts).max() <= 2.1 + 1e-6 and (shifts.min(0) < -0.5).all() and (shifts.max(0) > 0.5).all()
    white = np.full((21, 21, 3), 255, dtype=np.uint8)
    rotated = RandomAffine(degrees=20.0, translate=0.0, scale=(1.0, 1.0)).apply(white, random.Random(1))
    assert rotated[10, 10].tolist() == [255] * 3 and min(rotated[0, 0, 0], rotated[0, -1, 0]) == 0


def test_single_crop_runs_the_affine_in_the_worker_crop():
    from data_modules.views import RandomAffine

    image = np.asarray(noise_image(32, 32))
    plain = SingleCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0)).build(32)
    warped = SingleCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0), affine=RandomAffine()).build(32)
    assert np.array_equal(plain.crop(image, random.Random(0))[0], image)
    assert not np.array_equal(warped.crop(image, random.Random(0))[0], image)


def test_brightness_contrast_only_jitter_is_one_affine_grey_map_per_image():
    """`jitter_saturation=False` with `max_hue_shift=0` (ConVIRT's jitter of brightness and contrast in [0.6, 1.4]):
    each output image is a x + k with one a and k for all its pixels and channels; with saturation it is not."""
    from data_modules.views import _photometric

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(90, 128, (8, 6, 6, 3), dtype=torch.uint8, generator=generator)
    x = images.permute(0, 3, 1, 2).float() / 255

    def residual(augment: Augment) -> torch.Tensor:
        out = _photometric(images, augment, torch.Generator().manual_seed(1))
        out = out * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        design = torch.stack([x.flatten(1), torch.ones_like(x.flatten(1))], dim=-1)  # [N, P, 2]
        solution = torch.linalg.lstsq(design, out.flatten(1).unsqueeze(-1)).solution
        return (design @ solution).squeeze(-1).sub(out.flatten(1)).abs().amax(1)

    convirt = Augment(
        hflip_prob=0, color_jitter=0.5, color_jitter_prob=1.0, max_hue_shift=0.0, jitter_saturation=False
    )
    assert residual(convirt).max() < 1e-4
    assert residual(Augment(hflip_prob=0, color_jitter=0.5, color_jitter_prob=1.0)).max() > 1e-2


def test_blur_sigma_is_drawn_from_blur_sigma(monkeypatch):
    import data_modules.views as views

    drawn = []

    def recording_blur(pixels, sigma):
        drawn.append(sigma)
        return pixels

    monkeypatch.setattr(views, "_gaussian_blur", recording_blur)
    images = torch.zeros(400, 4, 4, 3, dtype=torch.uint8)
    views._photometric(images, Augment(blur_prob=1.0, blur_sigma=(0.1, 3.0)), torch.Generator().manual_seed(0))
    sigma = torch.cat(drawn)
    assert sigma.min() >= 0.1 and sigma.max() <= 3.0 and sigma.max() > 2.5
