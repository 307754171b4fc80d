"""openclipart 0.18 clip art from the Debian packages `openclipart-png` and `openclipart-svg`.

`openclipart-png` puts 8,121 PNGs under `/usr/share/openclipart/png/<category>/.../<name>.png` (22 top-level
categories; 905 images appear in several folders, leaving 6,900 distinct ones; sizes from 2 px to 16,000 px, three
so large that Pillow refuses them as decompression bombs). The PNGs carry only a `Title` text chunk; the titles
and keywords (`dc:title`, `dc:subject`) live in the RDF metadata of the matching SVG in `openclipart-svg`
(`.../svg/<same path>.svg`). The caption joins title and keywords ("2 dead frogs: froggies, green, fen, ...") —
noisy alt-text in the spirit of ALIGN (Jia et al., 2021); without `openclipart-svg` the folder names stand in for
keywords. The top-level category is the `.cls` label. Licence: public domain (Creative Commons Public Domain
Dedication, per the Debian copyright file); the few SVGs that name another licence keep it in `.json`.
"""

from __future__ import annotations

import hashlib
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image

from data_modules.sources import IMAGE_ERRORS, Record, SourceData, SourceError, safe_key

DEFAULT_ROOT = Path("/usr/share/openclipart")
LICENCE = "public domain (Creative Commons Public Domain Dedication, openclipart 0.18 via Debian openclipart-png)"
_NAMESPACES = {
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "cc": "http://web.resource.org/cc/",
    "dc": "http://purl.org/dc/elements/1.1/",
}


@dataclass(frozen=True)
class SvgMetadata:
    """The parts of an openclipart SVG's `<cc:Work>` block that describe the picture."""

    title: str
    keywords: list[str]
    licence: str


def read_svg_metadata(svg_file: Path) -> SvgMetadata | None:
    """Title, keywords and licence URL from the SVG's RDF metadata; None when the file has no `<cc:Work>`."""
    try:
        work = ElementTree.parse(svg_file).getroot().find(".//rdf:RDF/cc:Work", _NAMESPACES)
    except ElementTree.ParseError:
        return None
    if work is None:
        return None
    licence = work.find("cc:license", _NAMESPACES)
    return SvgMetadata(
        title=(work.findtext("dc:title", default="", namespaces=_NAMESPACES) or "").strip(),
        keywords=[item.text.strip() for item in work.findall("dc:subject/rdf:Bag/rdf:li", _NAMESPACES) if item.text],
        licence=licence.get(f"{{{_NAMESPACES['rdf']}}}resource", "") if licence is not None else "",
    )


def _png_title(png_file: Path) -> str:
    """The PNG's `Title` text chunk; empty when the file does not open (the builder reports it when decoding)."""
    try:
        with Image.open(png_file) as image:
            return str(image.info.get("Title", "")).strip()
    except IMAGE_ERRORS:
        return ""


def clipart_caption(title: str, keywords: list[str]) -> str:
    """`title: keyword, keyword, ...` with underscores as spaces and repeated keywords (and the title) dropped."""
    seen = {title.lower()}
    unique_keywords = []
    for keyword in (keyword.replace("_", " ").strip() for keyword in keywords):
        if keyword and keyword.lower() not in seen:
            seen.add(keyword.lower())
            unique_keywords.append(keyword)
    return ": ".join(part for part in (title, ", ".join(unique_keywords)) if part)


def openclipart_source(root: Path) -> SourceData:
    """One record per distinct PNG (byte-identical copies in several folders become one, listing every folder)."""
    png_root, svg_root = root / "png", root / "svg"
    if not png_root.is_dir():
        raise SourceError(
            f"openclipart is not in {png_root}; install it with: apt-get install openclipart-png openclipart-svg"
        )
    if not svg_root.is_dir():
        print(
            f"note: {svg_root} is missing, so captions use PNG titles and folder names instead of keywords; "
            "apt-get install openclipart-svg adds the keywords",
            file=sys.stderr,
        )
    copies: dict[str, list[Path]] = {}
    png_files = sorted(png_root.rglob("*.png"))
    for png_file in png_files:
        copies.setdefault(hashlib.sha256(png_file.read_bytes()).hexdigest(), []).append(png_file.relative_to(png_root))
    top_categories = sorted(
        {relative.parts[0] for paths in copies.values() for relative in paths if len(relative.parts) > 1}
    )
    records = []
    svg_files = []
    for paths in copies.values():
        relative = paths[0]
        folders = sorted({path.parent.as_posix() for path in paths if len(path.parts) > 1})
        svg_file = svg_root / relative.with_suffix(".svg")
        metadata = read_svg_metadata(svg_file) if svg_file.is_file() else None
        if metadata is not None:
            svg_files.append(svg_file)
            title, keywords, licence = metadata.title, metadata.keywords, metadata.licence
        else:
            title = _png_title(png_root / relative)
            keywords = [word for folder in folders for word in folder.split("/")]
            licence = ""
        meta: dict[str, object] = {
            "title": title,
            "keywords": keywords,
            "folders": folders,
            "path": relative.as_posix(),
        }
        if licence:
            meta["licence"] = licence
        records.append(
            Record(
                key=safe_key(relative.with_suffix("").as_posix()),
                open_image=partial(Image.open, png_root / relative),
                origin=str(png_root / relative),
                caption=clipart_caption(title, keywords) or None,
                label=top_categories.index(relative.parts[0]) if len(relative.parts) > 1 else None,
                meta=meta,
            )
        )
    return SourceData(
        name=f"debian:openclipart-png:{png_root}",
        licence=LICENCE,
        records=records,
        inputs=[*png_files, *svg_files],
        classnames={"cls": [category.replace("_", " ") for category in top_categories]},
    )
