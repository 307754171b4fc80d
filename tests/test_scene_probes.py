"""The dense and compositional evaluations on scenes and emoji contrasts, on constructed features whose answer is
known: `DenseProbe` (linear segmentation), `ZeroShotSegmentation` on object instances, `CompositionalProbe`
(SNARE-style perturbed captions) and `MMVPPairs` (CLIP-blind pairs, mined from `vlp-data emoji-contrasts`).
Perfect features score 1 (or beat chance), uninformative ones score chance, bad input gets its one sentence."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from data_modules.builder import main as vlp_data
from data_modules.views import SingleCrop, Views
from vlp_lightning.callbacks import (
    CompositionalProbe,
    DenseProbe,
    MMVPPairs,
    ZeroShotSegmentation,
    mine_clip_blind_pairs,
    snare_pairs,
    write_clip_blind_pairs,
)
from vlp_lightning.callbacks.dense_probe import dense_probe_predictions, patch_labels, segmentation_metrics
from vlp_lightning.callbacks.mmvp import clip_blind_pairs, mmvp_pair_outcomes
from vlp_lightning.callbacks.snare import pair_outcomes
from vlp_lightning.methods.base import VLPMethod
from vlp_lightning.modules.masking import patchify

SIZE, PATCH = 32, 8
GRID = (SIZE // PATCH, SIZE // PATCH)


class PatchPixels(VLPMethod):
    """No weights: each patch's feature is its pixels (`constant`: every patch the same feature)."""

    def __init__(self, size: int = SIZE, constant: bool = False) -> None:
        super().__init__()
        self.size, self.constant = size, constant
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, so the callbacks find a device

    @property
    def image_size(self) -> int:
        return self.size

    def train_views(self) -> Views:
        return SingleCrop()

    def patch_features(self, images):
        features = patchify(images, PATCH)  # [N, L, 3*8*8]
        return torch.ones_like(features) if self.constant else features


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ DenseProbe
def blocky_labels(count: int, seed: int) -> torch.Tensor:
    """Patch-aligned pixel classes [count, 32, 32] in 0..3 (0 the most common)."""
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randint(0, 6, (count, *GRID), generator=generator).clamp(max=3)
    return patches.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)


def test_dense_probe_on_features_that_name_the_class_is_exact_and_on_noise_it_is_not():
    train, test = blocky_labels(24, 0), blocky_labels(16, 1)

    def perfect(labels):  # one-hot of each patch's class
        return torch.nn.functional.one_hot(patch_labels(labels, GRID, 4), 4).float()

    nearest = dense_probe_predictions(perfect(train), train, perfect(test), GRID, SIZE, 4, upsampling="nearest")
    assert segmentation_metrics(nearest, test, 4) == {"miou": 1.0, "pixel_accuracy": 1.0}
    bilinear = dense_probe_predictions(perfect(train), train, perfect(test), GRID, SIZE, 4)
    assert segmentation_metrics(bilinear, test, 4)["miou"] > 0.8  # inexact only where patches of two classes meet
    noise = torch.randn(24, 16, 4, generator=torch.Generator().manual_seed(2)), torch.randn(16, 16, 4)
    scores = segmentation_metrics(dense_probe_predictions(noise[0], train, noise[1], GRID, SIZE, 4, max_iter=100),
                                  test, 4)
    assert scores["miou"] < 0.35  # near "everything is class 0": IoU share(0) / #classes ~ 0.17


def test_dense_probe_on_scene_shards_segments_what_the_features_separate(instance_shards, scene_shards: Path):
    pattern, _ = instance_shards  # red and green rectangles on blue, patch-aligned
    probe = DenseProbe(pattern, pattern, name="toy", labels="foreground", upsampling="nearest", batch_size=4)
    assert probe.evaluate(None, PatchPixels()) == {"dense_probe/toy/miou": 1.0, "dense_probe/toy/pixel_accuracy": 1.0,
                                                   "dense_probe/toy/classes": 2}
    constant = probe.evaluate(None, PatchPixels(constant=True))  # every pixel the majority class, background
    assert constant["dense_probe/toy/miou"] < 0.35
    train, val = str(scene_shards / "train-000000.tar"), str(scene_shards / "val-000000.tar")
    category = DenseProbe(train, val, name="toy", max_iter=20, batch_size=16).evaluate(None, PatchPixels(size=96))
    assert category["dense_probe/toy/classes"] == 3  # background, Objects, Food & Drink


def test_dense_probe_bad_input_is_named(make_shards, tmp_path):
    with pytest.raises(ValueError, match="labels='things' must be one of"):
        DenseProbe("a.tar", "b.tar", labels="things")
    with pytest.raises(ValueError, match="upsampling='cubic' must be one of"):
        DenseProbe("a.tar", "b.tar", upsampling="cubic")
    with pytest.raises(ValueError, match="max_train_samples=0 must be a positive number"):
        DenseProbe("a.tar", "b.tar", max_train_samples=0)
    plain = make_shards(tmp_path / "plain", n=4, per_shard=4, image_size=SIZE).pattern
    with pytest.raises(ValueError, match=r"no \.instances\.png member; build scene shards"):
        DenseProbe(plain, plain).evaluate(None, PatchPixels())


# --------------------------------------------------------------------------- prompt segmentation on instances
@pytest.fixture
def instance_shards(tmp_path, write_tar):
    """6 scenes of two patch-aligned rectangles (red, green) on blue, with their instance mask and `.json`."""
    samples, masks = [], []
    for index in range(6):
        labels = np.zeros((SIZE, SIZE), dtype=np.uint8)
        image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        image[..., 2] = 255
        boxes = [[0, 0, 8 * (1 + index % 2), 16], [16, 8 * (index % 3), 32, 32]]
        for number, (x0, y0, x1, y1) in enumerate(boxes, start=1):
            labels[y0:y1, x0:x1] = number
            image[y0:y1, x0:x1] = (255, 0, 0) if number == 1 else (0, 255, 0)
        meta = {"objects": [{"box": box, "name": name, "category": "Objects", "colour": colour}
                            for box, name, colour in zip(boxes, ("apple", "leaf"), ("red", "green"))], "relations": []}
        samples.append({"__key__": f"s{index:03d}", "png": png(image), "instances.png": png(labels),
                        "json": json.dumps(meta).encode()})
        masks.append(labels)
    write_tar(tmp_path / "scenes-000000.tar", samples)
    return str(tmp_path / "scenes-000000.tar"), torch.from_numpy(np.stack(masks))


def test_prompt_segmentation_scores_each_instance(instance_shards):
    pattern, labels = instance_shards
    callback = ZeroShotSegmentation(pattern, thresholds=(0.9,), name="toy", batch_size=4)
    assert callback.evaluate(None, PatchPixels())["promptseg/toy/miou_best"] == pytest.approx(1.0)
    uniform = callback.evaluate(None, PatchPixels(constant=True))["promptseg/toy/miou_best"]
    shares = torch.stack([(labels == number).flatten(1).float().mean(1) for number in (1, 2)])  # [2, N]
    assert uniform == pytest.approx(shares.mean().item())  # "all of the image" against each instance


def test_prompt_segmentation_bad_targets_are_named(instance_shards, make_shards, tmp_path):
    pattern, _ = instance_shards
    with pytest.raises(ValueError, match="targets='objects' must be one of"):
        ZeroShotSegmentation(pattern, targets="objects")
    with pytest.raises(ValueError, match=r"no \.mask\.png member; score scene shards with targets='instances'"):
        ZeroShotSegmentation(pattern, targets="foreground").evaluate(None, PatchPixels())
    plain = make_shards(tmp_path / "plain", n=4, per_shard=4, image_size=SIZE).pattern
    with pytest.raises(ValueError, match=r"no \.instances\.png member to take targets from"):
        ZeroShotSegmentation(plain, targets="instances").evaluate(None, PatchPixels())


# ------------------------------------------------------------------------------------------------------ SNARE
SCENE = {
    "caption": "a cat, a dog and a dog on grass",
    "objects": [{"name": "cat", "colour": "red"}, {"name": "dog", "colour": "blue"}, {"name": "dog", "colour": "red"},
                {"name": "sun", "colour": "yellow"}],
    "relations": [[0, "overlaps", 3], [0, "left of", 1], [3, "above", 0], [0, "right of", 3]],
}


def test_snare_negatives_come_from_the_graph_and_are_certainly_false():
    pairs = snare_pairs(SCENE, "k1")
    # the dogs occur twice, so no text may name "the dog"; overlaps is symmetric and skipped
    assert pairs["attribute"] == ("a red cat and a yellow sun", "a yellow cat and a red sun")
    assert pairs["relation"] == ("a sun above a cat", "a cat above a sun")
    assert pairs["negation"] == ("a cat that is red", "a cat that is not red")
    true, false = pairs["shuffle"]
    assert true == SCENE["caption"] and false != true and sorted(false.split()) == sorted(true.split())
    assert snare_pairs(SCENE, "k1") == pairs  # fixed by the key
    alone = {"caption": "a dog", "objects": [{"name": "dog", "colour": "blue"}] * 2, "relations": []}
    assert "attribute" not in snare_pairs(alone, "k") and "negation" not in snare_pairs(alone, "k")


def test_snare_pair_accuracy_is_one_for_perfect_features_and_chance_for_random_ones():
    generator = torch.Generator().manual_seed(0)
    true, false = torch.randn(4000, 16, generator=generator), torch.randn(4000, 16, generator=generator)
    assert pair_outcomes(true + 0.1 * torch.randn(4000, 16), true, false).mean() == 1.0
    assert pair_outcomes(torch.randn(4000, 16, generator=generator), true, false).mean() == pytest.approx(0.5, abs=0.03)
    assert pair_outcomes(true, false, false).mean() == 0.5  # ties count half


class WordBag(VLPMethod):
    """A CLIP-family stand-in: images map to a fixed random vector, texts to one vector for every text (all ties)."""

    def __init__(self, size: int = 96) -> None:
        super().__init__()
        self.size = size
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = lambda texts: {"ids": torch.ones(len(texts), 4)}

    @property
    def image_size(self) -> int:
        return self.size

    def train_views(self) -> Views:
        return SingleCrop()

    def encode_image(self, images):
        return images.flatten(1)[:, :4]

    def encode_text(self, text):
        return text["ids"]


def test_compositional_probe_scores_every_kind_at_chance_for_a_text_blind_model(scene_shards: Path):
    unseen = str(scene_shards / "unseen-000000.tar")
    metrics = CompositionalProbe(unseen, name="toy", batch_size=8).evaluate(None, WordBag())
    assert metrics["snare/toy/shuffle_pairs"] == 10 and metrics["snare/toy/chance"] == 0.5
    scored = [kind for kind in ("attribute", "relation", "shuffle", "negation") if f"snare/toy/{kind}" in metrics]
    assert "shuffle" in scored and all(metrics[f"snare/toy/{kind}"] == 0.5 for kind in scored)


def test_compositional_probe_bad_input_is_named(make_shards, tmp_path):
    with pytest.raises(ValueError, match=r"kinds=\['colour'\] must be a non-empty choice"):
        CompositionalProbe("a.tar", kinds=("colour",))
    plain = make_shards(tmp_path / "plain", n=4, per_shard=4, image_size=16, with_json=True).pattern
    with pytest.raises(ValueError, match=r"have no scene graph \(\.json objects\)"):
        CompositionalProbe(plain).evaluate(None, WordBag(size=16))
    assert CompositionalProbe(plain).evaluate(None, PatchPixels()) == {}  # no joint space: skipped with a warning


# ------------------------------------------------------------------------------------------------------- MMVP
TONES = {"1F3FB": (250, 220, 190), "1F3FC": (225, 185, 145), "1F3FD": (190, 140, 100), "1F3FE": (140, 95, 60),
         "1F3FF": (90, 60, 40)}
TONE_WORDS = {"light": "1F3FB", "medium-light": "1F3FC", "medium": "1F3FD", "medium-dark": "1F3FE", "dark": "1F3FF"}
COLOURS = {"red": (220, 30, 30), "blue": (40, 60, 220), "green": (30, 170, 60)}


def fake_contrast_cache(root: Path) -> Path:
    """npm caches of emoji-datasource-google / -twitter: a ball red (google) vs blue (twitter), a leaf green in
    both, and a waving hand in five skin tones (google)."""
    drawings = {"google": {"0001": "red", "0002": "green"}, "twitter": {"0001": "blue", "0002": "green"}}
    for style, fills in drawings.items():
        package = root / f"emoji-datasource-{style}-16.0.0" / "package"
        (package / "img" / style / "64").mkdir(parents=True)
        (package / "package.json").write_text(json.dumps({"name": f"emoji-datasource-{style}", "version": "16.0.0"}))

        def draw(name: str, rgb: tuple[int, int, int]) -> None:
            image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
            ImageDraw.Draw(image).rectangle((8, 8, 55, 55), fill=(*rgb, 255))
            image.save(package / "img" / style / "64" / name)

        entries = []
        for order, (code, colour) in enumerate(fills.items()):
            draw(f"{code}.png", COLOURS[colour])
            entries.append({"name": ("BALL", "LEAF")[order], "unified": code, "image": f"{code}.png",
                            "sort_order": order, "has_img_google": True, "has_img_twitter": True})
        variations = {}
        for tone, rgb in TONES.items():
            draw(f"0003-{tone.lower()}.png", rgb)
            variations[tone] = {"unified": f"0003-{tone}", "image": f"0003-{tone.lower()}.png",
                                "has_img_google": True, "has_img_twitter": True}
        draw("0003.png", (240, 200, 40))
        entries.append({"name": "WAVING HAND SIGN", "unified": "0003", "image": "0003.png", "sort_order": 9,
                        "has_img_google": True, "has_img_twitter": True, "skin_variations": variations})
        (package / "emoji.json").write_text(json.dumps(entries))
    return root


@pytest.fixture
def contrast_shards(tmp_path) -> str:
    assert vlp_data(["emoji-contrasts", str(tmp_path / "contrasts"), "--cache-dir",
                     str(fake_contrast_cache(tmp_path / "npm"))]) == 0
    return str(tmp_path / "contrasts" / "test-000000.tar")


def test_emoji_contrasts_writes_tones_and_style_contrasts_with_their_texts(contrast_shards):
    manifest = json.loads((Path(contrast_shards).parent / "manifest.json").read_text())
    assert manifest["splits"] == {"test": 7}  # 5 tones + the ball's two drawings; the leaf is green in both
    with tarfile.open(contrast_shards) as tar:
        texts = sorted(tar.extractfile(member).read().decode() for member in tar if member.name.endswith(".txt"))
    tones = [f"waving hand sign: {tone} skin tone" for tone in TONE_WORDS]
    assert texts == sorted(["a red ball", "a blue ball", *tones])


class CentreColour(VLPMethod):
    """A CLIP-family stand-in that sees colours: an image is its centre pixel, a text the colour it names."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        mean, std = torch.tensor(SingleCrop().normalization[0]), torch.tensor(SingleCrop().normalization[1])

        def tokenizer(texts: list[str]) -> dict[str, torch.Tensor]:
            rgbs = []
            for text in texts:
                word = text.split(": ")[1].removesuffix(" skin tone") if ": " in text else text.split()[1]
                rgbs.append(TONES[TONE_WORDS[word]] if word in TONE_WORDS else COLOURS[word])
            return {"ids": (torch.tensor(rgbs, dtype=torch.float) / 255 - mean) / std}

        self.tokenizer = tokenizer

    @property
    def image_size(self) -> int:
        return 16

    def train_views(self) -> Views:
        return SingleCrop()

    def encode_image(self, images):
        return images[:, :, 8, 8]

    def encode_text(self, text):
        return text["ids"]

    def probe_features(self, images):
        return images.flatten(1)


def test_mined_pairs_are_the_clip_blind_ones_and_perfect_features_solve_them(contrast_shards, tmp_path):
    document = mine_clip_blind_pairs(WordBag(size=16), CentreColour(), contrast_shards, clip_threshold=0.5,
                                     ssl_threshold=0.999)
    assert document["candidates"] == 10 + 1  # C(5, 2) tone pairs + one style pair
    assert len(document["pairs"]) == 11  # WordBag sees every image alike here; pixels tell all apart
    assert {pair["kind"] for pair in document["pairs"]} == {"skin_tone", "style"}
    pairs = str(write_clip_blind_pairs(tmp_path / "pairs.json", document))
    perfect = MMVPPairs(contrast_shards, pairs, name="toy").evaluate(None, CentreColour())
    assert perfect["mmvp/toy/pair_accuracy"] == 1.0 and perfect["mmvp/toy/pairs"] == 11
    blind = MMVPPairs(contrast_shards, pairs, name="toy").evaluate(None, WordBag(size=16))
    assert blind["mmvp/toy/pair_accuracy"] == 0.25 == blind["mmvp/toy/chance"]  # all ties


def test_clip_blind_selection_and_pair_accuracy_on_constructed_features():
    metas = [{"group": "a"}, {"group": "a"}, {"group": "b"}, {"group": "b"}, {"group": "a"}]
    clip = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, 0.0], [0.0, 1.0], [1.0, 0.02]])
    ssl = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # group a: (0, 1) alike for CLIP and apart for SSL; (0, 4) alike for both; (1, 4) apart; group b: apart for CLIP
    assert [pair[:2] for pair in clip_blind_pairs(metas, clip, ssl, 0.95, 0.6)] == [(0, 1), (1, 4)]
    generator = torch.Generator().manual_seed(0)
    texts = torch.randn(4000, 2, 8, generator=generator)
    assert mmvp_pair_outcomes(texts + 0.05 * torch.randn(4000, 2, 8), texts).mean() == 1.0
    random_images = torch.randn(4000, 2, 8, generator=generator)
    assert mmvp_pair_outcomes(random_images, texts).mean() == pytest.approx(0.25, abs=0.03)
    with pytest.raises(ValueError, match="has no `group`; build the candidates with `vlp-data emoji-contrasts`"):
        clip_blind_pairs([{}], clip[:1], ssl[:1], 0.9, 0.6)


def test_mmvp_bad_input_is_named(contrast_shards, tmp_path):
    with pytest.raises(ValueError, match="pairs='nowhere.json' is not a file"):
        MMVPPairs(contrast_shards, "nowhere.json")
    (tmp_path / "empty.json").write_text(json.dumps({"pairs": []}))
    with pytest.raises(ValueError, match="holds no pairs; mine with a lower clip_threshold"):
        MMVPPairs(contrast_shards, str(tmp_path / "empty.json"))
    (tmp_path / "other.json").write_text(json.dumps({"pairs": [{"kind": "style", "keys": ["x", "y"],
                                                                "texts": ["a red ball", "a blue ball"]}]}))
    with pytest.raises(ValueError, match="2 images of .* are not in"):
        MMVPPairs(contrast_shards, str(tmp_path / "other.json")).evaluate(None, CentreColour())
    with pytest.raises(ValueError, match="has no encode_image; pass a CLIP-family checkpoint"):
        mine_clip_blind_pairs(PatchPixels(), CentreColour(), contrast_shards)
