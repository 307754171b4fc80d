"""UrbanCLIP and its indicator probe.

`RegressionProbe` (UrbanCLIP's frozen-embedding MLP) must recover a target that is a function of the features, score
about zero where the features carry nothing about it, match scikit-learn's ridge regression for its reference, and
stop with one sentence on a sample without a numeric target; UrbanCLIP is CoCa with both loss weights 1, its
temperature clamped to [1, 100] and every parameter decayed; the emoji source writes a numeric `added_in`.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.linear_model import Ridge
from torch import Tensor, nn

from data_modules.sources.emoji import emoji_source
from data_modules.views import IMAGENET_MEAN, IMAGENET_STD, SingleCrop, Views
from vlp_lightning.callbacks import RegressionProbe, regression_metrics, regression_probe_predictions, ridge_predictions
from vlp_lightning.callbacks.features import EvalFeatures
from vlp_lightning.callbacks.regression_probe import numeric_targets
from vlp_lightning.methods import CoCa, UrbanCLIP
from vlp_lightning.methods.base import VLPMethod

#: a quick probe for the tests (the official recipe is batch 2 for 100 epochs).
FAST = {"epochs": 40, "batch_size": 8}


def linear_data(count: int, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(count, dim, generator=generator)
    weight = torch.linspace(-1, 1, dim)
    return features, 3 * features @ weight + 10 + 0.05 * torch.randn(count, generator=generator)


def test_the_probe_recovers_a_linear_target_deterministically():
    train, train_targets = linear_data(160, 8, seed=0)
    test, test_targets = linear_data(80, 8, seed=1)
    predictions = regression_probe_predictions(train, train_targets, test, **FAST)
    metrics = regression_metrics(predictions, test_targets)
    assert metrics["R2"] > 0.9, metrics
    assert metrics["RMSE"] < 0.5 * test_targets.std().item() and metrics["MAE"] < metrics["RMSE"] * 1.01
    torch.testing.assert_close(regression_probe_predictions(train, train_targets, test, **FAST), predictions)
    ridge = regression_metrics(ridge_predictions(train, train_targets, test), test_targets)
    assert ridge["R2"] > 0.99


def test_noise_targets_and_uninformative_features_score_no_r2():
    train, _ = linear_data(160, 8, seed=0)
    test, test_targets = linear_data(80, 8, seed=1)
    noise = torch.Generator().manual_seed(2)
    train_noise, test_noise = torch.randn(160, generator=noise), torch.randn(80, generator=noise)
    assert regression_metrics(regression_probe_predictions(train, train_noise, test, **FAST), test_noise)["R2"] < 0.05
    assert regression_metrics(ridge_predictions(train, train_noise, test), test_noise)["R2"] < 0.05
    constant = torch.ones(160, 8), torch.ones(80, 8)  # an encoder that says nothing about the image
    _, train_targets = linear_data(160, 8, seed=0)
    flat = regression_probe_predictions(constant[0], train_targets, constant[1], **FAST)
    assert regression_metrics(flat, test_targets)["R2"] <= 0.0
    assert regression_metrics(ridge_predictions(constant[0], train_targets, constant[1]), test_targets)["R2"] <= 0.0


def test_ridge_reference_matches_scikit_learn():
    train, train_targets = linear_data(30, 40, seed=3)  # more features than samples: the penalty matters
    test, _ = linear_data(10, 40, seed=4)
    reference = Ridge(alpha=2.0).fit(train.double().numpy(), train_targets.double().numpy())
    ours = ridge_predictions(train, train_targets, test, alpha=2.0)
    torch.testing.assert_close(ours, torch.from_numpy(reference.predict(test.double().numpy())))


def features_with(meta: list[dict] | None) -> EvalFeatures:
    count = 2 if meta is None else len(meta)
    return EvalFeatures(torch.zeros(count, 3), ["a", "b"][:count], None, None, meta, torch.zeros(0, 3, 64, 64).byte())


def test_targets_are_numbers_or_one_sentence_naming_the_sample_and_field():
    assert numeric_targets(features_with([{"v": 1}, {"v": "2.5"}]), "v", "s.tar").tolist() == [1.0, 2.5]
    with pytest.raises(ValueError, match=r"target_field='v': sample 'b' of s.tar has no such .json field.*\(this one "
                                         r"has w\)"):
        numeric_targets(features_with([{"v": 1.0}, {"w": 2.0}]), "v", "s.tar")
    for bad in ("old", None, True, float("nan"), [1.0]):
        with pytest.raises(ValueError, match=r"target_field='v': sample 'b' of s.tar has the value .* not a finite"):
            numeric_targets(features_with([{"v": 1.0}, {"v": bad}]), "v", "s.tar")
    with pytest.raises(ValueError, match=r"target_field='v': the samples of s.tar have no .json member"):
        numeric_targets(features_with(None), "v", "s.tar")


# ------------------------------------------------------------------ the callback on shards, with a fixed encoder


class MeanColour(VLPMethod):
    """A fixed encoder: an image is its mean colour (the joint space and the probe features alike)."""

    required_keys = ("image",)

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    @property
    def image_size(self) -> int:
        return 16

    def train_views(self) -> Views:
        return SingleCrop()

    def encode_image(self, images: Tensor) -> Tensor:
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (images.float() * std + mean).mean((2, 3)) + self.anchor

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        return {"loss": self.anchor * 0}


class ProbeOnly(MeanColour):
    encode_image = VLPMethod.encode_image

    def probe_features(self, images: Tensor) -> Tensor:
        return MeanColour.encode_image(self, images)


def colour_shards(path: Path, count: int, seed: int, write_tar, constant: bool = False) -> str:
    """Flat-colour images whose `.json` "redness" is a linear function of the red channel."""
    rng, samples = random.Random(seed), []
    for index in range(count):
        red = rng.randrange(30, 230)
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (red, 90, 90)).save(buffer, format="PNG")
        meta = {"redness": 1.0 if constant else 2 + red / 50, "name": f"tile {index}"}
        samples.append({"__key__": f"{seed}{index:04d}", "png": buffer.getvalue(), "json": json.dumps(meta).encode()})
    return str(write_tar(path, samples))


def test_regression_probe_callback_on_shards(tmp_path, write_tar):
    train = colour_shards(tmp_path / "train.tar", 32, seed=0, write_tar=write_tar)
    test = colour_shards(tmp_path / "test.tar", 16, seed=1, write_tar=write_tar)
    probe = RegressionProbe(train, test, "redness", name="tiles", ridge_alpha=0.01)  # the MLP: batch 2, 100 epochs
    with torch.no_grad():
        metrics = probe.evaluate(None, MeanColour())
    assert set(metrics) == {f"regression/tiles/{name}" for name in ("R2", "RMSE", "MAE", "MAPE", "ridge_R2")}
    assert metrics["regression/tiles/R2"] > 0.9 and metrics["regression/tiles/ridge_R2"] > 0.99, metrics
    assert metrics["regression/tiles/RMSE"] < 0.4  # redness spans 2.6 ... 6.6

    with pytest.raises(ValueError, match=r"target_field='name': sample '00000' of .* has the value 'tile 0'"):
        RegressionProbe(train, test, "name").evaluate(None, MeanColour())
    with pytest.raises(ValueError, match=r"target_field='population': sample '00000' of .* has no such .json field"):
        RegressionProbe(train, test, "population").evaluate(None, MeanColour())
    with pytest.raises(ValueError, match=r"representation='joint' needs .* ProbeOnly has not; use representation="):
        RegressionProbe(train, test, "redness").evaluate(None, ProbeOnly())
    flat = colour_shards(tmp_path / "flat.tar", 8, seed=2, write_tar=write_tar, constant=True)
    with pytest.raises(ValueError, match=r"target_field='redness' is 1 in every sample of .*flat.tar; .* varies"):
        RegressionProbe(flat, test, "redness").evaluate(None, MeanColour())


# ------------------------------------------------------------------ UrbanCLIP


def test_urbanclip_is_coca_with_both_loss_weights_one():
    torch.manual_seed(0)
    method = UrbanCLIP().eval()
    assert (method.caption_weight, method.contrastive_weight) == (1.0, 1.0) and isinstance(method, CoCa)
    assert CoCa().caption_weight == 2.0  # CoCa's own λ_Cap
    text = method.tokenizer(["red tile", "a green park", "river"])
    outputs = method.forward_loss({"image": torch.randn(3, 3, 32, 32), "text": text})
    torch.testing.assert_close(outputs["loss"], outputs["contrastive"] + outputs["caption"])


def test_urbanclip_clamps_its_temperature_and_decays_every_parameter():
    method = UrbanCLIP()
    for start, clamped in ((-1.0, 0.0), (10.0, math.log(100))):
        method.logit_scale.data.fill_(start)
        method.after_optimizer_step()
        assert method.logit_scale.item() == pytest.approx(clamped)
    assert len(method.parameter_groups()) == 1  # AdamW over model.parameters(), as the official loop
    with pytest.raises(ValueError, match=r"min_logit_scale=0 must be positive"):
        UrbanCLIP(min_logit_scale=0)


def test_emoji_source_writes_added_in_as_a_number(tmp_path):
    package = tmp_path / "package"
    (package / "img" / "google" / "64").mkdir(parents=True)
    (package / "package.json").write_text(json.dumps({"name": "emoji-datasource-google", "version": "16.0.0"}))
    entry = {"name": "MELTING FACE", "short_name": "melting_face", "short_names": ["melting_face"],
             "unified": "1FAE0", "image": "1fae0.png", "category": "Smileys & Emotion", "subcategory": "face-smiling",
             "sort_order": 1, "added_in": "14.0", "has_img_google": True}
    (package / "emoji.json").write_text(json.dumps([entry]))
    Image.new("RGBA", (64, 64), (250, 200, 0, 255)).save(package / "img" / "google" / "64" / "1fae0.png")
    (record,) = emoji_source("google", package, tmp_path / "cache").records
    assert record.meta["added_in"] == 14.0 and record.meta["subcategory_id"] == 0
