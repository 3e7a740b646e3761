"""Answers of OpenAI-style image endpoints, which laozhang, apiyi and aimlapi all return.

Success: ``{"created": ..., "data": [{"url": ..., "b64_json": ...}], "meta": {"usage": {...}}}``
(aimlapi adds ``meta.usage`` with ``credits_used`` in its schema and ``tokens_used`` in its
example, so both are read). Errors come as OpenAI-style JSON (``{"error": {"message", "type",
"code"}}``), other JSON shapes, plain text or an HTML page from a gateway; each becomes the typed
error for its status, keeping the real status code.

Responses are structured leniently: only the fields read here are declared, anything else the
provider adds is ignored.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Mapping
from html import unescape
from typing import TYPE_CHECKING, ClassVar, Final

from attrs import frozen

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
from flux_adapters.result import ResultImage, Usage
from flux_adapters.wire import HttpResponse

if TYPE_CHECKING:
    import cattrs

__all__ = ["ImagesApiAnswers", "parse_error", "parse_images", "retry_after"]

_DETAIL_CHARS: Final = 500


@frozen
class _Item:
    url: str | None = None
    b64_json: str | None = None


@frozen
class _Usage:
    credits_used: float | None = None
    tokens_used: int | None = None


@frozen
class _Meta:
    usage: _Usage | None = None


@frozen
class _Images:
    data: list[_Item]
    meta: _Meta | None = None


@functools.cache
def _converter() -> cattrs.Converter:
    import cattrs  # lazy: keeps `import flux_adapters` cheap

    return cattrs.Converter(forbid_extra_keys=False)


def parse_images(provider: str, response: HttpResponse) -> Answer:
    """Read a 2xx answer of an OpenAI-style image endpoint.

    Raises:
        ResponseFormatError: The body is not JSON of the documented shape, or has no image.
        ProviderError: The body is an error report despite the success status.
    """
    try:
        body = response.json()
    except ValueError:
        raise _format_error(provider, response, "the answer is not JSON") from None
    if isinstance(body, dict) and body.get("error") and not body.get("data"):
        raise parse_error(provider, response)
    try:
        images = _converter().structure(body, _Images)
    except Exception as exc:  # cattrs raises a ClassValidationError group for any shape mismatch
        raise _format_error(
            provider, response, "the answer does not have the documented shape"
        ) from exc
    results = tuple(
        ResultImage(url=item.url, b64_json=item.b64_json)
        for item in images.data
        if item.url or item.b64_json
    )
    if not results:
        raise _format_error(provider, response, "the answer holds no image")
    usage = images.meta.usage if images.meta else None
    return Answer(
        images=results,
        usage=Usage(credits_used=usage.credits_used, tokens_used=usage.tokens_used)
        if usage
        else None,
    )


def _format_error(provider: str, response: HttpResponse, message: str) -> ResponseFormatError:
    return ResponseFormatError(
        message,
        provider=provider,
        status_code=response.status_code,
        excerpt=redact(response.text()[:200]),
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
    """Return the typed error for an error answer, keeping the real status code."""
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
    kind = _classify(status, code, f"{code or ''} {detail}")
    return kind(
        _MESSAGES[kind], provider=provider, status_code=status, detail=detail or None, code=code
    )


def _classify(status: int, code: str | None, text: str) -> type[ProviderError]:
    if code in _MODERATION_CODES or _MODERATION_TEXT.search(text):
        return ContentModerated
    if status == 402 or code in _BALANCE_CODES or _BALANCE_TEXT.search(text):
        return InsufficientBalance
    if code in _MODEL_CODES or _MODEL_TEXT.search(text):
        return ModelUnavailable
    if status in (401, 403):
        return AuthenticationFailed
    if status >= 500:
        return ProviderUnavailable
    return ProviderRejected


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.replace(".", "", 1).isdigit():
        return float(value)
    import email.utils  # lazy: only HTTP-date Retry-After values need it

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_TITLE: Final = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAGS: Final = re.compile(r"<[^>]+>")
_SPACE: Final = re.compile(r"\s+")


def _detail(response: HttpResponse) -> tuple[str, str | None]:
    """Pull the provider's own words (and error code) out of an error body of any shape."""
    text = response.text()
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return _json_detail(body)
    if "<html" in text[:500].lower() or "<!doctype" in text[:100].lower():
        title = _TITLE.search(text)
        plain = title.group(1) if title else _TAGS.sub(" ", text)
        return _clip(unescape(plain)), None
    return _clip(text), None


def _json_detail(body: Mapping[str, object]) -> tuple[str, str | None]:
    error = body.get("error")
    if isinstance(error, dict):
        message = error.get("message") or error.get("msg") or ""
        code = error.get("code") or error.get("type")
        return _clip(str(message)), str(code) if code else None
    for key in ("message", "detail", "msg", "error"):
        value = body.get(key)
        if value:
            code = body.get("code")
            return _clip(value if isinstance(value, str) else str(value)), str(
                code
            ) if code else None
    return _clip(str(body)), None


def _clip(text: str) -> str:
    text = redact(_SPACE.sub(" ", text).strip())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 1] + "…"


class ImagesApiAnswers:
    """``parse_response`` and ``parse_error`` for adapters whose provider answers in this shape."""

    name: ClassVar[str]

    def parse_response(self, response: HttpResponse) -> Answer:
        """Read a successful answer."""
        return parse_images(self.name, response)

    def parse_error(self, response: HttpResponse) -> ProviderError:
        """Return the typed error for an error answer."""
        return parse_error(self.name, response)
