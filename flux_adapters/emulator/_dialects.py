"""What each provider accepts, checked the way its document describes, for the emulator.

Each dialect reads a request body (JSON object or form fields and files) and returns a `Job` or
the list of problems the provider would answer with a 4xx. The field vocabulary of each dialect
is written out here from its document; the numbers (image counts, size grids, ranges) come from
the same `ModelLimits` rows the adapters use, each citing its document.
"""

from __future__ import annotations

import binascii
import io
import math
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from typing import BinaryIO, Final

from attrs import frozen
from PIL import Image
from PIL.ImageFile import ImageFile
from PIL.JpegImagePlugin import JpegImageFile
from PIL.PngImagePlugin import PngImageFile
from PIL.WebPImagePlugin import WebPImageFile

from flux_adapters._files import SNIFF_BYTES, image_format
from flux_adapters.emulator.images import placeholder
from flux_adapters.limits import ModelLimits
from flux_adapters.providers import get_adapter

__all__ = ["DIALECTS", "Job", "Upload"]

MB: Final = 1024 * 1024
# The formats providers take, read by Pillow's own readers. The library's one table of magic
# numbers (flux_adapters._files.image_format) tells them (and the formats people send by mistake)
# apart, so that only an accepted format is parsed.
_READERS: Final[Mapping[str, Callable[[BinaryIO], ImageFile]]] = {
    "png": PngImageFile,
    "jpeg": JpegImageFile,
    "webp": WebPImageFile,
}
# What Pillow's readers and decoders raise on a broken file (SyntaxError for a bad header or
# checksum, OSError for truncated data, the rest from struct and zlib deep inside).
_UNREADABLE: Final = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
)
_DATA_URL: Final = re.compile(r"data:image/[\w.+-]+(?:;[\w.+-]+=[\w.+-]+)*;base64,")
_SIZE: Final = re.compile(r"(\d+)x(\d+)")
_RATIO: Final = re.compile(r"(\d+):(\d+)")
# aimlapi's image_size presets (the fal names it mirrors) and the sizes they render.
AIMLAPI_PRESETS: Final = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}


@frozen
class Upload:
    """One file part of a multipart body."""

    filename: str
    content_type: str
    data: bytes


@frozen(kw_only=True)
class Job:
    """A request the provider would accept, reduced to what the emulator renders."""

    provider: str
    model: str
    prompt: str
    references: tuple[Image.Image, ...]
    width: int
    height: int
    output_format: str
    seed: int | None


class _Check:
    """Collects the problems of one request."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, message: str) -> None:
        self.problems.append(message)


def _limits(provider: str, model: object, check: _Check) -> ModelLimits | None:
    offered = get_adapter(provider).limits
    if not isinstance(model, str) or not model:
        check.fail("model is required")
        return None
    found = offered.get(model)
    if found is None:
        check.fail(f"model {model!r} is not available; available: {', '.join(offered)}")
    return found


def _decode_image(data: bytes, name: str, limits: ModelLimits, check: _Check) -> Image.Image | None:
    """The image in *data*, fully decoded, or ``None`` with the problem noted.

    Pillow's ``Image.open`` checks sizes against its process-wide ``MAX_IMAGE_PIXELS``, with a
    warning below twice that; instead the format's own reader parses the header and the provider's
    pixel limit is checked before a pixel is decoded. Then the whole image is decoded here, so
    that a truncated or corrupt one is refused now, not found broken while rendering.
    """
    rule = limits.image
    if len(data) > rule.max_bytes:
        check.fail(
            f"{name} is {len(data) / MB:.1f} MB; each image must be at most {rule.max_bytes // MB} MB"
        )
        return None
    found = image_format(data[:SNIFF_BYTES])
    if found not in rule.formats or found not in _READERS:
        check.fail(
            f"{name} is {found or 'an unknown format'}; accepted: {', '.join(sorted(rule.formats))}"
        )
        return None
    try:
        image = _READERS[found](io.BytesIO(data))
    except _UNREADABLE:
        check.fail(f"{name} is not a readable {found} image")
        return None
    if image.width * image.height > rule.max_pixels:
        check.fail(
            f"{name} has {image.width}x{image.height} pixels; at most {rule.max_pixels / 1e6:g} MP"
        )
        return None
    try:
        image.load()
    except _UNREADABLE:
        check.fail(f"{name} is a truncated or corrupt {found} image")
        return None
    return image


def _reference(value: object, name: str, limits: ModelLimits, check: _Check) -> Image.Image | None:
    if not isinstance(value, str):
        check.fail(f"{name} must be a string (a URL or a data URL)")
        return None
    if value.startswith(("http://", "https://")):
        return placeholder(value)
    match = _DATA_URL.match(value)
    if match is None:
        check.fail(f"{name} must be a public http(s) URL or a data:image/...;base64, URL")
        return None
    try:
        data = binascii.a2b_base64(value[match.end() :], strict_mode=True)
    except (binascii.Error, ValueError):
        check.fail(f"{name} is a data URL with invalid base64")
        return None
    return _decode_image(data, name, limits, check)


def _whole(
    value: object, name: str, check: _Check, low: int | None = None, high: int | None = None
) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool):
        check.fail(f"{name} must be an integer")
        return None
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        check.fail(f"{name} must be {bounds}; got {value}")
        return None
    return value


def _number(value: object, name: str, check: _Check, low: float, high: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        check.fail(f"{name} must be a number from {low:g} to {high:g}; got {value!r}")


def _unknown(body: Mapping[str, object], allowed: set[str], check: _Check) -> None:
    for key in body:
        if key not in allowed:
            check.fail(f"unknown parameter {key!r}")


def _sized(width: int, height: int, limits: ModelLimits, check: _Check) -> tuple[int, int] | None:
    rule = limits.sizes
    if rule is None:
        check.fail(f"{limits.model} takes no width/height")
        return None
    if rule.fits(width, height):
        return width, height
    check.fail(f"size {width}x{height} is not allowed: {rule.describe()}")
    return None


def _ratio_size(text: object, limits: ModelLimits, check: _Check) -> tuple[int, int] | None:
    match = _RATIO.fullmatch(text) if isinstance(text, str) else None
    if match is None or not all(int(part) for part in match.groups()):
        check.fail(f"aspect_ratio must look like '16:9'; got {text!r}")
        return None
    width, height = (int(part) for part in match.groups())
    if limits.ratios is None or not limits.ratios.accepts(width, height):
        accepted = limits.ratios.describe() if limits.ratios else "none"
        check.fail(f"aspect_ratio {text} is out of range ({accepted})")
        return None
    # "The system automatically adjusts size to maintain approximately 1 megapixel total area."
    exact = math.sqrt(1024 * 1024 * width / height)
    return round(exact / 16) * 16, round(exact * height / width / 16) * 16


def _first_size(references: tuple[Image.Image, ...], default: tuple[int, int]) -> tuple[int, int]:
    return references[0].size if references else default


def _common(
    provider: str,
    body: Mapping[str, object],
    check: _Check,
    image_values: list[tuple[str, object]],
) -> tuple[ModelLimits | None, str, tuple[Image.Image, ...]]:
    limits = _limits(provider, body.get("model"), check)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        check.fail("prompt is required")
        prompt = ""
    elif limits and limits.prompt_max_chars and len(prompt) > limits.prompt_max_chars:
        check.fail(f"prompt is {len(prompt)} characters; at most {limits.prompt_max_chars}")
    if limits is None:
        return None, prompt, ()
    if not limits.images.low <= len(image_values) <= (limits.images.high or 0):
        check.fail(
            f"{limits.model} takes {limits.images} reference images; got {len(image_values)}"
        )
    decoded = [_reference(value, name, limits, check) for name, value in image_values]
    references = tuple(image for image in decoded if image is not None)
    return limits, prompt, references


def _settings(body: Mapping[str, object], limits: ModelLimits, check: _Check) -> str:
    if "seed" in body:
        _whole(body["seed"], "seed", check, low=limits.seed.low)
    if "safety_tolerance" in body and limits.safety_tolerance is not None:
        tolerance = limits.safety_tolerance
        _whole(body["safety_tolerance"], "safety_tolerance", check, tolerance.low, tolerance.high)
    if "prompt_upsampling" in body and not isinstance(body["prompt_upsampling"], bool):
        check.fail("prompt_upsampling must be a boolean")
    for name, allowed in (("steps", limits.steps), ("guidance", limits.guidance)):
        if name not in body:
            continue
        if allowed is None:
            check.fail(f"{name} is only supported by flux-2-flex")
        elif name == "steps":
            _whole(body[name], name, check, int(allowed.low), int(allowed.high or 0))
        else:
            _number(body[name], name, check, allowed.low, float(allowed.high or 0))
    output_format = body.get("output_format", "jpeg")
    if output_format not in limits.output_formats:
        check.fail(
            f"output_format must be one of {', '.join(limits.output_formats)}; got {output_format!r}"
        )
    return str(output_format)


def _numbered_images(body: Mapping[str, object], check: _Check) -> list[tuple[str, object]]:
    names = ["input_image"] + [f"input_image_{n}" for n in range(2, 9)]
    present = [name for name in names if name in body]
    expected = names[: len(present)]
    if present != expected:
        check.fail(f"reference images must be numbered without gaps: got {', '.join(present)}")
    return [(name, body[name]) for name in present]


_BFL_SETTINGS: Final = {"seed", "safety_tolerance", "output_format", "prompt_upsampling"}
_IMAGE_FIELDS: Final = {"input_image"} | {f"input_image_{n}" for n in range(2, 9)}


def laozhang(body: Mapping[str, object]) -> Job | list[str]:
    """Laozhang's ``/v1/images/generations`` (seeds 000, 001)."""
    check = _Check()
    _unknown(
        body,
        {"model", "prompt", "n", "size", "width", "height", "aspect_ratio"}
        | _BFL_SETTINGS
        | _IMAGE_FIELDS,
        check,
    )
    limits, prompt, references = _common("laozhang", body, check, _numbered_images(body, check))
    if limits is None:
        return check.problems
    output_format = _settings(body, limits, check)
    if "n" in body:
        _whole(body["n"], "n", check, 1, 1)
    size: tuple[int, int] | None = _first_size(references, (1024, 1024))
    if "size" in body and ("width" in body or "height" in body):
        check.fail("use size or width / height, not both")
    elif "size" in body or "width" in body or "height" in body:
        if limits.sizes is None:
            check.fail(f"{limits.model} takes aspect_ratio, not size or width / height")
        elif "size" in body:
            match = _SIZE.fullmatch(body["size"]) if isinstance(body["size"], str) else None
            if match is None:
                check.fail(f"size must look like '1024x1024'; got {body['size']!r}")
            else:
                size = _sized(int(match[1]), int(match[2]), limits, check)
        else:
            width = _whole(body.get("width"), "width", check)
            height = _whole(body.get("height"), "height", check)
            if width is not None and height is not None:
                size = _sized(width, height, limits, check)
    if "aspect_ratio" in body:
        if limits.ratios is None:
            check.fail(f"{limits.model} takes size or width / height, not aspect_ratio")
        else:
            size = _ratio_size(body["aspect_ratio"], limits, check)
    return _job(
        check, "laozhang", limits, prompt, references, size, output_format, body.get("seed")
    )


def apiyi(body: Mapping[str, object]) -> Job | list[str]:
    """Apiyi's JSON ``/v1/images/generations`` (seed 003)."""
    check = _Check()
    _unknown(
        body,
        {"model", "prompt", "aspect_ratio", "steps", "guidance"} | _BFL_SETTINGS | _IMAGE_FIELDS,
        check,
    )
    limits, prompt, references = _common("apiyi", body, check, _numbered_images(body, check))
    if limits is None:
        return check.problems
    output_format = _settings(body, limits, check)
    size: tuple[int, int] | None = _first_size(references, (1024, 1024))
    if "aspect_ratio" in body:
        size = _ratio_size(body["aspect_ratio"], limits, check)
    return _job(check, "apiyi", limits, prompt, references, size, output_format, body.get("seed"))


def _form_int(fields: dict[str, object], name: str, check: _Check) -> None:
    value = fields.get(name)
    if isinstance(value, str):
        if re.fullmatch(r"-?\d+", value.strip()):
            fields[name] = int(value)
        else:
            check.fail(f"{name} must be an integer; got {value!r}")
            del fields[name]


def apiyi_multipart(fields: Mapping[str, str], files: list[tuple[str, Upload]]) -> Job | list[str]:
    """Apiyi's multipart ``/v1/images/edits`` with repeated ``image[]`` files (seed 002)."""
    check = _Check()
    allowed = {"model", "prompt", "size", "width", "height", "steps", "guidance"} | _BFL_SETTINGS
    _unknown(dict.fromkeys(fields), allowed, check)
    for name, _ in files:
        if name not in ("image[]", "image"):
            check.fail(f"unknown file field {name!r}; send images as image[]")
    values: dict[str, object] = dict(fields)
    for name in ("seed", "safety_tolerance", "steps", "width", "height"):
        _form_int(values, name, check)
    if isinstance(values.get("guidance"), str):
        try:
            values["guidance"] = float(str(values["guidance"]))
        except ValueError:
            check.fail(f"guidance must be a number; got {values['guidance']!r}")
            del values["guidance"]
    if "prompt_upsampling" in values:
        check.fail("unknown parameter 'prompt_upsampling'")
        del values["prompt_upsampling"]
    limits = _limits("apiyi-multipart", values.get("model"), check)
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        check.fail("prompt is required")
        prompt = ""
    if limits is None:
        return check.problems
    uploads = [upload for name, upload in files if name in ("image[]", "image")]
    if not limits.images.low <= len(uploads) <= (limits.images.high or 0):
        check.fail(f"{limits.model} takes {limits.images} reference images; got {len(uploads)}")
    decoded = [
        _decode_image(u.data, f"image[] #{n + 1} ({u.filename})", limits, check)
        for n, u in enumerate(uploads)
    ]
    references = tuple(image for image in decoded if image is not None)
    output_format = _settings(values, limits, check)
    size: tuple[int, int] | None = _first_size(references, (1024, 1024))
    if "size" in values and ("width" in values or "height" in values):
        check.fail("use size or width / height, not both")
    elif "size" in values:
        match = _SIZE.fullmatch(str(values["size"]))
        if match is None:
            check.fail(f"size must look like '1024x1024'; got {values['size']!r}")
        else:
            size = _sized(int(match[1]), int(match[2]), limits, check)
    elif "width" in values or "height" in values:
        width, height = values.get("width"), values.get("height")
        if not isinstance(width, int) or not isinstance(height, int):
            check.fail("width and height go together")
        else:
            size = _sized(width, height, limits, check)
    return _job(
        check,
        "apiyi-multipart",
        limits,
        prompt,
        references,
        size,
        output_format,
        values.get("seed"),
    )


def aimlapi(body: Mapping[str, object]) -> Job | list[str]:
    """Aimlapi's ``/v1/images/generations`` for ``blackforestlabs/flux-2-pro(-edit)`` (seed 004)."""
    check = _Check()
    allowed = {"model", "prompt", "image_urls", "image_size", "output_format", "seed",
               "enable_safety_checker", "safety_tolerance", "guidance_scale"}  # fmt: skip
    _unknown(body, allowed, check)
    wire_model = body.get("model")
    editing = wire_model == "blackforestlabs/flux-2-pro-edit"
    if wire_model not in ("blackforestlabs/flux-2-pro", "blackforestlabs/flux-2-pro-edit"):
        check.fail(f"model {wire_model!r} is not available")
        return check.problems
    urls = body.get("image_urls", [])
    if editing and "image_urls" not in body:
        check.fail("image_urls is required for blackforestlabs/flux-2-pro-edit")
    elif not editing and "image_urls" in body:
        check.fail(
            "image_urls is not accepted by blackforestlabs/flux-2-pro; use blackforestlabs/flux-2-pro-edit"
        )
    if not isinstance(urls, list):
        check.fail("image_urls must be a list")
        urls = []
    values = {key: value for key, value in body.items() if key != "model"} | {"model": "flux-2-pro"}
    named = [(f"image_urls[{index}]", url) for index, url in enumerate(urls)]
    limits, prompt, references = _common("aimlapi", values, check, named)
    if limits is None:
        return check.problems
    if editing and not urls:
        check.fail("image_urls must hold at least 1 image")
    tolerance = body.get("safety_tolerance")
    if tolerance is not None and tolerance not in {str(n) for n in range(1, 6)}:
        check.fail(f"safety_tolerance must be one of '1'..'5' (a string); got {tolerance!r}")
    if "seed" in body:
        _whole(body["seed"], "seed", check, low=1)
    if "enable_safety_checker" in body and not isinstance(body["enable_safety_checker"], bool):
        check.fail("enable_safety_checker must be a boolean")
    if "guidance_scale" in body:
        _number(body["guidance_scale"], "guidance_scale", check, 0, 20)
    output_format = body.get("output_format", "png")
    if output_format not in limits.output_formats:
        check.fail(f"output_format must be one of {', '.join(limits.output_formats)}")
    size: tuple[int, int] | None = AIMLAPI_PRESETS["landscape_4_3"]
    image_size = body.get("image_size")
    if isinstance(image_size, str):
        size = AIMLAPI_PRESETS.get(image_size)
        if size is None:
            check.fail(
                f"image_size must be one of {', '.join(AIMLAPI_PRESETS)} or {{width, height}}"
            )
    elif isinstance(image_size, dict):
        if set(image_size) != {"width", "height"}:
            check.fail("image_size must have exactly width and height")
        else:
            width = _whole(image_size["width"], "image_size.width", check)
            height = _whole(image_size["height"], "image_size.height", check)
            if width is not None and height is not None:
                size = _sized(width, height, limits, check)
    elif image_size is not None:
        check.fail("image_size must be a preset name or {width, height}")
    return _job(
        check, "aimlapi", limits, prompt, references, size, str(output_format), body.get("seed")
    )


def _job(
    check: _Check,
    provider: str,
    limits: ModelLimits,
    prompt: str,
    references: tuple[Image.Image, ...],
    size: tuple[int, int] | None,
    output_format: str,
    seed: object,
) -> Job | list[str]:
    if check.problems or size is None:
        return check.problems or ["the output size could not be resolved"]
    return Job(
        provider=provider,
        model=limits.model,
        prompt=prompt,
        references=references,
        width=size[0],
        height=size[1],
        output_format=output_format,
        seed=seed if isinstance(seed, int) else None,
    )


JsonDialect = Callable[[Mapping[str, object]], "Job | list[str]"]
DIALECTS: Final[Mapping[str, JsonDialect]] = {
    "laozhang": laozhang,
    "apiyi": apiyi,
    "aimlapi": aimlapi,
}
"""JSON ``/v1/images/generations`` dialects by URL prefix; apiyi's multipart one is separate."""
