"""ConVIRT (Zhang et al. 2020) against its paper: the image transformations, and the paper preset's text side."""

from __future__ import annotations

from pathlib import Path

import yaml

from data_modules.views import RandomAffine
from vlp_lightning.methods import ConVIRT

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def test_convirt_views_are_the_papers_five_transformations():
    """Appendix: crop 0.6-1.0, flip p 0.5, affine (20 degrees, 0.1, 0.95-1.05), brightness / contrast in
    [0.6, 1.4] only, Gaussian blur sigma in [0.1, 3.0]."""
    (crop,) = ConVIRT().train_views().crops(224)
    augment = crop.augment
    assert crop.scale == (0.6, 1.0) and augment.hflip_prob == 0.5
    assert crop.affine == RandomAffine(degrees=20.0, translate=0.1, scale=(0.95, 1.05))
    spread = 0.8 * augment.color_jitter
    assert (1 - spread, 1 + spread) == (0.6, 1.4) and augment.color_jitter_prob == 1.0
    assert augment.max_hue_shift == 0.0 and not augment.jitter_saturation and augment.grayscale_prob == 0.0
    assert augment.blur_prob == 1.0 and augment.blur_sigma == (0.1, 3.0) and augment.solarize_prob == 0.0


def test_convirt_presets_follow_the_papers_text_side():
    """Sec. 3 and appendix: BERT max-pooled over all outputs, embeddings and first 6 layers frozen, one random
    sentence of the report per step."""
    paper = yaml.safe_load((EXPERIMENTS / "convirt" / "chest_xray_paper.yaml").read_text())
    text = paper["model"]["init_args"]["text"]["init_args"]
    assert text["pooling"] == "max" and text["frozen_layers"] == 6
    for recipe in ("chest_xray_paper", "emoji_tiny"):
        config = yaml.safe_load((EXPERIMENTS / "convirt" / f"{recipe}.yaml").read_text())
        assert config["data"]["init_args"]["caption_sampling"] == "sentence", recipe
