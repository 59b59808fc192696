"""Pictures of what was kept: each expert's grid over the image, kept tokens bright, dropped ones dimmed."""

from __future__ import annotations

from PIL import Image, ImageDraw

__all__ = ["kept_token_heatmap"]


def kept_token_heatmap(image: Image.Image, kept: dict[str, list[int]], grids: dict[str, tuple[int, int]],
                       panel: int = 256) -> Image.Image:
    """One panel per expert: the image with that expert's kept grid cells shown and the rest dimmed.

    Args:
        image: the input image; kept: {expert: flat grid indices kept}; grids: {expert: (rows, cols)}.
        panel: side of each panel in pixels.
    Returns:
        an RGB image, panels side by side, each titled "expert: kept/total".
    """
    base = image.convert("RGB").resize((panel, panel))
    title_h = 18
    out = Image.new("RGB", (panel * len(grids), panel + title_h), "white")
    for i, (name, (rows, cols)) in enumerate(grids.items()):
        keep = set(kept.get(name, []))
        shade = Image.new("RGBA", (panel, panel), (0, 0, 0, 0))
        draw = ImageDraw.Draw(shade)
        cw, ch = panel / cols, panel / rows
        for cell in range(rows * cols):
            r, c = divmod(cell, cols)
            box = (c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1)
            if cell in keep:
                draw.rectangle(box, outline=(255, 60, 0, 255))
            else:
                draw.rectangle(box, fill=(0, 0, 0, 150))
        tile = Image.alpha_composite(base.convert("RGBA"), shade).convert("RGB")
        out.paste(tile, (i * panel, title_h))
        ImageDraw.Draw(out).text((i * panel + 4, 3), f"{name}: {len(keep)}/{rows * cols} kept", fill="black")
    return out
