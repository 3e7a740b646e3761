"""Output images the emulator returns: real pictures, deterministic, visibly made of the inputs.

Image 2 (or the only image) fills the frame as the scene; image 1 is placed in front of it in a
white frame; any further references line up as framed thumbnails along the bottom. With no
references, a gradient and circles are drawn from the seed. The same inputs, prompt and seed
always give the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageOps

__all__ = ["encode", "render"]

_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _rng(prompt: str, seed: int | None) -> random.Random:
    if seed is None:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return random.Random(seed)


def _framed(image: Image.Image, width: int, height: int, border: int) -> Image.Image:
    # Pad rather than crop: the whole reference stays visible.
    inner = ImageOps.pad(
        image.convert("RGB"),
        (max(1, width - 2 * border), max(1, height - 2 * border)),
        color="white",
    )
    return ImageOps.expand(inner, border=border, fill="white")


def _backdrop(width: int, height: int, rng: random.Random) -> Image.Image:
    top = tuple(rng.randrange(40, 220) for _ in range(3))
    bottom = tuple(rng.randrange(40, 220) for _ in range(3))
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    for y in range(height):
        mix = y / max(1, height - 1)
        draw.line(
            [(0, y), (width, y)],
            fill=tuple(round(a + (b - a) * mix) for a, b in zip(top, bottom, strict=True)),
        )
    for _ in range(6):
        radius = rng.randrange(max(2, min(width, height) // 12), max(3, min(width, height) // 4))
        x, y = rng.randrange(width), rng.randrange(height)
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return canvas


def render(
    width: int, height: int, references: Sequence[Image.Image], prompt: str, seed: int | None
) -> Image.Image:
    """Draw a *width* x *height* picture combining *references* in order."""
    rng = _rng(prompt, seed)
    if not references:
        canvas = _backdrop(width, height, rng)
    else:
        scene = references[1] if len(references) > 1 else references[0]
        canvas = ImageOps.fit(scene.convert("RGB"), (width, height))
        if len(references) == 1:
            # A one-image "edit": recolour the picture so the change is visible.
            tint = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
            canvas = Image.blend(canvas, tint, 0.25)
        else:
            side = min(width, height)
            subject = _framed(references[0], side // 2, side // 2, max(2, side // 80))
            canvas.paste(subject, ((width - subject.width) // 2, (height - subject.height) // 3))
            extras = references[2:]
            if extras:
                thumb = max(8, min(side // 5, width // (len(extras) + 1)))
                for index, extra in enumerate(extras):
                    tile = _framed(extra, thumb, thumb, max(1, thumb // 30))
                    canvas.paste(tile, (width - (index + 1) * (thumb + 4), height - thumb - 4))
    ImageDraw.Draw(canvas).text((6, 4), f"flux-adapters emulator  seed={seed}", fill="white")
    return canvas


def encode(image: Image.Image, output_format: str) -> bytes:
    """The image as *output_format* bytes (``jpeg``, ``png`` or ``webp``)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=_PIL_FORMATS[output_format])
    return buffer.getvalue()
