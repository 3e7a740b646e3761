"""OpenAI Images API bodies -> `EditRequest`, with every problem found reported at once.

``POST /v1/images/generations`` is JSON: OpenAI's ``prompt``, ``model``, ``n``, ``size``,
``response_format``, ``user``, plus FLUX fields as extra body fields (``input_image``,
``input_image_2`` .. ``input_image_8`` or ``image_urls``, ``seed``, ``output_format``,
``width``/``height``, ``aspect_ratio``, ``safety_tolerance``, ``prompt_upsampling``, ``steps``,
``guidance``, ``allow_conversions``). ``POST /v1/images/edits`` is multipart: files in ``image``
or ``image[]`` (in order), the same fields as text. Any other field is refused, never dropped:
FLUX cannot do what ``quality``, ``style`` or ``mask`` ask, and a caller should know.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

from attrs import frozen

from flux_adapters.errors import RequestError, Violation
from flux_adapters.request import EditRequest

__all__ = ["EDIT_FIELDS", "GENERATION_FIELDS", "ParsedCall", "from_fields"]

MAX_IMAGES: Final = 16
_NUMBERED: Final = ("input_image", *(f"input_image_{i}" for i in range(2, MAX_IMAGES + 1)))
_COMMON: Final = frozenset(
    {
        "prompt",
        "model",
        "n",
        "size",
        "response_format",
        "user",
        "seed",
        "output_format",
        "width",
        "height",
        "aspect_ratio",
        "safety_tolerance",
        "prompt_upsampling",
        "steps",
        "guidance",
        "allow_conversions",
    }
)
GENERATION_FIELDS: Final = _COMMON | {"image_urls", *_NUMBERED}
EDIT_FIELDS: Final = _COMMON | {"image", "image[]"}
_INTS: Final = ("n", "seed", "width", "height", "safety_tolerance", "steps")
_BOOLS: Final = ("prompt_upsampling", "allow_conversions")
_DECIMAL: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


@frozen
class ParsedCall:
    """A request the gateway can route, and how to answer it."""

    request: EditRequest
    response_format: str


def _v(field: str, message: str, limit: str, value: object) -> Violation:
    shown = repr(value)
    return Violation(field, message, limit, shown if len(shown) <= 80 else shown[:77] + "...")


def _from_text(name: str, value: object) -> object:
    """A multipart field's text as the JSON value it stands for (``"42"`` -> 42)."""
    if not isinstance(value, str):
        return value
    if name in _INTS and len(value) < 40:
        # Only ASCII digits with one optional sign: int() alone takes "1_000" and " 5 ", and
        # str.isdigit() passes "²" and "--5", which int() then refuses.
        text = value.strip()
        if text.removeprefix("-").isascii() and text.removeprefix("-").isdigit():
            return int(text)
        return value
    if name == "guidance":
        # A decimal number in ASCII only: float() alone takes "1_5" (15.0) and "١٥" (Arabic
        # digits, 15.0), which a client did not mean as a guidance.
        text = value.strip()
        return float(text) if len(text) < 40 and _DECIMAL.fullmatch(text) else value
    if name in _BOOLS and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def from_fields(
    fields: Mapping[str, object],
    *,
    allowed: frozenset[str],
    images: Sequence[object] = (),
    text_fields: bool = False,
    default_model: str = "flux-2-pro",
) -> ParsedCall | list[Violation]:
    """Build the request from *fields* (JSON values, or multipart text with *text_fields*)."""
    found: list[Violation] = []
    unknown = sorted(name for name in fields if name not in allowed)
    for name in unknown:
        found.append(
            _v(
                name[:60],
                "is not a field this gateway takes (FLUX cannot do it; nothing is dropped silently)",
                "the fields in docs/gateway.md",
                "(given)",
            )
        )
    values = {
        name: (_from_text(name, value) if text_fields else value)
        for name, value in fields.items()
        if name in allowed and name not in ("image", "image[]")
    }
    n = values.pop("n", 1)
    if n is not None and (type(n) is not int or n != 1):
        found.append(_v("n", "must be 1: each FLUX call makes one image", "1", n))
    # Only an absent (or null) field takes its default: "", false, 0 or [] is a mistake to
    # name, not a request for the default (a model of "" would be sent, and paid, as
    # flux-2-pro).
    response_format = values.pop("response_format", None)
    if response_format is None:
        response_format = "url"
    if response_format not in ("url", "b64_json"):
        found.append(
            _v("response_format", "is not a format", '"url" or "b64_json"', response_format)
        )
    values.pop("user", None)  # OpenAI's end-user id: accepted, neither sent on nor logged
    size = values.pop("size", None)
    if size == "auto":
        size = None
    references: list[object] = list(images)
    urls = values.pop("image_urls", None)
    numbered = [(name, values.pop(name)) for name in _NUMBERED if name in values]
    if urls is not None:
        if numbered:
            found.append(
                _v(
                    "image_urls",
                    "give image_urls or input_image.., not both",
                    "one of them",
                    "both",
                )
            )
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            found.append(_v("image_urls", "must be a list of URLs or data URLs", "a list", urls))
        else:
            references.extend(urls)
    if numbered:
        names = [name for name, _ in numbered]
        expected = list(_NUMBERED[: len(numbered)])
        if names != expected:
            found.append(
                _v(
                    names[0] if names[0] != expected[0] else names[-1],
                    "numbered images must start at input_image and leave no gap",
                    ", ".join(expected),
                    ", ".join(names),
                )
            )
        references.extend(value for _, value in numbered)
    for position, reference in enumerate(references):
        if not isinstance(reference, str | bytes):
            found.append(
                _v(f"images[{position}]", "must be a URL or data URL string", "a string", reference)
            )
    if len(references) > MAX_IMAGES:
        found.append(
            _v("images", "too many reference images", f"at most {MAX_IMAGES}", len(references))
        )
    model = values.pop("model", None)
    if model is None:
        model = default_model
    prompt = values.pop("prompt", None)
    if prompt is None:
        found.append(_v("prompt", "is required", "text", None))
    kwargs: dict[str, object] = {key: value for key, value in values.items() if value is not None}
    try:
        request = EditRequest(
            prompt=prompt,  # type: ignore[arg-type]
            model=model,  # type: ignore[arg-type]
            images=[r for r in references if isinstance(r, str | bytes)][:MAX_IMAGES],
            size=size,  # type: ignore[arg-type]
            **kwargs,  # type: ignore[arg-type]
        )
    except RequestError as error:
        return found + [v for v in error.violations if not (prompt is None and v.field == "prompt")]
    except TypeError as error:  # a field EditRequest does not take: listed above already
        return found or [_v("body", str(error)[:200], "the documented fields", "(given)")]
    if found:
        return found
    return ParsedCall(request, str(response_format))
