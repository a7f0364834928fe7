"""Image grids with captions (PNG), for evaluation reports and run folders."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["image_grid"]


def _font() -> ImageFont.ImageFont:
    """PIL's classic 6-pixel bitmap font: every character, spaces included, one cell wide, so a
    caption reads as typed at any size (the FreeType default squeezes spaces at small sizes)."""
    if hasattr(ImageFont, "load_default_imagefont"):  # Pillow >= 10.1
        return ImageFont.load_default_imagefont()
    return ImageFont.load_default()


def image_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    path: str | Path,
    *,
    columns: int = 6,
    scale: int = 4,
    max_caption_lines: int = 12,
    width_chars: int = 24,
) -> Path:
    """Save ``images`` (``[H, W, 3]`` uint8 each) in a grid, each upscaled ``scale``× (nearest, so
    pixels stay crisp) with its caption wrapped below it. Cells are as tall as the longest caption
    needs (up to ``max_caption_lines`` lines; a longer one ends with "..."), so no caption is cut."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images to put in a grid")
    font = _font()
    h, w = images[0].shape[:2]
    tile_w, tile_h = w * scale, h * scale
    line_h = 11
    wrapped = []
    for caption in captions:
        lines = textwrap.wrap(caption, width_chars) or [""]
        if len(lines) > max_caption_lines:
            lines = lines[: max_caption_lines - 1] + [lines[max_caption_lines - 1][: width_chars - 3] + "..."]
        wrapped.append(lines)
    caption_lines = max(len(lines) for lines in wrapped)
    cell_w, cell_h = max(tile_w, width_chars * 6) + 8, tile_h + caption_lines * line_h + 10
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = (k % columns) * cell_w + 4, (k // columns) * cell_h + 4
        tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((tile_w, tile_h), Image.NEAREST)
        canvas.paste(tile, (x, y))
        draw.rectangle([x - 1, y - 1, x + tile_w, y + tile_h], outline=(180, 180, 180))
        for j, line in enumerate(lines):
            draw.text((x, y + tile_h + 3 + j * line_h), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
