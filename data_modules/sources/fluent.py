"""Microsoft's Fluent UI emoji (`vlp-data fluent`): npm `fluentui-emoji` 1.3.0, MIT.

That package (a repackaging of github.com/microsoft/fluentui-emoji by M. Abu Mattar) holds SVGs only, one folder per
style: `icons/modern/` (Microsoft's "Color" style, gradients: `--style color`, 3,145 files), `icons/flat/` (3,145)
and `icons/high-contrast/` (1,595, no skin tones), named by the CLDR name in kebab case plus a skin-tone suffix for
the people ("waving-hand-medium-dark.svg", "-default" for the yellow one). It has neither Microsoft's
`metadata.json` nor the 3D PNGs, so every style goes through the SVG renderer (`data_modules.sources.svg`), and the
group, subgroup and code points come from OpenMoji's `data/openmoji.json` (fetched as for `vlp-data openmoji`),
matched by that CLDR name: "waving-hand-light" is OpenMoji's "waving hand: light skin tone". About 9% of the files
match no OpenMoji annotation (Fluent's own names: "man-wrestling", "one-oclock", some new people variants): they
keep the file name as caption, get no `.cls` label and `"group": null` in `.json`, and the manifest counts them
under `unmatched`.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

from data_modules.sources import Record, SourceData, SourceError, safe_key
from data_modules.sources.cldr import LICENCE as CLDR_LICENCE
from data_modules.sources.cldr import load_annotations
from data_modules.sources.openmoji import VERSION as OPENMOJI_VERSION
from data_modules.sources.openmoji import fetch_openmoji, load_entries, split_tags
from data_modules.sources.registry import fetch_npm_package
from data_modules.sources.svg import render_svg, require_renderer

PACKAGE = "fluentui-emoji"
VERSION = "1.3.0"
#: `--style` -> the package's folder.
STYLES = {"color": "modern", "flat": "flat", "high-contrast": "high-contrast"}
LICENCE = (f"images: MIT (Microsoft Fluent UI Emoji, npm {PACKAGE}@{VERSION}); groups: matched in OpenMoji "
           f"{OPENMOJI_VERSION} data/openmoji.json")
DEFAULT_SIZE = 72
#: the file-name suffixes of the skin tones and OpenMoji's annotation suffixes; longest first, so "-medium-light"
#: is not read as "-light".
SKIN_TONES = {"medium-light": 2, "medium-dark": 4, "default": None, "light": 1, "medium": 3, "dark": 5}
_TONE_NAMES = {1: "light", 2: "medium-light", 3: "medium", 4: "medium-dark", 5: "dark"}


def kebab(text: str) -> str:
    """"Waving hand: light skin tone" -> "waving-hand-light-skin-tone" (how the package names its files)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def match_entry(name: str, index: dict[str, dict]) -> tuple[dict | None, int | None]:
    """(OpenMoji entry, skin tone) of a file name: the whole name first ("vertical-traffic-light" is no tone), then
    the base name plus its tone's annotation suffix; (None, tone or None) when nothing matches."""
    if name in index:
        return index[name], None
    for suffix, tone in SKIN_TONES.items():
        if name.endswith(f"-{suffix}"):
            base = name[: -len(suffix) - 1]
            key = base if tone is None else f"{base}-{_TONE_NAMES[tone]}-skin-tone"
            return index.get(key), tone
    return None, None


def fluent_source(style: str, size: int, language: str | None, cache_dir: Path) -> SourceData:
    """Every SVG of the `style` folder, in file-name order, rendered at `size`; a broken one is a counted skip."""
    if style not in STYLES:
        raise SourceError(f"unknown Fluent emoji style {style!r}; choose one of {', '.join(STYLES)}")
    require_renderer()
    package_dir = fetch_npm_package(PACKAGE, VERSION, cache_dir, _is_wanted_member)
    svg_dir = package_dir / "icons" / STYLES[style]
    files = sorted(svg_dir.glob("*.svg"))
    if not files:
        raise SourceError(f"{svg_dir} holds no SVG files; delete {package_dir.parent} so it is fetched again")
    entries = load_entries(fetch_openmoji(cache_dir))
    index: dict[str, dict] = {}
    for entry in entries:
        index.setdefault(kebab(str(entry["annotation"])), entry)
    groups = list(dict.fromkeys(str(entry["group"]) for entry in entries))
    subgroups = list(dict.fromkeys(str(entry["subgroups"]) for entry in entries))
    annotations = load_annotations(language, cache_dir) if language else None
    records, unmatched = [], 0
    for file in files:
        entry, tone = match_entry(file.stem, index)
        unmatched += entry is None
        caption = str(entry["annotation"]).lower() if entry else file.stem.replace("-", " ")
        meta: dict[str, object] = {
            "name": file.stem,
            "style": style,
            "skintone": tone,
            "group": entry["group"] if entry else None,
            "subgroup": entry["subgroups"] if entry else None,
            "subgroup_id": subgroups.index(str(entry["subgroups"])) if entry else None,
            "hexcode": entry["hexcode"] if entry else None,
            "tags": split_tags(entry.get("tags")) if entry else [],
        }
        if annotations is not None:
            if entry:
                caption, names = annotations.describe(str(entry["emoji"]), caption)
            else:
                names = {"name_language": "en"}
            meta.update(names)
        records.append(Record(
            key=safe_key(file.stem),
            open_image=partial(render_svg, file, size),
            origin=str(file),
            caption=caption,
            label=groups.index(str(entry["group"])) if entry else None,
            meta=meta,
            alpha_mask=True,
        ))
    return SourceData(
        name=f"npm:{PACKAGE}@{VERSION} icons/{STYLES[style]} at {size}px" + (f", names in {language}" if language
                                                                           else ""),
        licence=LICENCE + (f"; {CLDR_LICENCE}" if language else ""),
        records=records,
        inputs=files,
        classnames={"cls": groups, "subgroup_id": subgroups},
        extra={"unmatched": unmatched},
    )


def _is_wanted_member(name: str) -> bool:
    return name in ("package/package.json", "package/LICENSE") or (
        name.startswith("package/icons/") and name.endswith(".svg")
    )
