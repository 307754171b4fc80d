"""Composite scenes whose every label is exact: emoji cut-outs pasted on real backgrounds (`vlp-data scenes`).

Cut-outs (`--styles`, `CUTOUT_STYLES`): the 64 px emoji PNGs with alpha of `emoji-datasource-<style>` (`twitter`,
`google`; read through `sources.emoji`, fetched once by `vlp-data emoji`), the things among them (not flags, symbols
or skin-tone swatches: `OBJECT_CATEGORIES`); a concept is an emoji name ("red apple"), drawn in any of the styles.
The SVG emoji (`openmoji`, `fluent-color`, `fluent-flat`, `fluent-high-contrast`, drawn at 192 px) join the concept
of their code point, and the Tux Paint stamps (`tuxpaint`, many of them photographs) are concepts named by their
descriptions, a stamp of an emoji's name joining it (`cutout_concepts`). Backgrounds (`--backgrounds`, one kind or
several joined by commas): `skimage`, scikit-image's bundled sample photos and textures (`SKIMAGE_BACKGROUNDS`, the
images inside its wheel; the ones it downloads are never used); `openclipart`, openclipart's 95 tileable patterns
(Debian `openclipart-png`, `special/patterns/pattern-*.png`, tiled to `PATTERN_SIDE` first: "a herringbone
pattern"); a random square of one, grey ones tinted. Without scikit-image (the `scenes` extra), or with
`--backgrounds plain`, plain colours and two-colour gradients.

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
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import cv2
import numpy as np
import platformdirs
from PIL import Image

from data_modules.instances import INSTANCES_MEMBER, block_tags
from data_modules.sources import Record, SourceData, SourceError
from data_modules.sources.emoji import IMAGE_LICENCES, emoji_source
from data_modules.sources.fluent import fluent_source
from data_modules.sources.openclipart import DEFAULT_ROOT as OPENCLIPART_ROOT
from data_modules.sources.openclipart import LICENCE as OPENCLIPART_LICENCE
from data_modules.sources.openmoji import openmoji_source
from data_modules.sources.svg import render_svg
from data_modules.sources.tuxpaint import tuxpaint_source

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
#: openclipart's tileable patterns (`vlp-data scenes --backgrounds openclipart`, under its root), and the side they
#: are tiled to.
OPENCLIPART_PATTERNS = "png/special/patterns/pattern-*.png"
PATTERN_SIDE = 512
BACKGROUND_KINDS = ("skimage", "openclipart", "plain")
BLOCK_GRID = 3
_SIDE_RANGE = (0.12, 0.4)
_PLACEMENT_TRIES = 30
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_IRREGULAR_PLURALS = {"man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice",
                      "foot": "feet", "tooth": "teeth", "goose": "geese", "leaf": "leaves", "knife": "knives"}
_NOUNS_IN_ING = {"building", "ring", "wing", "wedding", "dumpling", "seedling", "lightning", "bowling", "king",
                 "string", "painting", "swing", "pudding"}
_POSITIONS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))


#: the cut-out sources `--styles` may name: the emoji PNGs (`vlp-data emoji`), the SVG emoji (`vlp-data openmoji`,
#: `vlp-data fluent --style ...`, drawn by the SVG renderer) and the Tux Paint stamps (`vlp-data tuxpaint`, many of
#: them photographs).
EMOJI_STYLES = ("twitter", "google")
VECTOR_STYLES = ("openmoji", "fluent-color", "fluent-flat", "fluent-high-contrast")
CUTOUT_STYLES = (*EMOJI_STYLES, *VECTOR_STYLES, "tuxpaint")
#: OpenMoji's groups (also Fluent's, matched through OpenMoji) of things, as the emoji categories they are.
VECTOR_GROUPS = {"smileys-emotion": "Smileys & Emotion", "people-body": "People & Body",
                 "animals-nature": "Animals & Nature", "food-drink": "Food & Drink",
                 "travel-places": "Travel & Places", "activities": "Activities", "objects": "Objects"}
#: Tux Paint's top folders whose stamps are not things (letters, signs, notes, coins).
TUXPAINT_SKIPPED = ("symbols",)
#: the side vector cut-outs are drawn at and raster ones are shrunk to (a cut-out fills at most 40 % of a scene).
CUTOUT_SIDE = 192
_NOUN_PHRASE = re.compile(r"^(?:a|an|some|the)\s+([a-z][a-z' -]*?)[.!]?$", re.IGNORECASE)


@dataclass(frozen=True)
class Concept:
    """A thing's name and its cut-outs per style (the image paths: one per style, several for Tux Paint stamps of one
    name)."""

    name: str
    category: str
    emoji: str | None
    images: dict[str, tuple[str, ...]]


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
    openclipart_root: Path = OPENCLIPART_ROOT,
) -> SourceData:
    """`count` scenes of the concepts not held out (left to `--split`) and `heldout_count` of the held-out ones, in
    the split `unseen` (module doc). `backgrounds` is `plain` or a comma-separated list of `skimage` (left out when
    scikit-image is missing, saying so) and `openclipart` (the patterns under `openclipart_root`)."""
    if not 1 <= max_objects <= 254 or size < 64 or not 0 < heldout_fraction < 1:
        raise SourceError(f"--max-objects {max_objects}, --size {size}, --heldout-concepts {heldout_fraction}: need "
                          "1-254 objects, at least 64 pixels and a fraction in (0, 1)")
    concepts, inputs, licences = cutout_concepts(styles, cache_dir)
    seen = sorted(name for name in concepts if not heldout(name, heldout_fraction))
    unseen = sorted(name for name in concepts if heldout(name, heldout_fraction))
    if not seen or not unseen:
        raise SourceError(f"--heldout-concepts {heldout_fraction} holds out {len(unseen)} of the {len(concepts)} "
                          "concepts; choose a fraction that leaves some on both sides")
    background_files, background_licences, background_names = background_pool(backgrounds, openclipart_root)
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
    background_licence = "backgrounds: " + ("; ".join(background_licences) or "plain colours and gradients")
    return SourceData(
        name=f"scenes v{RENDER_VERSION}: "
             + (f"emoji-datasource-{{{','.join(styles)}}}" if set(styles) <= set(EMOJI_STYLES)
                else f"cut-outs {{{','.join(styles)}}}") + " on "
             f"{' + '.join(background_names) or 'plain'} backgrounds, {size} px, 1-{max_objects} objects, "
             f"{heldout_fraction:g} of {len(concepts)} concepts held out",
        licence="; ".join(["cut-outs " + ", ".join(licences), background_licence]
                          + (["emoji.json metadata: MIT (emoji-data, Cal Henderson)"]
                             if set(styles) & set(EMOJI_STYLES) else [])),
        records=records,
        inputs=[*inputs, *map(Path, background_files)],
        classnames={"concepts": seen, HELDOUT_SPLIT: unseen},
    )


def cutout_concepts(
    styles: tuple[str, ...], cache_dir: Path | None
) -> tuple[dict[str, Concept], list[Path], list[str]]:
    """The concepts the `styles` draw (`CUTOUT_STYLES`), their input files and licences.

    Emoji PNG styles name a concept by its emoji name; a vector emoji joins the concept of its code point (OpenMoji's
    and Fluent's CLDR names differ from the emoji names: "grinning face with big eyes" is "smiling face with open
    mouth"), or is a concept of its own when no PNG style draws that emoji; skin-tone variants are left out. A Tux
    Paint stamp's concept is its description when that is a noun phrase ("A head of lettuce." -> "head of lettuce"),
    else its file name; a stamp joins an emoji concept of the same name (a photograph of a "mouse" beside the
    drawings), and stamps of one name are one concept; stamps the SVG renderer rejects are left out."""
    unknown = [style for style in styles if style not in CUTOUT_STYLES]
    if unknown or not styles:
        raise SourceError(f"--styles {','.join(styles)}: unknown {', '.join(unknown) or 'empty list'}; choose from "
                          f"{', '.join(CUTOUT_STYLES)}")
    cache_dir = cache_dir or Path(platformdirs.user_cache_dir("vlp-lightning")) / "npm"
    concepts: dict[str, Concept] = {}
    inputs: list[Path] = []
    licences: list[str] = []
    by_code: dict[str, str | None] = {}  # emoji code point -> its concept (None: an emoji that is not a thing)
    ordered = [style for group in (EMOJI_STYLES, VECTOR_STYLES, ("tuxpaint",)) for style in group if style in styles]
    for style in ordered:
        if style in EMOJI_STYLES:
            source = emoji_source(style, None, cache_dir)
            licences.append(IMAGE_LICENCES[style])
            for record in source.records:
                code = record.meta["unified"].lower()
                if record.meta["category"] not in OBJECT_CATEGORIES:
                    by_code.setdefault(code, None)
                    continue
                by_code[code] = record.caption
                _add(concepts, record.caption, record.meta["category"], code, style, record.origin)
        elif style in VECTOR_STYLES:
            if style == "openmoji":
                source = openmoji_source(CUTOUT_SIDE, None, cache_dir)
            else:
                source = fluent_source(style.removeprefix("fluent-"), CUTOUT_SIDE, None, cache_dir)
            licences.append(source.licence)
            for record in source.records:
                code = str(record.meta["hexcode"] or "").lower()
                category = VECTOR_GROUPS.get(str(record.meta["group"]))
                if record.meta["skintone"] is not None or category is None or not code:
                    continue
                name = by_code[code] if code in by_code else record.caption
                if name is not None:
                    _add(concepts, name, category, code, style, record.origin)
        else:
            source = tuxpaint_source("en", CUTOUT_SIDE, None, cache_dir.parent / "debian")  # `vlp-data tuxpaint`s
            licences.append(source.licence)
            for record in source.records:
                if record.meta["category"] in TUXPAINT_SKIPPED or not _drawable(record.origin):
                    continue
                name = stamp_name(record.caption, Path(record.origin).stem)
                category = concepts[name].category if name in concepts else str(record.meta["category"])
                _add(concepts, name, category, None, style, record.origin)
        inputs += source.inputs
    return concepts, inputs, licences


def stamp_name(description: str, stem: str) -> str:
    """A Tux Paint stamp's concept: its description's noun phrase of at most 4 words ("A head of lettuce." -> "head of
    lettuce"), else its file name in words without numbers ("stoplight_02_yellow" -> "stoplight yellow")."""
    phrase = _NOUN_PHRASE.match(description.strip())
    if phrase and len(phrase.group(1).split()) <= 4:
        return phrase.group(1).lower().strip()
    words = re.sub(r"[_-]+|(?<=[a-z])(?=[A-Z])", " ", stem).lower().split()
    return " ".join(word for word in words if not word.isdigit()) or stem.lower()


def _drawable(path: str) -> bool:
    """Whether the cut-out at `path` can be drawn (a few Tux Paint SVGs are rejected by the renderer: left out of
    the concepts rather than failing every scene that would show them)."""
    try:
        _trimmed_cutout(path)
    except (ValueError, OSError):
        return False
    return True


def _add(concepts: dict[str, Concept], name: str, category: str, emoji: str | None, style: str, path: str) -> None:
    concept = concepts.setdefault(name, Concept(name, category, emoji, {}))
    concept.images[style] = (*concept.images.get(style, ()), path) if style == "tuxpaint" else (path,)


def _plan(rng: random.Random, pool: list[Concept], max_objects: int, background_files: list[str]) -> dict:
    """What a scene shows: its objects' concepts and styles and its background; the layout is drawn when rendering."""
    total = rng.randint(1, max_objects)
    distinct = rng.sample(pool, min(len(pool), rng.randint(1, total)))
    chosen = distinct + [rng.choice(distinct) for _ in range(total - len(distinct))]
    rng.shuffle(chosen)
    objects = []
    for concept in chosen:
        style = rng.choice(sorted(concept.images))
        paths = concept.images[style]
        objects.append({"name": concept.name, "category": concept.category, "emoji": concept.emoji, "style": style,
                        "image": paths[0] if len(paths) == 1 else rng.choice(paths)})
    return {"objects": objects, "background": draw_background(rng, background_files)}


def background_pool(
    backgrounds: str, openclipart_root: Path = OPENCLIPART_ROOT
) -> tuple[list[str], list[str], list[str]]:
    """The background files of `--backgrounds` (module doc), their licences and the names of their kinds."""
    kinds = [kind.strip() for kind in backgrounds.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in BACKGROUND_KINDS]
    if unknown or not kinds or ("plain" in kinds and len(kinds) > 1):
        raise SourceError(f"--backgrounds {backgrounds!r}: give plain, or one or more of skimage, openclipart "
                          "joined by commas (e.g. skimage,openclipart)")
    files, licences, names = [], [], []
    if "skimage" in kinds:
        skimage_dir = skimage_data_dir()
        if skimage_dir is None:
            print("note: scikit-image is not installed (pip install 'vlp-lightning[scenes]'), so its photos and "
                  "textures are left out of the backgrounds")
        else:
            files += [str(skimage_dir / name) for name in SKIMAGE_BACKGROUNDS]
            licences.append("scikit-image sample images: " + "; ".join(
                f"{name} {licence}" for name, (_, licence) in SKIMAGE_BACKGROUNDS.items()))
            names.append("scikit-image")
    if "openclipart" in kinds:
        patterns = sorted(str(path) for path in openclipart_root.glob(OPENCLIPART_PATTERNS))
        if not patterns:
            raise SourceError(f"--backgrounds openclipart: no {OPENCLIPART_PATTERNS} under {openclipart_root}; "
                              "install them with apt-get install openclipart-png (or give --openclipart-root)")
        files += patterns
        licences.append(f"{len(patterns)} openclipart patterns: {OPENCLIPART_LICENCE}")
        names.append("openclipart")
    return files, licences, names


def background_words(path: str) -> str:
    """What a caption says of the background file `path`: its scikit-image description, or "a <name> pattern" of an
    openclipart pattern (pattern-herringbone-4.png: "a herringbone pattern")."""
    name = Path(path).name
    if name in SKIMAGE_BACKGROUNDS:
        return SKIMAGE_BACKGROUNDS[name][0]
    words = re.sub(r"-\d+$", "", Path(path).stem.removeprefix("pattern-")).replace("-", " ").replace("_", " ")
    return f"{_article(words)} pattern"


def draw_background(rng: random.Random, background_files: list[str]) -> dict:
    """A background plan (`render_background` draws it): a random square of one of `background_files` (scaled
    0.4-1 of its shorter side, at a random offset; grey textures tinted), or without files two plain colours, flat
    or as a gradient."""
    if background_files:
        return {"file": rng.choice(background_files), "scale": round(rng.uniform(0.4, 1.0), 4),
                "offset": [round(rng.random(), 4), round(rng.random(), 4)],
                "tint": [rng.randint(150, 255) for _ in range(3)]}
    first = [rng.randint(0, 255) for _ in range(3)]
    return {"colours": [first, [min(255, max(0, value + rng.randint(-60, 60))) for value in first]],
            "gradient": rng.choice(("none", "horizontal", "vertical"))}


def load_cutout(path: str, max_side: int = CUTOUT_SIDE) -> tuple[np.ndarray, np.ndarray, str]:
    """The cut-out trimmed to its alpha box: premultiplied RGB float32 [h, w, 3], alpha float32 [h, w, 1] in
    [0, 1], and the name of its mean colour. An SVG is drawn to fit `max_side`, a larger image is first scaled down
    to it (the photographs of Tux Paint's stamps reach 2,348 px, which the cache should not hold at full size)."""
    trimmed, colour = _trimmed_cutout(path, max_side)
    rgba = trimmed.astype(np.float32) / 255
    alpha = rgba[..., 3:]
    return rgba[..., :3] * alpha, alpha, colour


@lru_cache(maxsize=2048)
def _trimmed_cutout(path: str, max_side: int = CUTOUT_SIDE) -> tuple[np.ndarray, str]:
    """The cut-out's RGBA uint8 [h, w, 4] trimmed to its alpha box and the name of its mean colour; kept as uint8
    (a quarter of the float32 arrays) so the cache of a few thousand cut-outs stays small."""
    if path.endswith(".svg"):
        image = render_svg(Path(path), max_side)
    else:
        with Image.open(path) as opened:
            image = opened.convert("RGBA")
        if max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    pixels = np.asarray(image.convert("RGBA"))
    ys, xs = np.nonzero(pixels[..., 3].astype(np.float32) / 255 > 0.5)
    if len(ys) == 0:
        raise ValueError(f"cut-out {path} has no opaque pixel")
    pixels = np.ascontiguousarray(pixels[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    rgba = pixels.astype(np.float32) / 255
    alpha = rgba[..., 3:]
    mean = (rgba[..., :3] * alpha).sum((0, 1)) / alpha.sum()
    return pixels, colour_name(mean)


def cutout_colour(path: str) -> str:
    """The name of the mean colour of a cut-out PNG's opaque pixels (as the scenes' `.json` objects name it)."""
    return _trimmed_cutout(path)[1]


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


def render_background(background: dict, size: int) -> tuple[np.ndarray, str]:
    """The background of a `draw_background` plan: float32 [size, size, 3] in [0, 1] and the caption's words."""
    if "file" in background:
        image = _background_image(background["file"])
        side = max(1, round(min(image.shape[:2]) * background["scale"]))
        top = round((image.shape[0] - side) * background["offset"][1])
        left = round((image.shape[1] - side) * background["offset"][0])
        square = cv2.resize(image[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_AREA)
        if image.shape[2] == 1:  # a grey texture, tinted
            square = square[..., None] * (np.float32(background["tint"]) / 255)
        return square.astype(np.float32), background_words(background["file"])
    first, second = (np.float32(colour) / 255 for colour in background["colours"])
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    weight = {"none": np.zeros((size, size)), "horizontal": np.tile(ramp, (size, 1)),
              "vertical": np.tile(ramp[:, None], (1, size))}[background["gradient"]][..., None]
    kind = "gradient" if background["gradient"] != "none" else "background"
    return (first * (1 - weight) + second * weight).astype(np.float32), f"a plain {colour_name(first)} {kind}"


@lru_cache(maxsize=16)
def _background_image(path: str) -> np.ndarray:
    """float32 [H, W, 1 or 3] in [0, 1]; transparent pixels over white; a pattern (not one of scikit-image's) tiled
    to at least `PATTERN_SIDE` on each side."""
    with Image.open(path) as image:
        if image.mode in ("L", "I", "I;16"):
            pixels = np.asarray(image.convert("L"), dtype=np.float32)[..., None]
        elif image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            pixels = np.asarray(Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"), dtype=np.float32)
        else:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    if Path(path).name not in SKIMAGE_BACKGROUNDS:
        repeats = [-(-PATTERN_SIDE // pixels.shape[0]), -(-PATTERN_SIDE // pixels.shape[1]), 1]
        pixels = np.tile(pixels, repeats)
    return pixels / 255


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
    canvas, background_words = render_background(plan["background"], size)
    labels = np.zeros((size, size), dtype=np.uint8)
    placed: list[_Placed] = []
    visible: list[int] = []
    kept = []
    for item in plan["objects"]:
        premultiplied, alpha, colour = load_cutout(item["image"])
        side = rng.uniform(*_SIDE_RANGE)
        rgb, alpha = scale_cutout(premultiplied, alpha, side * size / max(alpha.shape[:2]))
        height, width = alpha.shape[:2]
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
        paste(canvas, rgb, alpha, x, y)
        labels[y : y + height, x : x + width][pasted] = len(placed) + 1
        visible = [count - covered[index] for index, count in enumerate(visible)] + [int(pasted.sum())]
        placed.append(_Placed(item["name"], x, y, pasted, colour, side))
        kept.append(item)
    if not placed:
        raise ValueError(f"no object of {[item['name'] for item in plan['objects']]} is 16 pixels large at {size} px")
    image = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
    meta = describe_scene(kept, placed, labels, background_words)
    return {
        "jpg": encode_image(Image.fromarray(image), "JPEG", quality=90),
        INSTANCES_MEMBER: encode_image(Image.fromarray(labels, mode="L"), "PNG", compress_level=1),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
        "txt": meta["caption"].encode("utf-8"),
    }


def scale_cutout(premultiplied: np.ndarray, alpha: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A `load_cutout` cut-out resized by `scale` (area averaging when shrinking): premultiplied RGB [h, w, 3] and
    alpha [h, w, 1]."""
    width, height = max(1, round(alpha.shape[1] * scale)), max(1, round(alpha.shape[0] * scale))
    shrink = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    rgb = cv2.resize(premultiplied, (width, height), interpolation=shrink).reshape(height, width, 3)
    return rgb, cv2.resize(alpha, (width, height), interpolation=shrink).reshape(height, width, 1)


def paste(canvas: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, x: int, y: int) -> None:
    """Composite a premultiplied cut-out over `canvas` (float32 [S, S, 3], in place) with its top left at (x, y)."""
    height, width = alpha.shape[:2]
    region = canvas[y : y + height, x : x + width]
    region *= 1 - alpha
    region += rgb


def encode_image(image: Image.Image, format: str, **options: object) -> bytes:
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
