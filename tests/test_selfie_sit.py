"""Selfie and SiT: their losses against plain references, what reaches which network, the losses fall, and a
Lightning fast_dev_run with a plain DataLoader of dict batches."""

from __future__ import annotations

import math
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_modules.views import Crop, TwoCrops, ViewTransform
from vlp_lightning.losses.instance_contrastive import nt_xent_loss
from vlp_lightning.losses.masked_modeling import patch_selection_loss, uncertainty_weighted_sum
from vlp_lightning.methods.selfie import Selfie
from vlp_lightning.methods.sit import SiT, random_gaussian_blur, rectangle_masks, rotate_quarter_turns
from vlp_lightning.modules.masking import patchify, random_masking, unpatchify
from vlp_lightning.modules.vision import VisionEncoder


def tiny_selfie() -> Selfie:
    """32 px images cut into a 4x4 grid of 8 px patches (the paper's CIFAR setting) with timm's tiny test ResNet."""
    torch.manual_seed(0)
    return Selfie(VisionEncoder("test_resnet", img_size=32), patch_size=8, mask_ratio=0.25)


def tiny_sit() -> SiT:
    torch.manual_seed(0)
    return SiT(VisionEncoder("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2))


def ramps(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Colour ramps brighter towards the bottom right, random colours: a patch's content tells where it belongs."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    layout = axis.view(size, 1) + 0.5 * axis.view(1, size)
    colours = 1 + 0.3 * torch.randn(count, 3, 1, 1, generator=generator)
    return colours * layout + 0.1 * torch.randn(count, 3, size, size, generator=generator)


def optimise(method, batch: dict, steps: int, lr: float, seed: int | None = None) -> list[float]:
    """AdamW steps on one batch; with `seed`, every step draws the same masks / rotations / corruptions."""
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        if seed is not None:
            torch.manual_seed(seed)
        loss = method.forward_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def fast_dev_run(method, batches: list[dict], tmp_path) -> None:
    trainer = pl.Trainer(
        fast_dev_run=len(batches), accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, default_root_dir=tmp_path,
    )
    before = [p.detach().clone() for p in method.parameters() if p.requires_grad]
    trainer.fit(method, train_dataloaders=DataLoader(batches, batch_size=None))
    after = [p.detach() for p in method.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(before, after) if a.ndim > 1)


# ---------------------------------------------------------------------------------------------------------- Selfie
def test_patch_selection_loss_matches_a_plain_softmax():
    torch.manual_seed(0)
    queries, candidates = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    loss, accuracy = patch_selection_loss(queries, candidates)
    terms, correct = [], 0
    for image in range(2):
        for query in range(3):
            logits = [float(queries[image, query] @ candidates[image, k]) / math.sqrt(8) for k in range(3)]
            terms.append(-logits[query] + math.log(sum(math.exp(value) for value in logits)))
            correct += max(range(3), key=lambda k: logits[k]) == query
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert accuracy.item() == pytest.approx(correct / 6)
    # a query equal to its own candidate (orthogonal candidates) is picked with near certainty
    orthogonal = torch.eye(8)[:3].expand(2, -1, -1) * 20
    easy_loss, easy_accuracy = patch_selection_loss(orthogonal, orthogonal)
    assert easy_loss < 1e-3 and easy_accuracy == 1


def test_selfie_pools_only_the_visible_patches():
    selfie = tiny_selfie().eval()  # eval: batch norm uses running statistics, so patches do not mix
    images = ramps(3)
    torch.manual_seed(1)
    mask = random_masking(3, 16, 0.25)
    token_counts = []

    def count_tokens(_module, inputs, _output) -> None:
        token_counts.append(inputs[0].shape[1])

    hook = selfie.pooling_blocks[0].register_forward_hook(count_tokens)
    with torch.no_grad():
        queries, candidates = selfie.queries_and_candidates(images, mask)
        pixel_mask = unpatchify(mask.mask[..., None].expand(-1, -1, 3 * 64), 8, (4, 4)).bool()
        scrambled = torch.where(pixel_mask, torch.randn_like(images), images)
        queries_scrambled, candidates_scrambled = selfie.queries_and_candidates(scrambled, mask)
    hook.remove()
    assert token_counts == [1 + 12, 1 + 12]  # u0 + the 12 visible patches of 16
    assert queries.shape == candidates.shape == (3, 4, selfie.vision.num_features)
    assert torch.allclose(queries, queries_scrambled, atol=1e-5)  # the summary never saw the masked patches
    assert not torch.allclose(candidates, candidates_scrambled)  # but the candidates are those patches


def test_selfie_loss_falls_and_learns_to_pick_patches():
    selfie = tiny_selfie()
    losses = optimise(selfie, {"image": ramps(16)}, steps=20, lr=1e-3)  # fresh masks every step
    assert sum(losses[-5:]) / 5 < 0.8 * math.log(4), losses  # below chance: 4 candidates per query
    selfie.eval()
    with torch.no_grad():
        accuracy = selfie.forward_loss({"image": ramps(16, seed=1)})["patch_accuracy"]
    assert accuracy > 0.4  # held-out images, chance is 0.25


def test_selfie_fast_dev_run(tmp_path):
    fast_dev_run(tiny_selfie(), [{"image": ramps(4, seed=seed)} for seed in range(2)], tmp_path)


def test_selfie_probes_the_patch_network_on_the_whole_image():
    """Sec. 3: the patch network is transferred to whole images; the patch mean stays available."""
    selfie = tiny_selfie().eval()
    images = ramps(3)
    with torch.no_grad():
        whole = selfie.probe_features(images)
        assert torch.allclose(whole, selfie.vision(images))  # one pass over the 32 px image, not 16 of 8 px
        selfie.probe_representation = "patch_mean"
        patch_mean = selfie.probe_features(images)
    assert whole.shape == patch_mean.shape == (3, selfie.vision.num_features)
    assert torch.allclose(patch_mean, selfie.encode_patches(images).mean(dim=1))
    assert not torch.allclose(whole, patch_mean, atol=1e-3)
    with pytest.raises(ValueError, match="choose 'whole_image' or 'patch_mean'"):
        Selfie(VisionEncoder("test_resnet", img_size=32), patch_size=8, probe_representation="patches")


def test_selfie_rejects_a_patch_size_that_does_not_tile_the_image():
    with pytest.raises(ValueError, match="not a multiple of patch_size=12"):
        Selfie(VisionEncoder("test_resnet", img_size=32), patch_size=12)


# ---------------------------------------------------------------------------------------------------------- SiT
def test_nt_xent_matches_a_plain_reference():
    torch.manual_seed(0)
    first, second = torch.randn(4, 6), torch.randn(4, 6)
    loss = nt_xent_loss(first, second, temperature=0.5)
    embeddings = torch.nn.functional.normalize(torch.cat([first, second]), dim=1)
    terms = []
    for i in range(8):
        positive = (i + 4) % 8
        similarities = {j: math.exp(float(embeddings[i] @ embeddings[j]) / 0.5) for j in range(8) if j != i}
        terms.append(-math.log(similarities[positive] / sum(similarities.values())))
    assert loss.item() == pytest.approx(sum(terms) / 8, rel=1e-5)
    assert nt_xent_loss(first, first * 3, temperature=0.1) < nt_xent_loss(first, second, temperature=0.1)


def test_uncertainty_weighted_sum_is_kendalls_formula():
    losses = (torch.tensor(2.0), torch.tensor(0.5), torch.tensor(0.3))
    log_variances = torch.tensor([1.0, -0.5, 0.2])
    expected = sum(
        scale * math.exp(-s) * float(loss) + 0.5 * s
        for loss, s, scale in zip(losses, log_variances.tolist(), (1.0, 1.0, 0.5))
    )
    assert uncertainty_weighted_sum(losses, log_variances, (1.0, 1.0, 0.5)).item() == pytest.approx(expected)


def test_rotate_quarter_turns():
    images = torch.randn(8, 3, 5, 5)
    turns = torch.arange(8) % 4
    rotated = rotate_quarter_turns(images, turns)
    for image, turn, result in zip(images, turns, rotated):
        assert torch.equal(result, torch.rot90(image, int(turn), dims=(1, 2)))
    assert torch.equal(rotate_quarter_turns(rotated, (4 - turns) % 4), images)


def released_drop_rand_patches_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """The released SiT code's `drop_rand_patches` loop (engine.py, defaults max_drop 0.3, max_block_sz 0.25,
    tolr 0.05), transcribed to return the pixels it overwrites."""
    covered = np.zeros((size, size), dtype=bool)
    target = rng.uniform(0, 0.3) * size * size
    tolerance, largest = int(0.05 * size), int(0.25 * size)
    total = 0
    while total < target:
        top, left = rng.integers(0, size - tolerance), rng.integers(0, size - tolerance)
        bottom = min(rng.integers(tolerance, largest) + top, size)
        right = min(rng.integers(tolerance, largest) + left, size)
        covered[top:bottom, left:right] = True
        total += (bottom - top) * (right - left)
    return covered


@pytest.mark.parametrize("size", [32, 64])
def test_sit_corruption_rectangles_cover_what_the_released_loop_covers(size):
    rng = np.random.default_rng(0)
    count = 1000
    reference = np.array([released_drop_rand_patches_mask(rng, size).mean() for _ in range(count)])
    torch.manual_seed(0)
    ours = rectangle_masks(count, size, size, max_area=0.3, max_side=0.25).float().mean(dim=(1, 2)).numpy()
    assert abs(ours.mean() - reference.mean()) < 0.01  # about 0.15: a U(0, 0.3) target, less the overlaps
    for quantile in (0.1, 0.5, 0.9):
        assert abs(np.quantile(ours, quantile) - np.quantile(reference, quantile)) < 0.02, quantile
    assert ours.max() <= 0.3 + 0.25**2  # the last rectangle may overshoot the target by at most its own area
    # a single rectangle (grey, blur): sides in [5%, 100%) of the image, cut at the border
    single = rectangle_masks(count, size, size, max_area=None, max_side=1.0)
    rows, columns = single.any(dim=2).sum(dim=1), single.any(dim=1).sum(dim=1)
    assert rows.min() >= max(1, int(0.05 * size)) and rows.max() > 0.8 * size
    assert torch.equal(single.sum(dim=(1, 2)), rows * columns)  # one rectangle each


def test_sit_corrupts_with_grey_blur_noise_and_another_images_pixels():
    """Constant-colour images: every pixel of a corrupted image is its own colour, its grey, another image's colour,
    or something else (noise, the blurred grey edge); rectangles ignore the 8 px patch grid."""
    sit = tiny_sit()
    count = 16
    colours = torch.rand(count, 3) * torch.tensor([1.0, 0.6, 0.3])  # distinct channels: grey is recognisable
    images = colours.view(count, 3, 1, 1).expand(-1, -1, 32, 32).contiguous()
    torch.manual_seed(0)
    corrupted = sit.corrupt(images)

    def is_colour(colour: torch.Tensor, image: torch.Tensor) -> torch.Tensor:  # [3], [3, H, W] -> [H, W]
        return (image - colour.view(3, 1, 1)).abs().max(dim=0).values < 1e-5

    changed_fractions, with_grey, with_other, with_noise, off_grid = [], 0, 0, 0, 0
    for index in range(count):
        own = is_colour(colours[index], corrupted[index])
        grey = is_colour(colours[index].mean().expand(3), corrupted[index])
        other = torch.zeros_like(own)
        for source in range(count):
            if source != index:
                other |= is_colour(colours[source], corrupted[index])
        changed_fractions.append(1 - own.float().mean().item())
        with_grey += bool(grey.any())
        with_other += bool(other.any())
        with_noise += bool((~(own | grey | other)).any())
        per_patch = patchify((~own).float().view(1, 1, 32, 32), 8)[0]  # [16, 64]
        off_grid += bool(((per_patch > 0).any(dim=1) & (per_patch < 1).any(dim=1)).any())
    assert with_grey >= 14 and with_noise >= 14 and with_other >= 12  # the partner is sometimes the image itself
    assert off_grid == count  # every image has a patch only partly corrupted
    assert np.std(changed_fractions) > 0.05  # the area varies from image to image


def test_sit_blur_draws_the_released_kernels():
    """An impulse blurred by `smooth_patch`'s draws: odd kernels 3..15, normalised, symmetric."""
    impulses = torch.zeros(300, 1, 32, 32)
    impulses[:, 0, 16, 16] = 1
    torch.manual_seed(0)
    blurred = random_gaussian_blur(impulses)[:, 0]
    assert torch.allclose(blurred.sum(dim=(1, 2)), torch.ones(300), atol=1e-5)
    assert torch.allclose(blurred, blurred.flip(1).roll(1, dims=1), atol=1e-6)  # symmetric about row 16
    half_widths = ((blurred[:, 16] > 0).sum(dim=1) - 1) // 2
    assert set(half_widths.tolist()) == set(range(1, 8))  # kernel sizes 3, 5, ..., 15 and nothing wider


def test_sit_views_are_the_released_codes():
    """timm `create_transform` as the released code calls it for SSL: crop 0.08-1 bicubic, flip 0.5, brightness /
    contrast / saturation 0.4 always, no hue, grayscale, blur or solarisation."""
    crops = tiny_sit().train_views().crops(32)
    assert len(crops) == 2
    for crop in crops:
        assert crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3) and crop.interpolation == "bicubic"
        augment = crop.augment
        assert augment.hflip_prob == 0.5 and augment.color_jitter_prob == 1.0
        assert 0.8 * augment.color_jitter == pytest.approx(0.4) and augment.max_hue_shift == 0.0
        assert augment.grayscale_prob == augment.blur_prob == augment.solarize_prob == 0.0
    # without a hue shift, jitter keeps the hue of a colour (the angle of its YIQ chroma); SimCLR's jitter turns it
    pixel = np.array([[[150, 100, 80]]], dtype=np.uint8).repeat(40, 0).repeat(40, 1)
    yiq = torch.tensor([[0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])

    def hue_angles(views) -> list[float]:
        angles = []
        for seed in range(8):
            torch.manual_seed(seed)
            for view in views.build(32)(pixel):
                rgb = view[:, 16, 16] * torch.tensor(views.augment.std) + torch.tensor(views.augment.mean)
                i, q = (yiq @ rgb).tolist()
                angles.append(math.atan2(q, i))
        return angles

    i, q = (yiq @ torch.tensor([150.0, 100.0, 80.0]) / 255).tolist()
    original = math.atan2(q, i)
    assert max(abs(angle - original) for angle in hue_angles(tiny_sit().train_views())) < 1e-3
    assert max(abs(angle - original) for angle in hue_angles(TwoCrops())) > 0.05
    # bicubic and bilinear enlarge differently
    image = np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    cubic, linear = (
        ViewTransform((Crop(32, (0.5, 0.5), interpolation=name),), single=True).crop(image, random.Random(0))[0]
        for name in ("bicubic", "bilinear")
    )
    assert cubic.shape == linear.shape == (32, 32, 3) and not np.array_equal(cubic, linear)


def test_sit_needs_two_views():
    with pytest.raises(ValueError, match="SiT needs two views"):
        tiny_sit().forward_loss({"image": torch.randn(2, 3, 32, 32)})


def test_sit_loss_and_each_task_fall():
    sit = tiny_sit()
    images = ramps(8)
    batch = {"image": [images, images.flip(-1)]}
    torch.manual_seed(0)
    start = sit.forward_loss(batch)
    optimise(sit, batch, steps=10, lr=1e-3, seed=0)  # an overfitting check: same rotations and corruptions
    torch.manual_seed(0)
    end = sit.forward_loss(batch)
    assert end["loss"] < start["loss"] - 0.4
    for task in ("rotation_loss", "contrastive_loss", "reconstruction_loss"):
        assert end[task] < 0.85 * start[task], task


def test_sit_probe_features_and_fast_dev_run(tmp_path):
    sit = tiny_sit()
    assert sit.probe_features(ramps(3)).shape == (3, 2 * 192)  # rotation + contrastive token
    fast_dev_run(sit, [{"image": [ramps(4, seed=seed), ramps(4, seed=seed).flip(-1)]} for seed in range(2)], tmp_path)
