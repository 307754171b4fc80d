"""Emoji names and keywords in other languages, from Unicode CLDR (npm `cldr-annotations-full`, Unicode-3.0).

`annotations/<lang>/annotations.json` maps each emoji character to its `tts` name ("grinsendes Gesicht") and its
`default` keywords; a regional file ("de-CH") lists only what differs from its language ("de"), so the parents are
read first. The full package has no skin-tone or other derived sequences (those are in
`cldr-annotations-derived-full`): such emoji keep their English name, and their `.json` says so
(`"name_language": "en"`), so a multilingual evaluation can leave them out instead of mistaking them for
translations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_modules.sources import SourceError
from data_modules.sources.registry import fetch_npm_package

PACKAGE = "cldr-annotations-full"
VERSION = "48.2.0"
LICENCE = f"names and keywords: Unicode-3.0 (CLDR {VERSION.split('.')[0]} annotations, npm {PACKAGE}@{VERSION})"
_VARIATION_SELECTOR = "\ufe0f"


@dataclass(frozen=True)
class Annotations:
    """The CLDR names of one language: `names[character] = (tts name, keywords)`."""

    language: str
    names: dict[str, tuple[str, list[str]]]

    def lookup(self, emoji: str) -> tuple[str, list[str]] | None:
        """(name, keywords) of `emoji` (with or without its U+FE0F variation selectors, as CLDR keys vary), or None."""
        return self.names.get(emoji) or self.names.get(emoji.replace(_VARIATION_SELECTOR, ""))

    def describe(self, emoji: str, english_name: str) -> tuple[str, dict[str, object]]:
        """The caption and `.json` fields of `emoji`: the CLDR name and keywords, or the English name when this
        language has no entry for it (`"name_language": "en"`)."""
        found = self.lookup(emoji)
        if found is None:
            return english_name, {"name_language": "en"}
        name, keywords = found
        return name, {"name_language": self.language, "keywords": keywords}


def emoji_from_unified(unified: str) -> str:
    """"1F468-200D-1F4BB" (emoji-data's `unified`, OpenMoji's `hexcode`) -> the emoji's characters."""
    return "".join(chr(int(code, 16)) for code in unified.split("-"))


def load_annotations(language: str, cache_dir: Path) -> Annotations:
    """The annotations of `language` (a CLDR locale: de, pt-PT, zh-Hant; `_` is read as `-`), fetched once."""
    root = fetch_npm_package(PACKAGE, VERSION, cache_dir, _is_wanted_member) / "annotations"
    language = language.replace("_", "-")
    if not (root / language / "annotations.json").is_file():
        close = sorted(path.name for path in root.iterdir() if path.name.split("-")[0] == language.split("-")[0])
        hint = f"languages of that family here: {', '.join(close)}" if close else "e.g. de, fr, ja, pt-PT or zh-Hant"
        raise SourceError(f"CLDR has no emoji annotations for the language {language!r}; use a locale folder name of "
                          f"{root} ({hint})")
    parts = language.split("-")
    names: dict[str, tuple[str, list[str]]] = {}
    for end in range(1, len(parts) + 1):
        file = root / "-".join(parts[:end]) / "annotations.json"
        if file.is_file():
            entries = json.loads(file.read_text(encoding="utf-8"))["annotations"]["annotations"]
            for character, entry in entries.items():
                previous = names.get(character)
                tts = entry.get("tts") or ([previous[0]] if previous else [])
                keywords = entry.get("default") or (previous[1] if previous else [])
                if tts:
                    names[character] = (tts[0], list(keywords))
    return Annotations(language, names)


def _is_wanted_member(name: str) -> bool:
    return name in ("package/package.json", "package/LICENSE") or name.endswith("/annotations.json")
