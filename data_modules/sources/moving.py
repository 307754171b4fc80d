"""Moving-object clips made from real images (`vlp-data moving`): one object pasted on a plain canvas and moved in
1-3 legs, each leg one of eight directions, with the motion as the caption and one timeline segment per leg.

Objects: the images of an existing shard set (`--source emoji`, by default `data/emoji/train-*.tar` as `vlp-data
emoji` writes it, the object named by its `.txt` as "a <name> emoji"; `--source images`, any image shards, named by
the first line of their `.txt`) or Fashion-MNIST's training images (`--source fashion-mnist`, the Debian package's
IDX files, named by their class). An object's foreground is its `.mask.png` when the shards have one, else the
pixels that are not (near) white (emoji shards are flattened onto white), or for Fashion-MNIST the non-black ones.

A clip (`--frames` frames at `--fps`, `--size` pixels square): the object scaled to `--object-size`, 1-3 legs of at
least 3 frames each, consecutive legs in different directions, the object moving the same number of pixels each
frame (the most that keeps every path inside the canvas, at least one). Members: `.frames.npy` (uint8 [T, S, S,
3]), `.txt` ("a grinning face emoji moving left, then up"), `.cls` (the direction of the FIRST leg, one of
`DIRECTIONS`, the manifest's classnames) and `.json`: `fps`, `timeline` (one segment per leg, "moving left", in
seconds), `legs` (direction, per-frame `step` [dx, dy] in pixels, first and last frame), `centres` (the centre [x, y] of
the object's square in every frame), `object` (its name), `object_label` (its label in the source, when it has one) and
`origin`. Deterministic: a clip depends on (seed, key) only, so the same seed and inputs give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_modules.manifest import local_path, read_manifest
from data_modules.pipeline import IMAGE_MEMBERS, expand_shards
from data_modules.sources import Record, SourceData, SourceError
from data_modules.sources.fashion_mnist import CLASSNAMES as FASHION_CLASSNAMES
from data_modules.sources.fashion_mnist import read_idx

#: direction name -> unit step (x right, y down); the `.cls` label is the index of the first leg's direction.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "up-left": (-1, -1),
              "up-right": (1, -1), "down-left": (-1, 1), "down-right": (1, 1)}
SOURCES = ("emoji", "images", "fashion-mnist")
_MIN_LEG_FRAMES = 3
_WHITE = 245  # emoji are flattened onto white: brighter pixels in every channel are background


@dataclass(frozen=True)
class _Object:
    """One source image, decoded only when a clip uses it."""

    name: str
    origin: str
    label: int | None
    load: Callable[[], tuple[np.ndarray, np.ndarray]]  # RGB uint8 [h, w, 3], foreground float [h, w] in [0, 1]


def _shard_objects(pattern: str, noun: str) -> tuple[list[_Object], list[Path], str]:
    from data_modules.builder import iterate_shard  # the builder imports the sources

    paths = [local_path(url) for url in expand_shards(pattern)]
    if not paths or any(path is None or not path.is_file() for path in paths):
        raise SourceError(f"--images {pattern!r} names no local shard files; give image shards such as "
                          "'data/emoji/train-*.tar' (built with `vlp-data emoji data/emoji`)")
    objects = []
    for path in paths:
        for key, sample in iterate_shard(path):
            image = next((sample[name] for name in IMAGE_MEMBERS if name in sample), None)
            if image is None or "txt" not in sample:
                continue
            name = sample["txt"].decode("utf-8").strip().splitlines()[0]
            objects.append(_Object(f"{name} {noun}".strip(), f"{path}:{key}",
                                   int(sample["cls"]) if "cls" in sample else None,
                                   lambda image=image, mask=sample.get("mask.png"): _decode_cutout(image, mask)))
    if not objects:
        raise SourceError(f"--images {pattern!r} holds no image with a .txt name; use captioned image shards")
    licence = (read_manifest(paths[0].parent) or {}).get("licence", "as the image shards")
    return objects, paths, licence


def _decode_cutout(image: bytes, mask: bytes | None) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    if mask is not None:
        alpha = np.asarray(Image.open(io.BytesIO(mask)).convert("L"), np.float32) / 255
    else:
        alpha = (pixels < _WHITE).any(-1).astype(np.float32)
    return pixels, alpha


def _fashion_objects(root: Path) -> tuple[list[_Object], list[Path], str]:
    files = [root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"]
    if not all(path.is_file() for path in files):
        raise SourceError(f"Fashion-MNIST is not in {root}; install it with `apt-get install dataset-fashion-mnist` "
                          "or pass --root DIR holding its IDX files")
    images, labels = read_idx(files[0]), read_idx(files[1])
    objects = [_Object(FASHION_CLASSNAMES[label], f"{files[0]}[{index}]", int(label),
                       lambda image=image: (np.repeat(image[..., None], 3, -1), image.astype(np.float32) / 255))
               for index, (image, label) in enumerate(zip(images, labels))]
    return objects, files, "MIT (Fashion-MNIST, Copyright 2017 Zalando SE)"


def _article(name: str) -> str:
    """"a grinning face emoji", "an ankle boot"; a name that starts with an article keeps it."""
    if name.lower().startswith(("a ", "an ", "the ")):
        return name
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _plan(rng: random.Random, frames: int) -> list[tuple[str, int, int]]:
    """Legs as (direction, first frame, last frame): 1-3 legs of at least 3 frames, consecutive ones differing."""
    count = rng.randint(1, min(3, frames // _MIN_LEG_FRAMES))
    lengths = [_MIN_LEG_FRAMES] * count
    for _ in range(frames - _MIN_LEG_FRAMES * count):
        lengths[rng.randrange(count)] += 1
    legs, first, previous = [], 0, None
    for length in lengths:
        direction = rng.choice([name for name in DIRECTIONS if name != previous])
        legs.append((direction, first, first + length - 1))
        first, previous = first + length, direction
    return legs


def _centres(legs: list[tuple[str, int, int]], frames: int, speed: float, free: int, rng: random.Random
             ) -> list[tuple[int, int]]:
    """The object's centre offset (from its top-left start) per frame: each frame after the first moves one step
    of its leg; the start is drawn so the whole path fits the `free` pixels of the canvas."""
    steps = [(0.0, 0.0)] + [
        (speed * DIRECTIONS[direction][0], speed * DIRECTIONS[direction][1])
        for direction, first, last in legs for frame in range(first, last + 1) if frame > 0
    ]
    path = np.cumsum(np.array(steps), axis=0)[:frames]  # [T, 2]
    low, high = path.min(0), path.max(0)
    start = [rng.uniform(-low[axis], free - high[axis]) for axis in range(2)]
    return [(round(start[0] + x), round(start[1] + y)) for x, y in path]


def _render(obj: _Object, side: int, size: int, centres: list[tuple[int, int]], background: tuple[int, int, int]
            ) -> bytes:
    """The clip as `.frames.npy` bytes: the object (scaled so its longer side is `side`) alpha-blended at each
    frame's position (`centres` hold its top-left corner) on a plain `background`."""
    pixels, alpha = obj.load()
    scale = side / max(pixels.shape[:2])
    shape = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    pixels = np.asarray(Image.fromarray(pixels).resize(shape, Image.Resampling.LANCZOS), np.float32)
    alpha = np.asarray(Image.fromarray(alpha).resize(shape, Image.Resampling.BILINEAR), np.float32)[..., None]
    frames = np.empty((len(centres), size, size, 3), np.uint8)
    canvas = np.full((size, size, 3), background, np.float32)
    height, width = alpha.shape[:2]
    for index, (left, top) in enumerate(centres):
        frame = canvas.copy()
        region = frame[top : top + height, left : left + width]
        region[:] = alpha * pixels + (1 - alpha) * region
        frames[index] = np.clip(frame.round(), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, frames, allow_pickle=False)
    return buffer.getvalue()


def moving_source(source: str, images: str, root: Path, count: int, frames: int, fps: float, size: int,
                  object_size: int | None, seed: int) -> SourceData:
    """`count` moving-object clips (module doc) of the objects of `source`."""
    if source not in SOURCES:
        raise SourceError(f"--source {source!r} is not one of {', '.join(SOURCES)}")
    side = object_size or max(4, size * 3 // 8)
    if frames < _MIN_LEG_FRAMES or not 0 < side < size or fps <= 0:
        raise SourceError(f"--frames {frames}, --object-size {side}, --size {size} and --fps {fps} need at least "
                          f"{_MIN_LEG_FRAMES} frames, an object smaller than the canvas and a positive fps")
    speed = (size - side) // (frames - 1)
    if speed < 1:
        raise SourceError(f"an object of {side} px cannot move a pixel per frame for {frames} frames on a {size} px "
                          f"canvas; give a larger --size (at least {side + frames - 1}) or fewer --frames")
    if source == "fashion-mnist":
        objects, inputs, licence = _fashion_objects(root)
    else:
        objects, inputs, licence = _shard_objects(images, "emoji" if source == "emoji" else "")
    records = []
    for index in range(count):
        key = f"moving_{index:06d}"
        rng = random.Random(f"{seed}:{key}")
        obj = objects[rng.randrange(len(objects))]
        legs = _plan(rng, frames)
        centres = _centres(legs, frames, speed, size - side, rng)
        background = tuple(rng.randrange(256) for _ in range(3))
        caption = f"{_article(obj.name)} moving " + ", then ".join(direction for direction, _, _ in legs)
        meta = {
            "fps": fps,
            "timeline": [{"start": first / fps, "end": (last + 1) / fps, "text": f"moving {direction}"}
                         for direction, first, last in legs],
            "legs": [{"direction": direction, "step": [speed * DIRECTIONS[direction][0],
                                                       speed * DIRECTIONS[direction][1]],
                      "first_frame": first, "last_frame": last} for direction, first, last in legs],
            "centres": [[left + side // 2, top + side // 2] for left, top in centres],
            "object": obj.name,
            "origin": obj.origin,
            **({"object_label": obj.label} if obj.label is not None else {}),
        }
        label = list(DIRECTIONS).index(legs[0][0])

        def members(obj=obj, centres=centres, background=background, caption=caption, meta=meta, label=label
                    ) -> dict[str, bytes]:
            return {"frames.npy": _render(obj, side, size, centres, background), "txt": caption.encode("utf-8"),
                    "cls": str(label).encode("ascii"),
                    "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}

        records.append(Record(key, None, obj.origin, caption, label, {**meta, "size": size, "side": side,
                                                                       "background": background}, members=members))
    return SourceData(
        name=f"moving {source} objects ({images if source != 'fashion-mnist' else root}), {frames} frames of "
             f"{size} px at {fps:g} fps, seed {seed}",
        licence=licence,
        records=records,
        inputs=inputs,
        classnames={"cls": list(DIRECTIONS)},
    )
