"""What the async path's per-exchange shortcuts keep: each gives what the general path gives.

The aiohttp driver's bodies skip aiohttp's generic ``Payload.__init__``, and an answer whose
headers name no request id is told so at once; neither may change what is sent or read.
"""

from __future__ import annotations

import asyncio
from types import MappingProxyType

import pytest

from flux_adapters._flows import _answer_id
from flux_adapters._redact import REQUEST_ID_HEADERS, redactor_for, request_id
from flux_adapters.wire import HttpResponse

pytest.importorskip("aiohttp")

from aiohttp.payload import BytesPayload

from flux_adapters._aiohttp import _Body

KEY = "sk-test-0123456789abcdef"

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
    from flux_adapters._aiohttp import _Watch

    class Fixed(asyncio.SelectorEventLoop):
        def time(self) -> float:
            return 42.0

    for make, expected in ((asyncio.new_event_loop, None), (Fixed, 42.0)):
        loop = make()
        try:
            watch = _Watch(loop)
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
        assert _Watch(loop).time() == 7.0
    finally:
        loop.close()
