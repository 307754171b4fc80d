"""Emoji image-text pairs from iamcal's emoji-data npm packages (`emoji-datasource-<style>`, v16).

Each style package holds one 64x64 PNG per emoji (`img/<style>/64/<code points>.png`, RGBA) and `emoji.json`
(MIT), whose entries give the Unicode name ("FATHER CHRISTMAS"), short names ("santa"), one of 10 categories and
one of 99 subcategories. Version 16.0.0 has 1,911 emoji (skin-tone variants are left out: they share their base
emoji's name). The captions are the lower-cased names; the category is the `.cls` label and the subcategory an
integer `subcategory_id` in `.json`, both with manifest classnames. `added_in` in `.json` is the Emoji version that
introduced the emoji (emoji.json's "0.6" ... "16.0", as a number): a real numeric target for `RegressionProbe`.
Keys are the code points, identical across styles, so a Twitter-trained model can be evaluated on Google's drawings
of the same concepts (held-out style).

Image licences differ by style (emoji-data README): Twemoji CC-BY 4.0, Noto Apache-2.0; Apple's and Facebook's
images are not openly licensed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from functools import partial
from pathlib import Path

from PIL import Image

from data_modules.sources import Record, SourceData, SourceError, safe_key
from data_modules.sources.cldr import LICENCE as CLDR_LICENCE
from data_modules.sources.cldr import Annotations, emoji_from_unified, load_annotations

VERSION = "16"
STYLES = ("twitter", "google", "apple", "facebook")
_METADATA_LICENCE = "emoji.json metadata: MIT (emoji-data, Cal Henderson)"
IMAGE_LICENCES = {
    "twitter": "images: CC-BY 4.0 (Twemoji)",
    "google": "images: Apache-2.0 (Noto Emoji)",
    "apple": "images: Copyright Apple Inc., not licensed for commercial use",
    "facebook": "images: Copyright Facebook, Inc., no clear licence",
}


def fetch_package(package: str, cache_dir: Path) -> Path:
    """Unpacked `package@VERSION` from the npm registry, fetched once with `npm pack` into `cache_dir`.

    Only `package.json`, `emoji.json` and the 64px per-emoji images are unpacked (the sprite sheets are large and
    unused), through tarfile's `data` filter so no member can land outside the cache folder; the tarball is
    deleted once unpacked.
    """
    cached = sorted(cache_dir.glob(f"{package}-{VERSION}.*/package"))
    if cached:
        return cached[-1]
    if shutil.which("npm") is None:
        raise SourceError(
            f"npm is needed to fetch {package}@{VERSION}: install it with: apt-get install npm "
            "(or pass --package-dir with an unpacked copy of the package)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"fetching {package}@{VERSION} with npm pack into {cache_dir}", file=sys.stderr)
    result = subprocess.run(
        ["npm", "pack", f"{package}@{VERSION}", "--pack-destination", str(cache_dir)], capture_output=True, text=True
    )
    tarballs = sorted(cache_dir.glob(f"{package}-{VERSION}.*.tgz"))
    if result.returncode != 0 or not tarballs:
        raise SourceError(f"npm pack {package}@{VERSION} failed: {result.stderr.strip()[-500:]}")
    unpacked = cache_dir / tarballs[-1].name.removesuffix(".tgz")
    partial_dir = cache_dir / f".{unpacked.name}.partial"
    shutil.rmtree(partial_dir, ignore_errors=True)
    with tarfile.open(tarballs[-1], "r:gz") as archive:
        wanted = [member for member in archive.getmembers() if _is_wanted_member(member.name)]
        archive.extractall(partial_dir, members=wanted, filter="data")
    partial_dir.rename(unpacked)
    tarballs[-1].unlink()
    return unpacked / "package"


def _is_wanted_member(name: str) -> bool:
    parts = name.split("/")
    return name in ("package/package.json", "package/emoji.json") or (
        len(parts) == 5 and parts[:2] == ["package", "img"] and parts[3] == "64"
    )


def emoji_source(style: str, package_dir: Path | None, cache_dir: Path, language: str | None = None) -> SourceData:
    """Every emoji that has a `style` image, in emoji-data's sort order.

    `package_dir` is an unpacked `emoji-datasource-<style>` package; None fetches it into `cache_dir`. When the
    package lacks `emoji.json`, the metadata comes from the `emoji-datasource` package of the same version.
    `language` takes captions and keywords from CLDR (`data_modules.sources.cldr`, fetched into `cache_dir`).
    """
    if style not in STYLES:
        raise SourceError(f"unknown emoji style {style!r}; choose one of {', '.join(STYLES)}")
    if style in ("apple", "facebook"):
        print(f"note: {style} emoji {IMAGE_LICENCES[style]}; keep these shards to yourself", file=sys.stderr)
    package_dir = package_dir if package_dir is not None else fetch_package(f"emoji-datasource-{style}", cache_dir)
    metadata_file = package_dir / "emoji.json"
    if not metadata_file.is_file():
        metadata_file = fetch_package("emoji-datasource", cache_dir) / "emoji.json"
    image_dir = package_dir / "img" / style / "64"
    if not image_dir.is_dir():
        raise SourceError(f"{package_dir} has no {style} images (expected {image_dir})")
    entries = sorted(
        (entry for entry in json.loads(metadata_file.read_text(encoding="utf-8")) if entry.get(f"has_img_{style}")),
        key=lambda entry: entry["sort_order"],
    )
    categories = list(dict.fromkeys(entry["category"] for entry in entries))
    subcategories = list(dict.fromkeys(entry["subcategory"] for entry in entries))
    records = [
        Record(
            key=safe_key(Path(entry["image"]).stem),
            open_image=partial(Image.open, image_dir / entry["image"]),
            origin=str(image_dir / entry["image"]),
            caption=emoji_caption(entry),
            label=categories.index(entry["category"]),
            meta={
                "name": entry["name"],
                "short_names": entry["short_names"],
                "unified": entry["unified"],
                "category": entry["category"],
                "subcategory": entry["subcategory"],
                "subcategory_id": subcategories.index(entry["subcategory"]),
                "style": style,
                **_added_in(entry),
            },
        )
        for entry in entries
    ]
    if language:
        annotations = load_annotations(language, cache_dir)
        records = [_in_language(record, annotations) for record in records]
    package = json.loads((package_dir / "package.json").read_text(encoding="utf-8"))
    return SourceData(
        name=f"npm:{package['name']}@{package['version']} img/{style}/64" + (f", names in {language}" if language
                                                                           else ""),
        licence=f"{IMAGE_LICENCES[style]}; {_METADATA_LICENCE}" + (f"; {CLDR_LICENCE}" if language else ""),
        records=records,
        inputs=[metadata_file, *(image_dir / entry["image"] for entry in entries)],
        classnames={"cls": categories, "subcategory_id": subcategories},
    )


def _in_language(record: Record, annotations: Annotations) -> Record:
    """`record` with the CLDR name as caption and its keywords in `.json` (the English name when CLDR has none)."""
    caption, names = annotations.describe(emoji_from_unified(str(record.meta["unified"])), record.caption)
    return replace(record, caption=caption, meta={**record.meta, **names})


def _added_in(entry: dict[str, object]) -> dict[str, float]:
    """`{"added_in": 13.1}`: the Emoji version that introduced the emoji (emoji.json's `added_in`, "0.6" ... "16.0"),
    as a number for regression probes; nothing when the entry has none."""
    return {"added_in": float(entry["added_in"])} if entry.get("added_in") else {}


def emoji_caption(entry: dict[str, object]) -> str:
    """The Unicode name in lower case ("father christmas"); the short name ("santa") when there is none."""
    name = str(entry.get("name") or "")
    return name.lower() if name else str(entry["short_name"]).replace("_", " ").replace("-", " ")
