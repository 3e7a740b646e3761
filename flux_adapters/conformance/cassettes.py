"""vcrpy configuration for the conformance suite: scrubbing, canonical bodies, matchers, metadata.

A cassette is committed publicly by whoever recorded it, with their own key; so `Scrubber`
removes every secret it can find before anything is written, in both directions:

- **the recording keys** (the key given to `record` and any key a scenario records with), in
  every form `flux_adapters._redact.secret_forms` knows (as is, URL-encoded, JSON-escaped, the
  base64 of any value holding it, such as Basic ``user:key``) and every fragment of 8 characters
  or more of those forms, wherever they appear: header values, URLs (path, query, fragment,
  userinfo), JSON, multipart and form bodies, and any textual response body (JSON, HTML, XML,
  plain text). A key in free text becomes ``[redacted]``; inside a URL, ``REDACTED``;
- **credentials by name, whatever their value** (`CREDENTIAL_NAMES`, and the header or query
  parameter the adapter's own ``auth`` names; case-insensitive, ``-`` and ``_`` ignored): a
  header keeps its name and its scheme (``Authorization: Key <redacted>``,
  ``x-key: <redacted>``), a cookie its names (``sid=<redacted>``), a query parameter or a
  ``name=value`` pair in text its name (``signature=REDACTED``), a JSON field at any depth or a
  multipart text field its name (``"api_key": "<redacted>"``), URL userinfo its user name
  (``https://user:REDACTED@host``; a lone user name, often a token, becomes ``REDACTED``);
- **volatile response headers** (``date``, ``server``, request ids) are dropped.

A compressed answer is stored inflated, as the library read it (`Content-Encoding` in any case,
``x-gzip`` too, which vcrpy leaves compressed), so that it is scrubbed as text; one the library
cannot inflate keeps its header and becomes `UNDECODABLE`.

Not scrubbed, on purpose: a **binary** body (an image, anything that is not UTF-8 text, or is
typed image/audio/video/font) is stored as it is, since replacing bytes would corrupt it; the
scan that runs on every new cassette (`SecretScan`) looks for the recording keys' forms in those
bytes too, and a hit fails the recording. Secrets the scrubber was not told about and that carry
no credential name (someone else's key inside a prompt, say) are left to that scan, whose
key-shaped patterns (bearer tokens, ``sk-`` keys, Basic credentials) fail the run instead of
guessing: a guess that rewrote ``task-0123456789abcdef`` would corrupt ids the replay needs.

Both hooks are idempotent (vcrpy runs the request hook twice on live requests) and symmetric
(the live request is scrubbed before it is matched, so stored and live forms compare equal).

Bodies are stored canonically: a JSON request body sorted, with each image data URL replaced by
its digest (``data:image/png;sha256=<hex>;bytes=<n>``), and so each image sent as bare base64
(BFL's ``input_image``: ``base64:image/png;sha256=<hex>;bytes=<n>``); a multipart body rebuilt
with a fixed boundary and each file replaced by its digest. Images are matched by digest and cassettes stay
small. Recorded against the emulator (or another base URL), URLs are rewritten to the provider's
real host, and result URLs to the provider's result host.

Matching uses method, scheme, host, port, path and query (every host as recorded: a polling or
result URL on another host must be sent there), the credential (which header carries the key,
and its scheme; never its value), every other request header that is not volatile (name and
value), and the canonical body: JSON field by field, types included (``512`` is not ``"512"``),
multipart part by part (names, filenames, content types, order, digests). The failure message
names the first difference; every recorded interaction must be played.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from email import policy
from email.parser import BytesParser
from typing import Any, Final
from urllib.parse import parse_qsl, quote, quote_plus, unquote_plus, urlsplit

from flux_adapters._extras import extra_imports
from flux_adapters._files import MEDIA_TYPES, SNIFF_BYTES, image_format
from flux_adapters._redact import FRAGMENT, MASK, Redactor, secret_forms

__all__ = [
    "BOUNDARY",
    "CREDENTIAL_NAMES",
    "MATCH_ON",
    "PLACEHOLDER",
    "RECORDING",
    "UNDECODABLE",
    "URL_PLACEHOLDER",
    "Scrubber",
    "SecretScan",
    "body_matcher",
    "credential_matcher",
    "header_matcher",
    "is_credential",
    "make_vcr",
    "query_matcher",
    "scrub_request",
    "scrub_response",
    "yaml_problem",
]

BOUNDARY: Final = "flux-multipart-boundary"
MATCH_ON: Final = (
    "method", "scheme", "host", "port", "path", "flux_query", "flux_credential", "flux_headers",
    "flux_body",
)  # fmt: skip
PLACEHOLDER: Final = "<redacted>"
"""What a named credential's value becomes (a header, a cookie, a JSON or multipart field)."""
URL_PLACEHOLDER: Final = "REDACTED"
"""What a secret inside a URL becomes: a query value, a userinfo password, a key in a path."""

_CREDENTIALS: Final = (
    # headers
    "authorization",
    "proxy-authorization",
    "x-key",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
    "cookie",
    "set-cookie",
    # query parameters, form, JSON and multipart fields
    "key",
    "api_key",
    "access_token",
    "refresh_token",
    "id_token",
    "token",
    "client_secret",
    "password",
    "signature",
    "sig",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
)


def _normal(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


CREDENTIAL_NAMES: Final = frozenset(_normal(name) for name in _CREDENTIALS)
"""Names whose value is a credential wherever they appear, compared case-insensitively with
``-`` and ``_`` ignored (``api_key``, ``apiKey`` and ``API-KEY`` are one name)."""


def is_credential(name: str) -> bool:
    """Whether a header, parameter or field called *name* holds a credential."""
    return _normal(name) in CREDENTIAL_NAMES


def _names_pattern(names: Iterable[str]) -> str:
    return "|".join(
        sorted(
            {"[-_]?".join(re.escape(part) for part in re.split(r"[-_]", name)) for name in names},
            key=len,
            reverse=True,
        )
    )


_NAMES: Final = _names_pattern(_CREDENTIALS)
_VALUE_END: Final = "&\\s\"'<>,;#"


def _pair_pattern(extra: Iterable[str] = ()) -> re.Pattern[str]:
    """``name=value`` for every credential name (and *extra* ones), case-insensitively."""
    names = _names_pattern([*_CREDENTIALS, *extra])
    return re.compile(rf"(?<![\w-])(?P<name>{names})=(?P<value>[^{_VALUE_END}]+)", re.IGNORECASE)


_URL: Final = re.compile(r"https?://[^\s\"'<>\\]+", re.IGNORECASE)
_DATA_URL: Final = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+);base64,(?P<data>[A-Za-z0-9+/=]+)")
_BARE_BASE64: Final = re.compile(r"[A-Za-z0-9+/]{64,}={0,2}")
# An authentication scheme worth keeping: a short word, or one of the registered hyphenated ones.
_SCHEME: Final = re.compile(
    r"(?P<scheme>AWS4-HMAC-SHA256|SCRAM-SHA-256|SCRAM-SHA-1|[A-Za-z]{1,16})\s+\S"
)
_COOKIE_ATTRIBUTES: Final = frozenset(
    {"path", "domain", "expires", "max-age", "secure", "httponly", "samesite", "partitioned"}
)
_DROPPED_RESPONSE_HEADERS: Final = ("date", "server", "x-request-id", "cf-ray")
_BINARY_MEDIA: Final = ("image", "audio", "video", "font")

RECORDING: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "flux_recording", default=None
)
"""Where and when the cassette being written was recorded; written into it by the serializer."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _image_placeholder(match: re.Match[str]) -> str:
    data = base64.b64decode(match["data"])
    return f"data:{match['type']};sha256={_digest(data)};bytes={len(data)}"


def _bare_image(value: str) -> str | None:
    """The digest of *value* when it is a whole image as bare base64 (no ``data:`` prefix)."""
    if len(value) % 4 or not _BARE_BASE64.fullmatch(value):
        return None
    # Whole base64 quanta covering the bytes image_format reads (the library's one table).
    head = base64.b64decode(value[: 4 * -(-SNIFF_BYTES // 3)])
    media = MEDIA_TYPES.get(image_format(head) or "")
    if media is None:
        return None
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return f"base64:{media};sha256={_digest(data)};bytes={len(data)}"


def _media(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _textual(content_type: str, body: object) -> str | None:
    """*body* as text, or None when it is binary (a media type or bytes that are not UTF-8)."""
    if _media(content_type).split("/", 1)[0] in _BINARY_MEDIA:
        return None
    if isinstance(body, str):
        return body
    if isinstance(body, bytes):
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


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


def _header(headers: Mapping[str, Any], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return str(value[0] if isinstance(value, list) else value)
    return ""


def _set_header(headers: Any, name: str, value: str | list[str]) -> None:
    for key in [key for key in headers if key.lower() == name]:
        del headers[key]
    headers[name] = value


class Scrubber:
    """Removes secrets from recorded requests and responses (see the module docstring).

    Args:
        secrets: The keys to remove in every form: the recording key and any scenario's key.
        rewrite: Maps a URL recorded against a stand-in (the emulator, a base URL) to the
            provider's own.
        credentials: Names that carry a credential besides `CREDENTIAL_NAMES`: the header or
            query parameter of the adapter's ``auth`` (`KeyAuth`).

    Build one per recording and reuse it: the key pattern is compiled once.
    """

    def __init__(
        self,
        secrets: Iterable[str] = (),
        rewrite: Callable[[str], str] | None = None,
        credentials: Iterable[str] = (),
    ) -> None:
        # Only the keys' forms and fragments: guesses at key-shaped text suit a log line, not a
        # cassette, whose ids the replay needs and whose parameter names `Scrubber` keeps.
        self._cover = Redactor(tuple(secrets), shapes=False)
        self._rewrite = rewrite
        extra = sorted({name for name in credentials if name} - set(_CREDENTIALS))
        self._names = CREDENTIAL_NAMES | {_normal(name) for name in extra}
        self._pair = _pair_pattern(extra)

    def is_credential(self, name: str) -> bool:
        """Whether a header, parameter or field called *name* holds a credential."""
        return _normal(name) in self._names

    def cover(self, text: str) -> str:
        """*text* with every form of every key, and every long fragment, replaced by a mask."""
        return self._cover(text)

    def _url_cover(self, text: str) -> str:
        return self._cover(text).replace(MASK, URL_PLACEHOLDER)

    def url(self, url: str) -> str:
        """*url* without its userinfo password, credential parameters or keys (host kept)."""
        scheme, separator, rest = url.partition("://")
        if not separator:
            return self._url_cover(url)
        cut = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
        netloc, tail = rest[:cut], rest[cut:]
        userinfo, at, host = netloc.rpartition("@")
        if at:
            user, colon, _ = userinfo.partition(":")
            # A lone user name is how a token rides in a URL (https://<token>@host).
            userinfo = f"{self._url_cover(user)}:{URL_PLACEHOLDER}" if colon else URL_PLACEHOLDER
        tail, hash_, fragment = tail.partition("#")
        path, question, query = tail.partition("?")
        return (
            f"{scheme}://{userinfo}{at}{self._url_cover(host)}{self._url_cover(path)}"
            f"{question}{self.query(query)}{hash_}{self.query(fragment)}"
        )

    def query(self, query: str) -> str:
        """A query string (or form body) with credential values and keys replaced."""
        pairs = []
        for pair in query.split("&"):
            name, equals, value = pair.partition("=")
            if equals and self.is_credential(unquote_plus(name)):
                pairs.append(f"{name}={URL_PLACEHOLDER}")
            else:
                pairs.append(self._url_cover(name) + equals + self._url_cover(value))
        return "&".join(pairs)

    def text(self, text: str) -> str:
        """Free text (a body, a header, a JSON string): URLs scrubbed, pairs and keys replaced."""
        parts, last = [], 0
        for match in _URL.finditer(text):
            parts.append(self._plain(text[last : match.start()]))
            url = match.group()
            parts.append(self.url(self._rewrite(url) if self._rewrite is not None else url))
            last = match.end()
        parts.append(self._plain(text[last:]))
        return "".join(parts)

    def _plain(self, text: str) -> str:
        if not text:
            return text
        return self._cover(self._pair.sub(lambda m: f"{m['name']}={URL_PLACEHOLDER}", text))

    def credential(self, name: str, value: str) -> str:
        """The stored form of credential header *name*: its scheme, or its cookie names, stay."""
        kind = _normal(name)
        value = self._cover(value).strip()
        if kind == "cookie":
            return "; ".join(self._cookie(pair) for pair in value.split(";") if pair.strip())
        if kind == "setcookie":
            first, *attributes = value.split(";")
            kept = [
                attribute.strip()
                if attribute.partition("=")[0].strip().lower() in _COOKIE_ATTRIBUTES
                else self._cookie(attribute)
                for attribute in attributes
                if attribute.strip()
            ]
            return "; ".join([self._cookie(first), *kept])
        scheme = _SCHEME.match(value)
        return f"{scheme['scheme']} {PLACEHOLDER}" if scheme else PLACEHOLDER

    @staticmethod
    def _cookie(pair: str) -> str:
        name, equals, _ = pair.strip().partition("=")
        return f"{name.strip()}={PLACEHOLDER}" if equals and name.strip() else PLACEHOLDER

    def json_value(self, value: Any, *, images: bool = False) -> Any:
        """A parsed JSON value with credential fields (at any depth) and keys replaced.

        With *images*, each image data URL, and each image in bare base64, is replaced by its
        digest first.
        """
        if isinstance(value, str):
            if images:
                bare = _bare_image(value)
                if bare is not None:
                    return bare
                value = _DATA_URL.sub(_image_placeholder, value)
            return self.text(value)
        if isinstance(value, dict):
            return {
                self.cover(str(key)): PLACEHOLDER
                if self.is_credential(str(key))
                else self.json_value(item, images=images)
                for key, item in value.items()
            }
        if isinstance(value, list):
            return [self.json_value(item, images=images) for item in value]
        return value

    def _multipart(self, content_type: str, body: bytes) -> bytes:
        lines: list[bytes] = []
        for name, filename, media, data in _multipart_parts(content_type, body):
            lines.append(f"--{BOUNDARY}".encode())
            if filename is None:
                text = _textual("", data)
                if self.is_credential(name):
                    data = PLACEHOLDER.encode()
                elif text is not None:
                    data = self.text(text).encode()
                lines += [f'Content-Disposition: form-data; name="{name}"'.encode(), b"", data]
                continue
            # An already-canonical part holds its digest line; keep it as it is.
            digest = (
                data
                if data.startswith(b"sha256=")
                else f"sha256={_digest(data)};bytes={len(data)}".encode()
            )
            lines += [
                f'Content-Disposition: form-data; name="{name}"; '
                f'filename="{self.cover(filename)}"'.encode(),
                f"Content-Type: {media}".encode(),
                b"",
                digest,
            ]
        lines.append(f"--{BOUNDARY}--".encode())
        return b"\r\n".join(lines) + b"\r\n"

    def _request_body(self, content_type: str, body: bytes) -> bytes:
        media = _media(content_type)
        if media == "multipart/form-data":
            return self._multipart(content_type, body)
        if "json" in media:
            try:
                value = json.loads(body)
            except (ValueError, RecursionError):
                pass
            else:
                scrubbed = self.json_value(value, images=True)
                return json.dumps(scrubbed, ensure_ascii=False, sort_keys=True).encode()
        text = _textual(content_type, body)
        if text is None:
            return body  # binary: left whole, and searched by the scan after recording
        if media == "application/x-www-form-urlencoded":
            return self.query(text).encode()
        return self.text(text).encode()

    def request(self, request: Any) -> Any:
        """Scrub a vcrpy request in place and return it (the ``before_record_request`` hook)."""
        uri = self._rewrite(request.uri) if self._rewrite is not None else request.uri
        request.uri = self.url(uri)
        if self._rewrite is not None and _header(request.headers, "host"):
            _set_header(request.headers, "host", urlsplit(request.uri).netloc.rpartition("@")[2])
        for name in list(request.headers):
            value = str(request.headers[name])
            request.headers[name] = (
                self.credential(name, value) if self.is_credential(name) else self.text(value)
            )
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        content_type = _header(request.headers, "content-type")
        if body:
            request.body = self._request_body(content_type, body)
        if _media(content_type) == "multipart/form-data":
            _set_header(
                request.headers, "content-type", f"multipart/form-data; boundary={BOUNDARY}"
            )
        if body and request.body != body:
            _set_header(request.headers, "content-length", str(len(request.body)))
        return request

    def _response_text(self, content_type: str, text: str) -> str:
        if "json" in _media(content_type) or text.lstrip()[:1] in ("{", "["):
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                pass
            else:
                scrubbed = self.json_value(value)
                if scrubbed == value:
                    return text
                return json.dumps(scrubbed, ensure_ascii=False, separators=(",", ":"))
        return self.text(text)

    def response(self, response: dict[str, Any]) -> dict[str, Any]:
        """Scrub a vcrpy response in place and return it (the ``before_record_response`` hook)."""
        headers = response.setdefault("headers", {})
        _decode_body(response, headers)
        for name in list(headers):
            if name.lower() in _DROPPED_RESPONSE_HEADERS:
                del headers[name]
                continue
            values = headers[name] if isinstance(headers[name], list) else [headers[name]]
            headers[name] = [
                self.credential(name, str(value))
                if self.is_credential(name)
                else self.text(str(value))
                for value in values
            ]
        status = response.get("status")
        if isinstance(status, dict) and isinstance(status.get("message"), str):
            status["message"] = self.cover(status["message"])
        body = response.get("body", {}).get("string", b"")
        content_type = _header(headers, "content-type")
        text = _textual(content_type, body)
        if text is not None:
            scrubbed = self._response_text(content_type, text)
            if scrubbed != text:
                response["body"]["string"] = scrubbed.encode()
                _set_header(headers, "content-length", [str(len(response["body"]["string"]))])
        return response


UNDECODABLE: Final = b"\xff(a body in an encoding the library cannot read: not recorded)"
"""What an answer's body becomes when its ``Content-Encoding`` is one the library refuses (br,
a chain of two, data that does not inflate): the library fails to read it on replay as it did
while recording (no decoder takes a first byte of 0xff), and no key hides in it."""
_DECODED_MAX: Final = 16 * 1024 * 1024
"""The most an encoded answer is inflated to: a replay reads no larger cassette."""


def _decode_body(response: dict[str, Any], headers: dict[str, Any]) -> None:
    """Store *response*'s body as the library read it: decoded, so that it can be scrubbed.

    vcrpy decodes ``gzip`` and ``deflate`` spelt so, alone; the library (`_transport`) reads any
    case and ``x-gzip`` too. A body vcrpy left compressed was stored as binary, where neither
    the scrubber nor the scan can see a key a sandbox echoed in it, and anyone can inflate it.
    """
    names = [name for name in headers if name.lower() == "content-encoding"]
    values = [
        str(value)
        for name in names
        for value in (headers[name] if isinstance(headers[name], list) else [headers[name]])
    ]
    codings = [
        coding.strip().lower()
        for value in values
        for coding in value.split(",")
        if coding.strip() and coding.strip().lower() != "identity"
    ]
    if not codings:
        return
    body = response.setdefault("body", {}).get("string", b"")
    data = body.encode() if isinstance(body, str) else body
    decoded = _inflated(codings, data) if isinstance(data, bytes) else None
    if decoded is None:
        response["body"]["string"] = UNDECODABLE
    else:
        for name in names:
            del headers[name]
        response["body"]["string"] = decoded
    _set_header(headers, "content-length", [str(len(response["body"]["string"]))])


def _inflated(codings: list[str], data: bytes) -> bytes | None:
    """*data* inflated as the library inflates an answer, or ``None`` where it fails to."""
    import httpx

    from flux_adapters._transport import _WBITS, _Inflater

    if len(codings) != 1 or codings[0] not in _WBITS:
        return None
    pieces: list[bytes] = []
    size = 0
    try:
        for piece in _Inflater(codings[0]).feed(data):
            size += len(piece)
            if size > _DECODED_MAX:
                return None
            pieces.append(piece)
    except httpx.DecodingError:
        return None
    return b"".join(pieces)


def scrub_request(
    request: Any, rewrite: Callable[[str], str] | None = None, secrets: Iterable[str] = ()
) -> Any:
    """`Scrubber.request` with a scrubber made for this one call."""
    return Scrubber(secrets, rewrite).request(request)


def scrub_response(
    response: dict[str, Any],
    rewrite: Callable[[str], str] | None = None,
    secrets: Iterable[str] = (),
) -> dict[str, Any]:
    """`Scrubber.response` with a scrubber made for this one call."""
    return Scrubber(secrets, rewrite).response(response)


_SHORTEST_KEY: Final = 4
"""Keys shorter than this are not searched for (as in `Redactor`)."""
_SHAPES: Final = (
    ("a bearer token", re.compile(r"\bBearer\s+(?!<redacted>)[A-Za-z0-9._~+/=-]{8,}")),
    ("a Basic credential", re.compile(r"\bBasic\s+(?!<redacted>)[A-Za-z0-9+/=]{8,}")),
    ("an API key", re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{16,}")),
    (
        "a password in a URL",
        re.compile(r"\b[a-z][a-z0-9+.-]*://[^/?#\s@\"'<>:]*:(?!REDACTED@)[^/?#\s@\"'<>]+@", re.I),
    ),
    (
        "a user name in a URL (often a token)",
        re.compile(r"\b[a-z][a-z0-9+.-]*://(?!REDACTED@)[^/?#\s@\"'<>:]+@", re.I),
    ),
)
_NAMED: Final = (
    (
        "an unredacted {name}= value",
        re.compile(
            rf"(?<![\w-])(?P<name>{_NAMES})=(?!REDACTED(?![^{_VALUE_END}]))[^{_VALUE_END}]+",
            re.I,
        ),
    ),
    (
        'an unredacted JSON field "{name}"',
        re.compile(rf'"(?P<name>{_NAMES})"\s*:\s*(?!"<redacted>")', re.I),
    ),
    (
        'an unredacted multipart field "{name}"',
        re.compile(rf'name="(?P<name>{_NAMES})"\r?\n\r?\n(?!<redacted>\r?\n)', re.I),
    ),
)


def _form_kind(secret: str, form: str) -> str:
    if form == secret:
        return ""
    if form in (quote(secret, safe=""), quote_plus(secret, safe="")):
        return " (URL-encoded)"
    if form in (json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]):
        return " (JSON-escaped)"
    return " (base64)"


class SecretScan:
    """Finds what must never be in a cassette, by line, naming the kind and never the secret.

    Looks for every form of each given key (as `Scrubber` knows them) and every fragment of 8
    characters or more, and for credentials whatever the key: bearer tokens, Basic credentials,
    ``sk-`` keys, URL passwords, credential headers, query values, JSON and multipart fields that
    are not redacted. It reads each line as written and each YAML value as parsed (a folded
    line, an escaped string, the bytes of a ``!!binary`` body), so a key split by the YAML
    writer or stored in a binary body is found too.
    """

    def __init__(self, keys: Iterable[str] = (), *, credentials: Iterable[str] = ()) -> None:
        usable = tuple(dict.fromkeys(key for key in keys if len(key) >= _SHORTEST_KEY))
        self._scrubber = Scrubber(usable, credentials=credentials)
        self._forms: list[tuple[str, re.Pattern[str], re.Pattern[str] | None]] = []
        for secret in usable:
            for form in secret_forms(secret):
                label = _form_kind(secret, form)
                pieces = {form[i : i + FRAGMENT] for i in range(len(form) - FRAGMENT + 1)}
                fragments = (
                    re.compile("|".join(re.escape(piece) for piece in sorted(pieces)))
                    if len(form) > FRAGMENT
                    else None
                )
                self._forms.append((label, re.compile(re.escape(form)), fragments))

    def _keys_in(self, text: str) -> list[str]:
        kinds = []
        for label, whole, fragments in self._forms:
            if whole.search(text):
                kinds.append(f"a recording key{label}")
            elif fragments is not None and fragments.search(text):
                kinds.append(f"an {FRAGMENT}-character fragment of a recording key{label}")
        return kinds

    def _in_text(self, text: str) -> list[str]:
        kinds = [kind for kind, pattern in _SHAPES if pattern.search(text)]
        for kind, pattern in _NAMED:
            kinds += [kind.format(name=match["name"]) for match in pattern.finditer(text)]
        return kinds + self._keys_in(text)

    def findings(self, text: str) -> list[tuple[int, str]]:
        """Every ``(line, kind)`` in the cassette *text*, in line order."""
        with extra_imports():
            import yaml

        found: dict[tuple[int, str], None] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            found.update(dict.fromkeys((number, kind) for kind in self._in_text(line)))
        problem = yaml_problem(text)
        if problem:  # its values cannot be searched as parsed: say so rather than pass it
            found[(1, f"YAML that cannot be scanned as parsed ({problem})")] = None
            return sorted(found, key=lambda finding: finding[0])
        try:
            root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError:
            return sorted(found, key=lambda finding: finding[0])
        nodes = [root] if root is not None else []
        while nodes:
            node = nodes.pop()
            first, last = node.start_mark.line + 1, node.end_mark.line + 1
            if isinstance(node, yaml.ScalarNode):
                try:
                    binary = node.tag == "tag:yaml.org,2002:binary"
                    data = base64.b64decode(node.value).decode("latin-1") if binary else ""
                except ValueError:  # not base64 after all: read it as text
                    binary = False
                # A binary body is searched for the keys only: its bytes are no text.
                kinds = self._keys_in(data) if binary else self._in_text(node.value)
                for kind in kinds:
                    if not any((line, kind) in found for line in range(first, last + 1)):
                        found[(first, kind)] = None
            elif isinstance(node, yaml.SequenceNode):
                nodes += node.value
            elif isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    nodes += [key, value]
                    if isinstance(key, yaml.ScalarNode) and self._scrubber.is_credential(key.value):
                        for item in (
                            value.value if isinstance(value, yaml.SequenceNode) else [value]
                        ):
                            if isinstance(item, yaml.ScalarNode) and (
                                self._scrubber.credential(key.value, item.value) != item.value
                            ):
                                found[
                                    (item.start_mark.line + 1, f"an unredacted {key.value!r} value")
                                ] = None
        return sorted(found, key=lambda finding: finding[0])


def _shown(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "text"}.get(type(value))
    text = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return f"{kind} {text}" if kind else text


def _json_difference(first: Any, second: Any, path: str = "") -> str:
    """The first difference between the JSON values *first* (sent) and *second* (recorded).

    Types count: ``512`` and ``"512"``, ``1`` and ``1.0``, ``true`` and ``1`` differ, as a
    provider's schema tells them apart.
    """
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
    if type(first) is type(second) and first == second:
        return ""
    return f"{path or 'body'} is {_shown(first)}; the recording has {_shown(second)}"


def _part_shown(part: tuple[str, str | None, str, bytes]) -> str:
    name, filename, media, data = part
    if filename is None:
        return f"field {name!r} = {data.decode(errors='replace')[:80]!r}"
    return f"file {name!r} (filename {filename!r}, {media}, {data.decode(errors='replace')[:90]})"


def _multipart_difference(sent: list[Any], kept: list[Any]) -> str:
    """The first difference between two multipart bodies' parts: order, name, file, content."""
    for number, (mine, theirs) in enumerate(zip(sent, kept, strict=False), 1):
        if mine != theirs:
            return f"part {number} is {_part_shown(mine)}; the recording has {_part_shown(theirs)}"
    if len(sent) != len(kept):
        return f"{len(sent)} parts are sent; the recording has {len(kept)}"
    return "the bodies differ"


def body_matcher(live: Any, recorded: Any) -> None:
    """Compare canonical bodies; raise AssertionError naming the first difference."""
    if live.body == recorded.body:
        return
    content_type = _header(live.headers, "content-type")
    if "json" in _media(content_type):
        try:
            difference = _json_difference(
                json.loads(live.body or b"null"), json.loads(recorded.body or b"null")
            )
        except ValueError:
            difference = "the bodies differ"
        raise AssertionError(f"JSON body differs: {difference}")
    if content_type.startswith("multipart/form-data"):
        sent = _multipart_parts(content_type, live.body)
        kept = _multipart_parts(_header(recorded.headers, "content-type"), recorded.body or b"")
        raise AssertionError(f"multipart body differs: {_multipart_difference(sent, kept)}")
    raise AssertionError("body differs")


def _named_difference(
    sent: Mapping[str, Any], kept: Mapping[str, Any], shown: Callable[[Any], str] = repr
) -> str:
    """The first name (in order) whose value *sent* and the recording *kept* disagree on."""
    for name in sorted(set(sent) | set(kept)):
        if name not in kept:
            return f"{name} is sent but was not recorded"
        if name not in sent:
            return f"{name} was recorded but is not sent"
        if sent[name] != kept[name]:
            return f"{name} is {shown(sent[name])}; the recording has {shown(kept[name])}"
    return ""


def _query_values(uri: str) -> dict[str, list[str]]:
    """The query's values by name, a parameter without a value kept (``?debug``, ``?seed=``)."""
    values: dict[str, list[str]] = {}
    for name, value in sorted(parse_qsl(urlsplit(uri).query, keep_blank_values=True)):
        values.setdefault(name, []).append(value)
    return values


def query_matcher(live: Any, recorded: Any) -> None:
    """A vcrpy matcher: the same query parameters, with the same values, blank ones included.

    vcrpy's own ``query`` matcher drops a parameter with no value (``?debug``, ``?seed=``), which
    a provider may well read. Order does not matter; how many times a parameter is given does.
    """
    sent, kept = _query_values(live.uri), _query_values(recorded.uri)
    if sent != kept:
        difference = _named_difference(sent, kept, lambda values: ", ".join(map(repr, values)))
        raise AssertionError(f"query differs: {difference}")


VOLATILE_HEADERS: Final = frozenset(
    {"content-length", "host", "accept-encoding", "connection", "keep-alive", "te"}
)
"""Request headers not compared at all: the body and the URL are compared instead, and the
rest belong to the HTTP client, not to the adapter."""
PRESENCE_HEADERS: Final = frozenset(
    {
        "user-agent",
        "idempotency-key",
        "x-idempotency-key",
        "x-request-id",
        "traceparent",
        "tracestate",
    }
)
"""Request headers compared by presence only: their value changes from one run to the next."""


def _credential_names(names: Iterable[str]) -> Callable[[str], bool]:
    """Whether a header carries a credential: one of `CREDENTIAL_NAMES` or of *names*."""
    known = CREDENTIAL_NAMES | {_normal(name) for name in names}
    return lambda name: _normal(name) in known


def header_matcher(names: Iterable[str] = ()) -> Callable[[Any, Any], None]:
    """A vcrpy matcher: every request header that is not volatile is sent as recorded.

    ``Accept``, ``Content-Type`` and any header an adapter sets of its own (``HttpRequest.headers``)
    are compared by name and value, case-insensitively by name; `PRESENCE_HEADERS` by name only;
    `VOLATILE_HEADERS` not at all. Credential headers (the common names and the adapter's own
    *names*) are left to `credential_matcher`, which never compares their values.
    """
    credential = _credential_names(names)

    def shown(request: Any) -> dict[str, str]:
        kept: dict[str, str] = {}
        for name in request.headers:
            lowered = name.lower()
            if lowered in VOLATILE_HEADERS or credential(name):
                continue
            value = str(request.headers[name])
            kept[lowered] = "(any value)" if lowered in PRESENCE_HEADERS else value
        return kept

    def match(live: Any, recorded: Any) -> None:
        sent, kept = shown(live), shown(recorded)
        if sent != kept:
            raise AssertionError(f"header differs: {_named_difference(sent, kept)}")

    return match


def credential_matcher(names: Iterable[str]) -> Callable[[Any, Any], None]:
    """A vcrpy matcher: the key goes in the header the recording has it in, with its scheme.

    Values are never compared (the recording holds ``<redacted>``): only which credential
    headers are sent (the common names and the adapter's own *names*) and the word before the
    key (``Bearer``, ``Key``, ``Token``, or none), so ``Authorization: Bearer`` sent where the
    provider takes ``x-key`` is a difference.
    """
    credential = _credential_names(names)

    def signature(request: Any) -> list[str]:
        shown = []
        for name in sorted(request.headers, key=str.lower):
            if credential(name):
                words = str(request.headers[name]).split(None, 1)
                scheme = words[0] + " " if len(words) == 2 else ""
                shown.append(f"{name.lower()}: {scheme}<key>")
        return shown

    def match(live: Any, recorded: Any) -> None:
        sent, kept = signature(live), signature(recorded)
        if sent != kept:
            raise AssertionError(
                f"credential differs: sent {', '.join(sent) or 'none'}; "
                f"the recording has {', '.join(kept) or 'none'}"
            )

    return match


YAML_DEPTH: Final = 64
"""The deepest a cassette's YAML may nest: a recorded one nests a dozen levels; PyYAML's C
loader builds deeper documents by recursion, and crashes the process (a segmentation fault)
on one nested a hundred thousand levels."""
YAML_NODES: Final = 1_000_000
"""The most values a cassette's YAML may hold once its aliases are expanded: twenty anchors,
each two aliases of the one before, are a million values in a few lines (a "billion laughs")."""


def yaml_problem(text: str) -> str:
    """Why *text* is no YAML a recording writes, from its events alone (empty: it may be one).

    Nested deeper than `YAML_DEPTH`, or more than `YAML_NODES` values with every alias
    expanded (as a walk of it, or ``str()`` of it, expands them). Reading events recurses
    nowhere, so this is safe on any text; a syntax error is left to the loader.
    """
    with extra_imports():
        import yaml

    sizes: dict[str, int] = {}  # anchor -> the values it stands for, expanded
    open_: list[list[Any]] = [[None, 0]]  # [anchor, values so far] of each collection open

    def add(count: int) -> bool:
        total: int = open_[-1][1] + count
        open_[-1][1] = total
        return total > YAML_NODES

    try:
        for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                open_.append([event.anchor, 1])
                if len(open_) - 1 > YAML_DEPTH:
                    return f"it nests deeper than {YAML_DEPTH} levels"
                continue
            if isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
                anchor, count = open_.pop()
            elif isinstance(event, yaml.ScalarEvent):
                anchor, count = event.anchor, 1
            elif isinstance(event, yaml.AliasEvent):
                anchor, count = None, sizes.get(event.anchor or "", 1)
            else:
                continue
            if anchor:
                sizes[anchor] = count
            if add(count):
                return f"it holds more than {YAML_NODES} values with its aliases expanded"
    except yaml.YAMLError:
        return ""
    return ""


class _Serializer:
    """vcrpy's YAML, plus a ``recorded`` block saying where and when the cassette was made.

    Reading refuses YAML no recording writes (`yaml_problem`) with a ``ValueError``.
    """

    @staticmethod
    def serialize(cassette: dict[str, Any]) -> str:
        with extra_imports():
            from vcr.serializers import yamlserializer

        meta = RECORDING.get()
        if meta is not None:
            cassette = {"recorded": dict(meta), **cassette}
        return str(yamlserializer.serialize(cassette))

    @staticmethod
    def deserialize(text: str) -> dict[str, Any]:
        with extra_imports():
            from vcr.serializers import yamlserializer

        problem = yaml_problem(text)
        if problem:
            raise ValueError(f"not a cassette: {problem}")
        data: dict[str, Any] = yamlserializer.deserialize(text)
        return data


def make_vcr(
    record_mode: str = "none",
    rewrite: Callable[[str], str] | None = None,
    secrets: Iterable[str] = (),
    credentials: Iterable[str] = (),
) -> Any:
    """A vcrpy ``VCR`` set up for conformance cassettes (``record_mode="none"`` replays only).

    Args:
        record_mode: vcrpy's record mode.
        rewrite: See `Scrubber`.
        secrets: The keys to remove in every form (recording), or the stand-in key the replay
            sends (replay), so that a key is found in the same places on both sides.
        credentials: The adapter's own credential names (see `Scrubber`).
    """
    with extra_imports():
        import vcr

    scrubber = Scrubber(secrets, rewrite, credentials)
    recorder = vcr.VCR(
        serializer="flux-yaml",
        record_mode=record_mode,
        match_on=MATCH_ON,
        # One function per direction rather than filter_headers / filter_query_parameters:
        # those touch request headers only (kevin1024/vcrpy#569), compare query names
        # case-sensitively, and could not keep an Authorization scheme or find a key in a
        # response body; one Scrubber gives both directions the same placeholders.
        before_record_request=scrubber.request,
        before_record_response=scrubber.response,
        decode_compressed_response=True,
        # vcrpy's defaults keep each recorded interaction to one play (allow_playback_repeats)
        # and keep unplayed ones in the file (drop_unused_requests): both as the suite needs.
    )
    recorder.register_serializer("flux-yaml", _Serializer)
    recorder.register_matcher("flux_query", query_matcher)
    recorder.register_matcher("flux_body", body_matcher)
    recorder.register_matcher("flux_credential", credential_matcher(credentials))
    recorder.register_matcher("flux_headers", header_matcher(credentials))
    return recorder
