"""The packaged emoji and stamp sources (`vlp-data openmoji`, `fluent`, `tuxpaint`, `emoji --language`) on fake
caches in `tmp_path`: hand-written SVGs, a fake CLDR annotations file and a fake unpacked Debian tree, so nothing
is fetched; each build is checked against what the fake data says, masks included."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image

from data_modules.builder import main
from data_modules.masks import MASK_MEMBER, decode_mask
from data_modules.sources.fluent import match_entry
from data_modules.sources.tuxpaint import parse_description, pick_description
from tests.conftest import fake_emoji_cache

pytest.importorskip("resvg_py", reason="the SVG sources need the svg extra (resvg-py)")


def circle_svg(colour: str, radius: int = 20) -> str:
    """A filled circle in the middle of a 72x72 view box: `colour` inside, transparent outside."""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle cx="36" cy="36" r="{radius}" '
            f'fill="{colour}"/></svg>')


OPENMOJI = [  # (hexcode, emoji, annotation, group, subgroup, skin tone, colour)
    ("1F600", "\U0001F600", "grinning face", "smileys-emotion", "face-smiling", "", "#ff0000"),
    ("1F44B", "\U0001F44B", "waving hand", "people-body", "hand-fingers-open", "", "#00ff00"),
    ("1F44B-1F3FB", "\U0001F44B\U0001F3FB", "waving hand: light skin tone", "people-body", "hand-fingers-open", 1,
     "#0000ff"),
]


def fake_npm_cache(root: Path) -> Path:
    """openmoji, fluentui-emoji and cldr-annotations-full as `fetch_npm_package` leaves them in its cache."""
    openmoji = root / "openmoji-17.0.0" / "package"
    (openmoji / "color" / "svg").mkdir(parents=True)
    (openmoji / "data").mkdir()
    entries = []
    for order, (hexcode, emoji, annotation, group, subgroup, tone, colour) in enumerate(OPENMOJI, start=1):
        (openmoji / "color" / "svg" / f"{hexcode}.svg").write_text(circle_svg(colour))
        entries.append({"emoji": emoji, "hexcode": hexcode, "group": group, "subgroups": subgroup,
                        "annotation": annotation, "tags": "face, grin" if order == 1 else "", "openmoji_tags": "",
                        "skintone": tone, "skintone_base_hexcode": "1F44B" if tone else "", "order": order})
    (openmoji / "data" / "openmoji.json").write_text(json.dumps(entries))
    fluent = root / "fluentui-emoji-1.3.0" / "package" / "icons"
    for style in ("modern", "flat"):
        (fluent / style).mkdir(parents=True)
        for name, colour in (("grinning-face", "#ff0000"), ("waving-hand-light", "#0000ff"),
                             ("waving-hand-default", "#00ff00"), ("one-oclock", "#ffff00")):
            (fluent / style / f"{name}.svg").write_text(circle_svg(colour))
    cldr = root / "cldr-annotations-full-48.2.0" / "package" / "annotations"
    for language, names in (("de", {"\U0001F600": (["Gesicht", "grinsen"], "grinsendes Gesicht"),
                                    "\u0000": (["Kreis"], "roter Kreis")}),
                            ("de-CH", {"\U0001F44B": (["Hand"], "winkende Hand")})):
        (cldr / language).mkdir(parents=True)
        annotations = {char: {"default": keywords, "tts": [tts]} for char, (keywords, tts) in names.items()}
        (cldr / language / "annotations.json").write_text(json.dumps(
            {"annotations": {"identity": {"language": language}, "annotations": annotations}}))
    return root


def fake_debian_cache(root: Path) -> Path:
    """tuxpaint-stamps-default as `fetch_deb_package` leaves it: 2 PNG stamps with alpha and their .txt, a sound."""
    stamps = root / "tuxpaint-stamps-default_2022.06.04-1_all" / "usr" / "share" / "tuxpaint" / "stamps"
    (stamps / "animals" / "cats").mkdir(parents=True)
    (stamps / "food").mkdir()
    cat = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    cat.paste((200, 100, 50, 255), (10, 5, 30, 25))
    cat.save(stamps / "animals" / "cats" / "cat.png")
    (stamps / "animals" / "cats" / "cat.txt").write_text(
        "A cat.\nde.utf8=Eine Katze.\npt_BR.utf8=Um gato.\nca@valencia.utf8=Un gat.\n", encoding="utf-8")
    (stamps / "animals" / "cats" / "cat.dat").write_text("colorable\nnoflip\n")
    (stamps / "animals" / "cats" / "cat.ogg").write_bytes(b"OggS")
    (stamps / "animals" / "cats" / "cat_desc_de.ogg").write_bytes(b"OggS")
    apple = Image.new("LA", (20, 20), (0, 0))
    apple.paste((120, 255), (0, 0, 20, 10))
    apple.save(stamps / "food" / "apple.png")
    (stamps / "food" / "apple.txt").write_text("An apple.\n", encoding="utf-8")
    return root


def build(*argv: object) -> tuple[int, dict[str, dict[str, bytes]], dict]:
    out = Path(argv[1])
    code = main([str(arg) for arg in argv])
    if code != 0:
        return code, {}, {}
    samples = {sample["__key__"]: sample
               for sample in webdataset.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False)}
    return code, samples, json.loads((out / "manifest.json").read_text())


def rgba(sample: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    return image, decode_mask(sample[MASK_MEMBER])


def test_openmoji_renders_svgs_with_captions_groups_tags_and_alpha_masks(tmp_path: Path) -> None:
    code, samples, manifest = build("openmoji", tmp_path / "out", "--cache-dir", fake_npm_cache(tmp_path / "npm"),
                                    "--size", "36")
    assert code == 0 and sorted(samples) == ["1F44B", "1F44B-1F3FB", "1F600"]
    assert manifest["classnames"] == {"cls": ["smileys-emotion", "people-body"],
                                      "subgroup_id": ["face-smiling", "hand-fingers-open"]}
    assert "CC-BY-SA 4.0" in manifest["licence"] and MASK_MEMBER in manifest["members"]
    grin = samples["1F600"]
    assert grin["txt"].decode() == "grinning face" and grin["cls"] == b"0"
    meta = json.loads(grin["json"])
    assert meta["tags"] == ["face", "grin"] and meta["hexcode"] == "1F600" and meta["subgroup_id"] == 0
    assert meta["skintone"] is None and "name_language" not in meta
    tone = json.loads(samples["1F44B-1F3FB"]["json"])
    assert tone["skintone"] == 1 and tone["skintone_base_hexcode"] == "1F44B"
    assert samples["1F44B-1F3FB"]["cls"] == b"1"
    image, mask = rgba(grin)
    assert image.shape == (36, 36, 3) and mask.shape == (36, 36)
    # The circle (radius 20 of 72, so 10 px here) is red and foreground; the corners are transparent, so background
    # in the mask and the builder's white in the flattened image.
    assert tuple(image[18, 18]) == (255, 0, 0) and mask[18, 18]
    assert not mask[0, 0] and not mask[18, 1] and tuple(image[0, 0]) == (255, 255, 255)
    assert abs(mask.mean() - np.pi * 10**2 / 36**2) < 0.03
    assert tuple(rgba(samples["1F44B-1F3FB"])[0][18, 18]) == (0, 0, 255)


def test_openmoji_counts_a_broken_svg_as_skipped(tmp_path: Path) -> None:
    npm = fake_npm_cache(tmp_path / "npm")
    (npm / "openmoji-17.0.0" / "package" / "color" / "svg" / "1F44B.svg").write_text("<svg><circle")
    code, samples, manifest = build("openmoji", tmp_path / "out", "--cache-dir", npm)
    assert code == 0 and sorted(samples) == ["1F44B-1F3FB", "1F600"]
    assert list(manifest["skipped"]) == ["1F44B"] and "1F44B.svg" in manifest["skipped"]["1F44B"]


def test_openmoji_language_takes_cldr_names_with_the_parent_locale_and_marks_english_fallbacks(tmp_path: Path) -> None:
    code, samples, manifest = build("openmoji", tmp_path / "out", "--cache-dir", fake_npm_cache(tmp_path / "npm"),
                                    "--language", "de_CH")
    assert code == 0 and "Unicode-3.0" in manifest["licence"]
    grin = json.loads(samples["1F600"]["json"])
    assert samples["1F600"]["txt"].decode() == "grinsendes Gesicht"  # from de, the parent of de-CH
    assert grin["name_language"] == "de-CH" and grin["keywords"] == ["Gesicht", "grinsen"]
    assert samples["1F44B"]["txt"].decode() == "winkende Hand"  # de-CH's own entry
    tone = samples["1F44B-1F3FB"]  # a skin-tone sequence: not in cldr-annotations-full
    assert tone["txt"].decode() == "waving hand: light skin tone"
    assert json.loads(tone["json"])["name_language"] == "en" and "keywords" not in json.loads(tone["json"])


def test_unknown_language_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = build("openmoji", tmp_path / "out", "--cache-dir", fake_npm_cache(tmp_path / "npm"),
                       "--language", "xx")
    error = capsys.readouterr().err.strip()
    assert code == 2 and "'xx'" in error and "locale folder name" in error and error.count("\n") == 0


def test_emoji_language_option(tmp_path: Path) -> None:
    npm = fake_npm_cache(fake_emoji_cache(tmp_path / "npm"))
    metadata = npm / "emoji-datasource-twitter-16.0.0" / "package" / "emoji.json"
    metadata.write_text(json.dumps(json.loads(metadata.read_text())[:-1]))  # the flag reuses the first image's key
    code, samples, manifest = build("emoji", tmp_path / "out", "--cache-dir", npm, "--language", "de")
    assert code == 0 and manifest["source"].endswith("names in de") and "CLDR" in manifest["licence"]
    first = samples["0000"]  # unified 0000 is the fake CLDR's "\u0000"
    assert first["txt"].decode() == "roter Kreis"
    assert json.loads(first["json"])["name_language"] == "de" and json.loads(first["json"])["keywords"] == ["Kreis"]
    other = samples["0001"]
    assert other["txt"].decode() == json.loads(other["json"])["name"].lower()
    assert json.loads(other["json"])["name_language"] == "en"


def test_fluent_matches_openmoji_groups_and_skin_tones(tmp_path: Path) -> None:
    code, samples, manifest = build("fluent", tmp_path / "out", "--cache-dir", fake_npm_cache(tmp_path / "npm"),
                                    "--style", "flat", "--size", "24")
    assert code == 0 and sorted(samples) == ["grinning-face", "one-oclock", "waving-hand-default", "waving-hand-light"]
    assert manifest["unmatched"] == 1 and "MIT" in manifest["licence"]
    assert manifest["classnames"]["cls"] == ["smileys-emotion", "people-body"]
    light = samples["waving-hand-light"]
    assert light["txt"].decode() == "waving hand: light skin tone" and light["cls"] == b"1"
    assert json.loads(light["json"])["skintone"] == 1 and json.loads(light["json"])["hexcode"] == "1F44B-1F3FB"
    assert samples["waving-hand-default"]["txt"].decode() == "waving hand"
    clock = samples["one-oclock"]
    assert clock["txt"].decode() == "one oclock" and "cls" not in clock and json.loads(clock["json"])["group"] is None
    image, mask = rgba(light)
    assert tuple(image[12, 12]) == (0, 0, 255) and mask[12, 12] and not mask[0, 0]


def test_fluent_file_names_match_whole_names_before_tones() -> None:
    index = {"vertical-traffic-light": {"annotation": "vertical traffic light"}}
    assert match_entry("vertical-traffic-light", index) == (index["vertical-traffic-light"], None)
    assert match_entry("man-medium-light", {}) == (None, 2)


def test_tuxpaint_stamps_with_descriptions_categories_and_masks(tmp_path: Path) -> None:
    code, samples, manifest = build("tuxpaint", tmp_path / "out", "--cache-dir", fake_debian_cache(tmp_path / "deb"),
                                    "--language", "pt_BR")
    assert code == 0 and sorted(samples) == ["animals_cats_cat", "food_apple"]
    assert manifest["classnames"] == {"cls": ["animals", "food"]} and "GPL-2.0-or-later" in manifest["licence"]
    cat = samples["animals_cats_cat"]
    meta = json.loads(cat["json"])
    assert cat["txt"].decode() == "Um gato." and cat["cls"] == b"0"
    assert meta["description_language"] == "pt_BR" and meta["folder"] == "cats" and meta["flags"] == ["colorable",
                                                                                                    "noflip"]
    assert meta["sound"] is True and meta["spoken_descriptions"] == ["de"]
    image, mask = rgba(cat)
    assert mask.shape == (30, 40) and mask[5:25, 10:30].all() and mask.sum() == 20 * 20
    assert tuple(image[10, 20]) == (200, 100, 50) and tuple(image[0, 0]) == (255, 255, 255)
    apple = samples["food_apple"]
    assert apple["txt"].decode() == "An apple." and json.loads(apple["json"])["description_language"] == "en"
    assert decode_mask(apple[MASK_MEMBER])[:10].all() and not decode_mask(apple[MASK_MEMBER])[10:].any()


def test_tuxpaint_language_nobody_has_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = build("tuxpaint", tmp_path / "out", "--cache-dir", fake_debian_cache(tmp_path / "deb"),
                       "--language", "xx")
    error = capsys.readouterr().err.strip()
    assert code == 2 and "'xx'" in error and error.count("\n") == 0


def test_tuxpaint_description_parsing() -> None:
    descriptions = parse_description("A nickel.\nde.utf8=Ein Nickel.\nca@valencia.utf8=Un níquel.\nfr.utf8=\n")
    assert descriptions == {"en": "A nickel.", "de": "Ein Nickel.", "ca@valencia": "Un níquel."}
    assert pick_description(descriptions, "de_AT") == ("de", "Ein Nickel.")
    assert pick_description(descriptions, "fr") == ("en", "A nickel.")
