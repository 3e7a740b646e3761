"""Reading the answers of asynchronous providers: a JSON object, ids, URLs, numbers, words.

Nothing a provider sends is trusted: each value is checked for its kind before it is used, an
id or URL with control characters (which would end up in a request line) is refused, and the
provider's own words are cut and redacted before they reach an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

from flux_adapters.errors import ResponseFormatError
from flux_adapters.providers._images_api import (
    clip_detail,
    finite_number,
    format_error,
    url_problem,
)
from flux_adapters.wire import HttpResponse

__all__ = ["json_object", "number", "required_text", "required_url", "unreadable", "words"]

_ID_CHARS: Final = 200
_ID_NUMBERS: Final = 10 ** (_ID_CHARS - 1)
"""Whole numbers taken as an id: their text, sign and all, is at most `_ID_CHARS` long."""


def json_object(provider: str, response: HttpResponse) -> Mapping[str, object]:
    """The answer as a JSON object.

    Raises:
        ResponseFormatError: It is not JSON, or not an object.
    """
    try:
        body = response.json()
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python goes
        raise format_error(provider, response, "the answer is not readable JSON") from None
    if not isinstance(body, dict):
        raise format_error(provider, response, "the answer is not a JSON object")
    return body


def required_text(
    provider: str, response: HttpResponse, body: Mapping[str, object], name: str
) -> str:
    """The non-empty, printable text field *name* (an id), at most 200 characters.

    A whole number is taken as its text (``{"id": 12345}``), as the job flow takes an outside
    adapter's: the id only names the job the provider took (and bills), which is followed by
    its URLs; refused, the paid job would never be polled.

    Raises:
        ResponseFormatError: It is missing or not such a text.
    """
    value = body.get(name)
    if type(value) is int and abs(value) < _ID_NUMBERS:  # str() of a huge one would raise
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > _ID_CHARS:
        raise format_error(provider, response, f"the answer has no usable {name!r}")
    if not value.isprintable():
        raise format_error(provider, response, f"the answer's {name!r} holds control characters")
    return value


def required_url(
    provider: str, response: HttpResponse, body: Mapping[str, object], name: str
) -> str:
    """The http(s) URL in field *name*.

    Raises:
        ResponseFormatError: It is missing or not a usable URL.
    """
    value = body.get(name)
    if not isinstance(value, str):
        raise format_error(provider, response, f"the answer has no {name!r} URL")
    problem = url_problem(value, f"the answer's {name!r}")
    if problem:
        raise format_error(provider, response, problem)
    return value


def number(value: object) -> float | None:
    """*value* as a finite number (not a bool, not text), else ``None``."""
    return finite_number(value) if isinstance(value, int | float) else None


def words(value: object) -> str | None:
    """The provider's words in *value* (any JSON), cut and redacted; ``None`` when empty."""
    if value is None or value == "" or value == {} or value == []:
        return None
    try:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return None
    return clip_detail(text[:4000]) or None


def unreadable(provider: str, response: HttpResponse, message: str) -> ResponseFormatError:
    """A `ResponseFormatError` for an answer of the wrong shape."""
    return format_error(provider, response, message)
