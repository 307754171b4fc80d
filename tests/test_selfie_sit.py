"""Selfie and SiT: their losses against plain references, what reaches which network, the losses fall, and a
Lightning fast_dev_run with a plain DataLoader of dict batches."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from vlp_lightning.losses.masked_modeling import nt_xent_loss, patch_selection_loss, uncertainty_weighted_sum
from vlp_lightning.methods.selfie import Selfie
from vlp_lightning.methods.sit import SiT, rotate_quarter_turns
from vlp_lightning.modules.masking import patchify, random_masking, unpatchify
from vlp_lightning.modules.vision import VisionEncoder


def tiny_selfie() -> Selfie:
    """32 px images cut into a 4x4 grid of 8 px patches (the paper's CIFAR setting) with timm's tiny test ResNet."""
    torch.manual_seed(0)
    return Selfie(VisionEncoder("test_resnet", img_size=32), patch_size=8, mask_ratio=0.25)


def tiny_sit() -> SiT:
    torch.manual_seed(0)
    return SiT(VisionEncoder("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), corruption_ratio=0.25)


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


def test_sit_corrupts_exactly_the_ratio_of_patches():
    sit = tiny_sit()
    images = torch.randn(6, 3, 32, 32)
    corrupted = sit.corrupt(images)
    changed = (patchify(corrupted, 8) != patchify(images, 8)).any(dim=-1)  # [N, 16]
    assert (changed.sum(dim=1) == 4).all()  # round(16 * 0.25), the other patches untouched


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


def test_sit_encode_image_and_fast_dev_run(tmp_path):
    sit = tiny_sit()
    assert sit.encode_image(ramps(3)).shape == (3, 2 * 192)  # rotation + contrastive token
    fast_dev_run(sit, [{"image": [ramps(4, seed=seed), ramps(4, seed=seed).flip(-1)]} for seed in range(2)], tmp_path)
