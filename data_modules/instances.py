"""Object instances: the boxes and instance masks of a sample, carried through the crops and flips of its image.

A sample with instances (`vlp-data scenes` writes them) has a `.json` member listing `objects`, each with a `box`
`[x0, y0, x1, y1]` in pixels of the stored image (x1, y1 exclusive), and `relations` `[subject, predicate, object]`
naming objects by index; and an `<key>.instances.png` member, one greyscale PNG of the image's size whose pixel
value is the object's index + 1 (0: background). It is a member of its own, apart from the foreground `.mask.png`
(`data_modules.masks`), so a shard may hold both.

In a view (`crop_instances`, `flip_instances`), the instance mask is the crop's region of the stored mask, resized
with the image (nearest neighbour at pixel centres, so values stay object indices and line up with the resized image)
and mirrored with it. An object is kept when any of its pixels survive in the view's mask, and its box is the box of
those pixels: the stored box clipped to the crop and made tight. Clipping alone is loose around a non-rectangular
object the crop cuts (detectron2 recomputes boxes from masks after crops for that reason), and a box taken at the
stored resolution would keep the parts of a many-part object (splashes, sparkles) that a strong downscale drops from
the mask; from the view's mask, box and mask always agree. Kept objects are renumbered in order: value k + 1 of a
view's mask is `boxes[k]`, and `objects[k]` is its index in the sample's `.json`.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from numbers import Real

import cv2
import numpy as np
import torch
from PIL import Image

#: the member name of a sample's instance mask in a shard.
INSTANCES_MEMBER = "instances.png"
#: predicates a relation may use (`vlp-data scenes` writes these).
PREDICATES = ("left of", "right of", "above", "below", "bigger than", "overlaps")


@dataclass(frozen=True)
class Instances:
    """The objects of one image or view."""

    labels: np.ndarray  # uint8 [H, W]: object number + 1, 0 background
    boxes: np.ndarray  # float32 [K, 4]: x0, y0, x1, y1 in pixels
    objects: np.ndarray  # int64 [K]: index of each object in the sample's .json `objects`


def check_scene(meta: object, width: int, height: int) -> int:
    """The number of objects of a sample's `.json`; ValueError naming the first box outside the `width` x `height`
    image, malformed object or relation that names an object the `.json` does not list."""
    objects = meta.get("objects") if isinstance(meta, dict) else None
    if not isinstance(objects, list) or not all(isinstance(item, dict) for item in objects):
        raise ValueError(".json has no `objects` list of objects")
    if len(objects) > 254:
        raise ValueError(f".json lists {len(objects)} objects; an instance mask holds at most 254")
    for index, item in enumerate(objects):
        box = item.get("box")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(value, Real) for value in box)):
            raise ValueError(f"object {index} has no box [x0, y0, x1, y1]")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"object {index}'s box {box} is not inside the {width}x{height} image")
    for relation in meta.get("relations", []):
        if not (
            isinstance(relation, list) and len(relation) == 3 and relation[1] in PREDICATES
            and all(isinstance(relation[end], int) and 0 <= relation[end] < len(objects) for end in (0, 2))
        ):
            raise ValueError(f"relation {relation} does not name two of the {len(objects)} objects and a predicate")
    return len(objects)


def decode_instances(meta: object, data: bytes, width: int, height: int) -> Instances:
    """A sample's `.json` and instance mask PNG -> its `Instances`, both checked against the image's size."""
    count = check_scene(meta, width, height)
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG" or image.mode != "L":
            raise ValueError(f"an instance mask must be a greyscale PNG, got {image.format} {image.mode}")
        if image.size != (width, height):
            raise ValueError(f"the instance mask is {image.width}x{image.height}, the image {width}x{height}")
        labels = np.asarray(image)
    if labels.max(initial=0) > count:
        raise ValueError(f"the instance mask holds object {labels.max()} but .json lists {count} objects")
    boxes = np.asarray([item["box"] for item in meta["objects"]], dtype=np.float32).reshape(count, 4)
    return Instances(labels, boxes, np.arange(count, dtype=np.int64))


def crop_instances(instances: Instances, region: tuple[int, int, int, int], size: int) -> Instances:
    """The objects of the view that resizes `region` (top, left, height, width) of the image to `size` x `size`
    (module doc); `instances` are those of the whole stored image."""
    top, left, height, width = region
    patch = instances.labels[top : top + height, left : left + width]
    if patch.shape != (size, size):
        patch = cv2.resize(patch, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
    count = len(instances.objects)
    kept = np.flatnonzero(np.bincount(patch.ravel(), minlength=count + 1)[1:])
    boxes = np.empty((len(kept), 4), dtype=np.float32)
    for row, index in enumerate(kept):
        ys, xs = np.nonzero(patch == index + 1)
        boxes[row] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    renumber = np.zeros(count + 1, dtype=np.uint8)
    renumber[kept + 1] = np.arange(1, len(kept) + 1)
    return Instances(renumber[patch], boxes, instances.objects[kept])


def flip_instances(instances: Instances) -> Instances:
    """The objects of the horizontally mirrored view."""
    width = instances.labels.shape[1]
    boxes = instances.boxes.copy()
    boxes[:, 0], boxes[:, 2] = width - instances.boxes[:, 2], width - instances.boxes[:, 0]
    return Instances(cv2.flip(instances.labels, 1), boxes, instances.objects)


def batch_instances(views: list[list[Instances]], flips: tuple[tuple[bool, ...], ...], single: bool) -> dict:
    """Per-sample views (outer list: samples, inner: crops) -> the batch's `boxes` (list of float [K_i, 4]), `masks`
    (uint8 [N, S, S], value k + 1 = `boxes[i][k]`) and `objects` (list of int64 [K_i]), each mirrored where
    `flips[crop][sample]`; for a multi-view recipe each entry is a list over the crops."""
    entries: dict[str, list] = {"boxes": [], "masks": [], "objects": []}
    for crop, flipped in enumerate(flips):
        chosen = [flip_instances(sample[crop]) if flip else sample[crop] for sample, flip in zip(views, flipped)]
        entries["boxes"].append([torch.from_numpy(item.boxes) for item in chosen])
        entries["masks"].append(torch.from_numpy(np.stack([item.labels for item in chosen])))
        entries["objects"].append([torch.from_numpy(item.objects) for item in chosen])
    return {name: values[0] if single else values for name, values in entries.items()}


#: what `object_phrases` reads: each object's region description, or its name.
PHRASE_FIELDS = ("regions", "names")


def object_phrases(meta: dict, objects: torch.Tensor, field: str = "regions") -> list[str]:
    """The phrase of each object a view kept (`objects`, indices into the sample's `.json` objects): its region
    description ("a large yellow grinning face in the top left", `regions`) or its name (`names`)."""
    if field not in PHRASE_FIELDS:
        raise ValueError(f"phrase field {field!r} is not one of {PHRASE_FIELDS}")
    if field == "regions":
        return [meta["regions"][index] for index in objects.tolist()]
    return [meta["objects"][index]["name"] for index in objects.tolist()]


def block_tags(labels: np.ndarray, count: int, grid: int = 3, min_share: float = 0.02) -> list[list[int]]:
    """Per cell of a `grid` x `grid` split of an instance mask (row-major), the objects (0-based, of `count`)
    covering at least `min_share` of the cell, most first: PTP's block tags (Wang et al. 2023, sec. 3.1)."""
    height, width = labels.shape
    rows = [round(height * step / grid) for step in range(grid + 1)]
    columns = [round(width * step / grid) for step in range(grid + 1)]
    tags = []
    for row in range(grid):
        for column in range(grid):
            cell = labels[rows[row] : rows[row + 1], columns[column] : columns[column + 1]]
            pixels = np.bincount(cell.ravel(), minlength=count + 1)[1 : count + 1]
            order = np.argsort(-pixels, kind="stable")
            tags.append([int(index) for index in order if pixels[index] >= min_share * cell.size])
    return tags


def position_prompt(tags: list[list[int]], names: list[str], rng: random.Random) -> str | None:
    """PTP's position-guided text prompt "The block [P] has a [O]." (Wang et al. 2023, sec. 3.1): one block drawn
    among those holding an object, P its 1-based row-major number, O the name of the object covering most of it;
    None when no block holds one."""
    filled = [(cell, objects[0]) for cell, objects in enumerate(tags) if objects]
    if not filled:
        return None
    cell, index = rng.choice(filled)
    return f"The block {cell + 1} has a {names[index]}."
