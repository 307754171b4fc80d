"""Rendered words (and small pages of words) for text recognition: `vlp-data words`.

Each sample is a word of a seeded vocabulary (by default the built-in `words.txt`, 799 common English words of
3-8 letters) drawn with PIL's FreeType renderer in one of the machine's TrueType fonts (the DejaVu family of
`fonts-dejavu-core` / `-extra`: Sans, Sans Mono, Serif and their bold, oblique and condensed faces), on a square
canvas of `--size` pixels, with a random font size (55-100 % of what fits 80 % of the width), text colour,
background (a plain colour or a two-colour gradient, at least 100 levels of luma apart from the text), position
jitter and a rotation of up to +-6 degrees. The caption (`.txt`) is the word; `.json` holds the word, the font file,
every drawing parameter and `"ocr": true`, which tells a text-recognition method (`UNIT`) that the sample is a text
image to read rather than a natural image. `--pages N` adds N "pages": 2-4 lines of 2-3 words on a canvas twice as
large (the caption is the words in reading order, one line of text).

Splits: the fonts whose file name starts with `--heldout-font` (default `DejaVuSerif`: the whole serif family)
are never in `train` or `val`; `--heldout-count` words (and pages in proportion) are rendered in them alone, into the
fixed split `unseen_font` (a bench reads "words in a font never seen in training" from `unseen_font-*.tar`). The
same vocabulary is used everywhere, so the split measures generalisation to a new typeface, not to new words.

Reproducible: sample k's parameters come from `random.Random(f"{seed}:{key}")` only, so the same seed, vocabulary,
fonts and Pillow / FreeType give byte-identical shards whatever the order the builder writes them in.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from data_modules.sources import Record, SourceData, SourceError

DEFAULT_FONTS_DIR = Path("/usr/share/fonts/truetype/dejavu")
DEFAULT_VOCABULARY = Path(__file__).with_name("words.txt")
HELDOUT_SPLIT = "unseen_font"
#: bumped whenever the drawing changes, so existing shard sets are rebuilt (it is part of the source name).
RENDER_VERSION = 1
_MIN_LUMA_CONTRAST = 100
_MAX_ANGLE = 6.0
_LICENCE = ("images rendered with the DejaVu fonts (Bitstream Vera / DejaVu licence: free; rendered text carries no "
            "restriction); built-in word list written for vlp_lightning")


@dataclass(frozen=True)
class Drawing:
    """Everything one rendered sample depends on (also written to its `.json`)."""

    lines: tuple[str, ...]
    font: str
    canvas: int
    fill: float  # the font size as a fraction of the largest that fits
    angle: float
    offset: tuple[float, float]  # where the text sits in the free margin, 0..1 on each axis
    text_colour: tuple[int, int, int]
    background: tuple[tuple[int, int, int], tuple[int, int, int]]
    gradient: str  # "none", "horizontal" or "vertical"


@lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _luma(colour: tuple[int, int, int]) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def _background(drawing: Drawing) -> Image.Image:
    first, second = drawing.background
    if drawing.gradient == "none":
        return Image.new("RGB", (drawing.canvas, drawing.canvas), first)
    ramp = Image.linear_gradient("L").resize((drawing.canvas, drawing.canvas))
    if drawing.gradient == "horizontal":
        ramp = ramp.transpose(Image.Transpose.ROTATE_90)
    return Image.composite(Image.new("RGB", ramp.size, second), Image.new("RGB", ramp.size, first), ramp)


def render(drawing: Drawing, fonts_dir: Path) -> Image.Image:
    """The sample `drawing` describes: the text centred in 80 % x 60 % of the canvas (pages: 85 % x 80 %), scaled by
    `fill`, shifted by `offset` within the free margin, rotated by `angle` about the canvas centre."""
    text = "\n".join(drawing.lines)
    path = str(fonts_dir / drawing.font)
    reference = 100
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox(
        (0, 0), text, font=_font(path, reference), align="center")
    width_share, height_share = (0.8, 0.6) if len(drawing.lines) == 1 else (0.85, 0.8)
    largest = min(width_share * drawing.canvas * reference / max(1, right - left),
                  height_share * drawing.canvas * reference / max(1, bottom - top))
    font = _font(path, max(6, int(largest * drawing.fill)))
    layer = Image.new("RGBA", (drawing.canvas, drawing.canvas), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, align="center")
    x = (drawing.canvas - (right - left)) * drawing.offset[0] - left
    y = (drawing.canvas - (bottom - top)) * drawing.offset[1] - top
    draw.multiline_text((x, y), text, font=font, fill=(*drawing.text_colour, 255), align="center")
    layer = layer.rotate(drawing.angle, resample=Image.Resampling.BICUBIC)
    image = _background(drawing).convert("RGBA")
    return Image.alpha_composite(image, layer).convert("RGB")


def _drawing(lines: tuple[str, ...], font: str, canvas: int, rng: random.Random) -> Drawing:
    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    background = colour()
    text_colour = colour()
    while abs(_luma(text_colour) - _luma(background)) < _MIN_LUMA_CONTRAST:
        text_colour = colour()
    second = tuple(min(255, max(0, channel + rng.randint(-40, 40))) for channel in background)
    return Drawing(
        lines=lines,
        font=font,
        canvas=canvas,
        fill=round(rng.uniform(0.55, 1.0), 4),
        angle=round(rng.uniform(-_MAX_ANGLE, _MAX_ANGLE), 2),
        offset=(round(rng.uniform(0.3, 0.7), 4), round(rng.uniform(0.25, 0.75), 4)),
        text_colour=text_colour,
        background=(background, second),
        gradient=rng.choice(("none", "horizontal", "vertical")),
    )


def read_vocabulary(path: Path) -> list[str]:
    """The words of a vocabulary file: one per line, blank lines and `#` comments skipped, duplicates dropped."""
    if not path.is_file():
        raise SourceError(f"the vocabulary {path} does not exist; pass --vocabulary with a file of one word per line")
    words = list(dict.fromkeys(
        line.strip() for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")))
    bad = next((word for word in words if any(char.isspace() for char in word)), None)
    if not words or bad is not None:
        raise SourceError(f"the vocabulary {path} must hold one word per line (found {bad!r}); fix that line")
    return words


def font_files(fonts_dir: Path) -> list[Path]:
    """The TrueType fonts of `fonts_dir` that draw words (DejaVu's math font is left out), in name order."""
    if not fonts_dir.is_dir() or not (fonts := sorted(fonts_dir.glob("*.ttf"))):
        raise SourceError(f"no .ttf fonts in {fonts_dir}; install them with: apt-get install fonts-dejavu-core "
                          "fonts-dejavu-extra (or pass --fonts-dir with a folder of .ttf files)")
    return [font for font in fonts if "Math" not in font.stem]


def words_source(
    fonts_dir: Path = DEFAULT_FONTS_DIR,
    heldout_font: str = "DejaVuSerif",
    count: int = 3000,
    heldout_count: int = 500,
    pages: int = 0,
    size: int = 64,
    vocabulary: Path = DEFAULT_VOCABULARY,
    seed: int = 0,
) -> SourceData:
    """`count` words (and `pages` pages) in the fonts not held out, left to `--split`, plus `heldout_count` words
    (and pages in proportion) in the held-out fonts, fixed in the split `unseen_font` (module doc)."""
    if size < 16:
        raise SourceError(f"--size {size} is too small to draw a word; use at least 16 pixels")
    words = read_vocabulary(vocabulary)
    fonts = font_files(fonts_dir)
    heldout = [font.name for font in fonts if font.stem.startswith(heldout_font)]
    seen = [font.name for font in fonts if font.name not in heldout]
    if not heldout or not seen:
        raise SourceError(f"--heldout-font {heldout_font!r} matches {len(heldout)} of the {len(fonts)} fonts in "
                          f"{fonts_dir}; give the start of some but not all font file names, e.g. DejaVuSerif")
    heldout_pages = round(pages * heldout_count / count) if count else 0
    order = random.Random(f"{seed}:vocabulary").sample(words, len(words))  # every word equally often, any count
    records = []
    for prefix, group, words_wanted, pages_wanted, split in (
        ("", seen, count, pages, None), ("unseen_", heldout, heldout_count, heldout_pages, HELDOUT_SPLIT)
    ):
        for index in range(words_wanted):
            key = f"{prefix}word_{index:06d}"
            rng = random.Random(f"{seed}:{key}")
            word = order[index % len(order)]
            records.append(_record(key, (word,), rng.choice(group), size, rng, fonts_dir, split, "word"))
        for index in range(pages_wanted):
            key = f"{prefix}page_{index:06d}"
            rng = random.Random(f"{seed}:{key}")
            lines = tuple(" ".join(rng.choice(words) for _ in range(rng.randint(2, 3)))
                          for _ in range(rng.randint(2, 4)))
            records.append(_record(key, lines, rng.choice(group), 2 * size, rng, fonts_dir, split, "page"))
    return SourceData(
        name=f"rendered words v{RENDER_VERSION} ({len(words)} words of {vocabulary.name}, fonts of {fonts_dir}, "
             f"held out: {heldout_font}*)",
        licence=_LICENCE,
        records=records,
        inputs=[vocabulary, *(fonts_dir / name for name in seen + heldout)],
    )


def _record(key: str, lines: tuple[str, ...], font: str, canvas: int, rng: random.Random, fonts_dir: Path,
            split: str | None, kind: str) -> Record:
    drawing = _drawing(lines, font, canvas, rng)
    text = " ".join(lines)
    return Record(
        key=key,
        open_image=partial(render, drawing, fonts_dir),
        origin=f"{fonts_dir / font}: {text!r}",
        caption=text,
        meta={"text": text, **({"word": text} if kind == "word" else {}), "kind": kind, "ocr": True,
              **asdict(drawing)},
        split=split,
    )
