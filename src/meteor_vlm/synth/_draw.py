"""Drawing primitives shared by the families: palette, fonts, backgrounds, shapes, text.

Geometry is expressed in unit coordinates (fractions of the image side) by the
callers and converted to pixels here, so a sample looks the same at any size.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

# Saturated colours: each has one channel <= 60 so it never blends into the light backgrounds.
COLORS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
    "black": (30, 30, 30),
}

# Dark inks for text, readable on the light backgrounds.
INKS: tuple[RGB, ...] = ((0, 0, 0), (20, 30, 90), (90, 20, 20), (20, 70, 30), (60, 60, 60))

# Font size as a fraction of the side: 11 px at 336 px, capitals about 8 px tall.
TEXT_SCALE = 0.045


def text_px(size: int) -> int:
    """Font size in pixels for small detail text on an image of side ``size``."""
    return max(4, round(size * TEXT_SCALE))


@functools.lru_cache(maxsize=1)
def _font_file() -> str | None:
    """Path of matplotlib's bundled DejaVuSans-Bold.ttf, or None when matplotlib is absent."""
    # find_spec locates the package without paying for importing matplotlib.
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "mpl-data", "fonts", "ttf", "DejaVuSans-Bold.ttf")
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=64)
def font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Return a cached font of pixel size ``px`` (DejaVu Sans Bold, else Pillow's default)."""
    path = _font_file()
    if path is not None:
        return ImageFont.truetype(path, px)
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


def light_color(rng: random.Random) -> RGB:
    """A random pale colour for backgrounds."""
    return (rng.randint(224, 248), rng.randint(224, 248), rng.randint(224, 248))


def background(rng: random.Random, size: int, base: RGB | None = None, kind: str | None = None) -> Image.Image:
    """A plain, gradient or lightly textured background of side ``size``.

    Gradients and textures are built on a tiny grid and upsampled, so they are
    cheap and look identical at every image size.
    """
    base = base if base is not None else light_color(rng)
    kind = kind if kind is not None else rng.choice(("plain", "gradient", "texture"))
    if kind == "plain":
        return Image.new("RGB", (size, size), base)
    grid = 2 if kind == "gradient" else 6
    amp = 12 if kind == "gradient" else 8
    cells = np.array(
        [[[min(255, max(0, c + rng.randint(-amp, amp))) for c in base] for _ in range(grid)] for _ in range(grid)],
        dtype=np.uint8,
    )
    return Image.fromarray(cells, "RGB").resize((size, size), Image.Resampling.BILINEAR)


def darker(color: RGB, factor: float = 0.55) -> RGB:
    """``color`` scaled towards black, used for shape outlines."""
    return tuple(int(c * factor) for c in color)  # type: ignore[return-value]


def shape_polygon(shape: str, cx: float, cy: float, d: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of diameter ``d`` centred on (cx, cy), in pixels."""
    r = d / 2
    if shape == "square":
        h = r * 0.86  # a full-box square would look much heavier than the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.85, cy), (cx, cy + r), (cx - r * 0.85, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, d: float, color: RGB, size: int) -> None:
    """Draw a filled, outlined shape of diameter ``d`` pixels centred on (cx, cy)."""
    width = max(1, round(size / 168))
    outline = darker(color)
    if shape == "circle":
        r = d / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color, outline=outline, width=width)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, d), fill=color, outline=outline, width=width)


def draw_text(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, px: int, fill: RGB, anchor: str = "la"
) -> tuple[int, int, int, int]:
    """Draw ``text`` at ``xy`` with the cached font of size ``px`` and return its pixel bbox."""
    fnt = font(px)
    draw.text(xy, text, font=fnt, fill=fill, anchor=anchor)
    return tuple(int(v) for v in draw.textbbox(xy, text, font=fnt, anchor=anchor))  # type: ignore[return-value]


def glyph_boxes(
    xy: tuple[float, float], text: str, px: int, anchor: str = "la"
) -> list[tuple[int, int, int, int, str]]:
    """Pixel ink box and character of every visible glyph of ``text`` as `draw_text` draws it
    (spaces have no box). Ground truth for per-character targets."""
    fnt = font(px)
    # Where the string's "la" origin lies for this anchor (Pillow's "t"/"b"/"m" depend on the string's ink).
    sx0, sy0, _, _ = fnt.getbbox(text, anchor=anchor)
    lx0, ly0, _, _ = fnt.getbbox(text, anchor="la")
    ox, oy = xy[0] + sx0 - lx0, xy[1] + sy0 - ly0
    out = []
    for i, ch in enumerate(text):
        if ch.isspace():
            continue
        x = ox + fnt.getlength(text[:i])
        x0, y0, x1, y1 = fnt.getbbox(ch, anchor="la")
        if x1 > x0 and y1 > y0:
            out.append((int(x + x0), int(oy + y0), int(math.ceil(x + x1)), int(math.ceil(oy + y1)), ch))
    return out
