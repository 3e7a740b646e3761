"""Scrub secrets from text before it reaches a message, a log line, a report or a cassette.

A key can reach text in more shapes than the one it was given in: a provider echoes it inside
an error (whole, or cut at the 200th or 500th character), a proxy URL-encodes it into a query
string, a Basic ``Authorization`` header carries it base64-encoded after a user name. `Redactor`
knows the keys it was given and removes, from any text:

- every form of each key: as it is, URL-encoded, JSON-escaped, and the parts of its base64
  encoding that do not depend on what precedes it (for each of the three byte alignments);
- every fragment of 8 characters or more of any of those forms, so that a key cut at a boundary
  leaves at most 7 characters behind;
- anything shaped like a key, a bearer token, a URL signature, a URL's user info (a
  password) or query (it may be signed by any name), even of a key it was not given.

The work is linear in the text: one regular-expression scan with a lookahead per position.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Final
from urllib.parse import quote, quote_plus, urlsplit

from flux_adapters._display import escape_controls

__all__ = [
    "FRAGMENT",
    "MASK",
    "MOST_HEADERS",
    "REQUEST_ID_HEADERS",
    "REQUEST_ID_NAMES",
    "Redactor",
    "answer_headers",
    "hide_in_httpx_log",
    "redact",
    "redactor_for",
    "request_id",
    "secret_forms",
    "shown_state_url",
]

MASK: Final = "[redacted]"
FRAGMENT: Final = 8
"""Shortest piece of a key that is removed wherever it appears."""
_SHORTEST_KEY: Final = 4
"""Keys shorter than this are not searched for: replacing a 1-3 character "key" would mangle
every message, and no provider issues keys that short."""

_SHAPES: Final = re.compile(
    r"((?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{6,}|Bearer\s+[^\s\"',;]+|Basic\s+[A-Za-z0-9+/=]{8,}"
    r"|(?:signature|sig|X-Amz-Signature)=[^&\s\"']+"
    # A URL's user info (https://user:password@host/...): a caller's image URL quoted back.
    r"|(?<=://)[^\s/?#@\"'<>]+(?=@))",
    re.IGNORECASE,
)
_WORD: Final = re.compile(r"[^\s\"'<>]+")
"""A run of text a URL may be part of."""


def _url_query_hidden(found: re.Match[str]) -> str:
    """*found*'s run with the query of the http(s) URL in it masked (its fragment kept).

    A caller's presigned image URL may be signed by any parameter name (Firebase's ``token=``),
    not only by the ones `_SHAPES` knows. String searches, not a pattern: one pass per run.
    """
    word = found[0]
    lower = word.lower()
    starts = [at for at in (lower.find("http://"), lower.find("https://")) if at >= 0]
    if not starts:
        return word
    query = word.find("?", min(starts))
    if query < 0 or query + 1 == len(word):
        return word
    fragment = word.find("#", query)
    return word[: query + 1] + MASK + (word[fragment:] if fragment >= 0 else "")


def _base64_cores(secret: bytes) -> Iterable[str]:
    """The base64 text that encodes *secret* wherever it starts in a longer value.

    Base64 works on 3-byte groups, so the characters for *secret* depend on its offset modulo 3
    in the encoded value. For each offset, encode it behind that many filler bytes and keep only
    the characters made entirely of its own bytes.
    """
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + secret).decode("ascii")
        start = -(-offset * 4 // 3)  # characters touched by the filler bytes
        whole = (offset + len(secret)) // 3 * 4  # characters of complete groups
        core = encoded[start:whole]
        if core:
            yield core
            yield core.replace("+", "-").replace("/", "_")  # the URL-safe alphabet


def secret_forms(secret: str) -> tuple[str, ...]:
    """Every text form *secret* may take on the wire or in a stored exchange.

    Returns the key as it is, URL-encoded (``%XX`` and ``+``), JSON-escaped, and the parts of
    its base64 encoding that any base64 value containing it would include. Empty for an empty
    secret.
    """
    if not secret:
        return ()
    raw = secret.encode("utf-8", errors="surrogatepass")
    forms = [
        secret,
        quote(secret, safe=""),
        quote_plus(secret, safe=""),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        *_base64_cores(raw),
    ]
    return tuple(dict.fromkeys(form for form in forms if form))


class Redactor:
    """Removes the given secrets (in every form, and their long fragments) and key-like text.

    Build one per set of keys and reuse it: the pattern is compiled once. With
    ``shapes=False`` only the given keys are removed, not text that merely looks like a key or
    a signature (a cassette keeps ids such as ``task-0123456789`` and parameter names).
    """

    def __init__(self, secrets: Iterable[str] = (), *, shapes: bool = True) -> None:
        self._shapes = shapes
        grams: set[str] = set()
        whole: set[str] = set()
        for secret in secrets:
            if len(secret) < _SHORTEST_KEY:
                continue
            for form in secret_forms(secret):
                if len(form) < FRAGMENT:
                    whole.add(form)
                else:
                    grams.update(form[i : i + FRAGMENT] for i in range(len(form) - FRAGMENT + 1))
        self._active = bool(grams or whole)
        # Longest first, so an alternation prefers a whole key over a shorter one inside it.
        pieces = sorted(grams | whole, key=len, reverse=True)
        self._pattern = (
            re.compile("(?=(" + "|".join(re.escape(piece) for piece in pieces) + "))")
            if pieces
            else None
        )

    def __call__(self, text: str) -> str:
        """Return *text* with every secret, fragment and key-shaped value replaced by a mask."""
        if self._pattern is not None:
            text = self._cover(text, self._pattern)
        if not self._shapes:
            return text
        text = _SHAPES.sub(MASK, text)
        return _WORD.sub(_url_query_hidden, text) if "?" in text and "://" in text else text

    @staticmethod
    def _cover(text: str, pattern: re.Pattern[str]) -> str:
        spans: list[list[int]] = []
        for match in pattern.finditer(text):
            start, end = match.start(), match.start() + len(match.group(1))
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        if not spans:
            return text
        parts, last = [], 0
        for start, end in spans:
            parts += [text[last:start], MASK]
            last = end
        parts.append(text[last:])
        return "".join(parts)


@functools.lru_cache(maxsize=64)
def redactor_for(secrets: tuple[str, ...]) -> Redactor:
    """The `Redactor` for *secrets*, built once and shared."""
    return Redactor(secrets)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove *secrets* (every form, every 8+ character fragment) and key-shaped text."""
    return redactor_for(secrets)(text)


class _HiddenInLogs(logging.Filter):
    """Masks keys sent in a query string in httpx's own log lines (``HTTP Request: GET ...``)."""

    def __init__(self) -> None:
        super().__init__()
        self._keys: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def hide(self, key: str) -> None:
        if key not in self._keys:
            with self._lock:
                self._keys = self._keys | {key}

    def filter(self, record: logging.LogRecord) -> bool:
        keys = self._keys
        if keys:
            message = record.getMessage()
            cleaned = redactor_for(tuple(sorted(keys)))(message)
            if cleaned != message:
                record.msg, record.args = cleaned, ()
        return True


_IN_LOGS: Final = _HiddenInLogs()


def hide_in_httpx_log(key: str) -> None:
    """Keep *key*, sent as a query parameter, out of httpx's log of request URLs."""
    if not _IN_LOGS._keys:
        logging.getLogger("httpx").addFilter(_IN_LOGS)  # once: addFilter ignores a second add
    _IN_LOGS.hide(key)


# --- Answer headers kept on errors -----------------------------------------------------------

REQUEST_ID_HEADERS: Final = (
    "x-request-id",
    "request-id",
    "x-fal-request-id",
    # one-api / new-api, the gateway many resellers run (middleware/request-id.go there).
    "x-oneapi-request-id",
    "x-amzn-requestid",
    "x-amz-request-id",
)
"""Headers that carry a provider's id for an exchange, in the order they are looked for."""
REQUEST_ID_NAMES: Final = frozenset(REQUEST_ID_HEADERS)
"""The same names, to tell at once that a plain dict of headers holds none of them."""
MOST_HEADERS: Final = 64
"""Most headers of an answer looked at: a hostile provider may send thousands."""
_LONGEST_NAME: Final = 64
_LONGEST_VALUE: Final = 256
_LONGEST_ID: Final = 128
# A header whose name says it holds a credential or a session: its value is never kept.
_SECRET_NAME: Final = re.compile(
    r"cookie|auth|token|secret|key|passw|session|credential|signature", re.IGNORECASE
)
_URL_HEADERS: Final = frozenset({"location", "content-location", "link", "refresh"})


def _without_query(value: str) -> str:
    """A URL header's value without its query, fragment and user info (they may be signed)."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return MASK
    if not parts.scheme and not parts.netloc:
        return value.split("?", 1)[0].split("#", 1)[0]
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" + ("?[redacted]" if parts.query else "")


def answer_headers(headers: Mapping[str, str], scrub: Callable[[str], str]) -> dict[str, str]:
    """The headers of an answer, safe to keep on an error and to show.

    At most 64, names in lower case (a name holding a key or key-shaped text is left out); a
    credential's or cookie's value (``set-cookie``, ``authorization``, ``x-api-key``, ...)
    masked; a URL's query left out; every other value cut to 256 characters, passed through
    *scrub* (the client's keys, key-shaped text) and its control characters escaped: a hostile
    provider's headers reach terminals too.
    """
    kept: dict[str, str] = {}
    for raw_name, raw_value in list(headers.items())[:MOST_HEADERS]:
        name = str(raw_name).lower()
        if len(name) > _LONGEST_NAME or not name.isprintable() or scrub(name) != name:
            continue  # a name that holds a key (a gateway echoing what it was sent) is dropped
        value = str(raw_value)[: _LONGEST_VALUE * 4]
        if _SECRET_NAME.search(name):
            value = MASK
        elif name in _URL_HEADERS:
            value = scrub(_without_query(value))
        else:
            value = scrub(value)
        kept[name] = escape_controls(value)[:_LONGEST_VALUE]
    return kept


def request_id(headers: Mapping[str, str], scrub: Callable[[str], str]) -> str | None:
    """The provider's id for the exchange, from an answer's *headers* (names in lower case).

    Looked up among all of them (not only the first 64 that `answer_headers` keeps), and made
    safe the same way: a value that holds a key is masked, and a masked one is no id.
    """
    if type(headers) is dict and REQUEST_ID_NAMES.isdisjoint(headers):  # most answers
        return None
    for name in REQUEST_ID_HEADERS:
        raw = headers.get(name)
        if not raw:
            continue
        value = answer_headers({name: raw}, scrub).get(name, "").strip()
        if value and value != MASK:
            return value[:_LONGEST_ID]
    return None


def shown_state_url(url: str | None) -> str:
    """*url* for a repr: a password in it (``redis://:pw@host``) is a credential, never shown."""
    if url is None:
        return "None"
    # redis-py also takes the password as a query parameter (?password=...).
    url = re.sub(r"(?i)([?&]password=)[^&#]*", rf"\g<1>{MASK}", url)
    head, at, rest = url.rpartition("@")
    if not at:
        return repr(url)
    scheme, slashes, userinfo = head.partition("://")
    user = userinfo.partition(":")[0] if slashes else ""
    return repr(f"{scheme}{slashes}{user}:{MASK}@{rest}" if slashes else f"{MASK}@{rest}")
