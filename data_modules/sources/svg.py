"""SVG to RGBA rendering for the vector sources (`vlp-data openmoji`, `fluent`, the SVG-only Tux Paint stamps).

The renderer is resvg (Rust), through the PyPI wheel `resvg-py` (the `svg` extra). Why resvg: it is the most
complete static-SVG renderer outside the browsers (it passes most of its ~1,600-file test suite, gradients, masks
and filters included, which the Fluent "color" drawings use throughout), and the wheel is self-contained (abi3,
manylinux), so nothing has to be installed system-wide. CairoSVG would need the system libcairo and has weaker
gradient / filter support; pyvips needs libvips (librsvg underneath); skia-python is a 60 MB wheel; svglib +
reportlab render no gradients' opacity and no masks. The output keeps the drawing's transparency, which the
builder writes as the `.mask.png` member.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from data_modules.sources import SourceError


def require_renderer() -> None:
    """Fail before any sample is listed when the renderer is missing (one sentence with the fix)."""
    try:
        import resvg_py  # noqa: F401
    except ImportError:
        raise SourceError("rendering SVG needs the resvg-py package, which is not installed; install it with: "
                          "pip install -e '.[svg]'") from None


def render_svg(path: Path, size: int) -> Image.Image:
    """The SVG file `path` drawn to fit a `size` x `size` box (aspect kept, so a square emoji fills it), RGBA.

    A broken file raises ValueError (resvg's parse error) or OSError (unreadable), both of which the builder counts
    as a skipped sample. System fonts are not loaded: emoji and stamps are drawn with paths, and loading them costs
    more than the drawing.
    """
    import resvg_py

    text = path.read_text(encoding="utf-8")
    png = resvg_py.svg_to_bytes(svg_string=text, width=size, height=size, skip_system_fonts=True)
    image = Image.open(io.BytesIO(bytes(png)))
    image.load()
    return image.convert("RGBA")
