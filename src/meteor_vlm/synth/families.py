"""One generator per task family.

Each generator takes a seeded ``random.Random`` and the image side and returns
``(image, question, answer, meta)``.  All random draws that decide content or
layout happen in unit coordinates and never depend on the image size, so a
sample is the same scene at every resolution.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from PIL import Image, ImageDraw

from . import _draw
from ._lexicon import (
    CHART_LABELS,
    COLOR_NAMES,
    DOC_KEYS,
    DOC_NUMBER_KEYS,
    NO,
    SHAPE_NAMES,
    SHAPE_PLURALS,
    TEMPLATES,
    WORDS,
    YES,
)

Generated = tuple[Image.Image, str, str, dict[str, Any]]
Asked = tuple[str, str, dict[str, Any]]

MARGIN = 0.04  # empty border, in units of the image side


# --------------------------------------------------------------------------- objects


def _column_layout(rng: random.Random, n: int, columns: int = 5) -> list[tuple[float, float, float]]:
    """Place ``n`` objects in distinct vertical columns, so left/right relations are unambiguous."""
    width = (1 - 2 * MARGIN) / columns
    layout = []
    for col in sorted(rng.sample(range(columns), n)):
        d = rng.uniform(0.13, 0.16)
        lo = MARGIN + col * width + d / 2 + 0.01
        hi = MARGIN + (col + 1) * width - d / 2 - 0.01
        layout.append((rng.uniform(lo, hi), rng.uniform(MARGIN + d / 2, 1 - MARGIN - d / 2), d))
    return layout


def _grid_layout(rng: random.Random, n: int, cells: int = 4) -> list[tuple[float, float, float]]:
    """Place ``n`` objects in distinct cells of a jittered grid, so they never touch."""
    width = (1 - 2 * MARGIN) / cells
    layout = []
    for cell in rng.sample(range(cells * cells), n):
        row, col = divmod(cell, cells)
        d = rng.uniform(0.11, 0.14)
        x = MARGIN + col * width + rng.uniform(d / 2 + 0.01, width - d / 2 - 0.01)
        y = MARGIN + row * width + rng.uniform(d / 2 + 0.01, width - d / 2 - 0.01)
        layout.append((x, y, d))
    return layout


def _render_objects(rng: random.Random, size: int, objects: list[dict[str, Any]]) -> Image.Image:
    """Draw the objects (unit coordinates) on a fresh light background."""
    image = _draw.background(rng, size)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw.draw_shape(
            draw, obj["shape"], obj["x"] * size, obj["y"] * size, obj["size"] * size, _draw.COLORS[obj["color"]], size
        )
    return image


def _objects(layout: list[tuple[float, float, float]], attrs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Zip positions with (color, shape) pairs into object records."""
    return [
        {"color": color, "shape": shape, "x": x, "y": y, "size": d}
        for (x, y, d), (color, shape) in zip(layout, attrs)
    ]


def _article(word: str) -> str:
    """English indefinite article for ``word``."""
    return "an" if word[0] in "aeiou" else "a"


# --------------------------------------------------------------------------- families


def scenes(rng: random.Random, size: int, index: int) -> Generated:
    """GQA-like scene: 2-5 shapes with distinct shapes; attribute or spatial-relation question."""
    n = rng.randint(2, 5)
    shapes = rng.sample(SHAPE_NAMES, n)  # distinct shapes make "the <shape>" a unique referent
    colors = [rng.choice(COLOR_NAMES) for _ in range(n)]
    layout = _column_layout(rng, n)
    rng.shuffle(layout)
    objects = _objects(layout, list(zip(colors, shapes)))
    image = _render_objects(rng, size, objects)
    question, answer, meta = ask_scenes(rng, {"objects": objects}, index)
    return image, question, answer, meta


def ask_scenes(rng: random.Random, meta: dict[str, Any], index: int) -> Asked:
    """An attribute, relation or neighbour question about the objects of a scene."""
    objects = meta["objects"]
    by_x = sorted(objects, key=lambda o: o["x"])
    kind = rng.choice(("color", "relation", "neighbor"))
    if kind == "color":
        target = rng.choice(objects)
        question = TEMPLATES["scene_color"].format(shape=target["shape"])
        answer = target["color"]
    elif kind == "relation":
        a, b = rng.sample(objects, 2)
        direction = rng.choice(("left", "right"))
        truth = a["x"] < b["x"] if direction == "left" else a["x"] > b["x"]
        question = TEMPLATES["scene_relation"].format(
            color1=a["color"], shape1=a["shape"], direction=direction, color2=b["color"], shape2=b["shape"]
        )
        answer = YES if truth else NO
    else:
        # Reference the 2nd object from one end: exactly one object lies beyond it.
        direction = rng.choice(("left", "right"))
        ref, other = (by_x[1], by_x[0]) if direction == "left" else (by_x[-2], by_x[-1])
        question = TEMPLATES["scene_neighbor"].format(direction=direction, color=ref["color"], shape=ref["shape"])
        answer = other["shape"]
    return question, answer, {"objects": objects, "question_type": kind}


def pope(rng: random.Random, size: int, index: int) -> Generated:
    """POPE-like existence probe; even indices are "yes", odd indices "no".

    Negatives alternate between adversarial (the absent object shares its
    colour or its shape with a present one) and random (shares neither when
    possible).
    """
    n = rng.randint(2, 5)
    combos = [(c, s) for c in COLOR_NAMES for s in SHAPE_NAMES]
    attrs = rng.sample(combos, n)
    objects = _objects(_column_layout(rng, n), attrs)
    image = _render_objects(rng, size, objects)
    question, answer, meta = ask_pope(rng, {"objects": objects}, index)
    return image, question, answer, meta


def ask_pope(rng: random.Random, meta: dict[str, Any], index: int) -> Asked:
    """Existence probe: "yes" for even ``index``; negatives alternate adversarial / random."""
    objects = meta["objects"]
    combos = [(c, s) for c in COLOR_NAMES for s in SHAPE_NAMES]
    attrs = [(o["color"], o["shape"]) for o in objects]
    present = set(attrs)
    if index % 2 == 0:
        color, shape = rng.choice(attrs)
        answer, negative = YES, None
    else:
        absent = [c for c in combos if c not in present]
        colors = {c for c, _ in attrs}
        shapes = {s for _, s in attrs}
        related = [(c, s) for c, s in absent if c in colors or s in shapes]
        unrelated = [(c, s) for c, s in absent if c not in colors and s not in shapes]
        if (index // 2) % 2 == 0:
            negative, pool = "adversarial", related
        else:
            negative, pool = "random", unrelated or absent
        color, shape = rng.choice(pool)
        answer = NO
    question = TEMPLATES["pope"].format(article=_article(color), color=color, shape=shape)
    return question, answer, {"objects": objects, "query": {"color": color, "shape": shape}, "negative": negative}


def counting(rng: random.Random, size: int, index: int) -> Generated:
    """Count one shape (0-9 instances, mixed colours) among 1-4 distractors of other shapes."""
    target = rng.choice(SHAPE_NAMES)
    count = rng.randint(0, 9)
    others = [s for s in SHAPE_NAMES if s != target]
    n_distract = rng.randint(1, 4)
    attrs = [(rng.choice(COLOR_NAMES), target) for _ in range(count)]
    attrs += [(rng.choice(COLOR_NAMES), rng.choice(others)) for _ in range(n_distract)]
    rng.shuffle(attrs)
    objects = _objects(_grid_layout(rng, len(attrs)), attrs)
    image = _render_objects(rng, size, objects)
    question, answer, meta = ask_counting(rng, {"objects": objects, "target": target}, index)
    return image, question, answer, meta


def ask_counting(rng: random.Random, meta: dict[str, Any], index: int) -> Asked:
    """How many of ``meta["target"]`` the scene shows; without a target, one is drawn (a shape of the
    scene or, as often, any shape)."""
    objects = meta["objects"]
    target = meta.get("target")
    if target is None:
        target = rng.choice([o["shape"] for o in objects] if rng.random() < 0.5 else SHAPE_NAMES)
    count = sum(o["shape"] == target for o in objects)
    question = TEMPLATES["counting"].format(shapes=SHAPE_PLURALS[target])
    return question, str(count), {"objects": objects, "target": target, "count": count}


def _clutter(rng: random.Random, draw: ImageDraw.ImageDraw, size: int, n: int) -> None:
    """Draw ``n`` glyph-free marks (lines, outlines, dots) as distractors."""
    palette = list(_draw.COLORS.values()) + [(120, 120, 120), (170, 170, 170)]
    for _ in range(n):
        color = rng.choice(palette)
        width = max(1, round(size * rng.uniform(0.003, 0.009)))
        x0, y0 = rng.uniform(0.02, 0.98) * size, rng.uniform(0.02, 0.98) * size
        w, h = rng.uniform(0.04, 0.3) * size, rng.uniform(0.04, 0.3) * size
        kind = rng.choice(("line", "rect", "ellipse", "dot"))
        if kind == "line":
            draw.line([x0, y0, x0 + rng.choice((-1, 1)) * w, y0 + rng.choice((-1, 1)) * h], fill=color, width=width)
        elif kind == "rect":
            draw.rectangle([x0, y0, x0 + w, y0 + h], outline=color, width=width)
        elif kind == "ellipse":
            draw.ellipse([x0, y0, x0 + w, y0 + h], outline=color, width=width)
        else:
            r = size * rng.uniform(0.008, 0.02)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=color)


def ocr(rng: random.Random, size: int, index: int) -> Generated:
    """One small uppercase word on a light label among clutter; asks for the word."""
    word = rng.choice(WORDS)
    image = _draw.background(rng, size)
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, size, rng.randint(8, 16))

    px = _draw.text_px(size)
    text = word.upper()
    fnt = _draw.font(px)
    bx0, by0, bx1, by1 = fnt.getbbox(text, anchor="la")
    pad = max(1, round(size * 0.009))
    # Draw position in unit coordinates; the box stays inside the margins at every size.
    tx = rng.uniform(MARGIN, 1 - MARGIN - 0.2) * size
    ty = rng.uniform(MARGIN, 1 - MARGIN - 0.06) * size
    label = _draw.light_color(rng)
    draw.rectangle([tx + bx0 - pad, ty + by0 - pad, tx + bx1 + pad, ty + by1 + pad], fill=label)
    box = _draw.draw_text(draw, (tx, ty), text, px, rng.choice(_draw.INKS))
    glyphs = _draw.glyph_boxes((tx, ty), text, px)
    question, answer, meta = ask_ocr(rng, {"word": word, "text_box": box, "font_px": px, "glyphs": glyphs}, index)
    return image, question, answer, meta


def ask_ocr(rng: random.Random, meta: dict[str, Any], index: int) -> Asked:
    """The one OCR question: which word is written."""
    return TEMPLATES["ocr"], meta["word"], meta


def _ink_box(glyphs: list[tuple[int, int, int, int, str]]) -> tuple[int, int, int, int]:
    """Pixel box around the ink of some glyphs (`_draw.glyph_boxes` entries)."""
    return (min(g[0] for g in glyphs), min(g[1] for g in glyphs), max(g[2] for g in glyphs), max(g[3] for g in glyphs))


def docs(rng: random.Random, size: int, index: int) -> Generated:
    """A white page of 4-8 "KEY: VALUE" lines in small text; asks for one key's value.

    Each line's meta holds its text box and the ink boxes of its key and of its value."""
    n = rng.randint(4, 8)
    keys = rng.sample(DOC_KEYS, n)
    values = [str(rng.randint(1, 99)) if k in DOC_NUMBER_KEYS else rng.choice(WORDS) for k in keys]

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    # Glyph-free header bar and footer rule make the page look like a form.
    gray = rng.randint(150, 210)
    draw.rectangle([0.06 * size, 0.05 * size, rng.uniform(0.3, 0.9) * size, 0.1 * size], fill=(gray, gray, gray))
    draw.line([0.06 * size, 0.95 * size, 0.94 * size, 0.95 * size], fill=(200, 200, 200), width=max(1, size // 168))

    px = _draw.text_px(size)
    ink = rng.choice(_draw.INKS)
    top, bottom = 0.15, 0.9
    step = (bottom - top) / n
    lines, glyphs = [], []
    for i, (key, value) in enumerate(zip(keys, values)):
        y = (top + i * step + rng.uniform(0, step - 0.05)) * size
        x = rng.uniform(0.06, 0.35) * size
        text = f"{key.upper()}: {value.upper()}"
        box = _draw.draw_text(draw, (x, y), text, px, ink)
        line_glyphs = _draw.glyph_boxes((x, y), text, px)  # the key's letters, ":", the value's characters
        glyphs += line_glyphs
        lines.append({"key": key, "value": value, "box": box, "key_box": _ink_box(line_glyphs[: len(key)]),
                      "value_box": _ink_box(line_glyphs[-len(value) :])})
        if rng.random() < 0.3:
            # Occasional faint rule under a line, a common form element.
            draw.line([0.06 * size, box[3] + 0.02 * size, 0.94 * size, box[3] + 0.02 * size], fill=(225, 225, 225))

    question, answer, meta = ask_docs(rng, {"lines": lines, "font_px": px, "glyphs": glyphs}, index)
    return image, question, answer, meta


def ask_docs(rng: random.Random, meta: dict[str, Any], index: int) -> Asked:
    """The value of one key of the page."""
    line = meta["lines"][rng.randrange(len(meta["lines"]))]
    return TEMPLATES["docs"].format(key=line["key"]), line["value"], meta


def charts(rng: random.Random, size: int, index: int) -> Generated:
    """A PIL bar chart of 3-6 labelled bars with values 1-9 printed above them.

    Questions ask for a bar's value, the tallest bar, or compare two bars.
    """
    n = rng.randint(3, 6)
    labels = rng.sample(CHART_LABELS, n)
    while True:
        values = [rng.randint(1, 9) for _ in range(n)]
        if values.count(max(values)) == 1:  # "tallest" must have one answer
            break
    if rng.random() < 0.5:
        bar_colors = [rng.choice(COLOR_NAMES[:-1])] * n
    else:
        bar_colors = [rng.choice(COLOR_NAMES[:-1]) for _ in range(n)]

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right = round(0.1 * size), round(0.96 * size)
    top, base = round(0.06 * size), round(0.86 * size)
    unit = (base - top) / 10
    line_w = max(1, round(size / 168))
    for v in range(2, 11, 2):
        # Light gridlines, drawn first so bars cover them.
        y = base - round(v * unit)
        draw.line([left, y, right, y], fill=(228, 228, 228), width=1)

    px = _draw.text_px(size)
    slot = (right - left) / n
    bars, glyphs = [], []
    for i, (label, value, cname) in enumerate(zip(labels, values, bar_colors)):
        x0 = round(left + i * slot + slot * 0.22)
        x1 = round(left + (i + 1) * slot - slot * 0.22)
        y_top = base - round(value * unit)
        draw.rectangle([x0, y_top, x1, base - 1], fill=_draw.COLORS[cname])
        xc = (x0 + x1) / 2
        for xy, text, anchor in (((xc, y_top - max(2, size // 110)), str(value), "mb"),
                                 ((xc, base + max(3, size // 70)), label.upper(), "mt")):
            _draw.draw_text(draw, xy, text, px, (0, 0, 0), anchor=anchor)
            glyphs += _draw.glyph_boxes(xy, text, px, anchor)
        bars.append({"label": label, "value": value, "color": cname, "x0": x0, "x1": x1, "top": y_top, "base": base})
    draw.line([left, top, left, base], fill=(60, 60, 60), width=line_w)
    draw.line([left, base, right, base], fill=(60, 60, 60), width=line_w)
    question, answer, meta = ask_charts(rng, {"bars": bars, "font_px": px, "glyphs": glyphs}, index)
    return image, question, answer, meta


def ask_charts(rng: random.Random, meta: dict[str, Any], index: int) -> Asked:
    """A bar's value, the tallest bar, or whether one bar is higher than another."""
    labels = [b["label"] for b in meta["bars"]]
    values = [b["value"] for b in meta["bars"]]
    n = len(labels)
    kind = rng.choice(("value", "tallest", "compare"))
    if kind == "value":
        i = rng.randrange(n)
        question, answer = TEMPLATES["chart_value"].format(label=labels[i]), str(values[i])
    elif kind == "tallest":
        question, answer = TEMPLATES["chart_tallest"], labels[values.index(max(values))]
    else:
        pairs = [(i, j) for i in range(n) for j in range(n) if values[i] != values[j]]
        i, j = rng.choice(pairs)  # the unique maximum guarantees a pair with different values
        question = TEMPLATES["chart_compare"].format(label1=labels[i], label2=labels[j])
        answer = YES if values[i] > values[j] else NO
    return question, answer, {**meta, "question_type": kind}


ASKERS: dict[str, Callable[[random.Random, dict[str, Any], int], Asked]] = {
    "scenes": ask_scenes,
    "pope": ask_pope,
    "counting": ask_counting,
    "ocr": ask_ocr,
    "docs": ask_docs,
    "charts": ask_charts,
}

GENERATORS: dict[str, Callable[[random.Random, int, int], Generated]] = {
    "scenes": scenes,
    "pope": pope,
    "counting": counting,
    "ocr": ocr,
    "docs": docs,
    "charts": charts,
}
