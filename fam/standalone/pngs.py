"""PNG output: the A1111 `parameters` text chunk (what the WebUI's PNG Info, *Send to
txt2img* and paste read back) and the labelled side-by-side comparison."""

from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ["infotext", "save_png", "side_by_side"]


def _quote(value: Any) -> str:
    """A1111's quoting of infotext values: JSON-quoted when they hold , : or a newline."""
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def infotext(prompt: str, negative: str, fields: Mapping[str, Any]) -> str:
    """The text A1111 writes under an image: prompt, "Negative prompt: …", then one line of
    `key: value` pairs in the given order (None values left out)."""
    pairs = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{pairs}".strip()


def save_png(image, path: str, parameters: str) -> None:
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", parameters)   # iTXt (UTF-8) when the text is not Latin-1
    image.save(path, pnginfo=info)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)   # scalable with FreeType (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


MIN_PANEL = 256   # smaller images are enlarged (nearest neighbour) so that the labels fit


def side_by_side(columns: list[tuple[list, str, str]]):
    """One sheet of labelled columns: each column is (images top to bottom, title, subtitle),
    all images of one size; a batch gives one row per image."""
    from PIL import Image, ImageDraw
    w, h = columns[0][0][0].size
    zoom = -(-MIN_PANEL // w) if w < MIN_PANEL else 1
    w, h = w * zoom, h * zoom
    title_px = max(12, w // 20)
    band = int(title_px * 2.6)
    rows = len(columns[0][0])
    sheet = Image.new("RGB", (w * len(columns), band + h * rows), "white")
    draw = ImageDraw.Draw(sheet)
    title, sub = _font(title_px), _font(max(10, int(title_px * 0.7)))
    for i, (images, heading, subtitle) in enumerate(columns):
        for j, image in enumerate(images):
            image = image.convert("RGB")
            if zoom > 1:
                image = image.resize((w, h), Image.NEAREST)
            sheet.paste(image, (i * w, band + j * h))
        x = i * w + title_px // 2
        draw.text((x, title_px // 4), heading, fill="black", font=title)
        draw.text((x, int(title_px * 1.45)), subtitle, fill=(80, 80, 80), font=sub)
    return sheet
