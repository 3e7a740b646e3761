"""Answers of OpenAI-style image endpoints, which laozhang, apiyi and aimlapi all return.

Success: ``{"created": ..., "data": [{"url": ..., "b64_json": ...}], "meta": {"usage": {...}}}``
(aimlapi adds ``meta.usage`` with ``credits_used`` in its schema and ``tokens_used`` in its
example, so both are read). Errors come as OpenAI-style JSON (``{"error": {"message", "type",
"code"}}``), other JSON shapes, plain text or an HTML page from a gateway; each becomes the typed
error for its status, keeping the real status code. Nothing a provider sends is trusted: error
bodies are cut to `ERROR_BODY_BYTES` before any pattern runs, HTML is reduced in one pass,
JSON too deep for Python is a typed error, and every image is checked before it is accepted.

Responses are structured leniently: only the fields read here are declared, anything else the
provider adds is ignored, and the optional usage report is read field by field (a count that is
not a number is left out rather than losing the image it came with, which was paid for).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Mapping
from html import unescape
from typing import TYPE_CHECKING, ClassVar, Final
from urllib.parse import SplitResult, urlsplit

from attrs import frozen

from flux_adapters._display import escape_controls
from flux_adapters._redact import redact
from flux_adapters.errors import (
    AuthenticationFailed,
    ContentModerated,
    InsufficientBalance,
    ModelUnavailable,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    ResponseFormatError,
)
from flux_adapters.providers import Answer
from flux_adapters.result import Usage, checked_image, inline_image_problem
from flux_adapters.wire import ERROR_BODY_BYTES, HttpResponse

if TYPE_CHECKING:
    import cattrs

__all__ = [
    "ImagesApiAnswers",
    "clip_detail",
    "finite_number",
    "format_error",
    "parse_error",
    "parse_images",
    "retry_after",
    "url_problem",
]

_DETAIL_CHARS: Final = 500
MAX_IMAGES: Final = 16
"""Most images one answer may list (these providers make one per call)."""
MAX_RETRY_AFTER: Final = 86_400.0
"""A ``Retry-After`` longer than a day is read as a day; the router caps what it honours."""


@frozen
class _Item:
    url: str | None = None
    b64_json: str | None = None


@frozen
class _Images:
    data: list[_Item]


@functools.cache
def _converter() -> cattrs.Converter:
    import cattrs  # lazy: keeps `import flux_adapters` cheap

    return cattrs.Converter(forbid_extra_keys=False)


def parse_images(provider: str, response: HttpResponse) -> Answer:
    """Read a 2xx answer of an OpenAI-style image endpoint.

    Every image is checked before it is accepted: a URL must be ``http(s)`` with a host, inline
    ``b64_json`` must be base64 of a png, jpeg or webp image within `MAX_IMAGE_BYTES`.

    Raises:
        ResponseFormatError: The body is not JSON of the documented shape, has no image, or
            reports an error despite the success status.
        ContentModerated: The body reports moderation despite the success status.
    """
    try:
        body = response.json()
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python goes
        raise format_error(provider, response, "the answer is not readable JSON") from None
    if isinstance(body, dict) and body.get("error") and not body.get("data"):
        detail, code = _json_detail(body)
        if _is_moderation(code, detail):
            raise ContentModerated(
                _MESSAGES[ContentModerated],
                provider=provider,
                status_code=response.status_code,
                detail=detail or None,
                code=code,
            )
        raise format_error(provider, response, "the answer reports an error despite its status")
    items = _plain_items(body)
    if items is None:  # not the common plain shape: cattrs reads it (or says what is wrong)
        try:
            images = _converter().structure(body, _Images)
        except Exception as exc:  # cattrs raises a ClassValidationError group for any mismatch
            raise format_error(
                provider, response, "the answer does not have the documented shape"
            ) from exc
        items = [(item.url, item.b64_json) for item in images.data if item.url or item.b64_json]
    if not items:
        raise format_error(provider, response, "the answer holds no image")
    if len(items) > MAX_IMAGES:
        raise format_error(provider, response, f"the answer lists {len(items)} images")
    for url, b64_json in items:
        problem = _image_problem(url, b64_json)
        if problem:
            raise format_error(provider, response, problem)
    # Made as Answer(...) makes it, without the dict of keyword arguments a class call
    # builds (a third of the cost; tests/test_async_per_edit.py holds why it is the same).
    answer = object.__new__(Answer)
    Answer.__init__(
        answer,
        # An empty field beside the other is no field (Go gateways write ``"b64_json": ""``
        # beside a URL): the image is the URL's, or the inline data's, as `_image_problem` judged.
        images=tuple([checked_image(url or None, b64_json or None) for url, b64_json in items]),
        usage=_usage(body),
    )
    return answer


def _plain_items(body: object) -> list[tuple[str | None, str | None]] | None:
    """The images of an answer in the common plain shape, as cattrs would read them; else ``None``.

    Plain: a dict whose ``data`` is a list of dicts whose ``url`` and ``b64_json`` are each text
    or absent (``None``). cattrs gives exactly these items for such an answer (text is kept as
    it is); anything else (a number for a URL, which cattrs turns into text, a missing ``data``)
    returns ``None`` and goes through cattrs. Only items with a URL or data are kept, as
    ``(url, b64_json)``.
    """
    if type(body) is not dict:
        return None
    data = body.get("data")
    if type(data) is not list:
        return None
    items = []
    for entry in data:
        if type(entry) is not dict:
            return None
        url = entry.get("url")
        b64_json = entry.get("b64_json")
        if (url is not None and type(url) is not str) or (
            b64_json is not None and type(b64_json) is not str
        ):
            return None
        if url or b64_json:
            items.append((url, b64_json))
    return items


def _usage(body: object) -> Usage | None:
    """``meta.usage``, field by field; ``None`` when it holds no readable count."""
    meta = body.get("meta") if isinstance(body, dict) else None
    usage = meta.get("usage") if isinstance(meta, dict) else None
    if not isinstance(usage, dict):
        return None
    credits = finite_number(usage.get("credits_used"))
    tokens = finite_number(usage.get("tokens_used"))
    whole = int(tokens) if tokens is not None and tokens.is_integer() else None
    if credits is None and whole is None:
        return None
    return Usage(credits_used=credits, tokens_used=whole)


def finite_number(value: object) -> float | None:
    """*value* as a finite number (numbers, or numeric text), else ``None``."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
"""Characters no HTTP client puts in a request line (httpx refuses them)."""


def _image_problem(url: str | None, b64_json: str | None) -> str:
    if b64_json:
        return inline_image_problem(b64_json)
    return url_problem(url or "", "a result URL")


def url_problem(url: str, what: str) -> str:
    """What is wrong with *url*, a URL an answer gave (*what*: ``"a result URL"``), or ``""``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"{what} is not a valid URL"
    scheme, netloc = parts.scheme, parts.netloc
    shape = (
        _known_origin_shape(scheme, netloc)
        if len(netloc) <= _REMEMBERED_NETLOC
        else _origin_shape(scheme, netloc)
    )
    if shape:
        return f"{what} {shape}"
    if _CONTROL.search(url):
        return f"{what} holds control characters"
    return ""


_REMEMBERED_NETLOC: Final = 300
"""Longest netloc whose verdict is remembered: a hostile answer's huge one is judged, not kept."""


def _origin_shape(scheme: str, netloc: str) -> str:
    """What is wrong with a URL's scheme and netloc as `url_problem` judges them, or ``""``."""
    parts = SplitResult(scheme, netloc, "", "", "")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return "is not a valid URL"
    if scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL"
    return ""


_known_origin_shape: Final = functools.lru_cache(maxsize=256)(_origin_shape)
"""`_origin_shape`, remembered: the verdict depends on these two parts alone, and the URLs of
answers come from a few origins."""


def format_error(provider: str, response: HttpResponse, message: str) -> ResponseFormatError:
    head = response.content[:800].decode("utf-8", errors="replace")
    return ResponseFormatError(
        message,
        provider=provider,
        status_code=response.status_code,
        excerpt=escape_controls(redact(head[:200])),
    )


_MODERATION_CODES: Final = frozenset(
    {
        "content_policy_violation",
        "moderation_blocked",
        "content_filter",
        "request_moderated",
        "content_moderated",
    }
)
_BALANCE_CODES: Final = frozenset(
    {"insufficient_quota", "insufficient_user_quota", "insufficient_balance"}
)
_MODEL_CODES: Final = frozenset({"model_not_found", "model_not_available"})
_MODERATION_TEXT: Final = re.compile(r"moderat|content policy|nsfw", re.IGNORECASE)
_BALANCE_TEXT: Final = re.compile(
    r"insufficient (balance|quota|credit)|余额不足|额度不足", re.IGNORECASE
)
# "model X not found" or "model X is unavailable", within one clause: a generic "service
# temporarily unavailable" after "the model is overloaded;" is a 5xx, not a missing model.
_MODEL_TEXT: Final = re.compile(
    r"no available channel|无可用渠道|model\b[^.;,]*\b(not found|not available|does not exist|is unavailable)",
    re.IGNORECASE,
)


_MESSAGES: Final[Mapping[type[ProviderError], str]] = {
    ContentModerated: "the provider's filter blocked the request",
    InsufficientBalance: "the account's balance or quota is exhausted",
    ModelUnavailable: "the provider cannot serve this model now",
    AuthenticationFailed: "the provider refused the API key",
    ProviderUnavailable: "the provider failed",
    ProviderRejected: "the provider refused the request",
}


def parse_error(provider: str, response: HttpResponse) -> ProviderError:
    """Return the typed error for an error answer, keeping the real status code.

    The status decides the kind; the body's code or text only tells apart the kinds of a 4xx
    (and of a 503) and finds moderation at any status (final: never failed over), never turning
    a 500 into "insufficient balance" (see
    ``flux_adapters.routing.BILLING_RULES``). At most `ERROR_BODY_BYTES` of the body are read.
    """
    detail, code = _detail(response)
    status = response.status_code
    if status == 429:
        return RateLimited(
            "the provider is rate limiting requests",
            provider=provider,
            status_code=status,
            detail=detail or None,
            code=code,
            retry_after=retry_after(response.header("retry-after")),
        )
    if status < 400:
        # A redirect (never followed: it would send the paid POST again) or an informational
        # status: neither success nor a refusal, so the job may have been done.
        return ResponseFormatError(
            "the provider answered with neither success nor an error",
            provider=provider,
            status_code=status,
            excerpt=detail,
        )
    kind = _classify(status, code, detail)
    return kind(
        _MESSAGES[kind], provider=provider, status_code=status, detail=detail or None, code=code
    )


def _is_moderation(code: str | None, text: str) -> bool:
    return code in _MODERATION_CODES or _MODERATION_TEXT.search(text) is not None


def _classify(status: int, code: str | None, text: str) -> type[ProviderError]:
    if _is_moderation(code, text):
        return ContentModerated
    if status == 402:
        return InsufficientBalance
    names_model = code in _MODEL_CODES or _MODEL_TEXT.search(text) is not None
    if 400 <= status < 500:
        if code in _BALANCE_CODES or _BALANCE_TEXT.search(text):
            return InsufficientBalance
        if names_model:
            return ModelUnavailable
        return AuthenticationFailed if status in (401, 403) else ProviderRejected
    if status == 503 and names_model:
        return ModelUnavailable
    return ProviderUnavailable if status >= 500 else ProviderRejected


_SECONDS: Final = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,6})?")


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date).

    ``None`` for an absent or unreadable value; at most `MAX_RETRY_AFTER`.
    """
    if not value:
        return None
    value = value.strip()[:100]
    if _SECONDS.fullmatch(value):
        return min(float(value), MAX_RETRY_AFTER)
    import email.utils  # lazy: only HTTP-date Retry-After values need it

    try:
        seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


_SPACE: Final = re.compile(r"\s+")


def _detail(response: HttpResponse) -> tuple[str, str | None]:
    """Pull the provider's own words (and error code) out of an error body of any shape."""
    content = response.content
    head = content[:ERROR_BODY_BYTES]
    if len(content) <= ERROR_BODY_BYTES:
        try:
            body = json.loads(head)
        except (ValueError, RecursionError):
            body = None
        if isinstance(body, dict):
            return _json_detail(body)
    text = head.decode("utf-8", errors="replace")
    start = text[:512].lower()
    if "<html" in start or "<!doctype" in start:
        return clip_detail(_html_text(text)), None
    return clip_detail(text), None


def _html_text(page: str) -> str:
    """The page's title, else its text without tags; one pass, no backtracking patterns."""
    lower = page.lower()
    opening = lower.find("<title")
    if opening >= 0:
        start = lower.find(">", opening) + 1
        end = lower.find("</title", start) if start else -1
        if end >= 0:
            return unescape(page[start:end])
    pieces: list[str] = []
    position = 0
    while True:
        tag = page.find("<", position)
        if tag < 0:
            pieces.append(page[position:])
            break
        pieces += [page[position:tag], " "]
        position = page.find(">", tag) + 1
        if position == 0:
            break
    return unescape("".join(pieces))


def _text_of(value: object) -> str:
    """A bounded text for any JSON value (nested ones included), never raising."""
    if isinstance(value, str):
        return value[: _DETAIL_CHARS * 4]
    try:
        return json.dumps(value, ensure_ascii=False)[: _DETAIL_CHARS * 4]
    except (ValueError, TypeError, RecursionError):
        return type(value).__name__


def _json_detail(body: Mapping[str, object]) -> tuple[str, str | None]:
    error = body.get("error")
    if isinstance(error, dict):
        message = error.get("message") or error.get("msg") or ""
        code = error.get("code") or error.get("type")
        return clip_detail(_text_of(message)), _clip_code(code)
    for key in ("message", "detail", "msg", "error"):
        value = body.get(key)
        if value:
            return clip_detail(_text_of(value)), _clip_code(body.get("code"))
    return clip_detail(_text_of(body)), None


def clip_detail(text: str) -> str:
    text = redact(_SPACE.sub(" ", text[: _DETAIL_CHARS * 4]).strip())
    text = text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 1] + "…"
    return escape_controls(text)  # error text reaches terminals


def _clip_code(code: object) -> str | None:
    return escape_controls(redact(_text_of(code)[:100])) if code else None


class ImagesApiAnswers:
    """``parse_response`` and ``parse_error`` for adapters whose provider answers in this shape."""

    name: ClassVar[str]

    def parse_response(self, response: HttpResponse) -> Answer:
        """Read a successful answer."""
        return parse_images(self.name, response)

    def parse_error(self, response: HttpResponse) -> ProviderError:
        """Return the typed error for an error answer."""
        return parse_error(self.name, response)
