"""vcrpy configuration for the conformance suite: scrubbing, canonical bodies, matchers, metadata.

Both hooks are idempotent (vcrpy runs the request hook twice on live requests) and symmetric
(the live request is scrubbed before it is matched, so stored and live forms compare equal):

- credentials: ``Authorization`` (and ``x-key``) become ``Bearer <redacted>``;
- URL signatures: every ``signature=`` / ``sig=`` / ``token=`` query value becomes ``REDACTED``,
  in request URLs and in response bodies alike, so the download of a result URL still matches;
- bodies: a JSON body is stored canonically with each image data URL replaced by its digest
  (``data:image/png;sha256=<hex>``); a multipart body is rebuilt with a fixed boundary and each
  file replaced by its digest. Images are matched by digest and cassettes stay small;
- hosts: recorded against the emulator (or another base URL), URLs are rewritten to the
  provider's real host, and result URLs to the provider's result host.

Matching uses method, scheme, host, port, path, query and the canonical body, with a key-level
difference in the failure message; every recorded interaction must be played.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from email import policy
from email.parser import BytesParser
from typing import Any, Final
from urllib.parse import urlsplit

__all__ = [
    "BOUNDARY",
    "MATCH_ON",
    "RECORDING",
    "body_matcher",
    "make_vcr",
    "scrub_request",
    "scrub_response",
]

BOUNDARY: Final = "flux-conformance-boundary"
MATCH_ON: Final = ("method", "scheme", "host", "port", "path", "query", "flux_body")
_SIGNED: Final = re.compile(
    r"(?P<key>\b(?:signature|sig|token|X-Amz-Signature)=)(?P<value>[^&\"'\s]+)", re.IGNORECASE
)
_DATA_URL: Final = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+);base64,(?P<data>[A-Za-z0-9+/=]+)")
_SECRET_HEADERS: Final = ("authorization", "x-key", "x-api-key", "api-key")
_DROPPED_RESPONSE_HEADERS: Final = ("date", "server", "set-cookie", "x-request-id", "cf-ray")

RECORDING: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "flux_recording", default=None
)
"""Where and when the cassette being written was recorded; written into it by the serializer."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _image_placeholder(match: re.Match[str]) -> str:
    data = base64.b64decode(match["data"])
    return f"data:{match['type']};sha256={_digest(data)};bytes={len(data)}"


def _canonical_json(value: Any) -> Any:
    if isinstance(value, str):
        return _SIGNED.sub(
            lambda m: m["key"] + "REDACTED", _DATA_URL.sub(_image_placeholder, value)
        )
    if isinstance(value, dict):
        return {key: _canonical_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_canonical_json(item) for item in value]
    return value


def _multipart_parts(content_type: str, body: bytes) -> list[tuple[str, str | None, str, bytes]]:
    message = BytesParser(policy=policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    parts = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        parts.append(
            (
                str(part.get_param("name", header="content-disposition")),
                part.get_filename(),
                part.get_content_type() if part.get_filename() else "",
                payload if isinstance(payload, bytes) else b"",
            )
        )
    return parts


def _canonical_multipart(content_type: str, body: bytes) -> bytes:
    lines: list[bytes] = []
    for name, filename, media, data in _multipart_parts(content_type, body):
        lines.append(f"--{BOUNDARY}".encode())
        if filename is None:
            lines += [f'Content-Disposition: form-data; name="{name}"'.encode(), b"", data]
        else:
            # An already-canonical part holds its digest line; keep it as it is.
            text = (
                data
                if data.startswith(b"sha256=")
                else f"sha256={_digest(data)};bytes={len(data)}".encode()
            )
            lines += [
                f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'.encode(),
                f"Content-Type: {media}".encode(),
                b"",
                text,
            ]
    lines.append(f"--{BOUNDARY}--".encode())
    return b"\r\n".join(lines) + b"\r\n"


def _header(headers: Mapping[str, Any], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return str(value[0] if isinstance(value, list) else value)
    return ""


def _set_header(headers: dict[str, Any], name: str, value: str) -> None:
    for key in [key for key in headers if key.lower() == name]:
        del headers[key]
    headers[name] = value


def scrub_request(request: Any, rewrite: Callable[[str], str] | None = None) -> Any:
    """Redact credentials and signatures, canonicalise the body, and rewrite hosts (idempotent)."""
    if rewrite is not None:
        request.uri = rewrite(request.uri)
        if _header(request.headers, "host"):
            _set_header(request.headers, "host", urlsplit(request.uri).netloc)
    request.uri = _SIGNED.sub(lambda m: m["key"] + "REDACTED", request.uri)
    for name in list(request.headers):
        if name.lower() in _SECRET_HEADERS:
            request.headers[name] = "Bearer <redacted>"
    body = request.body or b""
    content_type = _header(request.headers, "content-type")
    if body and content_type.startswith("application/json"):
        canonical = json.dumps(
            _canonical_json(json.loads(body)), ensure_ascii=False, sort_keys=True
        )
        request.body = canonical.encode()
    elif body and content_type.startswith("multipart/form-data"):
        request.body = _canonical_multipart(content_type, body)
        _set_header(request.headers, "content-type", f"multipart/form-data; boundary={BOUNDARY}")
    if request.body != body:
        _set_header(request.headers, "content-length", str(len(request.body)))
    return request


def scrub_response(
    response: dict[str, Any], rewrite: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """Drop volatile headers, redact signatures and rewrite result URLs in the body (idempotent)."""
    headers = response.get("headers", {})
    for name in [name for name in headers if name.lower() in _DROPPED_RESPONSE_HEADERS]:
        del headers[name]
    body = response.get("body", {}).get("string", b"")
    if isinstance(body, bytes) and _header(headers, "content-type").startswith("application/json"):
        text = body.decode("utf-8", errors="replace")
        if rewrite is not None:
            text = re.sub(r"https?://[^\s\"']+", lambda m: rewrite(m.group(0)), text)
        text = _SIGNED.sub(lambda m: m["key"] + "REDACTED", text)
        response["body"]["string"] = text.encode()
        _set_header(headers, "content-length", str(len(response["body"]["string"])))
    return response


def _json_difference(first: Any, second: Any, path: str = "") -> str:
    if isinstance(first, dict) and isinstance(second, dict):
        for key in sorted(set(first) | set(second)):
            where = f"{path}.{key}" if path else key
            if key not in second:
                return f"{where} is sent but was not recorded"
            if key not in first:
                return f"{where} was recorded but is not sent"
            found = _json_difference(first[key], second[key], where)
            if found:
                return found
        return ""
    if isinstance(first, list) and isinstance(second, list):
        if len(first) != len(second):
            return f"{path or 'body'} has {len(first)} items; the recording has {len(second)}"
        for index, (a, b) in enumerate(zip(first, second, strict=True)):
            found = _json_difference(a, b, f"{path}[{index}]")
            if found:
                return found
        return ""
    return "" if first == second else f"{path or 'body'} is {first!r}; the recording has {second!r}"


def body_matcher(live: Any, recorded: Any) -> None:
    """Compare canonical bodies; raise AssertionError naming the first difference."""
    if live.body == recorded.body:
        return
    content_type = _header(live.headers, "content-type")
    if content_type.startswith("application/json"):
        difference = _json_difference(
            json.loads(live.body or b"null"), json.loads(recorded.body or b"null")
        )
        raise AssertionError(f"JSON body differs: {difference}")
    if content_type.startswith("multipart/form-data"):
        sent = [
            (n, f, m, d.decode(errors="replace"))
            for n, f, m, d in _multipart_parts(content_type, live.body)
        ]
        kept = [(n, f, m, d.decode(errors="replace")) for n, f, m, d in _multipart_parts(
            _header(recorded.headers, "content-type"), recorded.body)]  # fmt: skip
        raise AssertionError(f"multipart body differs: sent parts {sent}, recorded parts {kept}")
    raise AssertionError("body differs")


class _Serializer:
    """vcrpy's YAML, plus a ``recorded`` block saying where and when the cassette was made."""

    @staticmethod
    def serialize(cassette: dict[str, Any]) -> str:
        from vcr.serializers import yamlserializer

        meta = RECORDING.get()
        if meta is not None:
            cassette = {"recorded": dict(meta), **cassette}
        return str(yamlserializer.serialize(cassette))

    @staticmethod
    def deserialize(text: str) -> dict[str, Any]:
        from vcr.serializers import yamlserializer

        data: dict[str, Any] = yamlserializer.deserialize(text)
        return data


def make_vcr(record_mode: str = "none", rewrite: Callable[[str], str] | None = None) -> Any:
    """A vcrpy ``VCR`` set up for conformance cassettes (``record_mode="none"`` replays only)."""
    import vcr

    recorder = vcr.VCR(
        serializer="flux-yaml",
        record_mode=record_mode,
        match_on=MATCH_ON,
        before_record_request=lambda request: scrub_request(request, rewrite),
        before_record_response=lambda response: scrub_response(response, rewrite),
        decode_compressed_response=True,
        # vcrpy's defaults keep each recorded interaction to one play (allow_playback_repeats)
        # and keep unplayed ones in the file (drop_unused_requests): both as the suite needs.
    )
    recorder.register_serializer("flux-yaml", _Serializer)
    recorder.register_matcher("flux_body", body_matcher)
    return recorder
