"""Minimal visual contrasts among emoji drawings, the candidates of MMVP-style CLIP-blind pairs (`vlp-data
emoji-contrasts`).

MMVP (Tong et al. 2024, "Eyes Wide Shut? Exploring the Visual Shortcomings of Multimodal LLMs", sec. 2) mines pairs
of images that CLIP embeds alike and a vision-only self-supervised encoder embeds apart, then writes for each pair a
question whose answer differs between its two images. Here the candidate pairs are contrasts whose difference is
known exactly, and each image's text names its side of the contrast:

* **skin tone** (`kind` "skin_tone"): the five Fitzpatrick skin-tone variants (U+1F3FB ... U+1F3FF) of each of the
  323 emoji that have them, in `--tone-style`; two-person emoji keep only their same-tone variants. Text: the
  emoji's Unicode name with the tone, as Unicode names the variant ("father christmas: medium-dark skin tone").
* **drawing style** (`kind` "style"): the two `--styles` drawings of one code point (Google's and Twitter's), kept
  where the mean colours of the two drawings have different names (`sources.scenes.cutout_colour`, the colour the
  scenes' objects are described by), since only then can a text tell them apart. Text: "a <colour> <name>".

`.json` holds `kind`, `group` (the images of one group are the candidate pairs: one emoji's tones, or its two
drawings), `name`, `unified`, `style` and `tone` / `colour`; the caption is the text. One split, `test`.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from PIL import Image

from data_modules.sources import Record, SourceData, SourceError, safe_key
from data_modules.sources.emoji import IMAGE_LICENCES, STYLES, emoji_caption, fetch_package
from data_modules.sources.scenes import cutout_colour

#: the Unicode skin-tone modifiers and the words of their Unicode names.
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
SPLIT = "test"


def _tone_records(entry: dict, image_dir: Path, style: str) -> list[Record]:
    variations = entry.get("skin_variations") or {}
    records = []
    for code, tone in SKIN_TONES.items():
        variant = variations.get(code) or variations.get(f"{code}-{code}")
        if variant is None or not variant.get(f"has_img_{style}"):
            continue
        path = image_dir / variant["image"]
        records.append(Record(
            key=safe_key(f"{Path(variant['image']).stem}_{style}"), open_image=partial(Image.open, path),
            origin=str(path), caption=f"{emoji_caption(entry)}: {tone} skin tone", split=SPLIT,
            meta={"kind": "skin_tone", "group": f"skin_tone-{entry['unified']}", "name": emoji_caption(entry),
                  "unified": variant["unified"], "style": style, "tone": tone},
        ))
    return records if len(records) > 1 else []


def _style_records(entry: dict, image_dirs: dict[str, Path]) -> list[Record]:
    paths = {style: image_dir / entry["image"] for style, image_dir in image_dirs.items()}
    if not all(entry.get(f"has_img_{style}") and path.is_file() for style, path in paths.items()):
        return []
    colours = {style: cutout_colour(str(path)) for style, path in paths.items()}
    if len(set(colours.values())) < len(colours):
        return []
    return [Record(
        key=safe_key(f"{Path(entry['image']).stem}_{style}"), open_image=partial(Image.open, path), origin=str(path),
        caption=f"a {colours[style]} {emoji_caption(entry)}", split=SPLIT,
        meta={"kind": "style", "group": f"style-{entry['unified']}", "name": emoji_caption(entry),
              "unified": entry["unified"], "style": style, "colour": colours[style]},
    ) for style, path in paths.items()]


def emoji_contrasts_source(styles: tuple[str, str], tone_style: str, cache_dir: Path) -> SourceData:
    """The skin-tone and drawing-style contrast candidates (module doc) from the `emoji-datasource-<style>` npm
    packages (fetched into `cache_dir` once, like `vlp-data emoji`)."""
    if len(styles) != 2 or styles[0] == styles[1] or not set(styles) <= set(STYLES) or tone_style not in STYLES:
        raise SourceError(f"--styles {','.join(styles)} must name two different styles and --tone-style "
                          f"{tone_style!r} one, of {', '.join(STYLES)}")
    packages = {style: fetch_package(f"emoji-datasource-{style}", cache_dir) for style in {*styles, tone_style}}
    image_dirs = {style: packages[style] / "img" / style / "64" for style in packages}
    metadata = packages[tone_style] / "emoji.json"
    if not metadata.is_file():
        raise SourceError(f"{packages[tone_style]} has no emoji.json")
    entries = sorted(json.loads(metadata.read_text(encoding="utf-8")), key=lambda entry: entry["sort_order"])
    records = [record for entry in entries for record in _tone_records(entry, image_dirs[tone_style], tone_style)]
    records += [record for entry in entries
                for record in _style_records(entry, {style: image_dirs[style] for style in styles})]
    if not records:
        raise SourceError(f"the emoji packages in {cache_dir} hold no skin-tone variants and no style contrasts")
    names = sorted(packages)
    return SourceData(
        name=f"emoji contrasts: skin tones ({tone_style}) and {' vs '.join(styles)} drawings, npm "
        + ", ".join(f"emoji-datasource-{style}" for style in names),
        licence="; ".join(IMAGE_LICENCES[style] for style in names) + "; emoji.json metadata: MIT (emoji-data)",
        records=records,
        inputs=[metadata, *(Path(record.origin) for record in records)],
    )
