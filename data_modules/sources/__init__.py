"""Inputs of the `vlp-data` shard builder.

A source turns something on disk (a folder, a CSV or JSONL table, an npm or Debian package) into a `SourceData`:
the samples as `Record`s plus what the manifest says about them. Sources never write shards: splitting,
decoding, validation and writing live once in `data_modules.builder`, so every source gets the same guarantees.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# What Pillow raises for a missing, truncated, corrupt or oversized image file.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError)
_MAX_KEY_LENGTH = 80


class SourceError(Exception):
    """A problem with the input that the user can fix; `vlp-data` prints it as one line, without a traceback."""


@dataclass(frozen=True)
class Record:
    """One sample before it is written: `<key>.png` plus optional `.txt`, `.cls` and `.json` members.

    `open_image` is called only when the builder writes the sample, so listing a large source stays cheap and an
    image that fails to decode is reported and skipped there. `origin` names where the image comes from (shown in
    that report). `split` is an official split of the source (Fashion-MNIST's `test`) that `--split` never
    reassigns; None lets `--split` decide. `alpha_mask` also writes the image's alpha channel as `<key>.mask.png`
    (the foreground of a cut-out, which the flattened `.png` no longer shows), at the size of the written image.

    A rendered sample whose members come out of one drawing (a scene's image, instance mask and `.json`) gives
    `members` instead of `open_image`: called when the sample is written, it returns every member, encoded
    (`{"jpg": ..., "instances.png": ..., "json": ..., "txt": ...}`); `meta` then only feeds the fingerprint that
    decides whether a shard set is up to date, so it must hold everything the drawing depends on.
    """

    key: str
    open_image: Callable[[], Image.Image] | None
    origin: str
    caption: str | None = None
    label: int | None = None
    meta: dict[str, object] | None = None
    split: str | None = None
    members: Callable[[], dict[str, bytes]] | None = None
    alpha_mask: bool = False


@dataclass(frozen=True)
class SourceData:
    """Everything a source contributes to a shard set.

    `name` and `licence` go to the manifest's `source` / `licence`; `classnames` to its `classnames` (key `cls`
    for `.cls` labels, or the name of an integer field of `.json`). `inputs` are the files the samples are read
    from: their sizes and modification times decide whether an existing shard set is up to date. `files` are
    written next to the shards and listed under `files` in the manifest (`vlp-data wordnet`'s `knowledge.json`);
    `name` must change when they do. `extra` holds further manifest entries (`vlp-data instructions` records its
    tasks and templates under `instructions`); it may not replace the builder's own.
    """

    name: str
    licence: str
    records: list[Record]
    inputs: list[Path]
    classnames: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)


def safe_key(text: str) -> str:
    """A WebDataset key made of `[A-Za-z0-9_-]` only.

    WebDataset splits a member name at the first dot of its base name, and a `/` or `..` would make a tar member
    that writes outside the extraction folder, so everything else becomes `_`. Keys stay short enough for a
    USTAR header; long ones keep a readable prefix and a hash of the full text so they stay distinct.
    """
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "_"
    if len(key) > _MAX_KEY_LENGTH:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
        key = f"{key[: _MAX_KEY_LENGTH - 13]}_{digest}"
    return key


def image_files(root: Path) -> list[Path]:
    """Image files under `root` (any depth, hidden files and folders left out), in a fixed order."""
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
