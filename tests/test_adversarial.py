"""PGD stays in its ε-ball and the pixel range, lowers a classifier's accuracy; the callback reports clean >= pgd."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from vlp_lightning import methods
from vlp_lightning.callbacks import AdversarialRobustness, pgd_attack
from vlp_lightning.callbacks.features import evaluation_mode


def test_pgd_stays_in_the_ball_and_breaks_a_linear_classifier():
    torch.manual_seed(0)
    pixels = torch.rand(64, 3, 4, 4)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    labels = classifier(pixels).argmax(1)  # the classifier is right on every clean image
    adversarial = pgd_attack(classifier, pixels, labels, lambda x: x, epsilon=0.1, step_size=0.02, steps=20)
    assert (adversarial - pixels).abs().max() <= 0.1 + 1e-6 and adversarial.min() >= 0 and adversarial.max() <= 1
    assert (classifier(adversarial).argmax(1) == labels).float().mean() < 0.5
    unchanged = pgd_attack(classifier, pixels, labels, lambda x: x, epsilon=0.0, step_size=0.02, steps=3)
    assert torch.equal(unchanged, pixels)


def test_robustness_callback_scores_a_classifier(tiny_clip_checkpoint, make_shards, tmp_path):
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16, image_size=32, num_classes=4)
    method = methods.DRTune(pretrained=tiny_clip_checkpoint, classnames_from=shards.pattern, regularize=False)
    callback = AdversarialRobustness(shards.pattern, epsilon=8 / 255, steps=3, batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with evaluation_mode(trainer, method):
        metrics = callback.evaluate(trainer, method)
    assert set(metrics) == {"robustness/pgd/clean", "robustness/pgd/pgd"}
    assert 0 <= metrics["robustness/pgd/pgd"] <= metrics["robustness/pgd/clean"] <= 1
    clip_method = methods.CoOp(pretrained=tiny_clip_checkpoint, classnames_from=shards.pattern)
    assert callback.evaluate(trainer, clip_method) == {}  # no classify(): skipped with a warning
