"""Composite scenes whose every label is exact: emoji cut-outs pasted on real backgrounds (`vlp-data scenes`).

Cut-outs: the 64 px emoji PNGs with alpha of `emoji-datasource-<style>` (read through `sources.emoji`, fetched once
by `vlp-data emoji`), the things among them (not flags, symbols or skin-tone swatches: `OBJECT_CATEGORIES`); a
concept is an emoji name ("red apple"), drawn in any of the `--styles`. Backgrounds: scikit-image's bundled sample
photos and textures (`SKIMAGE_BACKGROUNDS`, the images inside its wheel; the ones it downloads are never used), a
random square of one, textures tinted; without scikit-image (the `scenes` extra), or with `--backgrounds plain`,
plain colours and two-colour gradients.

A scene holds 1 to `--max-objects` objects of 1 or more concepts (so counts above one occur), each scaled to 12-40 %
of the side and placed where it leaves every object pasted before it at least half visible (an object that finds no
such place in 30 draws is left out). Labels come from the drawing itself:

- `.json` `objects`: name, category, emoji code points, style, `box` [x0, y0, x1, y1] of its visible pixels (x1, y1
  exclusive), `area` (visible pixels), `colour` (the name of the cut-out's mean colour), `size` (small / medium /
  large by its side), `position` (top left ... bottom right, the 3x3 cell of its box centre);
- `relations` [subject, predicate, object] for every ordered pair a predicate holds for: `left of` / `right of` /
  `above` / `below` when the box centres lie apart by at least a quarter of the two sides added, `bigger than` for 1.5
  times the pasted area, `overlaps` when the pasted cut-outs share pixels; `counts` per name;
- `caption` (short, also the `.txt`), `long_caption` (every object with its attributes and one relation),
  `regions` (one description per object) and `blocks`: for each cell of a `grid` x `grid` split (row-major), the
  objects covering at least 2 % of it, most first (PTP's block tags, Wang et al. 2023);
- `<key>.instances.png`: value = object index + 1, 0 background (`data_modules.instances`); `<key>.jpg`: the image.

Held-out concepts: a stable hash of the name (not the seed) puts `--heldout-concepts` of them aside; `train` / `val`
scenes never show one, the `--heldout-count` scenes of the fixed split `unseen` show only them. Reproducible: a
scene depends on `random.Random(f"{seed}:{key}")` only, so the same seed, packages and libraries give
byte-identical shards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from data_modules.instances import INSTANCES_MEMBER, block_tags
from data_modules.sources import Record, SourceData, SourceError
from data_modules.sources.emoji import IMAGE_LICENCES, emoji_source

HELDOUT_SPLIT = "unseen"
#: bumped whenever the drawing changes, so existing shard sets are rebuilt (it is part of the source name).
RENDER_VERSION = 1
OBJECT_CATEGORIES = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
                     "Activities", "Objects")
# scikit-image 0.26's images inside its wheel: file -> (what the caption says, licence from skimage.data's docs)
SKIMAGE_BACKGROUNDS = {
    "brick.png": ("a brick wall", "CC0 (CC0Textures Bricks25)"),
    "grass.png": ("grass", "CC0 (linolafett, DeviantArt)"),
    "gravel.png": ("gravel", "CC0 (CC0Textures Gravel04)"),
    "coffee.png": ("a photo of a coffee cup", "CC0 (Rachel Michetti)"),
    "chelsea.png": ("a photo of a cat", "CC0 (Stefan van der Walt)"),
    "astronaut.png": ("a photo of an astronaut", "public domain (NASA)"),
    "rocket.jpg": ("a photo of a rocket launch", "public domain (SpaceX)"),
    "camera.png": ("a photo of a cameraman", "CC0 (Lav Varshney)"),
    "hubble_deep_field.jpg": ("a photo of deep space", "public domain (NASA)"),
}
BLOCK_GRID = 3
_SIDE_RANGE = (0.12, 0.4)
_PLACEMENT_TRIES = 30
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_IRREGULAR_PLURALS = {"man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice",
                      "foot": "feet", "tooth": "teeth", "goose": "geese", "leaf": "leaves", "knife": "knives"}
_NOUNS_IN_ING = {"building", "ring", "wing", "wedding", "dumpling", "seedling", "lightning", "bowling", "king",
                 "string", "painting", "swing", "pudding"}
_POSITIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))


@dataclass(frozen=True)
class Concept:
    """An emoji name and its cut-out per style (the PNG path)."""

    name: str
    category: str
    emoji: str
    images: dict[str, str]


def heldout(name: str, fraction: float) -> bool:
    """Whether the concept `name` is held out: its stable hash (independent of seed and package order) < `fraction`."""
    return int(hashlib.sha256(f"scenes-concept:{name}".encode()).hexdigest()[:15], 16) < fraction * 16**15


def skimage_data_dir() -> Path | None:
    """scikit-image's bundled `skimage/data` folder, found without importing it; None when it is not installed."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if all((folder / name).is_file() for name in SKIMAGE_BACKGROUNDS) else None


def scenes_source(
    count: int = 5000,
    heldout_count: int = 500,
    heldout_fraction: float = 0.1,
    max_objects: int = 6,
    size: int = 256,
    styles: tuple[str, ...] = ("twitter", "google"),
    backgrounds: str = "skimage",
    cache_dir: Path | None = None,
    seed: int = 0,
) -> SourceData:
    """`count` scenes of the concepts not held out (left to `--split`) and `heldout_count` of the held-out ones, in
    the split `unseen` (module doc). `backgrounds` is `skimage` (falls back to `plain`, saying so) or `plain`."""
    if not 1 <= max_objects <= 254 or size < 64 or not 0 < heldout_fraction < 1:
        raise SourceError(f"--max-objects {max_objects}, --size {size}, --heldout-concepts {heldout_fraction}: need "
                          "1-254 objects, at least 64 pixels and a fraction in (0, 1)")
    concepts: dict[str, Concept] = {}
    inputs: list[Path] = []
    for style in styles:
        emoji = emoji_source(style, None, cache_dir)
        inputs += emoji.inputs
        for record in emoji.records:
            if record.meta["category"] in OBJECT_CATEGORIES:
                concept = concepts.setdefault(record.caption, Concept(
                    record.caption, record.meta["category"], record.meta["unified"].lower(), {}))
                concept.images[style] = record.origin
    seen = sorted(name for name in concepts if not heldout(name, heldout_fraction))
    unseen = sorted(name for name in concepts if heldout(name, heldout_fraction))
    if not seen or not unseen:
        raise SourceError(f"--heldout-concepts {heldout_fraction} holds out {len(unseen)} of the {len(concepts)} "
                          "concepts; choose a fraction that leaves some on both sides")
    skimage_dir = skimage_data_dir() if backgrounds == "skimage" else None
    if backgrounds == "skimage" and skimage_dir is None:
        print("note: scikit-image is not installed (pip install 'vlp-lightning[scenes]'), so the backgrounds are "
              "plain colours and gradients")
    background_files = [str(skimage_dir / name) for name in SKIMAGE_BACKGROUNDS] if skimage_dir else []
    records = []
    for prefix, pool, wanted, split in (("", seen, count, None), ("unseen_", unseen, heldout_count, HELDOUT_SPLIT)):
        for index in range(wanted):
            key = f"{prefix}scene_{index:06d}"
            plan = _plan(random.Random(f"{seed}:{key}"), [concepts[name] for name in pool], max_objects,
                         background_files)
            records.append(Record(
                key=key, open_image=None, origin=f"scene {key}", caption=None, meta=plan, split=split,
                members=partial(render_scene, plan, size, f"{seed}:{key}:layout"),
            ))
    licences = sorted({IMAGE_LICENCES[style] for style in styles})
    background_licence = (
        "backgrounds: scikit-image sample images: " + "; ".join(f"{name} {licence}" for name, (_, licence)
                                                                 in SKIMAGE_BACKGROUNDS.items())
        if skimage_dir else "backgrounds: plain colours and gradients")
    return SourceData(
        name=f"scenes v{RENDER_VERSION}: emoji-datasource-{{{','.join(styles)}}} on "
             f"{'scikit-image' if skimage_dir else 'plain'} backgrounds, {size} px, 1-{max_objects} objects, "
             f"{heldout_fraction:g} of {len(concepts)} concepts held out",
        licence="; ".join(["cut-outs " + ", ".join(licences), background_licence,
                           "emoji.json metadata: MIT (emoji-data, Cal Henderson)"]),
        records=records,
        inputs=[*inputs, *map(Path, background_files)],
        classnames={"concepts": seen, HELDOUT_SPLIT: unseen},
    )


def _plan(rng: random.Random, pool: list[Concept], max_objects: int, background_files: list[str]) -> dict:
    """What a scene shows: its objects' concepts and styles and its background; the layout is drawn when rendering."""
    total = rng.randint(1, max_objects)
    distinct = rng.sample(pool, min(len(pool), rng.randint(1, total)))
    chosen = distinct + [rng.choice(distinct) for _ in range(total - len(distinct))]
    rng.shuffle(chosen)
    objects = []
    for concept in chosen:
        style = rng.choice(sorted(concept.images))
        objects.append({"name": concept.name, "category": concept.category, "emoji": concept.emoji, "style": style,
                        "image": concept.images[style]})
    if background_files:
        background = {"file": rng.choice(background_files), "scale": round(rng.uniform(0.4, 1.0), 4),
                      "offset": [round(rng.random(), 4), round(rng.random(), 4)],
                      "tint": [rng.randint(150, 255) for _ in range(3)]}
    else:
        first = [rng.randint(0, 255) for _ in range(3)]
        background = {"colours": [first, [min(255, max(0, value + rng.randint(-60, 60))) for value in first]],
                      "gradient": rng.choice(("none", "horizontal", "vertical"))}
    return {"objects": objects, "background": background}


@lru_cache(maxsize=4096)
def _cutout(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The cut-out trimmed to its alpha box: premultiplied RGB float32 [h, w, 3], alpha float32 [h, w, 1] in
    [0, 1], and the name of its mean colour."""
    with Image.open(path) as image:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255
    ys, xs = np.nonzero(rgba[..., 3] > 0.5)
    if len(ys) == 0:
        raise ValueError(f"cut-out {path} has no opaque pixel")
    rgba = rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    alpha = rgba[..., 3:]
    mean = (rgba[..., :3] * alpha).sum((0, 1)) / alpha.sum()
    return rgba[..., :3] * alpha, alpha, colour_name(mean)


def cutout_colour(path: str) -> str:
    """The name of the mean colour of a cut-out PNG's opaque pixels (as the scenes' `.json` objects name it)."""
    return _cutout(path)[2]


def colour_name(rgb: np.ndarray) -> str:
    """The everyday name of an RGB colour in [0, 1]: black, white or grey by value and saturation, else by hue."""
    hue, saturation, value = cv2.cvtColor(np.float32(rgb).reshape(1, 1, 3), cv2.COLOR_RGB2HSV)[0, 0]
    if value < 0.2:
        return "black"
    if saturation < 0.15:
        return "white" if value > 0.8 else "grey"
    if hue < 15 or hue >= 345:
        return "red"
    if hue < 40:
        return "orange" if value > 0.6 else "brown"
    for limit, name in ((70, "yellow"), (170, "green"), (260, "blue"), (300, "purple")):
        if hue < limit:
            return name
    return "pink"


def _background(background: dict, size: int) -> tuple[np.ndarray, str]:
    """float32 [size, size, 3] in [0, 1] and the caption's words for it."""
    if "file" in background:
        image = _background_image(background["file"])
        side = max(1, round(min(image.shape[:2]) * background["scale"]))
        top = round((image.shape[0] - side) * background["offset"][1])
        left = round((image.shape[1] - side) * background["offset"][0])
        square = cv2.resize(image[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_AREA)
        if image.shape[2] == 1:  # a grey texture, tinted
            square = square[..., None] * (np.float32(background["tint"]) / 255)
        return square.astype(np.float32), SKIMAGE_BACKGROUNDS[Path(background["file"]).name][0]
    first, second = (np.float32(colour) / 255 for colour in background["colours"])
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    weight = {"none": np.zeros((size, size)), "horizontal": np.tile(ramp, (size, 1)),
              "vertical": np.tile(ramp[:, None], (1, size))}[background["gradient"]][..., None]
    kind = "gradient" if background["gradient"] != "none" else "background"
    return (first * (1 - weight) + second * weight).astype(np.float32), f"a plain {colour_name(first)} {kind}"


@lru_cache(maxsize=16)
def _background_image(path: str) -> np.ndarray:
    """float32 [H, W, 1 or 3] in [0, 1]."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L" if image.mode in ("L", "I", "I;16") else "RGB"), dtype=np.float32)
    return (pixels[..., None] if pixels.ndim == 2 else pixels) / 255


@dataclass
class _Placed:
    name: str
    x: int
    y: int
    alpha: np.ndarray  # bool [h, w]: the pasted pixels
    colour: str
    side: float  # longer side / image side


def render_scene(plan: dict, size: int, layout_seed: str) -> dict[str, bytes]:
    """The members of one scene (module doc): `jpg`, `instances.png`, `json`, `txt`."""
    rng = random.Random(layout_seed)
    canvas, background_words = _background(plan["background"], size)
    labels = np.zeros((size, size), dtype=np.uint8)
    placed: list[_Placed] = []
    visible: list[int] = []
    kept = []
    for item in plan["objects"]:
        premultiplied, alpha, colour = _cutout(item["image"])
        side = rng.uniform(*_SIDE_RANGE)
        scale = side * size / max(alpha.shape[:2])
        width, height = max(1, round(alpha.shape[1] * scale)), max(1, round(alpha.shape[0] * scale))
        shrink = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        alpha = cv2.resize(alpha, (width, height), interpolation=shrink)[..., None]
        pasted = alpha[..., 0] > 0.5
        for _ in range(_PLACEMENT_TRIES):
            x, y = rng.randint(0, size - width), rng.randint(0, size - height)
            covered = np.bincount(labels[y : y + height, x : x + width][pasted], minlength=len(placed) + 1)[1:]
            if all(2 * (visible[index] - covered[index]) >= placed[index].alpha.sum() for index in range(len(placed))):
                break
        else:
            continue
        if pasted.sum() < 16:
            continue
        rgb = cv2.resize(premultiplied, (width, height), interpolation=shrink)
        region = canvas[y : y + height, x : x + width]
        region *= 1 - alpha
        region += rgb
        labels[y : y + height, x : x + width][pasted] = len(placed) + 1
        visible = [count - covered[index] for index, count in enumerate(visible)] + [int(pasted.sum())]
        placed.append(_Placed(item["name"], x, y, pasted, colour, side))
        kept.append(item)
    if not placed:
        raise ValueError(f"no object of {[item['name'] for item in plan['objects']]} is 16 pixels large at {size} px")
    image = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
    meta = describe_scene(kept, placed, labels, background_words)
    return {
        "jpg": _encode(Image.fromarray(image), "JPEG", quality=90),
        INSTANCES_MEMBER: _encode(Image.fromarray(labels, mode="L"), "PNG", compress_level=1),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
        "txt": meta["caption"].encode("utf-8"),
    }


def _encode(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def describe_scene(items: list[dict], placed: list[_Placed], labels: np.ndarray, background: str) -> dict:
    """The `.json` of a rendered scene (module doc) from what was pasted where and the final instance mask."""
    size = labels.shape[0]
    objects = []
    for index, (item, where) in enumerate(zip(items, placed)):
        ys, xs = np.nonzero(labels == index + 1)
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        centre_x, centre_y = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
        objects.append({
            "name": item["name"], "category": item["category"], "emoji": item["emoji"], "style": item["style"],
            "box": box, "area": len(xs), "colour": where.colour,
            "size": "small" if where.side < 0.2 else "medium" if where.side < 0.3 else "large",
            "position": _POSITIONS[min(2, int(3 * centre_y))][min(2, int(3 * centre_x))],
        })
    relations = [[first, predicate, second] for first in range(len(objects)) for second in range(len(objects))
                 if first != second for predicate in _predicates(objects[first], objects[second], placed[first],
                                                                 placed[second])]
    counts = dict(sorted(Counter(item["name"] for item in objects).items()))
    return {
        "size": [size, size],
        "background": background,
        "objects": objects,
        "relations": relations,
        "counts": counts,
        "caption": _short_caption(counts, background),
        "long_caption": _long_caption(objects, relations, background),
        "regions": [_region(item) for item in objects],
        "blocks": {"grid": BLOCK_GRID, "objects": block_tags(labels, len(objects), BLOCK_GRID)},
    }


def _predicates(first: dict, second: dict, first_placed: _Placed, second_placed: _Placed) -> list[str]:
    """The predicates that hold for (first, second), in `PREDICATES` order."""
    predicates = []
    (a0, a1, a2, a3), (b0, b1, b2, b3) = first["box"], second["box"]
    apart_x = ((b0 + b2) - (a0 + a2)) / 2, ((a2 - a0) + (b2 - b0)) / 4
    apart_y = ((b1 + b3) - (a1 + a3)) / 2, ((a3 - a1) + (b3 - b1)) / 4
    if apart_x[0] >= apart_x[1]:
        predicates.append("left of")
    if -apart_x[0] >= apart_x[1]:
        predicates.append("right of")
    if apart_y[0] >= apart_y[1]:
        predicates.append("above")
    if -apart_y[0] >= apart_y[1]:
        predicates.append("below")
    if first_placed.alpha.sum() >= 1.5 * second_placed.alpha.sum():
        predicates.append("bigger than")
    if _pasted_overlap(first_placed, second_placed):
        predicates.append("overlaps")
    return predicates


def _pasted_overlap(first: _Placed, second: _Placed) -> bool:
    """Whether the two pasted cut-outs share a pixel (visible or hidden)."""
    left, top = max(first.x, second.x), max(first.y, second.y)
    right = min(first.x + first.alpha.shape[1], second.x + second.alpha.shape[1])
    bottom = min(first.y + first.alpha.shape[0], second.y + second.alpha.shape[0])
    if right <= left or bottom <= top:
        return False
    return bool((first.alpha[top - first.y : bottom - first.y, left - first.x : right - first.x]
                 & second.alpha[top - second.y : bottom - second.y, left - second.x : right - second.x]).any())




def plural(name: str) -> str:
    """English plural of an emoji name, inflecting its head noun: the first word of a person ("man biking" -> "men
    biking"), else the last word before `with` / `of` / `in` / `on` that is no verb in -ing ("face screaming in
    fear" -> "faces screaming in fear"); names of several people ("people hugging") stay."""
    words = name.split()
    if words[0] in _IRREGULAR_PLURALS.values():
        return name
    clause = next((index for index, word in enumerate(words) if index and word in ("with", "of", "in", "on")),
                  len(words))
    head = 0 if words[0] in ("man", "woman", "person") else max(
        (index for index in range(clause) if not words[index].endswith("ing") or words[index] in _NOUNS_IN_ING),
        default=clause - 1)
    word = words[head]
    if word in _IRREGULAR_PLURALS:
        word = _IRREGULAR_PLURALS[word]
    elif word.endswith(("s", "x", "z", "ch", "sh")):
        word += "es"
    elif word.endswith("y") and word[-2:-1] not in tuple("aeiou"):
        word = word[:-1] + "ies"
    else:
        word += "s"
    return " ".join(words[:head] + [word] + words[head + 1 :])


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _amount(name: str, count: int) -> str:
    return _article(name) if count == 1 else f"{_NUMBERS[count] if count < len(_NUMBERS) else count} {plural(name)}"


def _short_caption(counts: dict[str, int], background: str) -> str:
    """"two red apples and a cat face on grass": the objects by name and count, then the background."""
    parts = [_amount(name, count) for name, count in counts.items()]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on {background}"


def _position_phrase(position: str) -> str:
    if position in ("top", "bottom"):
        return f"at the {position}"
    return f"on the {position}" if position in ("left", "right") else f"in the {position}"


def _region(item: dict, verb: str = "") -> str:
    """"a large yellow grinning face in the top left" (with `verb` "is ": "... face is in the top left")."""
    return f"{_article(item['size'])} {item['colour']} {item['name']} {verb}{_position_phrase(item['position'])}"


def _long_caption(objects: list[dict], relations: list[list], background: str) -> str:
    """One sentence per object (its attributes and where it is relative to an earlier object), after the count."""
    total = len(objects)
    amount = "One object" if total == 1 else f"{_NUMBERS[total].capitalize() if total < 11 else total} objects"
    sentences = [f"{amount} on {background}."]
    for index, item in enumerate(objects):
        sentence = _region(item, verb="is ")
        spatial = [f"{predicate} the {objects[other]['name']}" for subject, predicate, other in relations
                   if subject == index and other < index and predicate in ("left of", "right of", "above", "below")]
        if spatial:
            sentence += ", " + spatial[0]
        overlapping = [objects[other]["name"] for subject, predicate, other in relations
                       if subject == index and other < index and predicate == "overlaps"]
        if overlapping:
            sentence += f", overlapping the {overlapping[0]}"
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
    return " ".join(sentences)
