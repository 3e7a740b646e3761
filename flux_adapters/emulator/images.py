"""The emulator's pictures: real images, deterministic, visibly made of the references.

Public, for sandboxes of providers in other packages (``examples/nimbus`` and
``examples/pixelforge`` use it): a server that stands in for a provider answers with the images
the emulator draws. Needs the ``emulator`` extra (Pillow; without it, importing this module
raises `errors.MissingExtraError`)::

    from flux_adapters.emulator.images import decode, encode, placeholder, render

    references = [placeholder("https://example.com/robot.png"), decode(uploaded_png)]
    picture = encode(render(1024, 768, references, "image 1 in front of image 2", seed=42), "png")

`render` draws the picture: image 2 (or the only image) fills the frame as the scene; image 1 is
placed in front of it in a white frame; any further references line up as framed thumbnails
along the bottom. With no references, a gradient and circles are drawn from the seed. The same
inputs, prompt and seed always give the same pixels. `encode` writes it as png, jpeg or webp.
`placeholder` stands in for a reference given by URL (the emulator never fetches), `decode`
reads one given as bytes.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Sequence
from typing import Final

from flux_adapters._extras import extra_imports

with extra_imports():
    from PIL import Image, ImageDraw, ImageOps

__all__ = ["FORMATS", "decode", "encode", "placeholder", "render"]

_PIL_FORMATS: Final = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
FORMATS: Final = tuple(_PIL_FORMATS)
"""The formats `encode` writes and `decode` reads: ``jpeg``, ``png``, ``webp``."""
_MAX_PIXELS: Final = 64_000_000


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
    """The image as *output_format* bytes (one of `FORMATS`).

    Raises:
        KeyError: *output_format* is not one of `FORMATS`.
    """
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=_PIL_FORMATS[output_format])
    return buffer.getvalue()


def placeholder(url: str) -> Image.Image:
    """The stand-in for a reference image given by URL: a tile coloured from the URL.

    The emulator never fetches from the internet; the tile's colour still shows where each
    reference went in the picture `render` draws.
    """
    digest = hashlib.sha256(url.encode()).digest()
    return Image.new("RGB", (256, 256), (digest[0], digest[1], digest[2]))


def decode(data: bytes) -> Image.Image:
    """The png, jpeg or webp image in *data*, decoded whole (at most 64 megapixels).

    Raises:
        ValueError: *data* is not a readable png, jpeg or webp image, or is larger.
    """
    try:
        with Image.open(
            io.BytesIO(data), formats=[_PIL_FORMATS[name] for name in FORMATS]
        ) as image:
            if image.width * image.height > _MAX_PIXELS:
                raise ValueError(f"the image has {image.width}x{image.height} pixels")
            image.load()
            return image.copy()
    except ValueError:
        raise
    except Exception as exc:  # Pillow's readers raise OSError, SyntaxError, struct.error ...
        raise ValueError(f"not a readable png, jpeg or webp image ({type(exc).__name__})") from exc
