"""Shared tests every method in the index must pass (solo-learn / timm style: parametrized over the registry).

Each method is built with its constructor defaults (which are tiny by contract), fed batches made by its own
`train_views()` and tokenizer, and must: give a finite loss, overfit a fixed batch (the loss falls), encode images to
[N, D] (probe features, and unit joint-space embeddings where the method has a joint space), and run a Lightning
`fast_dev_run`.
"""

from __future__ import annotations

import inspect
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader

from data_modules.clips import sampled_segments
from vlp_lightning import catalog, methods
from vlp_lightning.methods.adaptation.base import AdaptationMethod
from vlp_lightning.methods.base import VLPMethod
from vlp_lightning.methods.video.base import VideoTextMethod

METHOD_NAMES = methods.method_names()
CAPTIONS = ["red apple", "grinning face", "blue car", "green tree", "cat face", "smiling sun", "rain cloud", "dog"]


def make_batch(method: VLPMethod, batch_size: int = 8, seed: int = 0) -> dict:
    """A batch as the data modules produce it, through the method's own views and tokenizer."""
    if method.view_kind == "clip":  # the video family: clips through the method's clip views
        return make_video_batch(method, batch_size, seed)
    rng = np.random.default_rng(seed)
    transform = method.train_views().build(method.image_size)
    views = []
    for index in range(batch_size):
        pixels = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
        pixels[..., index % 3] = 255  # give images some structure to match with captions
        views.append(transform(Image.fromarray(pixels)))
    if isinstance(views[0], (list, tuple)):
        images = [torch.stack([v[i] for v in views]) for i in range(len(views[0]))]
    else:
        images = torch.stack(views)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    batch = {"image": images, "caption": captions, "label": torch.arange(batch_size) % 4,
             "__key__": [f"{i:04d}" for i in range(batch_size)]}
    if method.tokenizer is not None:
        batch["text"] = method.tokenizer(captions)
    if "boxes" in method.required_keys:
        batch.update(scene_objects(batch_size, method.image_size))
    if "long_caption" in method.required_keys:  # long captions, several sentences each (DreamLIP)
        batch["long_caption"] = [f"One {caption} in the centre. A {CAPTIONS[(i + 3) % len(CAPTIONS)]} is on the "
                                 f"left. The {caption} is big." for i, caption in enumerate(captions)]
    return batch


def scene_objects(batch_size: int, size: int) -> dict:
    """`boxes`, `objects` and `meta` as `ImageTextDataModule` gives them on scene shards (`data_modules.instances`):
    per image one or two objects, their boxes in the view's pixels and the `.json` they index, with a region
    description each (what `object_phrases(meta, objects, "regions")` reads)."""
    boxes, objects, metas = [], [], []
    for index in range(batch_size):
        half = size / 2
        left, top = half * (index % 2), half * (index // 2 % 2)
        kept = [[left, top, left + half, top + half], [size / 4, size / 4, size * 3 / 4, size * 3 / 4]]
        kept = kept[: 1 + index % 2]
        names = [CAPTIONS[(index + step) % len(CAPTIONS)] for step in range(len(kept))]
        boxes.append(torch.tensor(kept))
        objects.append(torch.arange(len(kept)))
        metas.append({"objects": [{"name": name, "box": box} for name, box in zip(names, kept)],
                      "regions": [f"a {name} at {round(box[0])}, {round(box[1])}" for name, box in zip(names, kept)]})
    return {"boxes": boxes, "objects": objects, "meta": metas}


def make_video_batch(method: VLPMethod, batch_size: int = 8, seed: int = 0, frames: int = 8) -> dict:
    """A clip batch as `VideoDataModule` produces it, through the method's clip views: `video` [B, T, 3, S, S],
    `frame_times`, captions and their tokens, and `segments` (two halves of each 1-fps clip, mapped onto the sampled
    frames)."""
    rng = np.random.default_rng(seed)
    transform = method.train_views().build(method.image_size)
    clips, times, segments = [], [], []
    for index in range(batch_size):
        pixels = rng.integers(0, 255, (frames, 48, 48, 3), dtype=np.uint8)
        pixels[:, :, :, index % 3] = 255
        pixels[np.arange(frames), :, (np.arange(frames) * 5 + index) % 48] = 0  # a bar moving across the frames
        indices = transform.sample(frames, random.Random(seed * 100 + index))
        clips.append(transform.crop(pixels[indices], random.Random(index)))
        times.append([float(i) for i in indices])  # 1 fps
        timeline = [(0.0, frames / 2, CAPTIONS[index % len(CAPTIONS)].split()[0]),
                    (frames / 2, float(frames), CAPTIONS[index % len(CAPTIONS)].split()[-1])]
        segments.append(sampled_segments(timeline, times[-1]))
    packed, recipe, _ = transform.pack(clips, seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    batch = {"video": recipe.finish(packed), "frame_times": torch.tensor(times), "segments": segments,
             "caption": captions, "label": torch.arange(batch_size) % 4,
             "__key__": [f"{i:04d}" for i in range(batch_size)]}
    if method.tokenizer is not None:  # a video-only method (masked video modelling) has no tokenizer
        batch["text"] = method.tokenizer(captions)
    return batch


#: the classes adaptation methods classify in these tests (the batches' labels are 0..3).
ADAPTATION_CLASSES = ["red apple", "grinning face", "blue car", "green tree"]


@pytest.fixture(params=METHOD_NAMES)
def method(request) -> VLPMethod:
    torch.manual_seed(0)
    method_class = getattr(methods, request.param)
    if issubclass(method_class, AdaptationMethod):  # starts from a pretrained method: a tiny CLIP made for the test
        return method_class(pretrained=request.getfixturevalue("tiny_clip_checkpoint"), classnames=ADAPTATION_CLASSES)
    if "classnames" in inspect.signature(method_class).parameters:  # a classifier trained from scratch (FFR)
        return method_class(classnames=ADAPTATION_CLASSES)
    return method_class()


def test_forward_loss_is_finite_and_named(method):
    outputs = method.forward_loss(make_batch(method))
    assert "loss" in outputs and outputs["loss"].ndim == 0
    assert all(torch.isfinite(value).all() for value in outputs.values())


def test_loss_falls_on_a_fixed_batch(method):
    batch = make_batch(method)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    method.train()
    losses = []
    for _ in range(12):
        torch.manual_seed(0)  # same masks / crops each step: an overfitting check, not a noise check
        loss = method.forward_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < losses[0], losses


def test_probe_features_and_joint_embeddings_shape(method):
    method.eval()
    images = torch.randn(3, 3, method.image_size, method.image_size)
    if method.view_kind == "clip":  # clips [N, T, 3, H, W]; unit joint-space embeddings where there is one
        images = torch.randn(3, method.num_frames, 3, method.image_size, method.image_size)
        if isinstance(method, VideoTextMethod):
            with torch.no_grad():
                assert torch.allclose(method.encode_video(images).norm(dim=-1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        features = method.probe_features(images)
        assert features.ndim == 2 and features.shape[0] == 3 and torch.isfinite(features).all()
        if is_overridden("encode_image", method, parent=VLPMethod):  # a joint image-text space: unit embeddings
            embeddings = method.encode_image(images)
            assert embeddings.shape[0] == 3 and torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_fast_dev_run(method, tmp_path):
    batches = [make_batch(method, seed=i) for i in range(2)]
    loader = DataLoader(batches, batch_size=None)
    trainer = pl.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    before = [p.detach().clone() for p in method.parameters() if p.requires_grad]
    trainer.fit(method, train_dataloaders=loader)
    after = [p.detach() for p in method.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "fast_dev_run did not update any weight"


def test_train_views_normalise_with_the_image_towers_statistics(method):
    """Views normalise as the tower expects (its `mean` / `std`, e.g. OpenAI CLIP's for BiomedCLIP), so training
    and evaluation (which normalises as the training views do) see the statistics of the tower."""
    method.vision.mean, method.vision.std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    assert method.train_views().normalization == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    # and the catalogue (`vlp methods`, the README table) names the views the method really trains on
    assert catalog.VIEW_KINDS[type(method.train_views()).__name__] == type(method).view_kind


def test_weight_decay_groups_follow_the_method_rule(method):
    groups = method.parameter_groups()
    no_decay = {id(p) for group in groups if group.get("weight_decay") == 0.0 for p in group["params"]}
    trainable = [(name, param) for name, param in method.named_parameters() if param.requires_grad]
    assert sum(len(group["params"]) for group in groups) == len(trainable)  # every trainable tensor, once
    for name, param in trainable:
        exempt = (method.exempt_gains_and_biases and param.ndim <= 1) or any(
            fragment in name for fragment in method.no_weight_decay_names
        )
        assert (id(param) in no_decay) == exempt, name


def test_clip_memoises_a_locked_text_tower_and_matches_the_uncached_features():
    from vlp_lightning.modules import TextTransformer

    torch.manual_seed(0)
    method = methods.CLIP(text=TextTransformer(vocab_size=258, context_length=32, width=32, layers=1, heads=2,
                                               locked=True))
    tokens = method.tokenizer(["red apple", "blue car", "red apple"])
    direct = method.text(tokens)
    calls = []
    method.text.register_forward_hook(lambda module, inputs, output: calls.append(output.shape[0]))
    assert torch.allclose(method.text_features(tokens), direct, atol=1e-6)
    assert torch.allclose(method.text_features(tokens), direct, atol=1e-6)
    assert calls == [2]  # two distinct captions, encoded once
