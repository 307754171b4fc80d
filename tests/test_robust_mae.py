"""RobustMAE (Huang et al. 2023): the frequency prompt leaves the low frequencies alone, the nearest prototype picks
the prompt, only prompts (and the head) train, the two kinds of start, PGD with and without prompts."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from vlp_lightning import methods
from vlp_lightning.callbacks import AdversarialRobustness
from vlp_lightning.callbacks.features import evaluation_mode
from vlp_lightning.modules.visual_prompts import (
    ClusterPrompts,
    FrequencyPrompt,
    cluster_prototypes,
    high_frequency_mask,
    high_pass,
)
from vlp_lightning.pretrained import build_method, save_checkpoint

CLASSES = ["red apple", "grinning face", "blue car", "green tree"]
TINY_MAE_CONFIG = {"class_path": "vlp_lightning.methods.MAE", "init_args": {
    "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2,
    "vision": {"class_path": "vlp_lightning.modules.VisionEncoder", "init_args": {
        "model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "width": 32, "depth": 2,
        "num_heads": 2}},
}}


@pytest.fixture(scope="module")
def tiny_mae_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    mae, _ = build_method(TINY_MAE_CONFIG, "TINY_MAE_CONFIG", "")
    return str(save_checkpoint(mae, tmp_path_factory.mktemp("mae") / "mae.ckpt", TINY_MAE_CONFIG))


def test_frequency_prompt_leaves_the_low_frequencies_untouched():
    torch.manual_seed(0)
    prompt = FrequencyPrompt(16, low_frequency_radius=0.3)
    with torch.no_grad():
        prompt.spectrum.normal_()
    images = torch.randn(2, 3, 16, 16)
    difference = torch.fft.fft2(prompt(images) - images)  # the full (not half) spectrum of what the prompt added
    rows = torch.fft.fftfreq(16).view(-1, 1)
    low = (rows ** 2 + torch.fft.fftfreq(16).view(1, -1) ** 2).sqrt() / 0.5 < 0.3
    assert low.sum() > 1 and difference[..., low].abs().max() < 1e-4
    assert difference[..., ~low].abs().max() > 0.1  # and it does change the medium / high frequencies
    mask = high_frequency_mask(16, 0.3)
    low_part = images - high_pass(images, mask)
    assert torch.allclose(high_pass(low_part, mask), torch.zeros_like(images), atol=1e-5)


def test_nearest_prototype_picks_the_prompt_and_kmeans_finds_the_groups():
    torch.manual_seed(0)
    features = torch.cat([torch.randn(10, 4) * 0.1 + 5, torch.randn(10, 4) * 0.1 - 5])
    prototypes = cluster_prototypes(features, num_clusters=2)
    assert prototypes.shape == (2, 4) and sorted(prototypes[:, 0].round().tolist()) == [-5.0, 5.0]
    prompts = ClusterPrompts(prototypes, lambda: FrequencyPrompt(8, 0.25))
    with torch.no_grad():
        for prompt in prompts.prompts:
            prompt.spectrum.normal_()
    queries = torch.tensor([[4.0] * 4, [-6.0] * 4])
    chosen = prompts.nearest(queries)
    assert chosen.tolist() == torch.cdist(queries, prototypes).argmin(1).tolist() and chosen.unique().numel() == 2
    prompted = prompts(torch.zeros(2, 3, 8, 8), queries)
    assert torch.allclose(prompted[1], prompts.prompts[int(chosen[1])].pattern())
    with pytest.raises(ValueError, match="num_clusters=30 needs between 1 and the 20"):
        cluster_prototypes(features, num_clusters=30)


def test_only_prompts_and_head_train_and_the_mae_stays_bit_identical(tiny_mae_checkpoint, make_shards, tmp_path):
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16, image_size=32, num_classes=4)
    method = methods.RobustMAE(pretrained=tiny_mae_checkpoint, classnames_from=shards.pattern,
                               cluster_shards=shards.pattern, num_clusters=3, adversarial_steps=1)
    assert len(method.cluster_prompts.prompts) == 3
    trainable = {name for name, param in method.named_parameters() if param.requires_grad}
    assert trainable and all(name.startswith(("cluster_prompts.prompts.", "head.")) for name in trainable)
    frozen = {name: value.clone() for name, value in method.pretrained.state_dict().items()}
    images = torch.randn(8, 3, 32, 32)
    batch = {"image": images, "label": torch.arange(8) % 4}
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=0.05)
    method.train()
    losses = []
    for _ in range(8):
        outputs = method.forward_loss(batch)
        optimizer.zero_grad()
        outputs["loss"].backward()
        optimizer.step()
        losses.append(outputs["loss"].item())
    assert "adversarial_accuracy" in outputs and losses[-1] < losses[0], losses
    assert all(torch.equal(value, frozen[name]) for name, value in method.pretrained.state_dict().items())
    assert not method.pretrained.training
    assert any(prompt.spectrum.abs().sum() > 0 for prompt in method.cluster_prompts.prompts)  # prompts learnt


def test_head_pretrained_needs_a_classifier_in_one_sentence(tiny_mae_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"head: pretrained needs a classifier checkpoint .* holds a MAE; use head: "
                                         r"linear or a classifier's checkpoint$"):
        methods.RobustMAE(pretrained=tiny_mae_checkpoint, classnames=CLASSES, head="pretrained")
    config = {"class_path": "vlp_lightning.methods.PEFTClassifier",
              "init_args": {"pretrained": tiny_mae_checkpoint, "classnames": CLASSES, "peft": "linear"}}
    classifier, _ = build_method(config, "test", "")
    checkpoint = str(save_checkpoint(classifier, tmp_path / "classifier.ckpt", config))
    method = methods.RobustMAE(pretrained=checkpoint, head="pretrained")
    assert method.classes.all == CLASSES and method.head is None
    assert {name for name, p in method.named_parameters() if p.requires_grad} == {"cluster_prompts.prompts.0.spectrum"}
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # zero prompts at the start: the prompted classifier is the classifier
        assert torch.allclose(method.classify(images), classifier.eval().classify(images), atol=1e-5)


def test_pgd_callback_scores_with_and_without_prompts(tiny_mae_checkpoint, make_shards, tmp_path):
    shards = make_shards(tmp_path / "shards", n=8, per_shard=8, image_size=32, num_classes=4)
    method = methods.RobustMAE(pretrained=tiny_mae_checkpoint, classnames_from=shards.pattern, combine="replace")
    with torch.no_grad():
        method.cluster_prompts.prompts[0].spectrum.normal_(std=0.5)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with evaluation_mode(trainer, method), torch.inference_mode():  # as `vlp test` calls it
        metrics = AdversarialRobustness(shards.pattern, epsilon=8 / 255, steps=2, batch_size=8).evaluate(trainer,
                                                                                                        method)
        unchanged = AdversarialRobustness(shards.pattern, epsilon=0.0, steps=1, batch_size=8).evaluate(trainer,
                                                                                                      method)
    assert set(metrics) == {f"robustness/pgd/{key}" for key in ("clean", "pgd", "clean_no_prompt", "pgd_no_prompt")}
    for suffix in ("", "_no_prompt"):
        assert 0 <= metrics[f"robustness/pgd/pgd{suffix}"] <= metrics[f"robustness/pgd/clean{suffix}"] <= 1
        assert unchanged[f"robustness/pgd/pgd{suffix}"] == unchanged[f"robustness/pgd/clean{suffix}"]


@pytest.mark.slow
def test_bench_robust_section_runs_end_to_end(tiny_mae_checkpoint, make_shards, tmp_path, monkeypatch):
    """bench/adaptation.py's "robust" section on generated shards, a few steps: both rows, both targets."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import adaptation  # bench/adaptation.py

    monkeypatch.chdir(tmp_path)
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16, image_size=32, num_classes=4)
    rows = adaptation.robust(tiny_mae_checkpoint, 3, tmp_path / "bench", train=shards.pattern,
                             evaluation=shards.pattern, classes_from=shards.pattern, pgd_steps=1)
    assert set(rows) == {"MAE + head, no prompts", "MAE + head + RobustMAE prompts (add)",
                         "MAE + head + RobustMAE prompts (replace)",
                         "MAE + head trained as long as head + prompts, no prompts"}
    assert all(0 <= row["pgd"] <= row["clean"] <= 1 for row in rows.values())
    assert [target.measured is not None for target in adaptation.robust_targets(rows)] == [True] * 6
    assert "| MAE + head + RobustMAE prompts (replace) |" in adaptation.robust_table(rows)
