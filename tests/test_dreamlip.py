"""DreamLIP and the caption sources: the multi-positive and grouping losses (losses/subcaption.py), the method's
sub-caption draw and config errors, `ImageTextDataModule.caption_source` (short / long / mixed) and its composition
with `caption_sampling` and PTP's position prompts, and `Retrieval(caption_source="long")`."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import draw_sample, png_bytes, write_tar  # noqa: E402
from data_modules.captions import caption_from_source
from data_modules.datamodules import ImageTextDataModule
from data_modules.pipeline import DataConfigError, SampleDecoder, expand_shards, make_loader
from data_modules.views import EvalView, SingleCrop
from vlp_lightning.callbacks import Retrieval
from vlp_lightning.callbacks.features import EvalFeatures
from vlp_lightning.losses.contrastive import clip_contrastive_loss
from vlp_lightning.losses.subcaption import (
    multi_positive_contrastive_loss,
    subcaption_grouping_loss,
    subcaption_grouping_weights,
)
from vlp_lightning.methods import DreamLIP
from vlp_lightning.methods.contrastive.dreamlip import draw_subcaptions
from vlp_lightning.modules.tokenizers import ByteTokenizer


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


# ------------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("local_loss", [False, True])
def test_multi_positive_loss_with_one_positive_is_clips_loss(local_loss: bool) -> None:
    torch.manual_seed(0)
    images, texts = unit(12, 16), unit(12, 16)
    for scale in (1.0, 14.3, 100.0):
        expected = clip_contrastive_loss(images, texts, scale, local_loss=local_loss)
        got = multi_positive_contrastive_loss(images, texts[:, None], scale, local_loss=local_loss)
        assert torch.allclose(got, expected, atol=1e-5), (scale, got, expected)


def test_multi_positive_loss_is_the_mean_log_likelihood_of_every_positive() -> None:
    """A reference by loops: image i -> each of its K texts among all N*K; each text -> its image among all N."""
    torch.manual_seed(1)
    count, positives, scale = 5, 3, 10.0
    images, texts = unit(count, 8), unit(count, positives, 8)
    flat = texts.reshape(-1, 8)
    image_to_text = torch.stack([-(scale * images[i] @ flat.T).log_softmax(0)[i * positives + k]
                                 for i in range(count) for k in range(positives)]).mean()
    text_to_image = torch.stack([-(scale * texts[i, k] @ images.T).log_softmax(0)[i]
                                 for i in range(count) for k in range(positives)]).mean()
    got = multi_positive_contrastive_loss(images, texts, scale)
    assert torch.allclose(got, 0.5 * (image_to_text + text_to_image), atol=1e-5)


def test_grouping_weights_are_sparse_thresholded_and_sum_to_one() -> None:
    torch.manual_seed(2)
    similarity = torch.randn(4, 3, 64)  # [N, K, P]
    for threshold in (None, 0.1, 0.5):
        weights = subcaption_grouping_weights(similarity, threshold)
        sigma = 1 / 64 if threshold is None else threshold
        low, high = similarity.amin(-1, keepdim=True), similarity.amax(-1, keepdim=True)
        below = (similarity - low) / (high - low) < sigma
        assert (weights >= 0).all() and torch.allclose(weights.sum(-1), torch.ones(4, 3), atol=1e-6)
        assert (weights[below] == 0).all() and (weights[~below] > 0).all()
        assert (weights.gather(-1, similarity.argmin(-1, keepdim=True)) == 0).all()  # the least similar: dropped
        assert (weights.gather(-1, similarity.argmax(-1, keepdim=True)) > 0).all()  # the most similar: always kept
    assert (subcaption_grouping_weights(similarity, 0.5) == 0).float().mean() > 0.3  # a high σ: most patches out
    with pytest.raises(ValueError, match=r"threshold σ must lie in \[0, 1\).*got 1.5"):
        subcaption_grouping_weights(similarity, 1.5)


def test_losses_fall_when_their_inputs_are_optimised() -> None:
    torch.manual_seed(3)
    images = torch.randn(6, 16, requires_grad=True)
    texts = torch.randn(6, 3, 16, requires_grad=True)
    patches = torch.randn(6, 9, 16, requires_grad=True)
    optimizer = torch.optim.Adam([images, texts, patches], lr=0.05)
    losses = []
    for _ in range(20):
        text_features = F.normalize(texts, dim=-1)
        loss = (multi_positive_contrastive_loss(F.normalize(images, dim=-1), text_features, 10.0)
                + subcaption_grouping_loss(patches, text_features, 10.0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_losses_name_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"image_features \[N, D\] and text_features \[N, K, D\].*\(4, 8\) and"):
        multi_positive_contrastive_loss(unit(4, 8), unit(4, 8), 1.0)
    with pytest.raises(ValueError, match=r"patch_features \[N, P, D\] and text_features \[N, K, D\]"):
        subcaption_grouping_loss(unit(4, 9, 8), unit(3, 2, 8), 1.0)


# ------------------------------------------------------------------------------------------------------ method
def test_subcaptions_are_sentences_drawn_deterministically() -> None:
    long = "Two objects on grass. A red apple is on the left. A blue car is at the top."
    sentences = {"Two objects on grass.", "A red apple is on the left.", "A blue car is at the top."}
    drawn = draw_subcaptions(long, 2, "0:key")
    assert drawn == draw_subcaptions(long, 2, "0:key") and len(set(drawn)) == 2 and set(drawn) <= sentences
    assert set(draw_subcaptions(long, 3, "1:key")) == sentences  # without replacement when there are enough
    assert len(draw_subcaptions("One object on grass.", 3, "0:key")) == 3  # with replacement when too few
    seen = {tuple(draw_subcaptions(long, 1, f"{epoch}:key")) for epoch in range(20)}
    assert len(seen) == 3  # another epoch, another draw


def test_dreamlip_logs_its_three_losses_and_declares_long_captions() -> None:
    torch.manual_seed(0)
    method = DreamLIP()
    captions = ["red apple", "blue car", "green tree", "cat face"]
    batch = {"image": torch.randn(4, 3, 32, 32), "text": method.tokenizer(captions), "__key__": list("abcd"),
             "long_caption": [f"One {caption} on grass. The {caption} is big. It is in the centre."
                              for caption in captions]}
    outputs = method.forward_loss(batch)
    weighted = outputs["clip_loss"] + outputs["multi_positive_loss"] + outputs["grouping_loss"]
    assert torch.allclose(outputs["loss"], weighted)
    assert "long_caption" in DreamLIP.required_keys


@pytest.mark.parametrize(("arguments", "says"), [
    ({"num_subcaptions": 0}, r"num_subcaptions .* at least 1, got 0"),
    ({"grouping_threshold": 1.0}, r"grouping_threshold σ .* got 1.0; pick a value in \[0, 1\)"),
    ({"clip_weight": 0.0, "multi_positive_weight": 0.0, "grouping_weight": 0.0}, r"not all 0"),
    ({"grouping_weight": -1.0}, r"must be >= 0 .*'grouping_weight': -1.0"),
])
def test_dreamlip_bad_config_is_one_sentence(arguments: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        DreamLIP(**arguments)


# ------------------------------------------------------------------------------------------------ caption source
def long_caption_shards(directory: Path, count: int = 24) -> str:
    """Hand-made shards: `.txt` "short k", `.json` long caption "Long k. Second k." (no `.json` for none)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    samples = [{"__key__": f"s{index:03d}", "png": png_bytes(draw_sample(index % 4, 16, rng)),
                "txt": f"short {index}".encode(),
                "json": json.dumps({"long_caption": f"Long {index}. Second {index}."}).encode()}
               for index in range(count)]
    return str(write_tar(directory / "train-000000.tar", samples))


def captions_of(shards: str, **decoder) -> list[str]:
    loader = make_loader(expand_shards(shards), SampleDecoder(EvalView().build(16), with_caption=True, **decoder),
                         batch_size=64, num_workers=0, shuffle=False, pad=False, finish=False, seed=0)
    return [caption for batch in loader for caption in batch["caption"]]


def test_caption_source_reads_short_long_or_either_per_sample(tmp_path: Path) -> None:
    shards = long_caption_shards(tmp_path)
    assert captions_of(shards) == [f"short {index}" for index in range(24)]
    assert captions_of(shards, caption_source="long") == [f"Long {index}. Second {index}." for index in range(24)]
    mixed = captions_of(shards, caption_source="mixed")
    assert mixed == captions_of(shards, caption_source="mixed")  # deterministic: a resumed run reads the same
    longs = [caption.startswith("Long") for caption in mixed]
    assert 4 <= sum(longs) <= 20  # about half of each
    sentences = captions_of(shards, caption_source="long", caption_sampling="sentence")  # composes with sampling
    assert all(re.fullmatch(rf"(Long|Second) {index}\.", caption) for index, caption in enumerate(sentences))
    epochs = {caption_from_source("s", "l", "mixed", f"0:{epoch}", "key") for epoch in range(12)}
    assert epochs == {"s", "l"}  # another epoch, another draw


def test_long_captions_asked_of_shards_without_them_stop_with_one_sentence(make_shards, tmp_path: Path) -> None:
    method = SimpleNamespace(required_keys=("image", "text"), image_size=16, tokenizer=ByteTokenizer(32),
                             train_views=lambda: SingleCrop())
    no_json = make_shards(tmp_path / "plain", n=4, per_shard=4)
    datamodule = ImageTextDataModule(train_shards=no_json.pattern, batch_size=4, num_workers=0, caption_source="long")
    datamodule.trainer = SimpleNamespace(lightning_module=method, global_rank=0, world_size=1)
    with pytest.raises(DataConfigError, match=r"caption_source='long' reads long captions .* no .json members"):
        datamodule.setup("fit")
    dreamlip = SimpleNamespace(**{**vars(method), "required_keys": DreamLIP.required_keys})
    datamodule = ImageTextDataModule(train_shards=no_json.pattern, batch_size=4, num_workers=0)
    datamodule.trainer = SimpleNamespace(lightning_module=dreamlip, global_rank=0, world_size=1)
    with pytest.raises(DataConfigError, match=r"SimpleNamespace needs `long_caption`"):
        datamodule.setup("fit")
    other_json = make_shards(tmp_path / "json", n=4, per_shard=4, with_json=True)  # a .json, but no long caption
    with pytest.raises(DataConfigError, match=r"caption_source='mixed' reads the .json field 'long_caption', which "
                                              r"sample 'train000000' lacks"):
        captions_of(other_json.pattern, caption_source="mixed")
    with pytest.raises(ValueError, match=r"caption_source must be one of \('short', 'long', 'mixed'\), got 'longest'"):
        ImageTextDataModule(train_shards=no_json.pattern, caption_source="longest")


def test_long_captions_compose_with_position_prompts_and_reach_dreamlip(scene_shards: Path) -> None:
    method = SimpleNamespace(required_keys=DreamLIP.required_keys, image_size=48, tokenizer=ByteTokenizer(256),
                             train_views=lambda: SingleCrop(scale=(0.5, 1.0), hflip=True))
    datamodule = ImageTextDataModule(train_shards=str(scene_shards / "train-000000.tar"), batch_size=8,
                                     num_workers=0, caption_source="long", position_prompts=True)
    datamodule.trainer = SimpleNamespace(lightning_module=method, global_rank=0, world_size=1, current_epoch=0,
                                         training=True, loggers=[])
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["long_caption"] == [meta["long_caption"] for meta in batch["meta"]]
    prompted = 0
    for caption, meta in zip(batch["caption"], batch["meta"]):
        assert caption.startswith(meta["long_caption"])
        prompted += bool(re.fullmatch(r" The block [1-9] has a .+\.", caption[len(meta["long_caption"]):]))
    assert prompted >= 4


def test_retrieval_reads_long_captions_from_the_json() -> None:
    features = EvalFeatures(image=torch.zeros(2, 4), keys=["a", "b"], captions=["a\nan a", "b"], labels=None,
                            meta=[{"long_caption": "Long a. More."}, {"long_caption": "Long b."}],
                            thumbnails=torch.zeros(0, 3, 8, 8, dtype=torch.uint8))
    assert Retrieval("x.tar").captions_per_image(features) == [["a", "an a"], ["b"]]
    assert Retrieval("x.tar", caption_source="long").captions_per_image(features) == [["Long a. More."], ["Long b."]]
    features.meta[1] = {}
    with pytest.raises(ValueError, match=r"caption_source='long' needs a .json 'long_caption' in every sample"):
        Retrieval("x.tar", caption_source="long").captions_per_image(features)
    with pytest.raises(ValueError, match=r"caption_source must be 'short' \(.txt\) or 'long'"):
        Retrieval("x.tar", caption_source="medium")
