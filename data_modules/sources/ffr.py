"""A spurious-correlation benchmark with a real and a synthetic domain (`vlp-data ffr`), for From Fake to Real (FFR,
Qraitem, Saenko, Plummer 2024) and its baselines.

Each sample is one cut-out of a class pasted on a background of one kind; its group is the pair (class, background),
the benchmark's subgroup (the paper's (Y, B), e.g. (landbird, water) in SpuCo Animals):

- real (splits `train`, `val`, `test`): photographs among Debian `tuxpaint-stamps-default`'s stamps (the folders of
  `--classes`, the `cartoon` / `toys` sub-folders left out: they are drawings), fetched once like `vlp-data tuxpaint`.
  A stable hash of the stamp's path (not the seed) gives each stamp to one split (60 / 20 / 20 %), so test stamps are
  never trained on. `train` is biased: in class c a fraction `--bias` of the samples (0.95 by default, the lowest
  bias of the paper's SpuCo Animals) show the class's own background kind (`--backgrounds`, the c-th, cyclically),
  the rest the other kinds in turn; `val` and `test` hold `--eval-count` samples of every group: balanced.
- synthetic (split `synthetic`): the same classes drawn as emoji (`emoji-datasource-<style>`'s images of the
  subcategories of `--synthetic`, fetched like `vlp-data emoji`): the "fake" domain, in which every group has the same
  number of samples (subgroup-balanced, FFR's step 1 data).

Backgrounds: a random square of scikit-image's sample image of the kind (`scenes.SKIMAGE_BACKGROUNDS`: grass, brick,
gravel, ...; grey textures tinted), drawn and composited as `vlp-data scenes` does (`scenes.draw_background`,
`load_cutout`, `paste`); the object's longer side is 45-80 % of the image, at a random place, mirrored half the time.

Members: `<key>.png`, `<key>.cls` (the class) and `<key>.json`: `class`, `background`, `group` (class index x
backgrounds + background index), `group_name` ("birds on grass"), `domain` (real / synthetic), `majority` (whether
the background is the class's own kind), `cutout`. Manifest classnames: `cls` (classes), `group`, `background`.
Reproducible: a sample depends on `random.Random(f"{seed}:{key}")` and the inputs only.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from data_modules.sources import Record, SourceData, SourceError
from data_modules.sources.emoji import IMAGE_LICENCES, emoji_source
from data_modules.sources.registry import fetch_deb_package
from data_modules.sources.scenes import (SKIMAGE_BACKGROUNDS, draw_background, encode_image, load_cutout, paste,
                                         render_background, scale_cutout, skimage_data_dir)
from data_modules.sources.tuxpaint import LICENCE as TUXPAINT_LICENCE
from data_modules.sources.tuxpaint import PACKAGE as TUXPAINT_PACKAGE
from data_modules.sources.tuxpaint import STAMPS_DIR

SYNTHETIC_SPLIT = "synthetic"
REAL_SPLITS = ("train", "val", "test")
#: the stamps' share per real split, by a stable hash of the stamp's path.
STAMP_FRACTIONS = (0.6, 0.2, 0.2)
DEFAULT_CLASSES = "birds=animals/birds,mammals=animals/mammals"
DEFAULT_SYNTHETIC = "birds=animal-bird,mammals=animal-mammal"
DEFAULT_BACKGROUNDS = "grass,brick"
#: stamp folders of drawings, not photographs: left out of the real domain.
DRAWING_FOLDERS = frozenset({"cartoon", "toys"})
RENDER_VERSION = 1
_SIDE_RANGE = (0.45, 0.8)
_MAX_CUTOUT_SIDE = 256


def parse_class_spec(text: str, option: str) -> dict[str, tuple[str, ...]]:
    """`birds=animals/birds,mammals=animals/mammals+animals/marsupials` -> {"birds": ("animals/birds",), ...}."""
    classes: dict[str, tuple[str, ...]] = {}
    for part in text.split(","):
        name, _, sources = part.partition("=")
        parts = tuple(source.strip() for source in sources.split("+") if source.strip())
        if not name.strip() or not parts or name.strip() in classes:
            raise SourceError(f"{option} {text!r}: {part!r} is not NAME=SOURCE[+SOURCE...] with a new name")
        classes[name.strip()] = parts
    if len(classes) < 2:
        raise SourceError(f"{option} {text!r} names {len(classes)} class; give at least two, e.g. {DEFAULT_CLASSES}")
    return classes


def stamp_split(path: str) -> str:
    """The real split of a stamp: a stable hash of its path (relative to the stamps folder) cut at STAMP_FRACTIONS."""
    value = int(hashlib.sha256(f"ffr-stamp:{path}".encode()).hexdigest()[:15], 16) / 16**15
    return REAL_SPLITS[0] if value < STAMP_FRACTIONS[0] else REAL_SPLITS[1] if value < sum(STAMP_FRACTIONS[:2]) \
        else REAL_SPLITS[2]


def biased_backgrounds(count: int, own: int, kinds: int, bias: float) -> list[int]:
    """The background index of each of a class's `count` training samples: round(bias x count) of its own kind
    `own`, the rest over the other kinds in turn."""
    majority = round(bias * count)
    others = [kind for kind in range(kinds) if kind != own]
    return [own] * majority + [others[index % len(others)] for index in range(count - majority)]


def ffr_source(
    classes: str = DEFAULT_CLASSES,
    synthetic: str = DEFAULT_SYNTHETIC,
    backgrounds: str = DEFAULT_BACKGROUNDS,
    bias: float = 0.95,
    train_count: int = 2000,
    eval_count: int = 100,
    synthetic_count: int = 2000,
    size: int = 64,
    styles: tuple[str, ...] = ("twitter", "google"),
    stamps_dir: Path | None = None,
    deb_cache: Path | None = None,
    npm_cache: Path | None = None,
    seed: int = 0,
) -> SourceData:
    """The real biased / balanced and synthetic balanced samples of the module doc."""
    real_classes, fake_classes = parse_class_spec(classes, "--classes"), parse_class_spec(synthetic, "--synthetic")
    if list(real_classes) != list(fake_classes):
        raise SourceError(f"--classes names {list(real_classes)} but --synthetic {list(fake_classes)}; give the same "
                          "classes in the same order")
    if not 0 < bias < 1 or size < 16:
        raise SourceError(f"--bias {bias}, --size {size}: need a bias in (0, 1) (0.95: 95 % of a class on its own "
                          "background) and at least 16 pixels")
    kinds = [kind.strip() for kind in backgrounds.split(",") if kind.strip()]
    files = {Path(name).stem: name for name in SKIMAGE_BACKGROUNDS}
    unknown = [kind for kind in kinds if kind not in files]
    if len(kinds) < 2 or unknown or len(set(kinds)) < len(kinds):
        raise SourceError(f"--backgrounds {backgrounds!r}: give two or more different kinds out of "
                          f"{', '.join(files)}")
    skimage_dir = skimage_data_dir()
    if skimage_dir is None:
        raise SourceError("vlp-data ffr draws its backgrounds from scikit-image's sample images; install it with "
                          "pip install 'vlp-lightning[scenes]'")
    background_files = [str(skimage_dir / files[kind]) for kind in kinds]
    names = list(real_classes)
    groups = [f"{name} on {kind}" for name in names for kind in kinds]

    if stamps_dir is None:
        stamps_dir = fetch_deb_package(TUXPAINT_PACKAGE, deb_cache or Path(".")) / STAMPS_DIR
    if not stamps_dir.is_dir():
        raise SourceError(f"{stamps_dir} is not a folder of Tux Paint stamps; pass --stamps-dir with one")
    stamps: dict[tuple[int, str], list[str]] = {}
    inputs: list[Path] = []
    for label, folders in enumerate(real_classes.values()):
        for folder in folders:
            for file in sorted((stamps_dir / folder).rglob("*.png")):
                relative = file.relative_to(stamps_dir)
                if DRAWING_FOLDERS.isdisjoint(relative.parts[:-1]):
                    stamps.setdefault((label, stamp_split(relative.as_posix())), []).append(str(file))
                    inputs.append(file)
    for label, name in enumerate(names):
        empty = [split for split in REAL_SPLITS if not stamps.get((label, split))]
        if empty:
            raise SourceError(f"--classes: {name} ({'+'.join(real_classes[name])}) has no photograph stamp for the "
                              f"split(s) {', '.join(empty)} under {stamps_dir}; give folders with more PNG stamps")

    cutouts: dict[int, list[str]] = {}
    for style in styles:
        emoji = emoji_source(style, None, npm_cache or Path("."))
        inputs += emoji.inputs
        for record in emoji.records:
            for label, subcategories in enumerate(fake_classes.values()):
                if record.meta["subcategory"] in subcategories:
                    cutouts.setdefault(label, []).append(record.origin)
    missing = [name for label, name in enumerate(names) if not cutouts.get(label)]
    if missing:
        raise SourceError(f"--synthetic: no emoji of {', '.join(missing)} in the subcategories "
                          f"{synthetic!r}; name emoji subcategories (e.g. animal-bird, animal-mammal)")

    def record(key: str, split: str, label: int, kind: int, pool: list[str], domain: str) -> Record:
        rng = random.Random(f"{seed}:{key}")
        plan = {"class": names[label], "label": label, "background": kinds[kind], "group": label * len(kinds) + kind,
                "group_name": groups[label * len(kinds) + kind], "domain": domain,
                "majority": kind == label % len(kinds), "cutout": rng.choice(pool),
                "drawing": {"background": draw_background(rng, [background_files[kind]]),
                            "side": round(rng.uniform(*_SIDE_RANGE), 4),
                            "place": [round(rng.random(), 4), round(rng.random(), 4)], "mirror": rng.random() < 0.5}}
        return Record(key=key, open_image=None, origin=f"{domain} {key}: {plan['cutout']}", meta=plan, split=split,
                      members=partial(render_sample, plan, size, stamps_dir))

    records = []
    per_class = max(1, train_count // len(names))
    for label in range(len(names)):
        for index, kind in enumerate(biased_backgrounds(per_class, label % len(kinds), len(kinds), bias)):
            records.append(record(f"train_{label:02d}_{index:06d}", "train", label, kind, stamps[label, "train"],
                                  "real"))
    for split in REAL_SPLITS[1:]:
        for group in range(len(groups)):
            for index in range(eval_count):
                label, kind = divmod(group, len(kinds))
                records.append(record(f"{split}_{group:02d}_{index:06d}", split, label, kind, stamps[label, split],
                                      "real"))
    per_group = max(1, synthetic_count // len(groups))
    for group in range(len(groups)):
        label, kind = divmod(group, len(kinds))
        for index in range(per_group):
            records.append(record(f"synthetic_{group:02d}_{index:06d}", SYNTHETIC_SPLIT, label, kind, cutouts[label],
                                  "synthetic"))
    background_licence = "; ".join(f"{files[kind]} {SKIMAGE_BACKGROUNDS[files[kind]][1]}" for kind in kinds)
    return SourceData(
        name=f"ffr v{RENDER_VERSION}: debian:{TUXPAINT_PACKAGE} photographs (real, bias {bias:g}) and "
             f"emoji-datasource-{{{','.join(styles)}}} (synthetic, balanced) of {', '.join(names)} on "
             f"{', '.join(kinds)}, {size} px",
        licence="; ".join([f"real cut-outs: {TUXPAINT_LICENCE}",
                           "synthetic cut-outs: " + ", ".join(sorted({IMAGE_LICENCES[style] for style in styles})),
                           "emoji.json metadata: MIT (emoji-data, Cal Henderson)",
                           f"backgrounds: scikit-image sample images: {background_licence}"]),
        records=records,
        inputs=[*inputs, *map(Path, background_files)],
        classnames={"cls": names, "group": groups, "background": kinds},
    )


def render_sample(plan: dict, size: int, stamps_dir: Path) -> dict[str, bytes]:
    """`png`, `cls` and `json` of one planned sample (module doc)."""
    drawing = plan["drawing"]
    canvas, _ = render_background(drawing["background"], size)
    premultiplied, alpha, _ = load_cutout(plan["cutout"], _MAX_CUTOUT_SIDE)
    rgb, alpha = scale_cutout(premultiplied, alpha, drawing["side"] * size / max(alpha.shape[:2]))
    if drawing["mirror"]:
        rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
    height, width = alpha.shape[:2]
    x, y = round(drawing["place"][0] * (size - width)), round(drawing["place"][1] * (size - height))
    paste(canvas, rgb, alpha, x, y)
    image = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
    cutout = Path(plan["cutout"])
    meta = {key: plan[key] for key in ("class", "background", "group", "group_name", "domain", "majority")}
    meta["cutout"] = cutout.relative_to(stamps_dir).as_posix() if cutout.is_relative_to(stamps_dir) else cutout.name
    return {
        "png": encode_image(Image.fromarray(image), "PNG"),
        "cls": str(plan["label"]).encode("ascii"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
