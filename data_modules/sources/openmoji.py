"""OpenMoji image-text pairs (`vlp-data openmoji`): npm `openmoji` 17.0.0, 4,495 SVG emoji, CC-BY-SA 4.0.

The package holds one colour SVG per emoji (`color/svg/<hexcode>.svg`, a 72x72 view box) and
`data/openmoji.json`, whose entries give the CLDR annotation ("grinning face"), comma-separated CLDR tags plus
OpenMoji's own tags, one of 12 groups and one of 119 subgroups, the hexcode and the skin tone (1-5, "" for none).
Unlike emoji-data it keeps the skin-tone variants (2,418 of the 4,495 are people-body, most of them tones) and adds
405 OpenMoji-only "extras" (`extras-openmoji`: brand icons, objects Unicode lacks) whose hexcodes lie in the Private
Use Area. Captions are the lower-cased annotations, the group the `.cls` label and the subgroup an integer
`subgroup_id` in `.json`, both with manifest classnames, as `vlp-data emoji` does. The SVGs are rendered at `--size`
(72 by default, the size of OpenMoji's own PNG export) by `data_modules.sources.svg`; the alpha channel becomes the
`.mask.png` member. `--language` takes the caption and keywords from CLDR instead (`data_modules.sources.cldr`).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from data_modules.sources import Record, SourceData, SourceError, safe_key
from data_modules.sources.cldr import LICENCE as CLDR_LICENCE
from data_modules.sources.cldr import load_annotations
from data_modules.sources.registry import fetch_npm_package
from data_modules.sources.svg import render_svg, require_renderer

PACKAGE = "openmoji"
VERSION = "17.0.0"
LICENCE = "images: CC-BY-SA 4.0 (OpenMoji, openmoji.org); metadata: data/openmoji.json of the same package"
DEFAULT_SIZE = 72


def fetch_openmoji(cache_dir: Path) -> Path:
    """The unpacked package (metadata, licence and colour SVGs only: the black SVGs and sources are left out)."""
    return fetch_npm_package(PACKAGE, VERSION, cache_dir, _is_wanted_member)


def _is_wanted_member(name: str) -> bool:
    return name in ("package/package.json", "package/LICENSE.txt", "package/data/openmoji.json") or (
        name.startswith("package/color/svg/") and name.endswith(".svg")
    )


def load_entries(package_dir: Path) -> list[dict[str, object]]:
    """The entries of `data/openmoji.json` in OpenMoji's order (its `order` field; the extras, which have none,
    last in the file's order)."""
    metadata = package_dir / "data" / "openmoji.json"
    if not metadata.is_file():
        raise SourceError(f"{package_dir} has no data/openmoji.json; delete that folder so it is fetched again")
    entries = json.loads(metadata.read_text(encoding="utf-8"))
    return sorted(entries, key=lambda entry: int(entry["order"]) if str(entry.get("order")).isdigit() else 1 << 30)


def openmoji_source(size: int, language: str | None, cache_dir: Path) -> SourceData:
    """Every entry of `data/openmoji.json`, its SVG rendered at `size`; a missing or broken SVG is a counted skip."""
    require_renderer()
    package_dir = fetch_openmoji(cache_dir)
    entries = load_entries(package_dir)
    annotations = load_annotations(language, cache_dir) if language else None
    groups = list(dict.fromkeys(str(entry["group"]) for entry in entries))
    subgroups = list(dict.fromkeys(str(entry["subgroups"]) for entry in entries))
    svg_dir = package_dir / "color" / "svg"
    records = []
    for entry in entries:
        hexcode = str(entry["hexcode"])
        caption = str(entry["annotation"]).lower()
        meta: dict[str, object] = {
            "annotation": entry["annotation"],
            "tags": split_tags(entry.get("tags")),
            "openmoji_tags": split_tags(entry.get("openmoji_tags")),
            "hexcode": hexcode,
            "group": entry["group"],
            "subgroup": entry["subgroups"],
            "subgroup_id": subgroups.index(str(entry["subgroups"])),
            "skintone": _skintone(entry.get("skintone")),
            "skintone_base_hexcode": entry.get("skintone_base_hexcode") or None,
        }
        if annotations is not None:
            caption, names = annotations.describe(str(entry["emoji"]), caption)
            meta.update(names)
        records.append(Record(
            key=safe_key(hexcode),
            open_image=partial(render_svg, svg_dir / f"{hexcode}.svg", size),
            origin=str(svg_dir / f"{hexcode}.svg"),
            caption=caption,
            label=groups.index(str(entry["group"])),
            meta=meta,
            alpha_mask=True,
        ))
    return SourceData(
        name=f"npm:{PACKAGE}@{VERSION} color/svg at {size}px" + (f", names in {language}" if language else ""),
        licence=LICENCE + (f"; {CLDR_LICENCE}" if language else ""),
        records=records,
        inputs=[package_dir / "data" / "openmoji.json", *(svg_dir / f"{entry['hexcode']}.svg" for entry in entries)],
        classnames={"cls": groups, "subgroup_id": subgroups},
    )


def split_tags(text: object) -> list[str]:
    """"cheerful, cheery, face" -> ["cheerful", "cheery", "face"]."""
    return [tag.strip() for tag in str(text or "").split(",") if tag.strip()]


def _skintone(value: object) -> int | str | None:
    """OpenMoji's skin tone: 1-5 (Fitzpatrick 1-2 ... 6), "1,3" for two people of different tones, None for none."""
    if value in ("", None):
        return None
    return int(value) if str(value).isdigit() else str(value)
