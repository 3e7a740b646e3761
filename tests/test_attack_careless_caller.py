"""Attacks on the Python API as a careless caller uses it: odd paths given to ``save`` and to
``edit_many``, and batch options no machine can honour. Each ends in a typed `FluxError` (or the
image written where its characters say), before anything is sent or paid for."""

from __future__ import annotations

import asyncio
import base64
import gc
import http.server
import json
import logging
import os
import socket
import socketserver
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient, errors
from flux_adapters.emulator import Emulator, run_emulator
from flux_adapters.result import ResultImage
from tests.conftest import image_bytes, serving

PNG = image_bytes(16, 12)
both = pytest.mark.parametrize("kind", ["sync", "async"])


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


def save(kind: str, image: ResultImage, target: object) -> Path:
    """`ResultImage.save`, or `save_async` run to its end, with any *target* at all."""
    if kind == "sync":
        return image.save(target)  # type: ignore[arg-type]
    return asyncio.run(image.save_async(target))  # type: ignore[arg-type]


class PathLike:
    """An ``os.PathLike`` whose ``__fspath__`` returns *value*, or raises it."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __fspath__(self) -> object:
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class Elsewhere(str):
    """A ``str`` whose ``__str__`` names another file than its characters do."""

    elsewhere = ""

    def __str__(self) -> str:
        return self.elsewhere


# --- save(): a path object whose own code fails, or says another name --------------------------


@both
@pytest.mark.parametrize(
    "failure", [RecursionError("too deep"), KeyError("name"), RuntimeError("no path today")]
)
def test_a_path_object_whose_fspath_raises_anything_is_an_output_error(
    kind: str, failure: Exception, tmp_path: Path
) -> None:
    # Before: only a TypeError or ValueError from the path became an OutputError; a
    # RecursionError (or any other) from the caller's __fspath__ escaped save() as it was.
    image = ResultImage(b64_json=base64.b64encode(PNG).decode())
    with pytest.raises(errors.OutputError, match=type(failure).__name__):
        save(kind, image, PathLike(failure))
    assert list(tmp_path.iterdir()) == []


@both
def test_a_str_subclass_is_saved_under_its_characters_not_its_str(
    kind: str, tmp_path: Path
) -> None:
    # Before: Path() (Python 3.11) took the str() of a str subclass, so the image replaced the
    # file its __str__ named, not the one its characters name (which open() would write).
    image = ResultImage(b64_json=base64.b64encode(PNG).decode())
    decoy = tmp_path / "decoy.png"
    decoy.write_bytes(b"keep me")
    target = Elsewhere(str(tmp_path / "asked.png"))
    target.elsewhere = str(decoy)
    assert save(kind, image, target) == tmp_path / "asked.png"
    assert (tmp_path / "asked.png").read_bytes() == PNG
    assert decoy.read_bytes() == b"keep me"


# --- edit_many(): an output folder that is no usable path --------------------------------------


def batch_error(emulator: Emulator, **options: object) -> errors.FluxError:
    """The `FluxError` a batch of one request with *options* ends with (asserted, not a bare one)."""

    async def run() -> None:
        client = AsyncFluxClient(
            "laozhang", api_key="test-key", base_url=emulator.base_url("laozhang")
        )
        async with client:
            request = EditRequest(prompt="p", model="flux-2-pro", images=[PNG])
            options.setdefault("requests", [request])
            async for _ in client.edit_many(**options):  # type: ignore[arg-type]
                pass

    before = len(emulator.calls("laozhang"))
    with pytest.raises(errors.FluxError) as raised:
        asyncio.run(run())
    assert len(emulator.calls("laozhang")) == before  # refused before anything was sent
    return raised.value


@pytest.mark.parametrize(
    "output_dir",
    [
        "out\0put",
        PathLike(RecursionError("too deep")),
        PathLike(KeyError("name")),
        PathLike(b"out\0put"),
    ],
    ids=["nul", "fspath-recursion", "fspath-keyerror", "fspath-bytes-nul"],
)
def test_an_output_dir_that_cannot_be_a_folder_is_a_typed_error_before_sending(
    output_dir: object, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a NUL in the name was mkdir's bare ValueError, and whatever the caller's
    # __fspath__ raised came out of the batch as it was.
    monkeypatch.chdir(tmp_path)
    error = batch_error(emulator, output_dir=output_dir)
    assert isinstance(error, errors.ConfigurationError | errors.OutputError)
    assert os.listdir(tmp_path) == []


def test_a_str_subclass_output_dir_is_the_folder_its_characters_name(
    emulator: Emulator, tmp_path: Path
) -> None:
    # Before: the folder made (and the journal and images written) was the one its __str__ named.
    folder = Elsewhere(str(tmp_path / "asked"))
    folder.elsewhere = str(tmp_path / "elsewhere")

    async def run() -> list[str]:
        client = AsyncFluxClient(
            "laozhang", api_key="test-key", base_url=emulator.base_url("laozhang")
        )
        async with client:
            request = EditRequest(prompt="p", model="flux-2-pro", images=[PNG])
            return [item.status async for item in client.edit_many([request], output_dir=folder)]

    assert asyncio.run(run()) == ["ok"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["asked"]


# --- edit_many(): a concurrency no machine can honour --------------------------------------------


def test_a_concurrency_over_the_most_is_refused_naming_it_before_sending(
    emulator: Emulator,
) -> None:
    # Before: any whole number was taken, and one worker task made per unit whatever the number
    # of requests: 300,000 took 4.5 s and 280 MB for one request, 10**9 never ended.
    error = batch_error(emulator, concurrency=1001)
    assert isinstance(error, errors.ConfigurationError)
    assert "1 to 1000" in str(error)


def test_the_most_concurrency_is_still_taken_and_the_command_takes_the_same(
    emulator: Emulator,
) -> None:
    from flux_adapters import cli
    from flux_adapters._options import MAX_CONCURRENCY

    async def run() -> list[str]:
        client = AsyncFluxClient(
            "laozhang", api_key="test-key", base_url=emulator.base_url("laozhang")
        )
        async with client:
            request = EditRequest(prompt="p", model="flux-2-pro", images=[PNG])
            items = client.edit_many([request], concurrency=MAX_CONCURRENCY)
            return [item.status async for item in items]

    assert asyncio.run(run()) == ["ok"]
    assert cli.MAX_CONCURRENCY == MAX_CONCURRENCY


# --- an AsyncFluxClient closed in another event loop than the one that used it ------------------


@pytest.mark.parametrize("driver", ["httpx", "aiohttp"])
def test_closing_an_async_client_after_the_loop_that_used_it_ended_is_no_crash(
    driver: str, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    # Before (httpx driver): aclose() in a second asyncio.run raised a bare RuntimeError("Event
    # loop is closed") from the first loop's connections; at the end of `async with client:` it
    # replaced the ConfigurationError that says what was wrong.
    def made() -> AsyncFluxClient:
        return AsyncFluxClient(
            "laozhang",
            api_key="test-key",
            base_url=emulator.base_url("laozhang"),
            driver=driver,  # type: ignore[arg-type]
        )

    # The loops end with the client's connections open (that is the point): they are collected
    # in here, where the warnings of sockets left unclosed are not the test's failure.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        run_both_closings(made, caplog)
        gc.collect()


def run_both_closings(
    made: Callable[[], AsyncFluxClient], caplog: pytest.LogCaptureFixture
) -> None:
    """``aclose()`` in a later ``asyncio.run``, then ``async with`` around a later one."""
    request = EditRequest(prompt="p", model="flux-2-pro")
    client = made()
    assert asyncio.run(client.edit(request)).provider == "laozhang"
    with caplog.at_level(logging.WARNING, logger="flux_adapters"):
        asyncio.run(client.aclose())
    assert client.is_closed
    assert "closed in another event loop" in caplog.text  # the connections left: said, once
    with pytest.raises(errors.ClientClosedError):
        asyncio.run(client.edit(request))

    client = made()
    asyncio.run(client.edit(request))

    async def again(used: AsyncFluxClient) -> None:
        async with used:
            await used.edit(request)

    with pytest.raises(errors.ConfigurationError, match="another event loop"):
        asyncio.run(again(client))
    assert client.is_closed


# --- a Downloader of the caller's own make that answers the wrong type ---------------------------


class Answering:
    """A `Downloader` that writes the image where asked and answers *answer* from every method
    (``"the path as str"`` answers the path it wrote, as a ``str``)."""

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def _answer(self, path: Path | None = None) -> object:
        if self.answer == "the path as str" and path is not None:
            return str(path)
        return self.answer

    def read(self, url: str) -> bytes:
        return self._answer()  # type: ignore[return-value]

    def save(self, url: str, path: Path, *, add_suffix: bool = False) -> Path:
        path.write_bytes(PNG)
        return self._answer(path)  # type: ignore[return-value]

    async def read_async(self, url: str) -> bytes:
        return self.read(url)

    async def save_async(self, url: str, path: Path, *, add_suffix: bool = False) -> Path:
        return self.save(url, path, add_suffix=add_suffix)


@both
def test_a_downloader_answering_the_path_as_str_still_saves(kind: str, tmp_path: Path) -> None:
    # Before: save() read the file back with `saved.open(...)`: AttributeError on a str.
    image = ResultImage(url="https://cdn.example/a.png", downloader=Answering("the path as str"))
    assert save(kind, image, tmp_path / "a.png") == tmp_path / "a.png"
    assert image.format == "png"


@both
@pytest.mark.parametrize("answer", [None, 5, b"\x89PNG"], ids=["None", "int", "bytes"])
def test_a_downloader_saving_without_saying_where_is_a_configuration_error(
    kind: str, answer: object, tmp_path: Path
) -> None:
    # Before: AttributeError ('NoneType' object has no attribute 'open'), from the library.
    image = ResultImage(url="https://cdn.example/a.png", downloader=Answering(answer))
    with pytest.raises(errors.ConfigurationError, match="save"):
        save(kind, image, tmp_path / "a.png")


@both
@pytest.mark.parametrize("answer", [None, 5, "\x89PNG"], ids=["None", "int", "str"])
def test_a_downloader_reading_what_is_not_bytes_is_a_configuration_error(
    kind: str, answer: object
) -> None:
    # Before: TypeError ('NoneType' object is not subscriptable), from the library.
    image = ResultImage(url="https://cdn.example/a.png", downloader=Answering(answer))
    with pytest.raises(errors.ConfigurationError, match="read"):
        image.read() if kind == "sync" else asyncio.run(image.read_async())


# --- a client's text arguments given as str subclasses whose own methods fail ----------------------


def raising(name: str) -> NoReturn:
    raise RuntimeError(f"{name} was called")


class Touchy(str):
    """A ``str`` whose comparison, hashing, length, iteration and usual methods all raise."""

    def __eq__(self, other: object) -> bool:
        raising("__eq__")

    def __hash__(self) -> int:
        raising("__hash__")

    def __len__(self) -> int:
        raising("__len__")

    def __iter__(self) -> Iterator[str]:
        raising("__iter__")

    def __getitem__(self, key: object) -> str:
        raising("__getitem__")

    def __contains__(self, key: object) -> bool:
        raising("__contains__")

    def lower(self) -> str:
        raising("lower")

    def strip(self, chars: str | None = None) -> str:
        raising("strip")

    def startswith(self, *args: object) -> bool:
        raising("startswith")


TEXT_ARGUMENTS = {
    "provider": "laozhang",
    "api_key": "sk-abc-123",
    "base_url": "http://127.0.0.1:9/laozhang",
    "routing": "ordered",
    "state": "local",
    "budget_period": "total",
    "budget_scope": "x",
    "state_fallback": "none",
    "driver": "httpx",
}


@pytest.mark.parametrize(
    ("client_class", "argument"),
    [
        (client_class, argument)
        for client_class in (FluxClient, AsyncFluxClient)
        for argument in sorted(TEXT_ARGUMENTS)
        if argument != "driver" or client_class is AsyncFluxClient  # FluxClient has no driver=
    ],
)
def test_a_str_subclass_argument_is_taken_by_its_characters(
    client_class: type[FluxClient] | type[AsyncFluxClient],
    argument: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: api_key= and base_url= (len, iteration, hashing, methods), routing=, state=,
    # budget_period= and driver= (comparison) ran the subclass's own methods: whatever they
    # raised came out of the constructor as it was, where every other value is checked.
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    options: dict[str, object] = {"provider": "laozhang"}
    if argument == "routing":
        options = {"providers": ["laozhang"]}
    if argument.startswith("budget"):
        options["budget_usd"] = 1.0
    options[argument] = Touchy(TEXT_ARGUMENTS[argument])
    client = client_class(**options)  # type: ignore[arg-type]
    assert client.providers == ("laozhang",)
    if argument == "base_url":
        assert repr(client).count("http://127.0.0.1:9/laozhang") == 1


# --- resume() of a job made by hand, its texts str subclasses whose own methods fail ------------


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    "name", ["provider", "model", "id", "poll_url", "result_url", "cancel_url"]
)
def test_resuming_a_job_whose_texts_are_str_subclasses_polls_their_characters(
    kind: str, name: str, emulator: Emulator
) -> None:
    # Before: checking the job ran the subclass's __len__ (provider, model, id) or __hash__ (the
    # URLs): a bare RuntimeError from resume(), whose refusals are ConfigurationErrors.
    from flux_adapters.jobs import Job

    fields = {
        "provider": "bfl",
        "model": "flux-2-pro",
        "id": "never-submitted",
        "poll_url": emulator.base_url("bfl") + "/v1/get_result?id=never-submitted",
        "result_url": "https://delivery.example/a.png",
        "cancel_url": "https://api.example/cancel",
    }
    fields[name] = Touchy(fields[name])
    job = Job(**fields)  # type: ignore[arg-type]
    url = emulator.base_url("bfl")

    def resume() -> None:
        if kind == "sync":
            with FluxClient("bfl", api_key="test-key", base_url=url) as client:
                client.resume(job)
            return

        async def resumed() -> None:
            async with AsyncFluxClient("bfl", api_key="test-key", base_url=url) as client:
                await client.resume(job)

        asyncio.run(resumed())

    with pytest.raises(errors.JobNotFound):  # the poll went out, and BFL never heard of it
        resume()
    assert Job.from_dict({**job.to_dict(), name: Touchy(fields[name])}) == Job.from_dict(
        {**job.to_dict(), name: str.__str__(fields[name])}
    )


# --- a reference image URL with a password, echoed back by the provider ---------------------------


@both
def test_a_password_in_an_image_url_echoed_by_the_provider_never_shows(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: the request's repr hid the URLs' user info and query, but the provider's error
    # quoting them carried the password and the token into str(error) and the attempt's log
    # line (only a query parameter named like a signature was masked).
    url = "https://alice:hunter2-PASSWORD@cdn.example/private.png"
    firebase = "https://storage.example/o/b.png?alt=media&token=hunter2-TOKEN"  # signed by token=

    def refuse(request: httpx.Request) -> httpx.Response:
        message = f"cannot fetch {url} nor {firebase}: 404"
        return httpx.Response(400, json={"error": {"message": message}})

    request = EditRequest(prompt="p", model="flux-2-pro", images=[url, firebase])
    transport = httpx.MockTransport(refuse)

    def edit() -> None:
        if kind == "sync":
            http = httpx.Client(transport=transport)
            with http, FluxClient("laozhang", api_key="test-key", http_client=http) as client:
                client.edit(request)
            return

        async def edited() -> None:
            http = httpx.AsyncClient(transport=transport)
            async with (
                http,
                AsyncFluxClient("laozhang", api_key="test-key", http_client=http) as client,
            ):
                await client.edit(request)

        asyncio.run(edited())

    with (
        caplog.at_level(logging.DEBUG, logger="flux_adapters"),
        pytest.raises(errors.ProviderRejected) as raised,
    ):
        edit()
    shown = f"{raised.value} {raised.value!r} {raised.value.detail} {caplog.text}"
    assert "hunter2" not in shown
    assert "https://[redacted]@cdn.example/private.png" in str(raised.value)
    assert "https://storage.example/o/b.png?[redacted]" in str(raised.value)


# --- save() over an existing file keeps who may read it ------------------------------------------


@both
@pytest.mark.parametrize("add_suffix", [False, True])
def test_saving_over_a_private_file_keeps_it_private(
    kind: str, add_suffix: bool, tmp_path: Path
) -> None:
    # Before: the image was written to a new file (0666 less the umask) renamed over the old
    # one: a file kept 0600 became readable by everyone, as cp would never make it.
    image = ResultImage(b64_json=base64.b64encode(PNG).decode())
    existing = tmp_path / "private.png"
    existing.write_bytes(b"old")
    existing.chmod(0o600)
    target = tmp_path / "private" if add_suffix else existing
    saved = (
        image.save(target, add_suffix=add_suffix)
        if kind == "sync"
        else asyncio.run(image.save_async(target, add_suffix=add_suffix))
    )
    assert saved == existing
    assert existing.read_bytes() == PNG
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    fresh = image.save(tmp_path / "fresh.png")  # a new file: the usual permissions, as before
    usual = tmp_path / "usual"
    usual.touch()  # 0666 less the umask
    assert stat.S_IMODE(fresh.stat().st_mode) == stat.S_IMODE(usual.stat().st_mode)


# --- edit_many() given requests or names in no order ---------------------------------------------


@pytest.mark.parametrize("shape", ["set", "frozenset", "dict"])
def test_requests_in_no_order_are_refused_before_anything_is_sent(
    shape: str, emulator: Emulator, tmp_path: Path
) -> None:
    # Before: a set was run in its iteration order, which changes from one process to the next
    # (str hashing is salted): the journal's jobs, named by their place, each held another
    # request on a rerun, so every job was "changed" and force=True paid for all of them again.
    # A dict ran its keys, as requests that were no requests.
    requests = [EditRequest(prompt=f"p{n}", model="flux-2-pro") for n in range(3)]
    given: object = {
        "set": set(requests),
        "frozenset": frozenset(requests),
        "dict": {f"job{n}": request for n, request in enumerate(requests)},
    }[shape]
    error = batch_error(emulator, requests=given, output_dir=tmp_path)
    assert isinstance(error, errors.ConfigurationError)
    assert "in order" in str(error)
    if shape == "dict":
        assert "names=list(" in str(error)


def test_names_in_no_order_are_refused_and_a_dicts_keys_taken(
    emulator: Emulator, tmp_path: Path
) -> None:
    # Before: a set of names was paired with the requests in its own order, so images were saved
    # under one another's names.
    error = batch_error(emulator, names={"a", "b"}, output_dir=tmp_path)
    assert isinstance(error, errors.ConfigurationError)
    assert "in order" in str(error)

    async def run() -> list[str]:
        request = EditRequest(prompt="p", model="flux-2-pro")
        named = {"robot": request}
        async with AsyncFluxClient(
            "laozhang", api_key="test-key", base_url=emulator.base_url("laozhang")
        ) as client:
            items = client.edit_many(named.values(), names=named.keys(), output_dir=tmp_path)
            return [item.name async for item in items]

    assert asyncio.run(run()) == ["robot"]


# --- a FluxClient made before os.fork(), used on both sides ---------------------------------------


class Counting(http.server.BaseHTTPRequestHandler):
    """Answers every POST as laozhang does; the server counts the connections it accepted."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a provider's server

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        body = json.dumps({"created": 1, "data": [{"url": "https://cdn.example/a.png"}]})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


class CountingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    accepted = 0

    def get_request(self) -> tuple[socket.socket, object]:
        found = super().get_request()
        self.accepted += 1
        return found


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_a_forked_child_never_sends_on_its_parents_connection() -> None:
    # Before: the child took the parent's kept-alive connection from the pool it inherited: a
    # request from each at once went out interleaved on one socket, and each could read the
    # other's answer (a paid image handed to the wrong call) or garbage (an ambiguous error).
    with serving(CountingServer(("127.0.0.1", 0), Counting)) as server:
        base_url = f"http://127.0.0.1:{server.server_address[1]}/laozhang"
        client = FluxClient("laozhang", api_key="test-key", base_url=base_url)
        request = EditRequest(prompt="p", model="flux-2-pro")
        client.edit(request)  # the parent's connection, kept alive in the pool
        assert server.accepted == 1
        with warnings.catch_warnings():  # Python 3.12+ warns of forking a process with threads
            warnings.simplefilter("ignore", DeprecationWarning)
            child = os.fork()
        if child == 0:  # the child: one edit, then out without running pytest's teardown
            try:
                client.edit(request)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        assert server.accepted == 2  # the child connected on its own
        client.edit(request)  # the parent's own connection still serves it
        assert server.accepted == 2
        client.close()
