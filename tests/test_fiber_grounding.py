"""FIBER's fine-grained stage (phrase grounding on scene shards) and the PhraseGrounding callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data_modules.instances import object_phrases
from data_modules.pipeline import make_eval_loader
from data_modules.views import EvalView
from vlp_lightning.callbacks import PhraseGrounding, constant_box_grounding
from vlp_lightning.losses.grounding import boxes_to_normalised, match_predictions, normalised_to_boxes
from vlp_lightning.methods import FIBER
from vlp_lightning.modules.tokenizers import ByteTokenizer


def fine_fiber() -> FIBER:
    torch.manual_seed(0)
    return FIBER(stage="fine", tokenizer=ByteTokenizer(context_length=192))


def scene_batch(shards: Path, method: FIBER, count: int = 8) -> dict:
    loader = make_eval_loader(str(shards / "train-000000.tar"), method.image_size, batch_size=count,
                              view=EvalView(mean=method.vision.mean, std=method.vision.std))
    return next(iter(loader))


def test_box_conversions_round_trip() -> None:
    boxes = torch.tensor([[0.0, 0.0, 64.0, 48.0], [8.0, 12.0, 24.0, 40.0]])
    normalised = boxes_to_normalised(boxes, height=48, width=64)
    torch.testing.assert_close(normalised, torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 26 / 48, 0.25, 28 / 48]]))
    torch.testing.assert_close(normalised_to_boxes(normalised, height=48, width=64), boxes)


def test_matcher_assigns_the_obvious_pairs() -> None:
    targets = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.3, 0.2, 0.2], [0.5, 0.8, 0.3, 0.1]])
    boxes = torch.tensor([[0.7, 0.3, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1], [0.5, 0.8, 0.3, 0.1], [0.4, 0.4, 0.5, 0.5],
                          [0.2, 0.2, 0.1, 0.1]])
    logits = torch.full((5, 3), -4.0)
    logits[[4, 0, 2], [0, 1, 2]] = 4.0
    queries, phrases = match_predictions(logits, boxes, targets, 2.0, 5.0, 2.0)
    assert dict(zip(phrases.tolist(), queries.tolist())) == {0: 4, 1: 0, 2: 2}


def test_grounding_loss_falls_on_a_fixed_scene_batch(scene_shards: Path) -> None:
    method = fine_fiber()
    batch = scene_batch(scene_shards, method)
    assert method.required_keys == ("image", "boxes") and sum(len(boxes) for boxes in batch["boxes"]) > 8
    optimizer = torch.optim.AdamW(p for p in method.parameters() if p.requires_grad)
    losses = []
    for _ in range(25):
        outputs = method.forward_loss(batch)
        optimizer.zero_grad()
        outputs["loss"].backward()
        optimizer.step()
        losses.append(outputs["loss"].item())
    assert all(np.isfinite(losses)) and {"align", "l1", "giou"} <= set(outputs)
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses


def test_ground_returns_boxes_in_pixels_of_the_input(scene_shards: Path) -> None:
    method = fine_fiber().eval()
    batch = scene_batch(scene_shards, method, count=3)
    phrases = [object_phrases(meta, objects) for meta, objects in zip(batch["meta"], batch["objects"])]
    grounded = method.ground(batch["image"], phrases)
    boxes, logits, counts = method.grounding_outputs(batch["image"], phrases)
    assert counts == [len(sample) for sample in phrases]
    for image, (sample, found) in enumerate(zip(phrases, grounded)):
        best = logits[image, :, : len(sample)].argmax(0)
        cx, cy, w, h = boxes[image, best].unbind(-1)
        expected = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * 32  # the input is 32 px
        assert found.shape == (len(sample), 4)
        torch.testing.assert_close(found, expected)
        assert found.min() >= -32 and found.max() <= 64 and (found[:, 2:] > found[:, :2]).all()


class BoxAnswers(nn.Module):
    """A stand-in method whose `ground` answers each batch's phrases with the next of `answers` (per image, [K, 4])."""

    image_size = 48

    def __init__(self, answers: list[torch.Tensor]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.answers = iter(answers)

    def train_views(self) -> EvalView:
        return EvalView()

    def ground(self, images: torch.Tensor, phrases: list[list[str]]) -> list[torch.Tensor]:
        answers = [next(self.answers) for _ in phrases]
        assert [len(answer) for answer in answers] == [len(sample) for sample in phrases]
        return answers


def true_boxes(shards: str) -> list[torch.Tensor]:
    return [boxes for batch in make_eval_loader(shards, 48, batch_size=4) for boxes in batch["boxes"]]


def test_phrase_grounding_scores_an_oracle_one_and_a_constant_box_as_by_hand(scene_shards: Path) -> None:
    shards = str(scene_shards / "unseen-000000.tar")
    truth = true_boxes(shards)
    oracle = PhraseGrounding(shards, name="unseen", batch_size=4).evaluate(None, BoxAnswers(truth))
    assert oracle == {"grounding/unseen/acc@0.5": 1.0, "grounding/unseen/mean_iou": pytest.approx(1.0)}

    box = np.float32([0, 0, 24, 24])
    every = np.concatenate([boxes.numpy() for boxes in truth])
    inter = (np.minimum(every[:, 2:], box[2:]) - np.maximum(every[:, :2], box[:2])).clip(0).prod(1)
    iou = inter / ((every[:, 2:] - every[:, :2]).prod(1) + 24 * 24 - inter)
    constant = [torch.from_numpy(box).expand(len(boxes), 4) for boxes in truth]
    metrics = PhraseGrounding(shards, name="unseen", batch_size=4).evaluate(None, BoxAnswers(constant))
    assert metrics["grounding/unseen/acc@0.5"] == pytest.approx((iou >= 0.5).mean())
    assert metrics["grounding/unseen/mean_iou"] == pytest.approx(iou.mean(), abs=1e-6)

    whole = constant_box_grounding(shards, 48, kind="whole")
    areas = (every[:, 2:] - every[:, :2]).prod(1)
    assert whole["mean_iou"] == pytest.approx((areas / 48**2).mean(), abs=1e-6)
    assert 0 < constant_box_grounding(shards, 48)["mean_iou"] < 1


def test_a_method_without_ground_is_skipped_with_one_warning(scene_shards: Path) -> None:
    callback = PhraseGrounding(str(scene_shards / "val-000000.tar"))
    with pytest.warns(UserWarning, match="has no ground") as warnings:
        assert callback.evaluate(None, FIBER()) == {} and callback.evaluate(None, FIBER()) == {}
    assert len([w for w in warnings if "has no ground" in str(w.message)]) == 1
