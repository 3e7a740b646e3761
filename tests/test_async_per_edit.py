"""What the async path's per-exchange shortcuts keep: each gives what the general path gives.

The aiohttp driver's bodies skip aiohttp's generic ``Payload.__init__``, and an answer whose
headers name no request id is told so at once; neither may change what is sent or read.
"""

from __future__ import annotations

import asyncio
import base64
from types import MappingProxyType
from typing import Any, TypeVar

import attrs
import pytest

from flux_adapters._flows import Outcome, _answer_id
from flux_adapters._redact import REQUEST_ID_HEADERS, redactor_for, request_id
from flux_adapters.providers import Answer
from flux_adapters.result import Attempt, EditResult, Usage, checked_image
from flux_adapters.wire import HttpResponse

pytest.importorskip("aiohttp")

from aiohttp.payload import BytesPayload

from flux_adapters._aiohttp import _Body

KEY = "sk-test-0123456789abcdef"
_T = TypeVar("_T")
_PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(64)).decode()

_HEADER_TABLES: list[dict[str, str]] = [
    {},
    {"content-type": "application/json", "content-length": "12", "server": "x"},
    {"x-request-id": "req-1"},
    {"request-id": "req-2", "x-request-id": ""},  # an empty one is no id: the next is looked at
    {"x-amzn-requestid": "amzn-3", "date": "Mon"},
    {"x-request-id": KEY},  # an id that is the key: masked, so no id
    {"x-request-id": f"id {KEY} tail"},
    {"x-request-id": "  "},
    {"X-Request-Id": "mixed-case"},  # names are lower case in an HttpResponse: not looked up
    {"x-oneapi-request-id": "one", "x-fal-request-id": "fal"},
    {"x-request-id": "\x1b[31mred"},  # controls escaped, as on errors
    {name: f"id-{index}" for index, name in enumerate(REQUEST_ID_HEADERS)},
]


@pytest.mark.parametrize("headers", _HEADER_TABLES)
def test_the_request_id_of_a_plain_dict_is_what_the_general_lookup_finds(
    headers: dict[str, str],
) -> None:
    """A dict with none of the id headers is answered at once; any mapping else looks each up."""
    scrub = redactor_for((KEY,))
    general = request_id(MappingProxyType(headers), scrub)  # not a dict: looked up name by name
    assert request_id(headers, scrub) == general
    response = HttpResponse(status_code=200, headers=headers, content=b"{}")
    assert _answer_id(response, (KEY,)) == general
    proxied = HttpResponse(status_code=200, headers=MappingProxyType(headers), content=b"{}")
    assert _answer_id(proxied, (KEY,)) == general
    if general is not None:
        assert KEY not in general


@pytest.mark.parametrize("kind", ["application/json", "multipart/form-data; boundary=abc"])
def test_a_streamed_body_carries_what_aiohttp_s_own_payload_would(kind: str) -> None:
    """Content type, size and headers as ``Payload.__init__`` sets them; written whole."""
    chunks = [b'{"prompt":', b'"a cat"}']
    body = _Body(iter(chunks), 18, kind, None, None)
    reference = BytesPayload(b"".join(chunks), content_type=kind)
    assert dict(body.headers) == dict(reference.headers)
    assert body.content_type == reference.content_type
    assert body.size == reference.size == 18
    assert body.filename is None
    assert body.encoding is None

    class Writer:
        transport = None

        def __init__(self) -> None:
            self.written: list[bytes] = []

        async def write(self, chunk: bytes) -> None:
            self.written.append(chunk)

    writer = Writer()
    asyncio.run(body.write_with_length(writer, None))  # type: ignore[arg-type]
    assert b"".join(writer.written) == b"".join(chunks)
    assert body.complete
    with pytest.raises(TypeError):
        body.headers["X-Other"] = "no"  # shared by bodies: read-only


def test_the_exchanges_clock_is_the_loop_s_own() -> None:
    """asyncio's loops read time.monotonic (so does the watch, directly); any other its own."""
    from flux_adapters._deadline import Watch

    class Fixed(asyncio.SelectorEventLoop):
        def time(self) -> float:
            return 42.0

    for make, expected in ((asyncio.new_event_loop, None), (Fixed, 42.0)):
        loop = make()
        try:
            watch = Watch(loop)
            before = loop.time()
            seen = watch.time()
            if expected is None:
                assert before <= seen <= loop.time()  # the same clock, read in between
            else:
                assert seen == expected
        finally:
            loop.close()
    loop = asyncio.new_event_loop()
    try:
        loop.time = lambda: 7.0  # type: ignore[method-assign]  # an instance's own clock
        assert Watch(loop).time() == 7.0
    finally:
        loop.close()


def _made_by_init(cls: type[_T], **values: object) -> _T:
    made = object.__new__(cls)
    cls.__init__(made, **values)  # as the library's hot paths do
    return made


@pytest.mark.parametrize(
    ("cls", "tables"),
    [
        (
            EditResult,
            [
                {"provider": "laozhang", "model": "flux-2-pro", "images": ()},
                {
                    "provider": "apiyi",
                    "model": "flux-2-pro",
                    "images": (checked_image("https://cdn.example/a.png", None),),
                    "usage": Usage(credits_used=2.0),
                    "cost_usd": 0.03,
                    "cost_source": "provider",
                    "attempts": (Attempt(provider="a", model="m", outcome="ok", elapsed_s=0.5),),
                    "elapsed_s": 1.25,
                    "request_id": "req-1",
                },
            ],
        ),
        (
            Attempt,
            [
                {"provider": "laozhang", "model": "flux-2-pro", "outcome": "ok", "elapsed_s": 0.1},
                {"provider": "x", "model": "y", "outcome": "failed", "elapsed_s": 0.0},
            ],
        ),
        (
            HttpResponse,
            [
                {"status_code": 200, "headers": {}, "content": b""},
                {"status_code": 503, "headers": {"x-request-id": "r"}, "content": b"{}"},
            ],
        ),
        (
            Answer,
            [
                {"images": ()},
                {
                    "images": (checked_image(None, _PNG_B64),),
                    "usage": Usage(credits_used=None, tokens_used=12),
                },
            ],
        ),
        (
            Outcome,
            [
                {"plan": "a plan", "answer": Answer(images=())},
                {"plan": "p", "answer": Answer(images=()), "request_id": "req-2"},
            ],
        ),
    ],
)
def test_a_value_made_through_its_init_is_the_one_its_class_makes(
    cls: type[Any], tables: list[dict[str, object]]
) -> None:
    """The per-edit values made as ``object.__new__`` then ``__init__`` are their class's own.

    That holds while the class has no ``__new__``, ``__init_subclass__`` trick or metaclass of
    its own (``cls(...)`` is then exactly those two steps): checked here, with the values.
    """
    assert attrs.has(cls)
    assert cls.__new__ is object.__new__
    assert type(cls) is type
    for values in tables:
        made = _made_by_init(cls, **values)
        called = cls(**values)
        assert type(made) is cls
        assert made == called
        assert repr(made) == repr(called)
        assert attrs.asdict(made, recurse=False) == attrs.asdict(called, recurse=False)
    with pytest.raises(TypeError) as by_init:  # a missing field: the same refusal
        _made_by_init(cls)
    with pytest.raises(TypeError) as by_call:
        cls()
    assert str(by_init.value) == str(by_call.value)
