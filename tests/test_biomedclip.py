"""BiomedCLIP (Zhang et al. 2023) as released: an MLP text projection, OpenAI CLIP's image normalisation in training
and evaluation alike, 32 epochs."""

from __future__ import annotations

import tarfile
from pathlib import Path

import torch
import yaml
from PIL import Image

from data_modules.views import IMAGENET_MEAN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, EvalView
from vlp_lightning.callbacks.features import extract_features, to_thumbnails
from vlp_lightning.methods import CLIP
from vlp_lightning.modules import GELUMLPProjection, VisionEncoder

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def tiny_clip(**overrides) -> CLIP:
    vision = VisionEncoder(
        "vit_tiny_patch16_224", img_size=16, patch_size=8, width=32, depth=1, num_heads=2,
        mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
    )
    return CLIP(vision=vision, embed_dim=16, **overrides)


def test_mlp_text_projection_is_open_clips_and_trains():
    method = tiny_clip(text_projection_type="mlp")
    assert isinstance(method.text_projection, GELUMLPProjection)
    assert isinstance(tiny_clip().text_projection, torch.nn.Linear)
    tokens = method.tokenizer(["a cell", "an x-ray"])
    method.encode_text(tokens).sum().backward()
    assert all(p.grad is not None for p in method.text_projection.parameters())


def test_tower_normalisation_reaches_train_views_and_evaluation(make_shards, tmp_path, monkeypatch):
    """The encoder sees eval images normalised like its training views (OpenAI CLIP's mean / std here, not
    ImageNet's), and the thumbnails undo that same normalisation."""
    method = tiny_clip().eval()
    assert method.train_views().normalization == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    shards = make_shards(tmp_path, n=4, per_shard=4, image_size=16)
    seen = []
    probe = method.probe_features
    monkeypatch.setattr(method, "probe_features", lambda images: seen.append(images) or probe(images))
    with torch.no_grad():
        features = extract_features(method, shards.pattern, batch_size=4)
    with tarfile.open(shards.urls[0]) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".png"))
        image = Image.open(archive.extractfile(member)).convert("RGB")
    expected = EvalView(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD).build(16)(image)
    assert torch.allclose(seen[0][0], expected, atol=1e-5)
    thumbnail = to_thumbnails(expected[None], mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)[0]
    assert torch.equal(features.thumbnails[0], thumbnail)
    assert OPENAI_CLIP_MEAN != IMAGENET_MEAN


def test_biomedclip_preset_is_the_released_configuration():
    config = yaml.safe_load((EXPERIMENTS / "biomedclip" / "pmc15m_paper.yaml").read_text())
    model = config["model"]["init_args"]
    assert config["trainer"]["max_epochs"] == 32
    assert model["text_projection_type"] == "mlp"
    vision = model["vision"]["init_args"]
    assert tuple(vision["mean"]) == OPENAI_CLIP_MEAN and tuple(vision["std"]) == OPENAI_CLIP_STD
