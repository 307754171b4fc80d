"""Tux Paint stamps (`vlp-data tuxpaint`): Debian `tuxpaint-stamps-default`, GPL-2.0-or-later.

The package (2022.06.04 in Debian 12) installs `usr/share/tuxpaint/stamps/<category>/<folders...>/<name>.png|svg`:
796 PNG cut-outs (RGBA, LA or palette with transparency; drawings and photographs, 150 px on the longer side in
the median, up to 2,348) and 248 SVGs, 165 of them with no PNG next to them (rendered at `--svg-size` by
`data_modules.sources.svg`; a stamp with both is read from its PNG, the drawing Tux Paint itself falls back to).
Next to each stamp: `<name>.txt`, whose first line is the English description and whose other lines are
translations, `<locale>.utf8=<text>` (`de.utf8=`, `pt_BR.utf8=`, `ca@valencia.utf8=`; 80-odd locales);
`<name>.dat` with Tux Paint's flags (`colorable`, `tintable`, `nomirror`, `noflip`, ...); `<name>.ogg`, a sound
effect, and `<name>_desc_<locale>.ogg`, spoken descriptions. The caption is the description in `--language`
(English by default; a locale without its own line falls back to its language, `pt_BR` to `pt`, then to English,
and `.json` names the language used in `description_language`); the top folder (animals, food, ...) is the `.cls`
label, the folder below it in `.json`; the alpha channel is the `.mask.png` member. Stamps without a `.txt` take
their file name as caption (`"description_language": null`).
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

from PIL import Image

from data_modules.sources import Record, SourceData, SourceError, safe_key
from data_modules.sources.registry import fetch_deb_package
from data_modules.sources.svg import render_svg, require_renderer

PACKAGE = "tuxpaint-stamps-default"
STAMPS_DIR = Path("usr/share/tuxpaint/stamps")
LICENCE = "GPL-2.0-or-later (Tux Paint stamps, Bill Kendrick and contributors; Debian tuxpaint-stamps-default)"
DEFAULT_SVG_SIZE = 256
_TRANSLATION = re.compile(r"^([A-Za-z]{2,3}(?:_[A-Za-z]{2,4})?(?:@[A-Za-z]+)?)\.(?:utf8|UTF-8)=(.*)$")


def parse_description(text: str) -> dict[str, str]:
    """{locale: description} of a stamp's `.txt`: the first untagged line is `en`, `de.utf8=...` lines the rest."""
    descriptions: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        match = _TRANSLATION.match(line)
        if match:
            if match.group(2).strip():
                descriptions.setdefault(match.group(1), match.group(2).strip())
        elif line and "en" not in descriptions:
            descriptions["en"] = line
    return descriptions


def pick_description(descriptions: dict[str, str], language: str) -> tuple[str, str] | None:
    """(locale, text) for `language` ("pt_BR"), then its language ("pt"), then English; None when there is none."""
    for locale in (language, language.split("_")[0].split("@")[0], "en"):
        if locale in descriptions:
            return locale, descriptions[locale]
    return None


def stamp_files(stamps_dir: Path) -> list[Path]:
    """Every stamp image in a fixed order: the PNGs, and the SVGs that have no PNG of the same name."""
    pngs = sorted(stamps_dir.rglob("*.png"))
    names = {path.with_suffix("") for path in pngs}
    return sorted(pngs + [path for path in stamps_dir.rglob("*.svg") if path.with_suffix("") not in names])


def tuxpaint_source(language: str, svg_size: int, stamps_dir: Path | None, cache_dir: Path) -> SourceData:
    """Every stamp under `stamps_dir` (None: fetch the Debian package into `cache_dir`), as the module doc says."""
    language = language.replace("-", "_")
    if stamps_dir is None:
        stamps_dir = fetch_deb_package(PACKAGE, cache_dir) / STAMPS_DIR
    if not stamps_dir.is_dir():
        raise SourceError(f"{stamps_dir} is not a folder of Tux Paint stamps; pass --stamps-dir with one (e.g. "
                          f"/{STAMPS_DIR} where tuxpaint-stamps is installed)")
    files = stamp_files(stamps_dir)
    if not files:
        raise SourceError(f"{stamps_dir} holds no .png or .svg stamps; pass --stamps-dir with the stamps folder")
    if any(file.suffix == ".svg" for file in files):
        require_renderer()
    categories = sorted({path.parts[0] for path in (file.relative_to(stamps_dir) for file in files)
                         if len(path.parts) > 1})
    records, found_language = [], False
    for file in files:
        parts = file.relative_to(stamps_dir).parts
        text_file = file.with_suffix(".txt")
        descriptions = parse_description(text_file.read_text(encoding="utf-8", errors="replace")) \
            if text_file.is_file() else {}
        picked = pick_description(descriptions, language)
        found_language |= picked is not None and picked[0] != "en" or language == "en"
        caption = picked[1] if picked else re.sub(r"[_-]+", " ", file.stem)
        data_file = file.with_suffix(".dat")
        spoken = sorted(path.stem.rpartition("_desc_")[2] for path in file.parent.glob(f"{file.stem}_desc_*.ogg"))
        meta: dict[str, object] = {
            "path": "/".join(parts),
            "category": parts[0] if len(parts) > 1 else None,
            "folder": "/".join(parts[1:-1]),
            "description_language": picked[0] if picked else None,
            "flags": data_file.read_text(encoding="utf-8", errors="replace").split() if data_file.is_file() else [],
            "sound": file.with_suffix(".ogg").is_file(),
            "spoken_descriptions": spoken,
            "vector": file.suffix == ".svg",
        }
        open_image = partial(render_svg, file, svg_size) if file.suffix == ".svg" else partial(Image.open, file)
        records.append(Record(
            key=safe_key("/".join(parts[:-1] + (file.stem,))),
            open_image=open_image,
            origin=str(file),
            caption=caption,
            label=categories.index(parts[0]) if len(parts) > 1 else None,
            meta=meta,
            alpha_mask=True,
        ))
    if not found_language:
        raise SourceError(f"no Tux Paint stamp has a description in the language {language!r}; use a locale of the "
                          f".txt files (e.g. de, fr, pt_BR, ca@valencia) or en")
    return SourceData(
        name=f"debian:{PACKAGE} {stamps_dir.name}, descriptions in {language}" + (
            f", SVGs at {svg_size}px" if any(file.suffix == ".svg" for file in files) else ""),
        licence=LICENCE,
        records=records,
        inputs=[path for file in files for path in (file, file.with_suffix(".txt")) if path.exists()],
        classnames={"cls": categories},
    )
