"""GRAIN (Halbe et al. 2024): its box-only Hungarian matching, its region losses, `ground`, its data contract, and
the patch-text grounding baseline the scenes bench sets beside CLIP."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_modules import ImageTextDataModule
from data_modules.pipeline import DataConfigError
from vlp_lightning.callbacks import PatchTextGrounding, PhraseGrounding, patch_similarity_boxes
from vlp_lightning.losses.grounding import box_matching_cost, hungarian, region_description_loss
from vlp_lightning.methods import CLIP, GRAIN
from vlp_lightning.modules.tokenizers import ByteTokenizer


def random_boxes(count: int, generator: torch.Generator) -> torch.Tensor:
    """[count, 4] normalised cx, cy, w, h inside the image."""
    size = 0.1 + 0.3 * torch.rand(count, 2, generator=generator)
    centre = size / 2 + (1 - size) * torch.rand(count, 2, generator=generator)
    return torch.cat([centre, size], 1)


def test_matching_is_the_cheapest_assignment_by_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    for queries, objects in ((4, 3), (3, 3), (5, 2)):
        cost = box_matching_cost(random_boxes(queries, generator), random_boxes(objects, generator), 5.0, 2.0)
        rows, columns = hungarian(cost)
        assert sorted(columns.tolist()) == list(range(objects)) and len(set(rows.tolist())) == objects
        best = min(sum(cost[row, column] for column, row in enumerate(chosen))
                   for chosen in itertools.permutations(range(queries), objects))
        torch.testing.assert_close(cost[rows, columns].sum(), best)


def orthonormal(count: int, dim: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(dim, count, generator=torch.Generator().manual_seed(1)))[0].T


def test_region_losses_vanish_for_perfect_predictions_whatever_the_query_order() -> None:
    generator = torch.Generator().manual_seed(0)
    targets = [random_boxes(2, generator), random_boxes(3, generator)]
    descriptions = orthonormal(5, 16)
    boxes, regions = random_boxes(8, generator).reshape(2, 4, 4), F.normalize(torch.randn(2, 4, 16), dim=-1)
    boxes[0, [3, 1]], regions[0, [3, 1]] = targets[0], descriptions[:2]  # queries 3 and 1 hold image 0's objects
    boxes[1, [0, 2, 1]], regions[1, [0, 2, 1]] = targets[1], descriptions[2:]
    terms = region_description_loss(boxes, regions, targets, descriptions, torch.tensor(100.0))
    assert terms["box"].item() < 1e-5 and terms["region"].item() < 1e-5 and terms["region_accuracy"] == 1.0
    shuffled = region_description_loss(boxes, regions, targets, descriptions.roll(1, 0), torch.tensor(100.0))
    assert shuffled["region"] > 10 and shuffled["region_accuracy"] == 0.0  # each query against another's description
    with pytest.raises(ValueError, match="5 boxes but 4 descriptions were given; give one description per true box"):
        region_description_loss(boxes, regions, targets, descriptions[:4], torch.tensor(100.0))


def test_region_losses_fall_when_predictions_are_trained() -> None:
    generator = torch.Generator().manual_seed(0)
    targets = [random_boxes(3, generator), random_boxes(1, generator)]
    descriptions = F.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    box_logits = torch.randn(2, 5, 4, generator=generator, requires_grad=True)
    region_weights = torch.randn(2, 5, 16, generator=generator, requires_grad=True)
    optimizer = torch.optim.Adam([box_logits, region_weights], lr=0.05)
    history = []
    for _ in range(40):
        terms = region_description_loss(box_logits.sigmoid(), F.normalize(region_weights, dim=-1), targets,
                                        descriptions, torch.tensor(10.0))
        optimizer.zero_grad()
        (terms["box"] + terms["region"]).backward()
        optimizer.step()
        history.append((terms["box"].item(), terms["region"].item()))
    assert history[-1][0] < 0.3 * history[0][0] and history[-1][1] < 0.3 * history[0][1], history


def tiny_grain() -> GRAIN:
    torch.manual_seed(0)
    return GRAIN(tokenizer=ByteTokenizer(context_length=64), decoder_dropout=0.0)


def test_ground_gives_each_phrase_the_box_of_its_most_similar_query_in_pixels() -> None:
    method = tiny_grain().eval()
    images = torch.randn(2, 3, 32, 32)
    phrases = [["a small red apple in the top left", "a grinning face"], ["a blue car"]]
    grounded = method.ground(images, phrases)
    _, boxes, regions = method.decode(images)
    texts = method.encode_text(method.tokenizer(phrases[0] + phrases[1]))
    for image, (sample, found, embedded) in enumerate(zip(phrases, grounded, (texts[:2], texts[2:]))):
        cx, cy, w, h = boxes[image, (embedded @ regions[image].T).argmax(1)].unbind(-1)
        expected = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * 32  # the input is 32 px
        assert found.shape == (len(sample), 4)
        torch.testing.assert_close(found, expected.detach())
    assert method.ground(images[:1], [[]])[0].shape == (0, 4)


def test_a_batch_without_boxes_gets_one_sentence() -> None:
    method = tiny_grain()
    batch = {"image": torch.randn(2, 3, 32, 32), "text": method.tokenizer(["a", "b"])}
    with pytest.raises(ValueError, match=r"^GRAIN needs object boxes and region descriptions .* train it on scene "
                                         r"shards \(`vlp-data scenes data/scenes`\)"):
        method.forward_loss(batch)


def scene_datamodule(shards: str, method: GRAIN) -> ImageTextDataModule:
    datamodule = ImageTextDataModule(train_shards=shards, batch_size=8, num_workers=0)
    datamodule.trainer = SimpleNamespace(lightning_module=method, global_rank=0, world_size=1, current_epoch=0,
                                         training=True, loggers=[])
    datamodule.setup("fit")
    return datamodule


def test_grain_overfits_a_scene_training_batch(scene_shards: Path) -> None:
    method = tiny_grain()
    datamodule = scene_datamodule(str(scene_shards / "train-000000.tar"), method)
    batch = datamodule.on_after_batch_transfer(datamodule.on_before_batch_transfer(
        next(iter(datamodule.train_dataloader())), 0), 0)
    assert {"boxes", "objects", "meta", "text"} <= set(batch) and sum(len(boxes) for boxes in batch["boxes"]) > 8
    optimizer = torch.optim.AdamW(method.parameters(), lr=3e-3)
    history = []
    for _ in range(15):
        outputs = method.forward_loss(batch)
        optimizer.zero_grad()
        outputs["loss"].backward()
        optimizer.step()
        history.append({name: outputs[name].item() for name in ("loss", "caption", "box", "region")})
    assert all(np.isfinite(step["loss"]) for step in history)
    for name in ("loss", "box", "region"):
        assert np.mean([step[name] for step in history[-3:]]) < 0.7 * history[0][name], (name, history)


def test_grain_on_shards_without_instances_stops_at_setup(make_shards, tmp_path: Path) -> None:
    plain = make_shards(tmp_path, n=6, per_shard=6)
    with pytest.raises(DataConfigError, match=r"GRAIN needs object boxes .* use scene shards"):
        scene_datamodule(plain.pattern, tiny_grain())


def test_patch_similarity_boxes_cover_the_patches_near_the_best() -> None:
    similarity = torch.zeros(2, 4, 4)
    similarity[0, 1, 2], similarity[0, 2, 3], similarity[0, 0, 0] = 1.0, 0.8, 0.3  # the 0.3 patch stays out
    similarity[1, 3, 0] = 0.5  # a map whose best patch is its only one above the rest
    similarity[1] -= 1.0
    boxes = patch_similarity_boxes(similarity, height=32, width=64)
    torch.testing.assert_close(boxes, torch.tensor([[32.0, 8.0, 64.0, 24.0], [0.0, 24.0, 16.0, 32.0]]))


def test_patch_text_grounding_scores_clip_through_phrase_grounding(scene_shards: Path) -> None:
    torch.manual_seed(0)
    clip = CLIP(tokenizer=ByteTokenizer(context_length=64)).eval()
    metrics = PhraseGrounding(str(scene_shards / "val-000000.tar"), name="val").evaluate(None,
                                                                                         PatchTextGrounding(clip))
    assert set(metrics) == {"grounding/val/acc@0.5", "grounding/val/mean_iou"}
    assert 0.0 <= metrics["grounding/val/acc@0.5"] <= 1.0 and 0.0 < metrics["grounding/val/mean_iou"] < 1.0
    with pytest.raises(ValueError, match="PatchTextGrounding needs a CLIP-family method with an image_projection"):
        PatchTextGrounding(torch.nn.Linear(2, 2))
