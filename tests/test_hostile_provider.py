"""The clients against a hostile provider and a careless caller, through httpx.MockTransport.

A provider that drips its answer, sends 100 MB, garbles its encoding, redirects forever, serves
HTML as the image, or echoes the key back; a caller passing any value for any argument. Every
outcome is a typed error (or a result), bounded in time and memory, and no key ever shows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient, errors
from flux_adapters._redact import FRAGMENT, secret_forms
from flux_adapters.result import MAX_IMAGE_BYTES
from flux_adapters.wire import ERROR_BODY_BYTES, MAX_ANSWER_BYTES, JsonBody
from tests.conftest import call_adapter, image_bytes

KEY = "sk-live-7Qw2Zr9XbT4mKp1VfH8sLd3NcY6gJa0E"
REQUEST = EditRequest(prompt="a robot", model="flux-2-pro")
RESULT_URL = "https://cdn.example/results/a.png?signature=s3cr3t"
OK = {"created": 1, "data": [{"url": RESULT_URL}]}
Handler = Callable[[httpx.Request], httpx.Response]
both = pytest.mark.parametrize("kind", ["sync", "async"])


class Stream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body made of *chunks*, optionally one every *pause* seconds; counts what is read."""

    def __init__(self, chunks: Iterator[bytes], pause: float = 0.0) -> None:
        self._chunks = chunks
        self._pause = pause
        self.read = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            time.sleep(self._pause)
            self.read += len(chunk)
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            await asyncio.sleep(self._pause)
            self.read += len(chunk)
            yield chunk


def run(kind: str, handler: Handler, call: Callable[[Any], Any], **options: Any) -> Any:
    """Make a client of *kind* on *handler* and return ``call(client)`` (awaited when async)."""
    transport = httpx.MockTransport(handler)
    if kind == "sync":
        with httpx.Client(transport=transport) as http:
            return call(FluxClient("laozhang", api_key=KEY, http_client=http, **options))

    async def main() -> Any:
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http, **options)
            outcome = call(client)
            return await outcome if asyncio.iscoroutine(outcome) else outcome

    return asyncio.run(main())


def leaks(text: str, key: str = KEY) -> list[str]:
    """Every form of *key*, or 8-character fragment of one, that appears in *text*."""
    found = []
    for form in secret_forms(key):
        found += [
            form[i : i + FRAGMENT]
            for i in range(len(form) - FRAGMENT + 1)
            if form[i : i + FRAGMENT] in text
        ]
    return found


# --- answers that never end, or never stop growing -----------------------------------------


@both
def test_a_server_dripping_its_answer_is_cut_off_at_the_deadline(kind: str) -> None:
    def drip(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Stream(iter([b"{"] * 200), pause=0.02))

    started = time.monotonic()
    with pytest.raises(errors.Timeout, match=r"deadline of 0\.3 s") as caught:
        run(kind, drip, lambda client: client.edit(REQUEST), deadline=0.3)
    assert time.monotonic() - started < 2.0  # 200 bytes at 20 ms each would take 4 s
    assert caught.value.sent is True  # the job may have been done: never failed over


@both
def test_a_number_given_as_timeout_is_also_the_deadline(kind: str) -> None:
    def drip(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Stream(iter([b" "] * 200), pause=0.02))

    with pytest.raises(errors.Timeout, match="deadline"):
        run(kind, drip, lambda client: client.edit(REQUEST), timeout=0.3)


@both
def test_an_answer_over_the_cap_is_refused_without_reading_it(kind: str) -> None:
    declared = httpx.Response(
        200, headers={"content-length": str(MAX_ANSWER_BYTES + 1)}, stream=Stream(iter([b"{"]))
    )
    with pytest.raises(errors.ResponseFormatError, match="larger than"):
        run(kind, lambda request: declared, lambda client: client.edit(REQUEST))
    endless = Stream(b"x" * 1024 * 1024 for _ in range(10_000))  # 10 GB if read to the end
    with pytest.raises(errors.ResponseFormatError, match="larger than"):
        run(kind, lambda request: httpx.Response(200, stream=endless), lambda c: c.edit(REQUEST))
    assert endless.read <= MAX_ANSWER_BYTES + 1024 * 1024


@both
def test_an_error_answer_is_read_no_further_than_its_prefix(kind: str) -> None:
    page = Stream(iter([b"<html><title>down</title>", *([b"x" * 65536] * 10_000)]))
    with pytest.raises(errors.ProviderUnavailable) as caught:
        run(kind, lambda request: httpx.Response(500, stream=page), lambda c: c.edit(REQUEST))
    assert caught.value.detail == "down"
    assert page.read <= ERROR_BODY_BYTES + 2 * 65536


@both
def test_a_body_that_cannot_be_decoded_is_a_format_error(kind: str) -> None:
    def garbled(request: httpx.Request) -> httpx.Response:
        body = Stream(iter([b"not gzip at all"]))
        return httpx.Response(200, headers={"content-encoding": "gzip"}, stream=body)

    with pytest.raises(errors.ResponseFormatError, match="could not be decoded"):
        run(kind, garbled, lambda client: client.edit(REQUEST))


# --- downloads that are not images ---------------------------------------------------------


def cdn(*answers: httpx.Response | Callable[[httpx.Request], httpx.Response]) -> Handler:
    """The provider answers OK; each download of the result plays the next of *answers*."""
    queue = list(answers)
    gets: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, json=OK)
        gets.append(str(request.url))
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if callable(answer):
            return answer(request)
        # A fresh response each time, whose body either client can stream.
        body = Stream(iter([answer.content]))
        return httpx.Response(answer.status_code, headers=answer.headers, stream=body)

    handler.gets = gets  # type: ignore[attr-defined]
    return handler


PNG = image_bytes(40, 30)
HTML = b"<html><body>Please log in</body></html>"


def save(kind: str, handler: Handler, target: Path, **options: Any) -> Path:
    if kind == "sync":
        return run(  # type: ignore[no-any-return]
            kind, handler, lambda client: client.edit(REQUEST).images[0].save(target), **options
        )

    async def go(client: AsyncFluxClient) -> Path:
        result = await client.edit(REQUEST)
        return await result.images[0].save_async(target)

    return run(kind, handler, go, **options)  # type: ignore[no-any-return]


@both
@pytest.mark.parametrize(
    ("answers", "problem"),
    [
        ((httpx.Response(302, headers={"location": "/login"}), httpx.Response(200, content=HTML)), "not an image"),
        ((httpx.Response(200, content=HTML, headers={"content-type": "text/html"}),), r"not an image \(text/html"),
        ((httpx.Response(200, content=b""),), "is empty"),
        ((httpx.Response(200, content=b"\x00" * 500, headers={"content-type": "image/png"}),), "not an image"),
        ((httpx.Response(302, headers={"location": "https://cdn.example/loop"}),), "redirected more than 5 times"),
        ((httpx.Response(302),), "redirected nowhere usable"),
        ((httpx.Response(200, headers={"content-length": str(MAX_IMAGE_BYTES + 1)}, content=PNG),), "larger than 32 MB"),
    ],
    ids=["302-to-html", "html", "empty", "fake-png", "redirect-loop", "redirect-nowhere", "too-large"],
)  # fmt: skip
def test_a_download_is_saved_only_when_it_is_an_image(
    kind: str, answers: tuple[httpx.Response, ...], problem: str, tmp_path: Path
) -> None:
    target = tmp_path / "out.png"
    with pytest.raises(errors.ResponseFormatError, match=problem) as caught:
        save(kind, cdn(*answers), target)
    assert "s3cr3t" not in str(caught.value)  # the URL's signature stays out of the message
    assert list(tmp_path.iterdir()) == []  # nothing half-written, nothing under the name


@both
def test_a_redirect_to_the_image_and_a_passing_failure_are_followed(
    kind: str, tmp_path: Path
) -> None:
    handler = cdn(
        httpx.Response(503),  # a blip: retried in place
        httpx.Response(302, headers={"location": "/moved/a.png"}),
        httpx.Response(200, content=PNG, headers={"content-type": "image/png"}),
    )
    target = save(kind, handler, tmp_path / "out.png")
    assert target.read_bytes() == PNG
    assert handler.gets[-1] == "https://cdn.example/moved/a.png"  # type: ignore[attr-defined]
    assert [path.name for path in tmp_path.iterdir()] == ["out.png"]


@both
def test_a_download_dripping_forever_ends_at_its_deadline(kind: str, tmp_path: Path) -> None:
    slow = Stream(iter([PNG[:16], *([b"\x00"] * 500)]), pause=0.02)
    started = time.monotonic()
    handler = cdn(lambda request: httpx.Response(200, stream=slow))
    with pytest.raises(errors.Timeout, match=r"deadline of 0\.5 s"):
        save(kind, handler, tmp_path / "out.png", deadline=0.5)
    assert time.monotonic() - started < 3.0
    assert list(tmp_path.iterdir()) == []


@both
def test_a_target_that_is_not_a_regular_file_is_refused_before_downloading(
    kind: str, tmp_path: Path
) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    (tmp_path / "file").write_bytes(b"x")
    for target, problem in [
        (folder, "is a directory"),
        (fifo, "is a FIFO"),
        (tmp_path / "missing" / "a.png", "does not exist"),
        (tmp_path / "file" / "a.png", "Not a directory"),
        (Path("/dev/null"), "is a device"),
    ]:
        handler = cdn(httpx.Response(200, content=PNG))
        with pytest.raises(errors.OutputError, match=problem):
            save(kind, handler, target)
        assert handler.gets == []  # type: ignore[attr-defined]


def test_a_callers_client_defaults_never_go_with_a_download(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            return httpx.Response(200, json=OK)
        return httpx.Response(200, content=PNG)

    transport = httpx.MockTransport(handler)
    with httpx.Client(
        transport=transport,
        headers={"Authorization": "Bearer caller-secret", "X-Team": "robots"},
        cookies={"session": "caller-cookie"},
        auth=("user", "caller-password"),
    ) as http:
        client = FluxClient("laozhang", api_key=KEY, http_client=http)
        client.edit(REQUEST).images[0].save(tmp_path / "out.png")
    post, get = seen
    assert post.headers["authorization"] == f"Bearer {KEY}"  # to the provider: its key
    assert "authorization" not in get.headers  # to the CDN: nothing of the caller's
    assert "cookie" not in get.headers
    assert "x-team" not in get.headers
    assert get.headers["accept"] == "image/*"


@both
def test_malformed_result_urls_and_redirects_are_typed_errors(kind: str, tmp_path: Path) -> None:
    with pytest.raises(errors.ResponseFormatError, match="not a valid URL"):
        run(
            kind,
            lambda r: httpx.Response(200, json={"data": [{"url": "http://[::1"}]}),
            lambda c: c.edit(REQUEST),
        )
    for location in ("http://[::1", "mailto:robot@example.com", "//"):
        handler = cdn(httpx.Response(302, headers={"location": location}))
        # Refused by httpx itself (a TransportError) or by us (a ResponseFormatError).
        with pytest.raises((errors.TransportError, errors.ResponseFormatError)):
            save(kind, handler, tmp_path / "out.png", deadline=0.4)  # too short to retry

        def redirect(request: httpx.Request, location: str = location) -> httpx.Response:
            return httpx.Response(302, headers={"location": location})

        with pytest.raises(errors.FluxError) as caught:  # the POST answered so: typed too
            run(kind, redirect, lambda client: client.edit(REQUEST))
        assert not isinstance(caught.value, errors.RequestError)
    assert list(tmp_path.iterdir()) == []


def test_inline_images_are_decoded_in_slices_to_their_target(tmp_path: Path) -> None:
    import base64

    png = image_bytes(600, 600)
    answer = httpx.Response(200, json={"data": [{"b64_json": base64.b64encode(png).decode()}]})
    transport = httpx.MockTransport(lambda request: answer)
    with httpx.Client(transport=transport) as http:
        result = FluxClient("aimlapi", api_key=KEY, http_client=http).edit(REQUEST)
    saved = result.images[0].save(tmp_path / "robot", add_suffix=True)
    assert saved == tmp_path / "robot.png"
    assert saved.read_bytes() == png


# --- the key never shows -------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "x" * 100])
def test_a_key_echoed_by_the_provider_never_shows_at_any_cut(prefix: str) -> None:
    """The detail is cut at 500 characters and an excerpt at 200: no cut leaves 8+ characters."""
    for offset in range(520):
        message = prefix + "y" * offset + KEY + " was refused"

        def echo(request: httpx.Request, text: str = message) -> httpx.Response:
            return httpx.Response(401, json={"error": {"message": text}})

        with pytest.raises(errors.AuthenticationFailed) as caught:
            run("sync", echo, lambda client: client.edit(REQUEST))
        error = caught.value
        shown = f"{error} {error!r} {error.detail} {error.attempts}"
        assert leaks(shown) == [], offset

        def garbage(request: httpx.Request, text: str = message) -> httpx.Response:
            return httpx.Response(200, content=text.encode())

        with pytest.raises(errors.ResponseFormatError) as garbled:
            run("sync", garbage, lambda client: client.edit(REQUEST))
        assert leaks(f"{garbled.value} {garbled.value.excerpt}") == [], offset


def test_a_key_in_a_transport_failure_message_never_shows() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError(f"Illegal header value b'Bearer {KEY}\\r'")

    with pytest.raises(errors.TransportError) as caught:
        run("sync", refuse, lambda client: client.edit(REQUEST))
    assert "may have reached" not in str(caught.value)
    assert leaks(str(caught.value)) == []


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (KEY + "\r", "line break"),
        (KEY + "\n", "line break"),
        (" " + KEY, "whitespace"),
        (KEY[:10] + "é" + KEY[10:], "cannot carry"),
        (KEY[:10] + " " + KEY[10:], "cannot carry"),
        ("Bearer " + KEY, "scheme word"),
        ('"' + KEY + '"', "wrapped in quotes"),
        ("'" + KEY + "'", "wrapped in quotes"),
        ('"' + KEY, "wrapped in quotes"),
        ("", "is empty"),
    ],
)
def test_an_unusable_key_is_refused_when_the_client_is_built_without_showing_it(
    key: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(errors.ConfigurationError, match=problem) as given:
        FluxClient("laozhang", api_key=key)
    assert "api_key=" in str(given.value)
    assert leaks(str(given.value)) == []
    monkeypatch.setenv("LAOZHANG_API_KEY", key)
    with pytest.raises(errors.ConfigurationError) as from_env:
        AsyncFluxClient("laozhang")
    assert "LAOZHANG_API_KEY" in str(from_env.value)
    assert leaks(str(from_env.value)) == []
    assert "may have reached" not in str(from_env.value)


@pytest.mark.parametrize("key", ["k", "any", "sk-x", "abcdefg"])
def test_a_key_shorter_than_any_providers_is_refused_when_the_client_is_built(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "any" or "k" was taken as a key, and the redactor does not look for a key under 4
    # characters (masking it would mangle every message): nowhere would it be kept out of a
    # message. No provider issues keys under 8 characters; such a value is a placeholder.
    with pytest.raises(
        errors.ConfigurationError,
        match=r"^api_key= is \d characters? long; an API key has at least 8",
    ) as given:
        FluxClient("laozhang", api_key=key)
    assert f"'{key}'" not in str(given.value)
    monkeypatch.setenv("LAOZHANG_API_KEY", key)
    with pytest.raises(errors.ConfigurationError, match=r"^\$LAOZHANG_API_KEY is \d char") as env:
        AsyncFluxClient("laozhang")
    assert f"'{key}'" not in str(env.value)
    monkeypatch.setenv("LAOZHANG_API_KEY", key + "h" * (8 - len(key)))  # 8: taken
    FluxClient("laozhang").close()


def test_the_key_never_appears_in_debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    from flux_adapters.emulator import run_emulator

    with caplog.at_level(logging.DEBUG), run_emulator() as emulator:
        with FluxClient("laozhang", api_key=KEY, base_url=emulator.base_url("laozhang")) as client:
            client.edit(REQUEST).images[0].read()
        closed = FluxClient("laozhang", api_key=KEY, base_url="http://127.0.0.1:9")
        with closed, pytest.raises(errors.TransportError):
            closed.edit(REQUEST)
    assert any(record.name.startswith("httpcore") for record in caplog.records)  # it did log
    assert leaks(caplog.text) == []


# --- a careless caller ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"routing": "fastest"}, "routing= must be"),
        ({"routing": "cheapst"}, "did you mean 'cheapest'"),
        ({"timeout": "30"}, "timeout= must be seconds"),
        ({"timeout": float("nan")}, "timeout= must be"),
        ({"timeout": -1}, "timeout= must be"),
        ({"timeout": httpx.Timeout(5, read=0)}, "timeout= read must be"),
        ({"deadline": float("inf")}, "deadline= must be"),
        ({"deadline": 10**400}, "deadline= must be"),
        ({"base_url": "api.laozhang.ai"}, "base_url= must be an http"),
        ({"base_url": "https://api.laozhang.ai/\r\nX: y"}, "base_url= must be an http"),
        ({"base_url": "http://[::1"}, "base_url= must be an http"),
        ({"base_url": 42}, "base_url= must be a URL string"),
        ({"max_cost_usd": -1}, "max_cost_usd="),
        ({"max_cost_usd": "0.05"}, "max_cost_usd="),
        ({"failover_on_ambiguous": "yes"}, "failover_on_ambiguous="),
        ({"policy": {"retries": 3}}, "policy="),
        ({"prices": {"laozhang": 0.03}}, "prices="),
        ({"settings": ["laozhang"]}, "settings="),
        ({"http_client": httpx.AsyncClient()}, "use AsyncFluxClient"),
        ({"http_client": "http"}, "http_client= must be"),
    ],
)
def test_every_client_argument_is_checked_when_the_client_is_built(
    options: dict[str, Any], problem: str
) -> None:
    with pytest.raises(errors.ConfigurationError, match=problem):
        FluxClient("laozhang", api_key=KEY, **options)


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({}, "pass either provider="),
        ({"provider": "laozhang", "providers": ["apiyi"]}, "pass either provider="),
        ({"providers": "laozhang"}, "must be a list"),
        ({"providers": []}, "is empty"),
        ({"providers": ["laozhang", "laozhang"]}, "more than once"),
        ({"providers": [42]}, "a provider must be a provider id or an adapter"),
        ({"provider": object()}, "a provider must be a provider id or an adapter"),
    ],
)
def test_provider_arguments_are_checked(arguments: dict[str, Any], problem: str) -> None:
    with pytest.raises(errors.ConfigurationError, match=problem):
        FluxClient(**arguments)


@both
def test_edit_takes_only_a_request_and_a_closed_client_says_so(kind: str) -> None:
    with pytest.raises(errors.RequestError, match="must be an EditRequest"):
        run(kind, lambda request: httpx.Response(200, json=OK), lambda c: c.edit({"prompt": "x"}))

    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=OK))
    if kind == "sync":
        client = FluxClient("laozhang", api_key=KEY, http_client=httpx.Client(transport=transport))
        client._http.close()
        with pytest.raises(errors.ConfigurationError, match="is closed"):
            client.edit(REQUEST)
        return

    async def closed() -> None:
        http = httpx.AsyncClient(transport=transport)
        client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
        await http.aclose()
        with pytest.raises(errors.ConfigurationError, match="is closed"):
            await client.edit(REQUEST)

    asyncio.run(closed())


class Broken:
    """An adapter from another package with bugs of its own."""

    name = "broken"
    default_base_url = "https://broken.example"
    env_prefix = "BROKEN"

    def __init__(self, fail_at: str) -> None:

        self._inner = call_adapter("laozhang")
        self.limits = self._inner.limits
        self._fail_at = fail_at

    def build_request(self, *args: Any) -> Any:
        if self._fail_at == "build":
            raise KeyError("model")
        if self._fail_at == "none":
            return None  # not a request at all
        if self._fail_at == "url":
            return attrs.evolve(self._inner.build_request(*args), url=5)  # type: ignore[arg-type]
        if self._fail_at in ("nan", "infinity"):
            # A float no JSON has: Python's encoder wrote NaN, and the paid request went out.
            built = self._inner.build_request(*args)
            assert isinstance(built.body, JsonBody)
            weight = float(self._fail_at.replace("infinity", "inf"))
            return attrs.evolve(built, body=JsonBody({**built.body.value, "weight": weight}))
        return self._inner.build_request(*args)

    def parse_response(self, response: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'url'")

    def parse_error(self, response: Any) -> Any:
        return None  # not an error at all


def test_a_buggy_adapter_gets_typed_errors_in_place_of_its_own() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=OK))
    with httpx.Client(transport=transport) as http:
        client = FluxClient(Broken("build"), api_key=KEY, http_client=http)
        with pytest.raises(errors.RequestError, match="could not build it"):
            client.edit(REQUEST)
        client = FluxClient(Broken("parse"), api_key=KEY, http_client=http)
        with pytest.raises(errors.ResponseFormatError, match="could not read the answer"):
            client.edit(REQUEST)


@pytest.mark.parametrize(
    ("fail_at", "says"),
    [
        ("none", "could not build it"),
        ("url", "cannot send"),
        ("nan", "cannot send"),
        ("infinity", "cannot send"),
    ],
)
def test_an_adapter_that_builds_no_request_gets_a_typed_error_nothing_sent(
    fail_at: str, says: str
) -> None:
    # build_request returning None (or anything not an HttpRequest) ended the call with a bare
    # AttributeError ('NoneType' object has no attribute 'role'), outside FluxError; a URL that
    # is not text did too on AsyncFluxClient, and was "the transport failed ... may have reached
    # it" on FluxClient, though nothing went out.
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json=OK)

    transport = httpx.MockTransport(handler)
    with httpx.Client(transport=transport) as http:
        client = FluxClient(Broken(fail_at), api_key=KEY, http_client=http)
        with pytest.raises(errors.RequestError, match=says):
            client.edit(REQUEST)
    assert sent == []

    async def main() -> None:
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient(Broken(fail_at), api_key=KEY, http_client=http)
            with pytest.raises(errors.RequestError, match=says):
                await client.edit(REQUEST)

    asyncio.run(main())
    assert sent == []


def test_a_probe_cancelled_by_wait_for_lets_the_next_call_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for prefix in ("LAOZHANG", "APIYI"):
        monkeypatch.setenv(f"{prefix}_API_KEY", KEY)
    from flux_adapters.routing import RoutingPolicy

    hang = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.laozhang.ai":
            if hang.is_set():
                await asyncio.sleep(30)  # the probe: never answers in time
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json=OK)

    async def main() -> list[str]:
        transport = httpx.MockTransport(handler)
        policy = RoutingPolicy(retries=0, cooldown=0.05)
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient(
                providers=["laozhang", "apiyi"], http_client=http, policy=policy
            )
            await client.edit(REQUEST)  # laozhang's 503 opens its circuit; apiyi serves it
            await asyncio.sleep(0.06)  # half-open: the next call is laozhang's probe
            hang.set()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.edit(REQUEST), timeout=0.2)
            hang.clear()
            result = await client.edit(REQUEST)  # the cancelled probe was released
            return [f"{a.provider}:{a.outcome}" for a in result.attempts]

    assert asyncio.run(main()) == ["laozhang:failed", "apiyi:ok"]  # probed, not skipped


@both
@pytest.mark.parametrize("location", ["http://[::1", "mailto:robot@example.com"])
def test_a_paid_post_answered_with_an_unreadable_location_is_never_failed_over(
    kind: str, location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx raises InvalidURL from send() for such a header: after the POST went out."""
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    monkeypatch.setenv("APIYI_API_KEY", KEY)
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.host == "api.laozhang.ai":
            return httpx.Response(302, headers={"location": location})
        return httpx.Response(200, json=OK)

    transport = httpx.MockTransport(handler)

    def edit() -> object:
        if kind == "sync":
            with httpx.Client(transport=transport) as http:
                client = FluxClient(providers=["laozhang", "apiyi"], http_client=http)
                return client.edit(REQUEST)

        async def main() -> object:
            async with httpx.AsyncClient(transport=transport) as http:
                client = AsyncFluxClient(providers=["laozhang", "apiyi"], http_client=http)
                return await client.edit(REQUEST)

        return asyncio.run(main())

    with pytest.raises(errors.FluxError) as caught:
        edit()
    assert hosts == ["api.laozhang.ai"]  # the second provider was never sent the job
    assert caught.value.attempts[0].billing in ("answer-lost", "unreadable-answer")


@both
def test_anything_a_callers_transport_raises_is_typed_and_never_failed_over(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    monkeypatch.setenv("APIYI_API_KEY", KEY)
    hosts: list[str] = []

    def broken(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        raise ValueError("a bug in the caller's transport")

    transport = httpx.MockTransport(broken)

    def edit() -> object:
        if kind == "sync":
            with httpx.Client(transport=transport) as http:
                return FluxClient(providers=["laozhang", "apiyi"], http_client=http).edit(REQUEST)

        async def main() -> object:
            async with httpx.AsyncClient(transport=transport) as http:
                client = AsyncFluxClient(providers=["laozhang", "apiyi"], http_client=http)
                return await client.edit(REQUEST)

        return asyncio.run(main())

    with pytest.raises(errors.TransportError, match="the transport failed") as caught:
        edit()
    assert caught.value.sent is True  # nothing tells when it failed: it may have been sent
    assert hosts == ["api.laozhang.ai"]


@both
def test_a_redirect_answering_the_post_is_neither_success_nor_a_refusal(kind: str) -> None:
    moved = httpx.Response(302, headers={"location": "https://elsewhere.example/v1"})
    with pytest.raises(errors.ResponseFormatError, match="neither success nor an error") as caught:
        run(kind, lambda request: moved, lambda client: client.edit(REQUEST))
    assert caught.value.status_code == 302


def _dripping_downloader(deadline: float) -> tuple[Any, httpx.AsyncClient]:
    from flux_adapters._download import HttpDownloader

    def handler(request: httpx.Request) -> httpx.Response:
        slow = Stream(iter([PNG[:16], *([b"\x00"] * 500)]), pause=0.02)
        return httpx.Response(200, stream=slow)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return HttpDownloader(async_client=http, deadline=deadline), http


def test_an_async_downloads_deadline_gives_its_task_back_uncancelled() -> None:
    """As `asyncio.timeout` does: the deadline's cancellation is taken back with its error, so
    the caller's own timeouts and task groups still work after it."""

    async def main() -> tuple[BaseException, int]:
        downloader, http = _dripping_downloader(0.3)
        async with http:
            try:
                await downloader.read_async("https://cdn.example/a.png")
            except errors.Timeout as error:
                caught: BaseException = error
            task = asyncio.current_task()
            assert task is not None
            await asyncio.sleep(0.4)  # no late cancel from the download's timer
            return caught, task.cancelling()

    caught, cancelling = asyncio.run(main())
    assert isinstance(caught, errors.Timeout)
    assert "deadline of 0.3 s" in str(caught)
    assert cancelling == 0


@pytest.mark.parametrize("late", [False, True], ids=["before-the-deadline", "as-it-passes"])
def test_a_callers_cancel_of_an_async_download_stays_a_cancel(
    late: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled by its caller (before its deadline, or in the turn the deadline passes), a
    download ends with the caller's CancelledError, never a Timeout, as under `asyncio.timeout`."""
    from flux_adapters import _deadline

    if late:  # the caller's cancel comes in the same turn of the loop as the deadline's
        passing = _deadline._Deadline.check

        def passing_with_the_callers(deadline: _deadline._Deadline, now: float) -> float | None:
            soonest = passing(deadline, now)
            if soonest is None:  # passed: its task was cancelled, and is again by the caller
                deadline.task.cancel()
            return soonest

        monkeypatch.setattr(_deadline._Deadline, "check", passing_with_the_callers)

    async def main() -> str:
        downloader, http = _dripping_downloader(0.3)
        async with http:
            task = asyncio.create_task(downloader.read_async("https://cdn.example/a.png"))
            if not late:
                await asyncio.sleep(0.1)
                task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return "cancelled"
            except errors.Timeout:
                return "timeout"
            return "done"

    assert asyncio.run(main()) == "cancelled"
