"""Shared fixtures: tiny generated WebDataset shard sets in `tmp_path` (no network, no real data).

`make_shards(tmp_path, n=40, per_shard=10, ...)` writes `{split}-{index:06d}.tar` shards of class-coloured shapes
(class k = a colour and a shape, caption "a photo of a <colour> <shape>", so a tiny model can learn them) plus a
`manifest.json` in the `vlp-data` format, and returns a `GeneratedShards` describing what it wrote.
`write_tar(path, samples)` writes arbitrary members (for corrupt or malicious shards).
`fake_emoji_cache(root)` fakes the npm emoji cache `vlp-data scenes` reads (20 coloured shapes); `scene_shards` is a
session's tiny scene shard folder built from it.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from data_modules.builder import main as build_shards
from data_modules.manifest import write_manifest

CLASSNAMES = [
    "red square", "green circle", "blue triangle", "yellow cross",
    "magenta square", "cyan circle", "orange triangle", "white cross",
]
_COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
    "magenta": (200, 40, 200), "cyan": (40, 200, 210), "orange": (240, 140, 20), "white": (245, 245, 245),
}


@dataclass
class GeneratedShards:
    directory: Path
    urls: list[str]          # one local path per shard, in order
    pattern: str             # brace pattern matching exactly `urls`
    keys: list[str]          # every sample key, in shard order
    captions: dict[str, str]
    labels: dict[str, int]
    classnames: list[str]


def draw_sample(label: int, image_size: int, rng: random.Random) -> Image.Image:
    """A shape of class `label` at a random position and size on a grey background with pixel noise."""
    colour_name, shape = CLASSNAMES[label % len(CLASSNAMES)].split()
    image = Image.new("RGB", (image_size, image_size), (90, 90, 90))
    draw = ImageDraw.Draw(image)
    extent = rng.uniform(0.45, 0.8) * image_size
    left = rng.uniform(0, image_size - extent)
    top = rng.uniform(0, image_size - extent)
    box = (left, top, left + extent, top + extent)
    colour = _COLOURS[colour_name]
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(left, top + extent), (left + extent / 2, top), (left + extent, top + extent)], fill=colour)
    else:
        width = extent / 4
        draw.rectangle((left + extent / 2 - width, top, left + extent / 2 + width, top + extent), fill=colour)
        draw.rectangle((left, top + extent / 2 - width, left + extent, top + extent / 2 + width), fill=colour)
    for _ in range(image_size):
        image.putpixel((rng.randrange(image_size), rng.randrange(image_size)), tuple(rng.randrange(256) for _ in "rgb"))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """Write `[{"__key__": "k", "png": b"...", "txt": b"..."}, ...]` as `k.png`, `k.txt`, ... members."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for extension, data in sample.items():
                if extension == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def generate_shards(
    directory: Path,
    n: int = 40,
    per_shard: int = 10,
    with_text: bool = True,
    with_label: bool = True,
    with_json: bool = False,
    image_size: int = 16,
    num_classes: int = 4,
    split: str = "train",
    manifest: bool = True,
    seed: int = 0,
) -> GeneratedShards:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    classnames = [f"a photo of a {name}" for name in CLASSNAMES[:num_classes]]
    keys, captions, labels, urls, shard_entries = [], {}, {}, [], {}
    for shard_index, first in enumerate(range(0, n, per_shard)):
        samples = []
        for index in range(first, min(n, first + per_shard)):
            key = f"{split}{index:06d}"
            label = rng.randrange(num_classes)
            sample = {"__key__": key, "png": png_bytes(draw_sample(label, image_size, rng))}
            if with_text:
                sample["txt"] = classnames[label].encode()
            if with_label:
                sample["cls"] = str(label).encode()
            if with_json:
                sample["json"] = json.dumps({"index": index, "class": CLASSNAMES[label]}).encode()
            keys.append(key)
            captions[key] = classnames[label]
            labels[key] = label
            samples.append(sample)
        name = f"{split}-{shard_index:06d}.tar"
        urls.append(str(write_tar(directory / name, samples)))
        shard_entries[name] = {"split": split, "count": len(samples), "keys": [s["__key__"] for s in samples]}
    members = ["png"] + ["txt"] * with_text + ["cls"] * with_label + ["json"] * with_json
    if manifest:
        write_manifest(directory, {
            "format": 1, "source": "generated shapes (tests)", "licence": "CC0", "created": "2024-01-01",
            "seed": seed, "shards": shard_entries, "splits": {split: n}, "members": sorted(members),
            "classnames": {"cls": [name.removeprefix("a photo of a ") for name in classnames]},
        })
    pattern = str(directory / f"{split}-{{{0:06d}..{len(urls) - 1:06d}}}.tar")
    return GeneratedShards(directory, urls, pattern, keys, captions, labels, classnames)


SCENE_SHAPES = ("circle", "triangle", "ring", "square")
SCENE_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (240, 210, 30),
                 "purple": (140, 40, 200)}


def fake_emoji_cache(root: Path) -> Path:
    """An npm cache holding `emoji-datasource-twitter@16` with 20 coloured shapes on transparency (10 per category)."""
    package = root / "emoji-datasource-twitter-16.0.0" / "package"
    (package / "img" / "twitter" / "64").mkdir(parents=True)
    (package / "package.json").write_text(json.dumps({"name": "emoji-datasource-twitter", "version": "16.0.0"}))
    entries = []
    for index, (shape, colour) in enumerate((shape, colour) for shape in SCENE_SHAPES for colour in SCENE_COLOURS):
        image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        fill = (*SCENE_COLOURS[colour], 255)
        if shape == "circle":
            draw.ellipse((4, 4, 59, 59), fill=fill)
        elif shape == "triangle":
            draw.polygon([(32, 2), (62, 60), (2, 60)], fill=fill)
        elif shape == "ring":
            draw.ellipse((2, 8, 61, 55), outline=fill, width=9)
        else:
            draw.rectangle((10, 10, 53, 53), fill=fill)
        name = f"{index:04x}.png"
        image.save(package / "img" / "twitter" / "64" / name)
        entries.append({"name": f"{colour.upper()} {shape.upper()}", "short_names": [shape], "unified": f"{index:04X}",
                        "image": name, "category": ("Objects", "Food & Drink")[index % 2], "subcategory": shape,
                        "sort_order": index, "has_img_twitter": True})
    entries.append({**entries[0], "name": "A FLAG", "unified": "FFFF", "category": "Flags", "sort_order": 99})
    (package / "emoji.json").write_text(json.dumps(entries))
    return root


@pytest.fixture(scope="session")
def scene_shards(tmp_path_factory) -> Path:
    """A folder of tiny `vlp-data scenes` shards (train 36, val 4, unseen 10 scenes of 96 px, plain backgrounds, up
    to 5 objects of the `fake_emoji_cache` shapes), built once per session."""
    root = tmp_path_factory.mktemp("scene_shards")
    argv = ["scenes", str(root / "shards"), "--cache-dir", str(fake_emoji_cache(root / "npm")), "--styles", "twitter",
            "--count", "40", "--heldout-count", "10", "--heldout-concepts", "0.25", "--size", "96", "--max-objects",
            "5", "--backgrounds", "plain"]
    assert build_shards(argv) == 0
    return root / "shards"


def fake_ffr_stamps(root: Path) -> Path:
    """A Tux Paint stamps folder with 10 photograph-like birds (ellipses) and 10 mammals (rectangles) on transparency,
    plus a cartoon bird that `vlp-data ffr` must leave out; the stable hash of the paths gives every class stamps in
    train, val and test."""
    for kind, box in (("birds", (4, 8, 36, 28)), ("mammals", (6, 4, 34, 26))):
        for index in range(10):
            folder = root / "animals" / kind
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
            colour = (*list(SCENE_COLOURS.values())[index % len(SCENE_COLOURS)], 255)
            draw = ImageDraw.Draw(image)
            (draw.ellipse if kind == "birds" else draw.rectangle)(box, fill=colour)
            image.save(folder / f"{kind[:-1]}{index}.png")
    (root / "animals" / "birds" / "cartoon").mkdir()
    Image.new("RGBA", (20, 20), (255, 0, 0, 255)).save(root / "animals" / "birds" / "cartoon" / "drawn.png")
    return root


#: `vlp-data ffr` options of the tests' tiny sets: the fake emoji shapes as synthetic classes, 32 px.
FFR_OPTIONS = ("--synthetic", "birds=circle+ring,mammals=triangle+square", "--styles", "twitter", "--size", "32",
               "--train-count", "40", "--eval-count", "3", "--synthetic-count", "16", "--bias", "0.9")


@pytest.fixture(scope="session")
def ffr_shards(tmp_path_factory) -> Path:
    """A folder of tiny `vlp-data ffr` shards (train 40 biased 0.9, val / test 3 per group, synthetic 4 per group,
    32 px) from `fake_ffr_stamps` and `fake_emoji_cache`, built once per session."""
    root = tmp_path_factory.mktemp("ffr_shards")
    argv = ["ffr", str(root / "shards"), "--stamps-dir", str(fake_ffr_stamps(root / "stamps")), "--npm-cache",
            str(fake_emoji_cache(root / "npm")), *FFR_OPTIONS]
    assert build_shards(argv) == 0
    return root / "shards"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tests run side by side on a small CPU; intra-op threads only add contention at these sizes."""
    torch.set_num_threads(1)


@pytest.fixture
def make_shards() -> Callable[..., GeneratedShards]:
    """`make_shards(tmp_path, n=40, per_shard=10, with_text=True, with_label=True, with_json=False,
    image_size=16, num_classes=4, split="train", manifest=True, seed=0) -> GeneratedShards`."""
    return generate_shards


@pytest.fixture(name="write_tar")
def write_tar_fixture() -> Callable[[Path, list[dict[str, bytes]]], Path]:
    """`write_tar(path, [{"__key__": ..., "<ext>": bytes, ...}])` for hand-made (corrupt, malicious) shards."""
    return write_tar


#: the model config of the tiny CLIP that adaptation methods start from in tests: 9-layer towers (MaPLe's default
#: prompt depth), 64 wide, 32 px.
TINY_CLIP_CONFIG = {"class_path": "vlp_lightning.methods.CLIP", "init_args": {
    "embed_dim": 32,
    "vision": {"class_path": "vlp_lightning.modules.VisionEncoder", "init_args": {
        "model_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "width": 64, "depth": 9,
        "num_heads": 2}},
    "text": {"class_path": "vlp_lightning.modules.TextTransformer", "init_args": {
        "vocab_size": 258, "context_length": 32, "width": 64, "layers": 9, "heads": 2}},
}}


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory) -> str:
    """A checkpoint of a randomly initialised tiny CLIP (`TINY_CLIP_CONFIG`) that `pretrained:` starts load."""
    from vlp_lightning.pretrained import build_method, save_checkpoint

    torch.manual_seed(0)
    clip, _ = build_method(TINY_CLIP_CONFIG, "TINY_CLIP_CONFIG", "")
    return str(save_checkpoint(clip, tmp_path_factory.mktemp("pretrained") / "clip.ckpt", TINY_CLIP_CONFIG))
