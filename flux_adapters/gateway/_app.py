"""The gateway's Starlette application: OpenAI's Images API in front of `AsyncFluxClient`."""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from json.encoder import (  # type: ignore[attr-defined]
    c_make_encoder,
    encode_basestring_ascii,
)
from pathlib import Path
from typing import Any, Final

import anyio
from attrs import field, frozen
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from flux_adapters import errors
from flux_adapters._deadline import within
from flux_adapters._serving import TooLarge, capped
from flux_adapters.client import AsyncFluxClient
from flux_adapters.gateway._errors import (
    Answer,
    error_answer,
    kept_tries,
    openai_error,
    shutting_down,
    violations_answer,
)
from flux_adapters.gateway._files import MEDIA, FileStore
from flux_adapters.gateway._keys import MAX_KEY_LENGTH, KeyRecord, KeyStore, hash_key, verify
from flux_adapters.gateway._metrics import Metrics
from flux_adapters.gateway._requests import EDIT_FIELDS, GENERATION_FIELDS, MAX_IMAGES, from_fields
from flux_adapters.request import EditRequest
from flux_adapters.result import EditResult
from flux_adapters.state import MAX_USD, StateBackend

__all__ = ["ClientFactory", "GatewaySettings", "LineHandler", "create_app"]

LOGGER: Final = logging.getLogger("flux_adapters.gateway")
ACCESS: Final = logging.getLogger("flux_adapters.gateway.access")

ClientFactory = Callable[[tuple[str, ...] | None], AsyncFluxClient]
"""Makes the client for a set of allowed providers (``None``: every configured one)."""

_FIELD_BYTES: Final = 1024 * 1024
_MOST_JSON_VALUES: Final = 100_000
"""More commas, objects and arrays than this in a JSON body is refused before it is parsed: two
bytes such as ``{},`` become a 64-byte dict, so a body within the size cap could still take
hundreds of megabytes as Python objects. A real generation has a few dozen values (and a prompt
far fewer commas than this)."""
_MOST_DIGITS: Final = 40
"""A JSON number of more digits than this is refused: converting one costs time quadratic in
its digits (4,000 digits, 70 us), in the gateway's loop; no field has more than a few."""
_FOUR_BYTE_UTF8: Final = re.compile(rb"[\xf0-\xf4]")
_BEYOND_LATIN1: Final = re.compile(rb"[\xc4-\xef]")


def _reading_bytes(raw: bytes) -> int:
    """What reading *raw* as JSON holds beyond its bytes: its text, then its values.

    Python makes a string as wide as its widest character (1, 2 or 4 bytes each), and json
    decodes the whole body into one before it parses it: a single emoji makes a 50 MB body a
    200 MB text, and its values as wide.
    """
    if raw.isascii():
        width = 1
    elif _FOUR_BYTE_UTF8.search(raw):
        width = 4
    elif _BEYOND_LATIN1.search(raw):
        width = 2
    else:
        width = 1  # Latin-1 letters (é, ü): one byte a character
    return 2 * width * len(raw)


def _busy() -> Answer:
    return openai_error(
        503,
        "the gateway holds as many request bodies as it may; try again shortly (nothing sent)",
        type_="server_error",
        code="server_busy",
        retry=True,
        headers={"retry-after": "1", "connection": "close"},
    )


_MOST_KNOWN_KEYS: Final = 10_000
"""Gateway key records kept for a Redis outage (`Gateway.known_keys`); past it, they start again."""
_INLINE_BODY_BYTES: Final = 64 * 1024
"""A request body up to this size is turned into a request on the event loop, not a thread."""
_INLINE_FILE_BYTES: Final = 1024 * 1024
"""A kept image up to this size is read on the event loop (from the page cache, ~0.1 ms) and
sent as one answer; a larger one is streamed from a thread (`FileResponse`)."""
_HEADER_TEXT: Final = re.compile(r"[^\x20-\x7e]")


def _public_root(url: object) -> str | None:
    """*url* checked as the root of image links, without a trailing ``/`` (links add one).

    A provider base URL's rules (`check_base_url`: http or https, a host, no user or password,
    no query), and no port 0.
    """
    if url is None:
        return None
    from urllib.parse import urlsplit

    from flux_adapters._options import check_base_url

    try:
        checked = check_base_url(url, "public_url")
        usable = urlsplit(checked).port != 0
    except errors.ConfigurationError:
        usable = False
    if usable:
        return checked.rstrip("/")
    # A user or password would go to every caller in every link: refused, and not shown.
    shown = re.sub(r"(?<=//)[^/?#]*@", "[redacted]@", url) if isinstance(url, str) else url
    raise errors.ConfigurationError(
        "GatewaySettings: public_url must be an http:// or https:// URL with a host, no user "
        f"or password and no query, such as https://images.example.com, not {shown!r:.200}"
    )


@frozen(kw_only=True)
class GatewaySettings:
    """How a gateway serves.

    Attributes:
        files_dir: Where result images are kept.
        retention: Seconds a kept image is served (default one day).
        max_body_bytes: Largest request body (default 240 MiB: 8 images of 20 MB as base64).
        public_url: Root URL for the image links, ``http://`` or ``https://`` and a host
            (default: the URL the client called); a trailing ``/`` is dropped.
        require_keys: Refuse requests without a valid gateway key (``False``: open, for a
            gateway only its own machine can reach).
        default_model: The model when a request names none.
        body_timeout: Seconds a request's whole body may take to arrive (default 300, at most
            a day, as ``serve --body-timeout`` and every timeout): a client that drips it is
            answered 408 and its connection closed, so slow uploads cannot hold the gateway's
            connections.
        max_bodies_bytes: Request bodies the gateway holds at once, all calls together (default
            1 GiB; at least *max_body_bytes*): a call that would pass it is answered 503
            ``server_busy`` with a ``Retry-After`` before its body is read, so many large
            calls at once cannot exhaust memory. A body counts its ``Content-Length``, or
            *max_body_bytes* when it has none (chunked); a JSON body, once read, also what
            reading it takes (its text and its values: twice its size, up to 8 times when it
            holds characters beyond Latin-1, such as an emoji), and is answered 503 if that
            passes the limit while other calls' bodies are held (alone, it is read).

    Raises:
        ConfigurationError: A value of the wrong kind or out of range.
    """

    files_dir: Path
    retention: float = 86400.0
    max_body_bytes: int = 240 * 1024 * 1024
    public_url: str | None = field(default=None, converter=_public_root)
    require_keys: bool = True
    default_model: str = "flux-2-pro"
    body_timeout: float = 300.0
    max_bodies_bytes: int = 1 << 30

    def __attrs_post_init__(self) -> None:
        from flux_adapters._options import MAX_KEEP_SECONDS, MAX_SECONDS, is_number

        problems = []
        retention: object = self.retention
        if not (is_number(retention) and 0 < retention <= MAX_KEEP_SECONDS):
            problems.append("retention must be seconds above 0, up to a year")
        body_timeout: object = self.body_timeout  # a timeout: bounded as every other one
        if not (is_number(body_timeout) and 0 < body_timeout <= MAX_SECONDS):
            problems.append(
                f"body_timeout must be seconds above 0, up to {MAX_SECONDS:.0f} (a day)"
            )
        size: object = self.max_body_bytes  # whatever a caller passed
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= 4096 << 20:
            problems.append("max_body_bytes must be a whole number of bytes from 1 to 4 GiB")
        held: object = self.max_bodies_bytes
        if isinstance(held, bool) or not isinstance(held, int) or not 0 < held <= 1 << 40:
            problems.append("max_bodies_bytes must be a whole number of bytes from 1 to 1 TiB")
        elif isinstance(size, int) and held < size:
            problems.append("max_bodies_bytes must be at least max_body_bytes")
        if problems:
            raise errors.ConfigurationError("GatewaySettings: " + "; ".join(problems))


class _LongNumber(ValueError):
    """A JSON body holds a number of more than `_MOST_DIGITS` digits."""


class _GivenTwice(ValueError):
    """A JSON object of the body names a field twice."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object for `json.loads`, refusing one that names a field twice.

    json keeps the last of them, silently: ``{"size": "1024x768", ..., "size": "512x512"}``
    (a body put together by hand) would be sent, and paid for, at a size the client may not
    have meant; a multipart body naming a field twice is refused too.
    """
    made = dict(pairs)
    if len(made) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _GivenTwice(name)
            seen.add(name)
    return made


def _bounded_int(digits: str) -> int:
    """``int(digits)`` for `json.loads`, refusing one too long to convert cheaply."""
    if len(digits) > _MOST_DIGITS + 1:  # a minus sign may come first
        raise _LongNumber
    return int(digits)


def _header(value: object, limit: int = 512) -> str:
    """*value* as a header value: printable ASCII only (no CR/LF), at most *limit* characters."""
    return _HEADER_TEXT.sub("?", str(value))[:limit]


class _ErrorJSON(JSONResponse):
    r"""An error answer's JSON, in ASCII.

    It may quote what the client sent (a field's name), and JSON's ``"\udcff"`` is a lone
    surrogate that Starlette's UTF-8 cannot encode: the answer was a 500 instead.
    """

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def _json(answer: Answer, request_id: str) -> JSONResponse:
    headers = {**answer.headers, "x-request-id": request_id}
    return _ErrorJSON(answer.body, status_code=answer.status, headers=headers)


class Gateway:
    """What one gateway holds: clients, keys, budgets, stored files, metrics, calls in flight."""

    def __init__(
        self,
        settings: GatewaySettings,
        clients: ClientFactory,
        keys: KeyStore,
        state: StateBackend,
    ) -> None:
        self.settings = settings
        self._make = clients
        self._clients: dict[tuple[str, ...] | None, AsyncFluxClient] = {}
        self.keys = keys
        self.state = state
        self.files = FileStore(settings.files_dir, settings.retention)
        self.metrics = Metrics(self._breaker_states)
        self.in_flight: dict[str, dict[str, object]] = {}
        self.bodies_held = 0
        """Bytes of request bodies taken in by the calls under way (`GatewaySettings.max_bodies_bytes`)."""
        self.draining = False
        self.started = time.time()
        self.base_urls: dict[tuple[object, ...], str] = {}
        """Root URLs of the image links, by what they are made from (`_base_url`)."""
        self.replenish = BackgroundTask(self.files.replenish_async)
        """Run once an answer is sent: the next kept image's file made, in a worker thread
        (`FileStore.replenish_async`)."""
        self.known_keys: dict[str, KeyRecord] = {}
        """Gateway key records as the key store last gave them, by hash: what a gateway whose
        shared state falls back locally (``state_fallback = "local"``) goes on with while Redis
        does not answer."""

    def remember(self, key_hash: str, record: KeyRecord | None) -> None:
        """Keep *record*, just read for *key_hash*, for `known_keys` (``None``: it is gone)."""
        if record is None:
            self.known_keys.pop(key_hash, None)
            return
        if key_hash not in self.known_keys and len(self.known_keys) >= _MOST_KNOWN_KEYS:
            self.known_keys.clear()
        self.known_keys[key_hash] = record

    def client(self, allowed: tuple[str, ...] | None = None) -> AsyncFluxClient:
        """The client for *allowed* providers (``None``: all), made once."""
        chosen = self._clients.get(allowed)
        if chosen is None:
            chosen = self._clients[allowed] = self._make(allowed)
        return chosen

    @property
    def providers(self) -> tuple[str, ...]:
        """Every configured provider, in failover order."""
        return self.client().providers

    def _breaker_states(self) -> Iterator[tuple[str, str, str]]:
        seen: set[tuple[str, str]] = set()
        for client in list(self._clients.values()):
            breaker = client._breaker
            for key in list(getattr(breaker, "_circuits", {})):
                if key not in seen:
                    seen.add(key)
                    yield key[0], key[1], breaker.state(key)

    async def aclose(self) -> None:
        """Remove the spare file, then close every client and the state backend."""
        # First: awaits below may be cancelled (a second Ctrl-C), and nothing needs the spare.
        self.files.close()
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        with contextlib.suppress(Exception):
            await self.state.aclose()
        closing = getattr(self.keys, "aclose", None)
        if closing is not None and self.keys is not self.state:
            with contextlib.suppress(Exception):
                await closing()

    def models(self, among: tuple[str, ...] | None = None) -> list[str]:
        """Canonical models offered by at least one configured provider (of *among*, if given)."""
        from flux_adapters.providers import get_adapter
        from flux_adapters.request import MODELS

        offered: set[str] = set()
        for name in self.providers if among is None else among:
            offered.update(get_adapter(name).limits)
        return [model for model in MODELS if model in offered]

    def estimate(
        self, client: AsyncFluxClient, request: EditRequest
    ) -> tuple[float, tuple[str, ...]]:
        """The most *request* may cost, and the providers whose price is not known.

        Among *client*'s providers whose limits take *request*: a budget cannot count a call to
        one without a price, so those are not used under a budget.
        """
        from flux_adapters.limits import plan
        from flux_adapters.prices import estimate
        from flux_adapters.providers import get_adapter

        most, unpriced = 0.0, []
        for name in client.providers:
            adapter = get_adapter(name)
            limits = adapter.limits.get(request.model)
            if limits is None:
                continue
            try:
                planned = plan(request, limits)
            except errors.FluxError:
                continue  # its limits refuse the request: the router skips it, nothing is paid
            figure = estimate(request, planned, client._prices, getattr(adapter, "prices", None))
            if figure is None or not math.isfinite(figure):
                unpriced.append(name)
            else:
                most = max(most, figure)
        return most, tuple(unpriced)


# -- the routes ----------------------------------------------------------------------------------


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def _authorized(request: Request, gateway: Gateway) -> KeyRecord | Answer | None:
    """The caller's key record; an `Answer` to refuse it; ``None`` on an open gateway."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    if not gateway.settings.require_keys and not given:
        return None
    if scheme.lower() != "bearer" or not given:
        return openai_error(
            401,
            "No API key provided: send Authorization: Bearer <gateway key>",
            code="invalid_api_key",
            retry=False,
        )
    if len(given) > MAX_KEY_LENGTH or not given.isascii():
        record = None
        key_hash = "0" * 64
    else:
        key_hash = hash_key(given)
        try:
            record = await gateway.keys.get_key(key_hash)
        except errors.ConfigurationError as exc:  # the operator's to fix: say what, not a bug
            LOGGER.error("the gateway's keys cannot be read: %s", exc)
            return openai_error(
                500,
                "the gateway cannot read its keys; nothing was sent",
                type_="server_error",
                code="keys_unreadable",
                retry=False,
            )
        except errors.StateUnavailable as exc:  # Redis down, refusing, or garbled: never silent
            gateway.metrics.child(gateway.metrics.state_failures, "key_lookup").inc()
            record = gateway.known_keys.get(key_hash)
            if record is None or getattr(gateway.state, "fallback", "none") != "local":
                LOGGER.warning("a gateway key could not be looked up: %s", exc)
                return _state_down_answer()
            # state_fallback = "local": calls go on, as the state's budgets and rate limits do
            # (it warns once an outage), for the keys this gateway has seen, as Redis last gave
            # them, until Redis answers again.
            LOGGER.debug("a gateway key was taken as last read: %s", exc)
        else:
            gateway.remember(key_hash, record)
    if not verify(record, key_hash):
        return openai_error(401, "Incorrect API key provided", code="invalid_api_key", retry=False)
    assert record is not None
    return record


def _allowed_providers(gateway: Gateway, record: KeyRecord | None) -> tuple[str, ...] | None:
    if record is None or not record.allowed_providers:
        return None
    wanted = {name.lower() for name in record.allowed_providers}
    return tuple(name for name in gateway.providers if name in wanted)


async def models(request: Request) -> Response:
    """``GET /v1/models``: the FLUX models this gateway (and this key) may use."""
    gateway = _gateway(request)
    request_id = _request_id()
    started = time.perf_counter()
    allowed = await _authorized(request, gateway)
    if isinstance(allowed, Answer):
        return _finish(gateway, request, "/v1/models", _json(allowed, request_id), started, None)
    listed = gateway.models(_allowed_providers(gateway, allowed))
    if allowed is not None and allowed.allowed_models:
        listed = [model for model in listed if model in allowed.allowed_models]
    created = int(gateway.started)
    body = {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": created, "owned_by": "black-forest-labs"}
            for model in listed
        ],
    }
    answer = JSONResponse(body, headers={"x-request-id": request_id})
    return _finish(gateway, request, "/v1/models", answer, started, allowed)


async def generations(request: Request) -> Response:
    """``POST /v1/images/generations`` (JSON)."""
    return await _image_call(request, "/v1/images/generations", _json_fields)


async def edits(request: Request) -> Response:
    """``POST /v1/images/edits`` (multipart)."""
    return await _image_call(request, "/v1/images/edits", _form_fields)


async def _json_fields(
    request: Request, gateway: Gateway
) -> tuple[dict[str, object], list[object], bool] | Answer:
    if _media_type(request) != "application/json":
        return openai_error(
            415, "Content-Type must be application/json", code="unsupported_media_type", retry=False
        )
    raw = await request.body()
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") > _MOST_JSON_VALUES:
        return openai_error(
            400,
            f"the body holds more than {_MOST_JSON_VALUES:,} JSON values (counted by its commas,"
            " objects and arrays); a generation has a few dozen",
            code="invalid_json",
            retry=False,
        )
    # Its text and values are held until the call ends (the images' data URLs go on in the
    # request). Beyond the bodies the gateway may hold, with other calls' bodies held: busy; a
    # call alone is read whatever it takes (max_body_bytes bounds it).
    reading = _reading_bytes(raw)
    held = gateway.bodies_held
    if held + reading > gateway.settings.max_bodies_bytes and held > request.state.held:
        return _busy()
    gateway.bodies_held += reading
    request.state.held += reading
    try:
        body = json.loads(raw, parse_int=_bounded_int, object_pairs_hook=_unique_names)
    except _GivenTwice as twice:
        return openai_error(
            400,
            f"the field {twice.name[:60]!r} is given twice (one of them would be dropped)",
            code="invalid_json",
            param=twice.name[:60],
            retry=False,
        )
    except _LongNumber:
        return openai_error(
            400,
            f"the body holds a number of more than {_MOST_DIGITS} digits",
            code="invalid_json",
            retry=False,
        )
    except (ValueError, RecursionError):
        return openai_error(400, "the body is not valid JSON", code="invalid_json", retry=False)
    if not isinstance(body, dict):
        return openai_error(400, "the body must be a JSON object", code="invalid_json", retry=False)
    return body, [], False


def _refused_field(message: str, param: str) -> Answer:
    """A multipart field refused: a 400 ``invalid_request`` naming it (nothing was sent)."""
    return openai_error(400, message, code="invalid_request", param=param, retry=False)


async def _form_fields(
    request: Request, gateway: Gateway
) -> tuple[dict[str, object], list[object], bool] | Answer:
    if _media_type(request) != "multipart/form-data":
        return openai_error(
            415,
            "Content-Type must be multipart/form-data",
            code="unsupported_media_type",
            retry=False,
        )
    fields: dict[str, object] = {}
    images: list[object] = []
    try:
        async with _strict_text(request).form(
            max_files=MAX_IMAGES + 1, max_fields=64, max_part_size=_FIELD_BYTES
        ) as form:
            for name, value in form.multi_items():
                if _MARKED.search(name):
                    shown = name.encode("utf-8", "backslashreplace").decode()[:60]
                    return _refused_field(
                        f"the name of the field '{shown}' is not UTF-8 text; nothing was sent",
                        shown,
                    )
                if isinstance(value, str) == (name in ("image", "image[]")):
                    # A file where text is expected (it was sent on as "(a file)"), or an
                    # image as text (it was dropped): refused, never guessed at.
                    wanted = "a file" if isinstance(value, str) else "text"
                    return _refused_field(f"the field {name[:60]!r} must be {wanted}", name[:60])
                if isinstance(value, str):
                    if _MARKED.search(value):
                        return _refused_field(
                            f"the field {name[:60]!r} is not UTF-8 text; nothing was sent",
                            name[:60],
                        )
                    if name in fields:
                        return _refused_field(f"the field {name[:60]!r} is given twice", name[:60])
                    fields[name] = value
                else:
                    images.append(await value.read())
    except HTTPException as exc:
        return openai_error(
            400, f"a broken multipart body: {exc.detail}", code="invalid_multipart", retry=False
        )
    if not images:
        return openai_error(
            400,
            "no image: send one or more files as image or image[]",
            code="invalid_request",
            param="image",
            retry=False,
        )
    return fields, images, True


_STRICT_UTF8: Final = "flux-gateway-utf-8"
"""UTF-8 whose undecodable bytes become lone surrogates (`_MARKED`), for a multipart body's
text: Starlette decodes a field that is not UTF-8 as Latin-1 instead, silently (a prompt typed
in GBK or Shift-JIS would be sent, and paid for, as mojibake)."""
_MARKED: Final = re.compile("[\udc80-\udcff]")


def _strict_utf8(name: str) -> codecs.CodecInfo | None:
    if name != "flux_gateway_utf_8":  # what codecs.lookup asks for _STRICT_UTF8
        return None
    return codecs.CodecInfo(
        name=_STRICT_UTF8,
        encode=codecs.utf_8_encode,
        decode=lambda data, errors="strict": codecs.utf_8_decode(data, "surrogateescape", True),
    )


codecs.register(_strict_utf8)


def _strict_text(request: Request) -> Request:
    """*request*, its multipart text decoded as `_STRICT_UTF8` unless it names another charset.

    A body of the default charset (UTF-8, named or not) gets the strict one; one that names
    another (``charset=shift_jis``) is read in it, as Starlette reads it.
    """
    from python_multipart.multipart import parse_options_header

    value = request.headers.get("content-type", "")
    named = parse_options_header(value)[1].get(b"charset")
    if named is not None:
        try:
            if codecs.lookup(named.decode("latin-1")).name != "utf-8":
                return request
        except LookupError:
            pass  # a charset Python does not know: Starlette would take Latin-1
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
    headers.append((b"content-type", f"{value}; charset={_STRICT_UTF8}".encode("latin-1")))
    return Request({**request.scope, "headers": headers}, request.receive)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


_IDS: Final = random.Random()
"""The generator of request ids: the gateway's own, seeded from the system's (and again in a
forked child), so that code beside it seeding `random`'s shared one (``random.seed(0)`` for
reproducible runs) cannot make every call's id the same."""
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_IDS.seed)


def _request_id() -> str:
    """``gw-`` and 16 hex digits: a name for a call in headers and logs, not a secret.

    From a `random` generator of its own (`_IDS`), seeded from the system's: as unlikely to
    repeat as ``secrets.token_hex(8)``, without a ``getrandom`` system call on every call. It
    keys the paid calls under way (`Gateway.in_flight`): ids that repeat would hide calls.
    """
    return f"gw-{_IDS.getrandbits(64):016x}"


async def _image_call(
    request: Request,
    route: str,
    read: Callable[[Request, Gateway], Any],
) -> Response:
    gateway = _gateway(request)
    limit = gateway.settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    size = min(int(declared), limit) if declared.isdigit() else limit
    if gateway.bodies_held + size > gateway.settings.max_bodies_bytes:
        return _finish(
            gateway, request, route, _json(_busy(), _request_id()), time.perf_counter(), None, {}
        )
    gateway.bodies_held += size
    request.state.held = size  # and what reading it takes (`_json_fields`)
    try:
        return await _image_call_held(gateway, request, route, read)
    finally:
        gateway.bodies_held -= request.state.held


def _too_large(limit: int) -> Answer:
    return openai_error(
        413,
        f"the body is larger than {limit} bytes",
        code="request_too_large",
        retry=False,
        headers={"connection": "close"},
    )


async def _image_call_held(
    gateway: Gateway,
    request: Request,
    route: str,
    read: Callable[[Request, Gateway], Any],
) -> Response:
    request_id = _request_id()
    started = time.perf_counter()
    info: dict[str, object] = {}

    def done(answer: Answer | Response, record: KeyRecord | None) -> Response:
        response = answer if isinstance(answer, Response) else _json(answer, request_id)
        return _finish(gateway, request, route, response, started, record, info)

    if gateway.draining:
        return done(shutting_down(), None)
    record = await _authorized(request, gateway)
    if isinstance(record, Answer):
        return done(record, None)
    limit = gateway.settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return done(_too_large(limit), record)
    if record is not None and record.rate_per_minute:
        try:
            wait = await gateway.state.take(
                f"gwkey-{record.id}",
                record.rate_per_minute / 60.0,
                max(1, int(record.rate_per_minute)),
            )
        except errors.StateUnavailable as exc:
            return done(_state_failed(gateway, exc), record)
        if wait > 0:
            return done(
                openai_error(
                    429,
                    f"rate limit of this gateway key ({record.rate_per_minute:g} calls a minute) reached",
                    type_="rate_limit_error",
                    code="rate_limit_exceeded",
                    retry=True,
                    headers={"retry-after": str(max(1, math.ceil(min(wait, 86400))))},
                ),
                record,
            )
    try:
        read_out = await within(
            gateway.settings.body_timeout, read(capped(request, limit), gateway)
        )
    except TooLarge:
        return done(_too_large(limit), record)
    except TimeoutError:
        return done(
            openai_error(
                408,
                f"the body did not arrive within {gateway.settings.body_timeout:g} s",
                code="request_timeout",
                retry=False,
                headers={"connection": "close"},
            ),
            record,
        )
    except ClientDisconnect:  # gone while sending its body: nothing sent, in the log all the same
        info["client_gone"] = True
        return done(Response(status_code=499), record)
    if isinstance(read_out, Answer):
        return done(read_out, record)
    fields, images, as_text = read_out

    def build() -> Any:
        return from_fields(
            fields,
            allowed=EDIT_FIELDS if as_text else GENERATION_FIELDS,
            images=images,
            text_fields=as_text,
            default_model=gateway.settings.default_model,
        )

    # Building a request inspects its images (headers, base64 in slices): a thread for large
    # bodies; a small one (a prompt, settings, URLs) is built at once, without a thread hop.
    small = not images and declared.isdigit() and int(declared) <= _INLINE_BODY_BYTES
    parsed = build() if small else await anyio.to_thread.run_sync(build)
    if isinstance(parsed, list):
        return done(violations_answer([(v, None) for v in parsed]), record)
    edit = parsed.request
    info["model"] = edit.model
    if record is not None and record.allowed_models and edit.model not in record.allowed_models:
        return done(
            openai_error(
                403,
                f"this gateway key may not use {edit.model}",
                type_="permission_error",
                code="model_not_allowed",
                param="model",
                retry=False,
            ),
            record,
        )
    allowed = _allowed_providers(gateway, record)
    if allowed == ():
        return done(
            openai_error(
                403,
                "none of this key's providers is configured here",
                type_="permission_error",
                code="provider_not_allowed",
                retry=False,
            ),
            record,
        )
    client = gateway.client(allowed)
    reservation = None
    estimate = 0.0
    if record is not None and record.budget_usd is not None:
        estimate, unpriced = gateway.estimate(client, edit)
        if unpriced:  # a budget counts only what has a price: route among the priced ones
            priced = tuple(name for name in client.providers if name not in unpriced)
            if not priced:
                return done(
                    openai_error(
                        403,
                        f"this gateway key has a budget, and no provider here has a known price "
                        f"for {edit.model} (unpriced: {', '.join(unpriced)}): a call could not "
                        "be counted against it",
                        type_="permission_error",
                        code="no_priced_provider",
                        retry=False,
                    ),
                    record,
                )
            client = gateway.client(priced)
        # A call estimated above the whole budget cannot fit, whatever was spent: refused here,
        # as the state takes no amount above its largest (a price may be any finite figure).
        try:
            reservation = (
                await gateway.state.reserve(
                    f"key:{record.id}", estimate, record.budget_usd, record.period
                )
                if estimate <= record.budget_usd
                else None
            )
            spent = (
                await gateway.state.spent(f"key:{record.id}", record.period)
                if reservation is None
                else 0.0
            )
        except errors.StateUnavailable as exc:
            return done(_state_failed(gateway, exc), record)
        if reservation is None:
            return done(
                openai_error(
                    429,
                    f"this gateway key's budget (${record.budget_usd:g} per {record.period}) is "
                    f"spent: ${spent:.4f} so far, and this call may cost ${estimate:.4f}",
                    type_="insufficient_quota",
                    code="budget_exceeded",
                    retry=False,
                ),
                record,
            )
    key_label = record.id if record is not None else "-"
    gateway.in_flight[request_id] = {"key": key_label, "model": edit.model, "since": time.time()}
    gateway.metrics.in_flight.inc()
    settled = estimate  # unless shown otherwise (a bug of ours included), the call may be billed
    try:
        if await _gone(request):
            # The client left while its call waited (its key, the shared state): no one would
            # get the image, and an OpenAI SDK that gave up sends the call again. Nothing sent.
            settled = 0.0
            info["client_gone"] = True
            return done(Response(status_code=499), record)
        try:
            result = await client.edit(edit)
        except errors.FluxError as error:
            tried = getattr(error, "attempts", ()) or ()
            _count_attempts(gateway, tried)
            if isinstance(error, errors.StateUnavailable):  # Redis failing: say so, count it
                LOGGER.warning("the shared state failed a call: %s", error)
                gateway.metrics.child(gateway.metrics.state_failures, "call").inc()
            answer = error_answer(error)
            billed = bool(answer.body["error"].get("may_be_billed"))  # type: ignore[attr-defined]
            # Each try that may have been billed counts (failover_on_ambiguous: more than one).
            tries = kept_tries(tried, error)
            kept = billed or tries > 0
            settled = estimate * max(1, tries) if kept else 0.0
            info["may_be_billed"] = billed
            provider = getattr(error, "provider", None) or (tried[-1].provider if tried else "-")
            if kept:
                gateway.metrics.child(gateway.metrics.spend, key_label, str(provider)).inc(estimate)
                await _left_unanswered(request, request_id, key_label, edit, str(provider), info)
            return done(answer, record)
        _count_attempts(gateway, result.attempts)
        cost = (
            result.cost_usd
            if result.cost_usd is not None and math.isfinite(result.cost_usd)
            else estimate
        )
        # A try before it that may have been billed (failover_on_ambiguous) counts too.
        settled = cost + estimate * kept_tries(result.attempts)
        gateway.metrics.child(gateway.metrics.spend, key_label, result.provider).inc(cost)
        info.update(provider=result.provider, attempts=len(result.attempts), cost_usd=cost)
        response = await _answer(gateway, request, result, parsed.response_format, request_id)
        if response.status_code != 200:  # made and billed, but not kept: the client gets a 502
            info["may_be_billed"] = True
        await _left_unanswered(request, request_id, key_label, edit, result.provider, info)
        return done(response, record)
    except asyncio.CancelledError:
        # Cut while the provider worked, or while its image was fetched to be kept (the job
        # done, and billed): either way no answer, and no access line, will say it.
        LOGGER.warning(
            json.dumps(
                {
                    "event": "cut-at-shutdown",
                    "request_id": request_id,
                    "key": key_label,
                    "model": edit.model,
                    "may_be_billed": True,
                    "message": "a paid call was still under way when the gateway stopped: "
                    "the provider may have done, and billed, it",
                }
            )
        )
        raise
    finally:
        gateway.in_flight.pop(request_id, None)
        gateway.metrics.in_flight.dec()
        if reservation is not None:
            with anyio.CancelScope(shield=True):
                try:
                    # A provider's own figure may pass what a budget can hold (a hostile one:
                    # 1e12 credits): the most it holds, refusing every later call, not nothing.
                    await gateway.state.settle(reservation, min(settled, MAX_USD))
                except errors.FluxError as error:  # the answer stands; only the books are off
                    LOGGER.warning(
                        json.dumps(
                            {
                                "event": "settle-failed",
                                "request_id": request_id,
                                "key": key_label,
                                "spent_usd": settled,
                                "error": type(error).__name__,
                            }
                        )
                    )


async def _gone(request: Request) -> bool:
    """Whether *request*'s client has closed its connection (its body all read by now).

    On uvicorn, the flag its request cycle keeps (``receive`` is the cycle's method): asking
    through ``receive``, as `Request.is_disconnected` does, would also let the connection read
    on past a request pipelined behind this one, which the server held back. Elsewhere, that.
    """
    cycle = getattr(request.receive, "__self__", None)
    gone = getattr(cycle, "disconnected", None)
    if isinstance(gone, bool):
        return gone
    return await request.is_disconnected()


async def _left_unanswered(
    request: Request,
    request_id: str,
    key_label: str,
    edit: EditRequest,
    provider: str,
    info: dict[str, object],
) -> None:
    """Log a call that may have been billed whose client has gone: its answer reaches no one.

    The server drops an answer to a closed connection without a word, and the access line
    would show it as given (a 200 with its cost): the warning says that the provider may have
    done, and billed, a job no client got, so that it is not lost silently.
    """
    if not await _gone(request):
        return
    info["client_gone"] = True
    LOGGER.warning(
        json.dumps(
            {
                "event": "client-gone",
                "request_id": request_id,
                "key": key_label,
                "model": edit.model,
                "provider": provider,
                "may_be_billed": True,
                "message": "the client left before its answer: the provider may have done, "
                "and billed, a job it will not get",
            }
        )
    )


def _count_attempts(gateway: Gateway, attempts: Sequence[Any]) -> None:
    for attempt in attempts:
        gateway.metrics.child(gateway.metrics.attempts, attempt.provider, attempt.outcome).inc()
    if len(attempts) > 1 and attempts[-1].outcome == "ok":
        for attempt in attempts[:-1]:
            if attempt.outcome == "failed":
                gateway.metrics.child(gateway.metrics.failovers, attempt.provider).inc()


async def _answer(
    gateway: Gateway, request: Request, result: EditResult, response_format: str, request_id: str
) -> Response:
    root = gateway.settings.public_url or _base_url(gateway, request)
    data: list[dict[str, object]] = []
    try:
        for image in result.images:
            name, held = await gateway.files.keep(image)
            if response_format == "b64_json":
                raw = held
                if raw is None:
                    raw = await anyio.to_thread.run_sync((gateway.files.folder / name).read_bytes)
                data.append({"b64_json": base64.b64encode(raw).decode("ascii")})
            else:
                data.append({"url": f"{root}/v1/files/{name}"})
    except errors.FluxError as error:
        # The details (the gateway's own paths, the provider's result URL) go to the log only.
        LOGGER.warning(
            json.dumps(
                {
                    "event": "result-not-kept",
                    "request_id": request_id,
                    "provider": result.provider,
                    "error": type(error).__name__,
                    "detail": str(error),
                }
            )
        )
        why = (
            "the gateway could not store it"
            if isinstance(error, errors.OutputError)
            else f"it could not be downloaded from the provider ({type(error).__name__})"
        )
        answer = openai_error(
            502,
            f"{result.provider} made the image (and billed it), but it could not be kept: {why}",
            type_="server_error",
            code="result_not_kept",
            retry=False,
            may_be_billed=True,
            provider=result.provider,
        )
        return _json(answer, request_id)
    headers = {
        "x-request-id": request_id,
        "x-flux-provider": result.provider,
        "x-flux-model": result.model,
        "x-flux-attempts": str(len(result.attempts)),
        "x-flux-attempt-log": _header(
            "; ".join(
                f"{a.provider}={a.outcome}" + (f":{a.billing}" if a.billing else "")
                for a in result.attempts
            ),
            1024,
        ),
    }
    if result.cost_usd is not None and math.isfinite(result.cost_usd):
        headers["x-flux-cost-usd"] = f"{result.cost_usd:.6f}"
        headers["x-flux-cost-source"] = result.cost_source or "price table"
    if result.warnings:
        headers["x-flux-warnings"] = _header(" | ".join(str(w) for w in result.warnings), 2048)
    if result.request_id:
        headers["x-flux-provider-request-id"] = _header(result.request_id, 256)
    body = {"created": int(time.time()), "data": data}
    # No image fetch to follow an inline answer: the next call's file once this one is sent.
    later = gateway.replenish if response_format == "b64_json" else None
    return JSONResponse(body, headers=headers, background=later)


def _base_url(gateway: Gateway, request: Request) -> str:
    """``str(request.base_url)`` without its last ``/``, made once for each set of its inputs.

    Starlette makes it from the scope's scheme, first ``host`` header, server and root path
    (copying the scope and splitting the URL it made): the same few values on every call.
    """
    scope = request.scope
    host = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
            break
    server = scope.get("server")
    key = (
        scope.get("scheme", "http"),
        host,
        None if server is None else tuple(server),
        scope.get("app_root_path", scope.get("root_path", "")),
    )
    made = gateway.base_urls.get(key)
    if made is None:
        made = str(request.base_url).rstrip("/")
        if len(gateway.base_urls) >= 64:  # Host headers are the client's: keep a few
            gateway.base_urls.clear()
        gateway.base_urls[key] = made
    return made


async def files(request: Request) -> Response:
    """``GET /v1/files/<name>``: a kept result image (no key: the name is the capability)."""
    gateway = _gateway(request)
    started = time.perf_counter()
    name = request.path_params["name"]
    path = gateway.files.path(name)
    response = None if path is None else _kept(gateway, path, name)
    if response is None:
        answer = openai_error(404, "no such image (or it has expired)", code="not_found")
        response = _json(answer, _request_id())
    else:
        response.background = gateway.replenish  # once this answer is sent
    return _finish(gateway, request, "/v1/files/{name}", response, started, None)


def _kept(gateway: Gateway, path: str, name: str) -> Response | None:
    """The answer serving the kept image *name* (at *path*); ``None`` if none (or expired)."""
    media = MEDIA[name.rpartition(".")[2]]
    headers = {"cache-control": "private, max-age=3600"}
    try:
        data = _small_file(gateway, path, name)
    except OSError:  # never kept, or swept
        return None
    if data is None:  # expired: removed now, as the sweep would
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    if data is not _LARGE:
        return Response(data, media_type=media, headers=headers)
    return FileResponse(path, media_type=media, headers=headers)


_LARGE: Final = b"(large)"
"""What `_small_file` answers for a file over `_INLINE_FILE_BYTES`: it is streamed instead."""


def _small_file(gateway: Gateway, path: str, name: str) -> bytes | None:
    """The bytes of the kept *path*; `_LARGE` if over `_INLINE_FILE_BYTES`; ``None`` if expired.

    The first fetch of an image written last is served from the bytes written, after a
    ``stat`` (`FileStore.fresh`); any other with one open, one ``fstat`` (for its age and size)
    and one read, without Python's buffered file layers: every image fetched from the gateway
    passes here.

    Raises:
        OSError: No such file.
    """
    fresh = gateway.files.fresh(name, path)
    if fresh is not None:
        return None if gateway.files.expired(fresh[1]) else fresh[0]
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        status = os.fstat(fd)
        if gateway.files.expired(status.st_mtime):
            return None
        size = status.st_size
        if size > _INLINE_FILE_BYTES:
            return _LARGE
        chunks = []
        while size > 0:  # a regular file: one read, unless it was cut short meanwhile
            chunk = os.read(fd, size)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


async def healthz(request: Request) -> Response:
    """Alive."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready to take calls: not draining, and a shared state (Redis) that answers.

    A gateway whose Redis is down (and has no local fallback) answers every call 503: a load
    balancer asking here sends the calls to another.
    """
    gateway = _gateway(request)
    if gateway.draining:
        return JSONResponse(
            {"status": "draining", "in_flight": len(gateway.in_flight)}, status_code=503
        )
    ready: dict[str, object] = {"status": "ready", "providers": list(gateway.providers)}
    where = getattr(gateway.state, "where", None)  # a shared state (RedisState)
    if where is not None:
        try:
            ready["state"] = await where()
        except errors.StateUnavailable as error:
            body = {"status": "state_unavailable", "detail": str(error)}
            return JSONResponse(body, status_code=503)
    return JSONResponse(ready)


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    gateway = _gateway(request)
    payload = await anyio.to_thread.run_sync(generate_latest, gateway.metrics.registry)
    return Response(payload, media_type=CONTENT_TYPE_LATEST)


def _finish(
    gateway: Gateway,
    request: Request,
    route: str,
    response: Response,
    started: float,
    record: KeyRecord | None,
    info: dict[str, object] | None = None,
) -> Response:
    """*response*, counted and logged (with the time taken up to now) once it has been sent.

    The metrics and the access line are the answer's background (`_Recorded`), run right
    after its last byte is written, before whatever background it had: the client is not kept
    waiting for them, and the event loop takes no other step in between (the next request,
    a scrape of ``/metrics``, sees them done).
    """
    elapsed = time.perf_counter() - started
    response.background = _Recorded(
        functools.partial(_record, gateway, request, route, response, elapsed, record, info),
        response.background,
    )
    return response


class _Recorded(BackgroundTask):
    """An answer's metrics and access line (`_finish`), then the background it had."""

    def __init__(self, recording: Callable[[], None], then: BackgroundTask | None) -> None:
        # Not BackgroundTask's own __init__: nothing here is a function to look at.
        self._recording = recording
        self._then = then

    async def __call__(self) -> None:
        try:
            self._recording()
        finally:
            if self._then is not None:
                await self._then()


def _record(
    gateway: Gateway,
    request: Request,
    route: str,
    response: Response,
    elapsed: float,
    record: KeyRecord | None,
    info: dict[str, object] | None,
) -> None:
    counted = gateway.metrics
    counted.child(counted.requests, route, str(response.status_code)).inc()
    counted.child(counted.latency, route).observe(elapsed)
    if ACCESS.isEnabledFor(logging.INFO):
        # What response.headers.get, request.method and request.client give, read straight
        # from the answer's header list and the scope (without the objects they build).
        request_id = None
        for name, value in response.raw_headers:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
                break
        scope = request.scope
        client = scope.get("client")
        line: dict[str, object] = {
            "ts": round(time.time(), 3),
            "request_id": request_id,
            "method": scope["method"],
            "route": route,
            "status": response.status_code,
            "ms": round(elapsed * 1000, 2),
            "key": record.id if record is not None else None,
            "client": client[0] if client else None,
        }
        line.update(info or {})
        _log_access(_line_json(line))


def _line_json(line: dict[str, object]) -> str:
    """``json.dumps(line)``, with an encoder made once instead of on every call.

    *line* is flat (text, numbers, booleans, ``None``): json.dumps's check for a value
    containing itself is all it leaves out. Without json's C encoder, json.dumps itself.
    """
    if _LINE_ENCODER is None:
        return json.dumps(line)
    return "".join(_LINE_ENCODER(line, 0))


_LINE_ENCODER: Final = (
    None
    if c_make_encoder is None
    else c_make_encoder(
        None,  # no markers: no check for a value that contains itself
        json.JSONEncoder().default,
        encode_basestring_ascii,
        None,  # indent
        ": ",
        ", ",
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )
)
"""json.dumps's defaults: ASCII, ``": "`` and ``", "``, keys unsorted, NaN allowed."""

_PLAIN: Final = logging.Formatter("%(message)s")


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """How ``flux-adapters serve`` logs the gateway: each message as one line on *stream*.

    Where access lines reach this handler only (as ``serve`` sets logging up), `_log_access`
    writes each line to its stream itself: what the handler would write for the record, under
    its lock, without the `logging.LogRecord` and logging's passes over the hierarchy (about
    45,000 instructions a line, two lines a call; docs/benchmarks.md, row m).
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.setFormatter(_PLAIN)


def _sole_access_handler() -> LineHandler | None:
    """The `LineHandler` that alone gets the access lines as they are; else ``None``.

    Logging gives a record of ``ACCESS`` (once enabled for it) to the handlers of ``ACCESS`` and
    its parents, through ``ACCESS``'s filters, up to a logger that does not propagate; a
    handler formats it unless its level or filters refuse it.
    """
    access = ACCESS
    if access.filters or access.handlers or not access.propagate:
        return None
    parent = access.parent
    if parent is None or parent.propagate or len(parent.handlers) != 1:
        return None
    handler = parent.handlers[0]
    if (
        type(handler) is not LineHandler
        or handler.filters
        or handler.level > logging.INFO
        or handler.formatter is not _PLAIN
    ):
        return None
    return handler


def _log_access(text: str) -> None:
    """Log *text* as an access line (at INFO; the caller saw ``ACCESS`` enabled for it)."""
    handler = _sole_access_handler()
    if handler is None:
        # As ACCESS.info(...), without looking up the caller's file and line in the stack
        # (logging's findCaller: a tenth of the logging's cost); the line is the message.
        ACCESS.handle(ACCESS.makeRecord(ACCESS.name, logging.INFO, __file__, 0, text, (), None))
        return
    # What the handler's handle(record) does: its emit under its lock (format(record) is the
    # message itself, "%(message)s", with no exception or stack attached).
    handler.acquire()
    try:
        handler.stream.write(text + handler.terminator)
        handler.flush()
    except RecursionError:
        raise
    except Exception:
        handler.handleError(
            ACCESS.makeRecord(ACCESS.name, logging.INFO, __file__, 0, text, (), None)
        )
    finally:
        handler.release()


def _state_failed(gateway: Gateway, exc: errors.StateUnavailable) -> Answer:
    """The answer to a call whose key's rate limit or budget the shared state failed to check.

    Counted (``step="call"``) and logged as the client's own admission is: nothing was sent.
    """
    LOGGER.warning("the shared state failed a call: %s", exc)
    gateway.metrics.child(gateway.metrics.state_failures, "call").inc()
    return _state_down_answer()


def _state_down_answer() -> Answer:
    return openai_error(
        503,
        "the gateway's shared state is not reachable; nothing was sent",
        type_="server_error",
        code="state_unavailable",
        retry=True,
    )


async def _state_down(request: Request, exc: Exception) -> Response:
    # The shared state did not answer (Redis down, failing closed) before anything was sent.
    LOGGER.warning("the shared state failed a request: %s", exc)
    return _json(_state_down_answer(), _request_id())


async def _unexpected(request: Request, exc: Exception) -> Response:
    # A bug: logged with its traceback (never a key: none is in the gateway's locals' reprs),
    # answered in OpenAI's shape without details.
    LOGGER.error("unexpected error in the gateway", exc_info=exc)
    answer = openai_error(500, "internal error in the gateway", type_="server_error", retry=False)
    return _json(answer, _request_id())


def _guarded(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """*endpoint*, a bug in it answered as `_unexpected` does, and not raised further.

    Starlette gives a handler for ``Exception`` to its outermost middleware, which sends the
    answer and then raises the exception again; the server then closes the connection, and a
    client can see a reset instead of the 500 (an OpenAI SDK retries a connection error: a call
    that may have been billed would be sent twice).
    """

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except (errors.StateUnavailable, HTTPException):
            raise  # answered by their own handlers
        except Exception as exc:
            return await _unexpected(request, exc)

    return guarded


async def _not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    if status == 405:
        answer = openai_error(405, "method not allowed", code="method_not_allowed")
    else:
        answer = openai_error(404, "no such route", code="not_found")
    return _json(answer, _request_id())


_EXCEPTION_HANDLERS: Final[dict[Any, Callable[[Request, Exception], Awaitable[Response]]]] = {
    errors.StateUnavailable: _state_down,
}
_STATUS_HANDLERS: Final[dict[int, Callable[[Request, Exception], Awaitable[Response]]]] = {
    404: _not_found,
    405: _not_found,
}


class _GatewayApp(Starlette):
    """Starlette, with the two routes every call takes dispatched without its layers.

    A call through the gateway is a ``POST /v1/images/generations`` and a ``GET`` of the kept
    image: for those two, `__call__` finds the endpoint itself and runs it as Starlette's
    layers would (its error middleware, exception middleware, router and route: five
    coroutines and two ``send`` wrappers a request, and a regular expression per route tried),
    with the same answers for every exception (`_fast`; tests/test_gateway.py compares the two
    ways). Anything else (another route or method, a ``root_path``, HEAD, lifespan) goes
    through Starlette.
    """

    fast = True
    """``False``: every request goes through Starlette's layers (the tests' general path)."""

    def __init__(self, hot: dict[str, Callable[[Request], Awaitable[Response]]], **kw: Any):
        super().__init__(**kw)
        self._generations = hot["generations"]
        self._files = hot["files"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast and scope["type"] == "http" and not scope.get("root_path"):
            path: str = scope["path"]
            method = scope["method"]
            if method == "POST" and path == "/v1/images/generations":
                await self._fast(self._generations, scope, receive, send)
                return
            if method == "GET" and path.startswith("/v1/files/"):
                name = path[len("/v1/files/") :]
                if name and "/" not in name:  # the route's {name}: one segment, not empty
                    scope["path_params"] = {"name": name}
                    await self._fast(self._files, scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    async def _fast(
        self,
        endpoint: Callable[[Request], Awaitable[Response]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Serve *endpoint* as Starlette's layers do, handlers and re-raising included.

        The route's wrapper (and the exception middleware behind it) answers an exception with
        its handler (`_STATUS_HANDLERS` for an `HTTPException` of that status, else the first
        of `_EXCEPTION_HANDLERS` or Starlette's own for `HTTPException` along its classes),
        unless the answer had started (then a RuntimeError); the error middleware answers any
        other exception with `_unexpected` if nothing was sent yet, and raises it again.
        """
        scope["app"] = self
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        request = Request(scope, receive, send)
        try:
            try:
                response = await endpoint(request)
                await response(scope, receive, sender)
            except Exception as exc:
                handler = _handler_for(exc)
                if handler is None:
                    raise
                if started:
                    raise RuntimeError(
                        "Caught handled exception, but response already started."
                    ) from exc
                await (await handler(request, exc))(scope, receive, sender)
                exc.__traceback__ = None
        except Exception as exc:
            answer = await _unexpected(Request(scope), exc)
            if not started:
                await answer(scope, receive, send)
            raise exc


def _handler_for(exc: Exception) -> Callable[[Request, Exception], Awaitable[Response]] | None:
    """The handler Starlette's exception middleware would give *exc*, if any."""
    if isinstance(exc, HTTPException):
        by_status = _STATUS_HANDLERS.get(exc.status_code)
        if by_status is not None:
            return by_status
    for kind in type(exc).__mro__:
        if kind in _EXCEPTION_HANDLERS:
            return _EXCEPTION_HANDLERS[kind]
        if kind is HTTPException:
            return _http_exception
    return None


async def _http_exception(request: Request, exc: Exception) -> Response:
    # Starlette's default for an HTTPException of a status without a handler of ours.
    assert isinstance(exc, HTTPException)
    if exc.status_code in {204, 304}:
        return Response(status_code=exc.status_code, headers=exc.headers)
    return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)


def create_app(gateway: Gateway) -> Starlette:
    """The ASGI app serving *gateway*."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sweeper = asyncio.get_running_loop().create_task(_sweep(gateway))
        try:
            yield
        finally:
            sweeper.cancel()
            await gateway.aclose()

    hot = {"generations": _guarded(generations), "files": _guarded(files)}
    app = _GatewayApp(
        hot,
        routes=[
            Route("/v1/images/generations", hot["generations"], methods=["POST"]),
            Route("/v1/images/edits", _guarded(edits), methods=["POST"]),
            Route("/v1/models", _guarded(models), methods=["GET"]),
            Route("/v1/files/{name}", hot["files"], methods=["GET"]),
            Route("/healthz", _guarded(healthz), methods=["GET"]),
            Route("/readyz", _guarded(readyz), methods=["GET"]),
            Route("/metrics", _guarded(metrics), methods=["GET"]),
        ],
        exception_handlers={**_STATUS_HANDLERS, **_EXCEPTION_HANDLERS, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app


async def _sweep(gateway: Gateway) -> None:
    every = max(1.0, min(gateway.settings.retention / 4, 600.0))
    while True:
        with contextlib.suppress(OSError):
            await anyio.to_thread.run_sync(gateway.files.sweep)
        await asyncio.sleep(every)
