"""A hostile or careless provider package: what it registers, raises and returns is typed.

Each test installs provider packages of its own: modules written to a temporary folder, found
through entry points handed to a fresh registry (nothing installed, nothing shared with the
other tests), or adapters given to the client directly.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import io
import json
import logging
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient, errors, providers
from flux_adapters.cli import main
from flux_adapters.jobs import Done, Job, Polling, Submitted
from flux_adapters.limits import IntRange, ModelLimits, NumberRange, RatioRule, SizeRule
from flux_adapters.prices import PerCall, PerMegapixel
from flux_adapters.providers import Answer, KeyAuth, get_adapter
from flux_adapters.providers.bfl import BflAdapter
from flux_adapters.providers.laozhang import LaozhangAdapter
from flux_adapters.result import EditResult, ResultImage, Usage
from tests.test_jobs import KEY as JOBS_KEY
from tests.test_jobs import T2I, Both, FakeBfl, both, run

QUICK = Polling(first=0.001, factor=1.5, longest=0.005, jitter=0.0, deadline=2.0)

GROUP = "flux_adapters.providers"

ADAPTER = """
from flux_adapters.providers.laozhang import LaozhangAdapter

class Adapter(LaozhangAdapter):
    name = {name!r}
    env_prefix = "PLUGIN"
"""
"""A working adapter, as a provider package would write it (the body of laozhang's)."""


class Plugins:
    """Provider packages installed for one test: ``add(id, source)`` writes one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.points: list[importlib.metadata.EntryPoint] = []

    def add(self, name: str, source: str, *, package: str | None = None) -> str:
        """A module holding *source*, registered as *name* by *package*; returns the module."""
        module = f"plugin_{uuid.uuid4().hex[:12]}"
        (self.folder / f"{module}.py").write_text(textwrap.dedent(source))
        point = importlib.metadata.EntryPoint(name, f"{module}:Adapter", GROUP)
        self.points.append(point._for(SimpleNamespace(name=package or f"{module}-dist")))  # type: ignore[attr-defined]
        return module


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Plugins]:
    installed = Plugins(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(providers, "_REGISTRY", providers._Registry())

    def entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        return [point for point in installed.points if point.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    before = set(sys.modules)
    yield installed
    for name in set(sys.modules) - before:
        if name.startswith("plugin_"):
            del sys.modules[name]


def test_a_working_plugin_loads(plugins: Plugins) -> None:
    plugins.add("pixelforge", ADAPTER.format(name="pixelforge"))
    assert get_adapter("pixelforge").name == "pixelforge"


def test_two_packages_claiming_one_id_load_neither_and_are_both_named(plugins: Plugins) -> None:
    # The first one found was used and the other ignored without a word: which adapter (and
    # which billing rules) served "pixelforge" depended on the order of sys.path.
    plugins.add("pixelforge", ADAPTER.format(name="pixelforge"), package="pixelforge-official")
    plugins.add("PixelForge", ADAPTER.format(name="pixelforge"), package="pixelforge-fork")
    for _ in range(2):  # and the second time alike: nothing was cached
        with pytest.raises(errors.ConfigurationError) as caught:
            get_adapter("pixelforge")
        message = str(caught.value)
        assert "pixelforge-official" in message
        assert "pixelforge-fork" in message
    assert "pixelforge" in providers.PROVIDERS  # listed, so that `models` can say why


class Odd(BaseException):
    """Not an Exception: what a plugin may raise by mistake (a sentinel, a framework's own)."""


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


@pytest.mark.parametrize(
    ("raised", "shown"),
    [
        ("raise tests.test_attack_plugins.Odd('half imported')", "Odd: half imported"),
        ("raise tests.test_attack_plugins.Unprintable()", "Unprintable"),
        ("raise RecursionError('deep')", "RecursionError: deep"),
    ],
)
def test_a_plugin_failing_at_import_in_any_way_is_a_configuration_error(
    plugins: Plugins, raised: str, shown: str
) -> None:
    plugins.add("pixelforge", f"import tests.test_attack_plugins\n{raised}\n")
    with pytest.raises(errors.ConfigurationError, match="could not be loaded") as caught:
        get_adapter("pixelforge")
    assert shown in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_keyboard_interrupt_while_a_plugin_loads_stays_one(plugins: Plugins) -> None:
    plugins.add("pixelforge", "raise KeyboardInterrupt\n")
    plugins.add("other", "raise SystemExit(3)\n")
    with pytest.raises(KeyboardInterrupt):
        get_adapter("pixelforge")
    with pytest.raises(SystemExit):
        get_adapter("other")


def test_a_plugin_that_loads_another_plugin_at_import_does_not_deadlock(
    plugins: Plugins,
) -> None:
    plugins.add("base-forge", ADAPTER.format(name="base-forge"))
    plugins.add(
        "pixelforge",
        """
        from flux_adapters.providers import get_adapter
        from flux_adapters.providers.laozhang import LaozhangAdapter

        BASE = get_adapter("base-forge")

        class Adapter(LaozhangAdapter):
            name = "pixelforge"
            env_prefix = "PLUGIN"
        """,
    )
    assert get_adapter("pixelforge").name == "pixelforge"


def test_a_plugin_that_loads_itself_at_import_is_a_configuration_error(plugins: Plugins) -> None:
    plugins.add(
        "pixelforge",
        """
        from flux_adapters.providers import get_adapter

        get_adapter("pixelforge")
        """,
    )
    with pytest.raises(errors.ConfigurationError, match="asks for itself while it is loaded"):
        get_adapter("pixelforge")


def test_a_slow_plugin_does_not_hold_up_loading_another(plugins: Plugins) -> None:
    # One lock for every id: a plugin whose import waits (on a thread of its own that loads
    # another provider, on a lock of the application) held every other provider's load.
    started, release = threading.Event(), threading.Event()
    sys.modules["tests.plugin_gate"] = SimpleNamespace(started=started, release=release)  # type: ignore[assignment]
    try:
        plugins.add("base-forge", ADAPTER.format(name="base-forge"))
        plugins.add(
            "slowforge",
            """
            import sys
            from flux_adapters.providers.laozhang import LaozhangAdapter

            gate = sys.modules["tests.plugin_gate"]
            gate.started.set()
            gate.release.wait()

            class Adapter(LaozhangAdapter):
                name = "slowforge"
                env_prefix = "PLUGIN"
            """,
        )
        loaded: list[str] = []
        slow = threading.Thread(target=lambda: loaded.append(get_adapter("slowforge").name))
        slow.start()
        try:
            assert started.wait(timeout=30)
            other = threading.Thread(target=lambda: loaded.append(get_adapter("base-forge").name))
            other.start()
            other.join(timeout=30)
            assert loaded == ["base-forge"]  # while slowforge still imports
        finally:
            release.set()
            slow.join(timeout=30)
        assert loaded == ["base-forge", "slowforge"]
    finally:
        del sys.modules["tests.plugin_gate"]


def test_two_threads_loading_one_plugin_import_it_once(plugins: Plugins) -> None:
    plugins.add(
        "pixelforge",
        """
        import sys
        from flux_adapters.providers.laozhang import LaozhangAdapter

        sys.modules["tests.plugin_count"].count += 1

        class Adapter(LaozhangAdapter):
            name = "pixelforge"
            env_prefix = "PLUGIN"
        """,
    )
    counter = SimpleNamespace(count=0)
    sys.modules["tests.plugin_count"] = counter  # type: ignore[assignment]
    try:
        found: list[object] = []
        threads = [
            threading.Thread(target=lambda: found.append(get_adapter("pixelforge")))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert counter.count == 1
        assert len(found) == 4
        assert all(adapter is found[0] for adapter in found)
    finally:
        del sys.modules["tests.plugin_count"]


# --- What an adapter's methods raise or return ---------------------------------------------

KEY = "sk-live-7Qw2Zr9XbT4mKp1VfH8sLd3NcY6gJa0E"
REQUEST = EditRequest(prompt="a robot", model="flux-2-pro")
RESULT_URL = "https://cdn.example/results/a.png"
OK = {"created": 1, "data": [{"url": RESULT_URL}]}


class Hostile(LaozhangAdapter):
    """laozhang's adapter, with one method replaced by what a provider package got wrong."""

    name = "hostile"
    env_prefix = "HOSTILE"

    def __init__(self, **methods: Callable[..., Any]) -> None:
        self._methods = methods

    def build_request(self, *args: Any) -> Any:
        if "build_request" in self._methods:
            return self._methods["build_request"](*args)
        return super().build_request(*args)

    def parse_response(self, response: Any) -> Any:
        if "parse_response" in self._methods:
            return self._methods["parse_response"](response)
        return super().parse_response(response)

    def parse_error(self, response: Any) -> Any:
        if "parse_error" in self._methods:
            return self._methods["parse_error"](response)
        return super().parse_error(response)


def raising(error: BaseException) -> Callable[..., Any]:
    def method(*args: Any) -> Any:
        raise error

    return method


def edited(adapter: object, status: int = 200, body: object = OK) -> tuple[object, list[object]]:
    """What ``edit`` ends with on FluxClient and on AsyncFluxClient: the result or the error."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(status, json=body)

    outcomes: list[object] = []
    transport = httpx.MockTransport(handler)
    with httpx.Client(transport=transport) as http:
        client = FluxClient(adapter, api_key=KEY, http_client=http)  # type: ignore[arg-type]
        try:
            outcomes.append(client.edit(REQUEST))
        except errors.FluxError as error:
            outcomes.append(error)

    async def main() -> None:
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient(adapter, api_key=KEY, http_client=http)  # type: ignore[arg-type]
            try:
                outcomes.append(await client.edit(REQUEST))
            except errors.FluxError as error:
                outcomes.append(error)

    asyncio.run(main())
    return outcomes[0], [outcomes[1], len(sent)]


ODDITIES: dict[str, BaseException] = {
    "base-exception": Odd("adapter bug"),
    "unprintable": Unprintable(),
    "stop-iteration": StopIteration(),
    "recursion": RecursionError("deep"),
}


@pytest.mark.parametrize("raised", ODDITIES.values(), ids=ODDITIES.keys())
def test_whatever_build_request_raises_is_a_request_error_with_nothing_sent(
    raised: BaseException,
) -> None:
    sync, (async_, sent) = edited(Hostile(build_request=raising(raised)))
    assert isinstance(sync, errors.RequestError)
    assert isinstance(async_, errors.RequestError)
    assert "hostile could not build it" in str(sync)
    assert sent == 0


@pytest.mark.parametrize("raised", ODDITIES.values(), ids=ODDITIES.keys())
@pytest.mark.parametrize("method", ["parse_response", "parse_error"])
def test_whatever_the_parse_methods_raise_is_a_response_format_error(
    raised: BaseException, method: str
) -> None:
    status = 200 if method == "parse_response" else 400
    sync, (async_, sent) = edited(Hostile(**{method: raising(raised)}), status)
    for outcome in (sync, async_):
        assert isinstance(outcome, errors.ResponseFormatError)
        assert outcome.status_code == status
    assert sent == 2


def test_an_interruption_in_an_adapter_method_stays_one() -> None:
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, json=OK))) as h:
        client = FluxClient(
            Hostile(parse_response=raising(KeyboardInterrupt())), api_key=KEY, http_client=h
        )
        with pytest.raises(KeyboardInterrupt):
            client.edit(REQUEST)


ERRORS_RETURNED: dict[str, object] = {
    "none": None,
    "keyboard-interrupt": KeyboardInterrupt(),  # raised as it is, it stopped the program
    "base-exception": Odd("an error?"),
    "text": "bad request",
    "request-error": errors.RequestError([]),
}


@pytest.mark.parametrize("returned", ERRORS_RETURNED.values(), ids=ERRORS_RETURNED.keys())
def test_parse_error_returning_no_provider_error_is_a_response_format_error(
    returned: object,
) -> None:
    sync, (async_, sent) = edited(Hostile(parse_error=lambda response: returned), 400)
    for outcome in (sync, async_):
        assert isinstance(outcome, errors.ResponseFormatError), repr(outcome)
        assert outcome.status_code == 400
    assert sent == 2


def test_a_provider_error_with_a_detail_that_is_no_text_is_still_typed() -> None:
    def parse_error(response: Any) -> errors.ProviderError:
        error = errors.ProviderError("refused", provider="hostile", status_code=400)
        error.detail = 5  # type: ignore[assignment]
        error.code = ["x"]  # type: ignore[assignment]
        return error

    sync, (async_, _) = edited(Hostile(parse_error=parse_error), 400)
    for outcome in (sync, async_):
        assert isinstance(outcome, errors.ProviderError)
        assert outcome.status_code == 400


def _echoing(kind: type[errors.ProviderError]) -> Callable[[Any], errors.ProviderError]:
    """A parse_error that puts the answer's text in its message, as careless adapters do."""

    def parse_error(response: Any) -> errors.ProviderError:
        return kind(f"refused: {response.text()}", provider="laozhang", status_code=400)

    return parse_error


def _raising_echo(response: Any) -> Any:
    raise errors.ResponseFormatError(
        f"unreadable: {response.text()}", provider="laozhang", status_code=200
    )


ECHOED: dict[str, tuple[int, Callable[..., Any]]] = {
    "parse-error": (400, _echoing(errors.ProviderRejected)),
    "parse-response": (200, _raising_echo),
}


@pytest.mark.parametrize(("status", "method"), ECHOED.values(), ids=ECHOED.keys())
def test_a_key_echoed_into_an_adapters_own_message_never_shows_and_the_adapter_is_named(
    status: int, method: Callable[..., Any]
) -> None:
    # The provider repeats the key it was sent; the adapter writes the answer into its message
    # (the detail was redacted, the message was not) and names a provider it was copied from.
    name = "parse_error" if status >= 300 else "parse_response"
    sync, (async_, _) = edited(Hostile(**{name: method}), status, {"echo": f"key {KEY}"})
    for outcome in (sync, async_):
        assert isinstance(outcome, errors.ProviderError)
        assert KEY not in str(outcome)
        assert KEY not in repr(outcome)
        assert KEY[:12] not in str(outcome)
        assert outcome.provider == "hostile"
        assert str(outcome).startswith("hostile: ")


class EchoingJobs(BflAdapter):
    """BFL's adapter whose job outcome quotes the poll's answer in its message."""

    name = "echoing-jobs"

    def parse_poll(self, response: Any, job: Job) -> Any:
        raise errors.JobFailed(
            f"failed: {response.text()}", provider="bfl", job_id=job.id, billed=None
        )


@both
def test_a_key_echoed_into_a_job_adapters_message_never_shows(kind: str) -> None:
    fake = FakeBfl(outcome={"status": "Error", "echo": f"your key {JOBS_KEY}"}, pending=0)
    with pytest.raises(errors.JobFailed) as caught:
        run(kind, fake, T2I, provider=EchoingJobs(), polling=QUICK)
    assert JOBS_KEY not in str(caught.value)
    assert JOBS_KEY[:12] not in str(caught.value)
    assert caught.value.provider == "echoing-jobs"
    assert caught.value.job is not None  # the job it ended keeps its id, to be looked up


ESCAPES = "\x1b[2J\x1b]0;pwned\x07"
"""What a hostile provider writes to clear a terminal and retitle it."""


def test_a_providers_escape_sequences_quoted_by_an_adapter_never_reach_the_terminal() -> None:
    def parse_error(response: Any) -> errors.ProviderError:
        text = response.json()["say"]
        return errors.ProviderRejected(
            f"refused: {text}", provider="hostile", status_code=400, detail=text, code=text
        )

    sync, (async_, _) = edited(Hostile(parse_error=parse_error), 400, {"say": ESCAPES})
    for outcome in (sync, async_):
        assert isinstance(outcome, errors.ProviderRejected)
        assert str(outcome).isprintable()
        assert "\\x1b[2J" in str(outcome)  # shown escaped, as the built-in adapters show it
        assert outcome.code is not None
        assert outcome.code.isprintable()


class EscapingJobs(BflAdapter):
    """BFL's adapter taking the job id as the provider gave it, escape sequences and all."""

    name = "escaping-jobs"

    def parse_submit(self, response: Any) -> Submitted:
        return attrs.evolve(super().parse_submit(response), id=f"job-1{ESCAPES}")


@both
@pytest.mark.parametrize("ending", ["deadline", "refused-poll"])
def test_a_job_id_with_escape_sequences_is_shown_escaped(kind: str, ending: str) -> None:
    fake = FakeBfl(pending=10**6)
    if ending == "refused-poll":
        fake = FakeBfl(poll_faults=[httpx.Response(403, json={"detail": "no"})])
    polling = attrs.evolve(QUICK, deadline=0.05)
    with pytest.raises(errors.FluxError) as caught:
        run(kind, fake, T2I, provider=EscapingJobs(), polling=polling)
    assert caught.value.job is not None
    assert caught.value.job.id == f"job-1{ESCAPES}"  # kept whole, to be polled again
    assert str(caught.value).isprintable(), str(caught.value)


# --- What an adapter declares: checked when it is loaded -----------------------------------


def declaring(**declared: Any) -> type[LaozhangAdapter]:
    """An adapter class (laozhang's) that declares *declared* as well, as class attributes."""
    return type("Declaring", (LaozhangAdapter,), {"name": "declaring", **declared})


NOT_TAKEN_REFUSED: dict[str, object] = {
    "2xx": {200: "our document"},  # an unreadable 200 would be failed over: paid twice
    "204": {204: "our document"},
    "3xx": {302: "our document"},
    "1xx": {100: "our document"},
    "600": {600: "our document"},
    "negative": {-1: "our document"},
    "text-status": {"503": "our document"},
    "bool-status": {True: "our document"},
    "float-status": {500.0: "our document"},
    "no-document": {409: ""},
    "document-not-text": {409: 5},
    "a-list": [409],
    "text": "409",
}


@pytest.mark.parametrize("declared", NOT_TAKEN_REFUSED.values(), ids=NOT_TAKEN_REFUSED.keys())
def test_an_unusable_not_taken_is_refused_when_the_adapter_is_loaded(
    plugins: Plugins, declared: object
) -> None:
    providers.register_provider("declaring", declaring(not_taken=declared))
    with pytest.raises(errors.ConfigurationError, match="not_taken"):
        get_adapter("declaring")
    with pytest.raises(errors.ConfigurationError, match="not_taken"):
        FluxClient(declaring(not_taken=declared)(), api_key=KEY)


def test_a_documented_not_taken_status_is_taken_as_declared(plugins: Plugins) -> None:
    providers.register_provider(
        "declaring", declaring(not_taken={409: "https://docs.example/errors#409", 599: "doc"})
    )
    assert get_adapter("declaring").not_taken == {  # type: ignore[union-attr]
        409: "https://docs.example/errors#409",
        599: "doc",
    }


def test_not_taken_statuses_written_as_http_status_members_are_taken(plugins: Plugins) -> None:
    # HTTPStatus is an int (an IntEnum), the standard library's own name for a status: the
    # exact-int check refused {HTTPStatus.CONFLICT: ...}, which the router had always matched.
    from http import HTTPStatus

    from flux_adapters.routing import billing_rule

    declared = {HTTPStatus.CONFLICT: "https://docs.example/errors#409"}
    providers.register_provider("declaring", declaring(not_taken=declared))
    adapter = get_adapter("declaring")
    conflict = errors.ProviderError("busy", provider="declaring", status_code=409)
    assert billing_rule(conflict, adapter.not_taken).name == "provider-rule"  # type: ignore[union-attr]


def test_a_2xx_slipped_into_not_taken_after_loading_is_still_never_failed_over() -> None:
    # The billing rule reads not_taken on every failure: an adapter may change it after it was
    # checked. An unreadable 200 may have been billed, whatever the adapter says.
    from flux_adapters.routing import billing_rule

    unreadable = errors.ResponseFormatError("unreadable", provider="x", status_code=200)
    assert billing_rule(unreadable, {200: "our document"}) == billing_rule(unreadable)
    redirected = errors.ProviderError("moved", provider="x", status_code=302)
    assert billing_rule(redirected, {302: "our document"}).name != "provider-rule"


def test_failover_after_an_unreadable_200_never_happens_whatever_not_taken_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)  # the adapter is laozhang's, renamed
    adapter = declaring(not_taken={409: "doc"})()
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.host)
        return httpx.Response(200, content=b"not json")

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = FluxClient(
            providers=[adapter, "laozhang"],
            http_client=http,
        )
        adapter.not_taken = {200: "doc"}  # type: ignore[attr-defined]  # after it was checked
        with pytest.raises(errors.FluxError):
            client.edit(REQUEST)
    assert len(sent) == 1


def _limits(**changes: Any) -> dict[str, ModelLimits]:
    row = LaozhangAdapter.limits["flux-2-pro"]
    return {"flux-2-pro": attrs.evolve(row, **changes)}


LIMITS_REFUSED: dict[str, object] = {
    "negative-images": _limits(images=IntRange(-1, 8)),
    "images-upside-down": _limits(images=IntRange(8, 1)),
    "images-not-int": _limits(images=IntRange(0, 8.5)),  # type: ignore[arg-type]
    "images-bool": _limits(images=IntRange(False, True)),
    "size-multiple-zero": _limits(sizes=SizeRule(multiple=0, min_side=64)),
    "size-not-int": _limits(sizes=SizeRule(multiple=16, min_side=64.5)),  # type: ignore[arg-type]
    "size-max-below-min": _limits(sizes=SizeRule(multiple=16, min_side=64, max_side=32)),
    "pixels-negative": _limits(sizes=SizeRule(multiple=16, min_side=64, max_pixels=-1)),
    "prompt-negative": _limits(prompt_max_chars=-5),
    "prompt-text": _limits(prompt_max_chars="4000"),
    "image-bytes-zero": _limits(
        image=attrs.evolve(LaozhangAdapter.limits["flux-2-pro"].image, max_bytes=0)
    ),
    "image-kind-unknown": _limits(
        image=attrs.evolve(
            LaozhangAdapter.limits["flux-2-pro"].image,
            kinds=frozenset({"url", "ftp"}),  # type: ignore[arg-type]
        )
    ),
    "guidance-nan": _limits(guidance=NumberRange(float("nan"), 5.0)),
    "ratio-zero": _limits(ratios=RatioRule(narrowest=(0, 1), widest=(7, 3))),
    "formats-empty": _limits(output_formats=()),
    "formats-text": _limits(output_formats="png"),
    "model-mismatch": {"flux-2-max": LaozhangAdapter.limits["flux-2-pro"]},
    "not-limits": {"flux-2-pro": {"images": 8}},
    "model-not-text": {5: LaozhangAdapter.limits["flux-2-pro"]},
}


@pytest.mark.parametrize("declared", LIMITS_REFUSED.values(), ids=LIMITS_REFUSED.keys())
def test_unusable_limits_are_refused_when_the_adapter_is_loaded(
    plugins: Plugins, declared: object
) -> None:
    # Such a row was taken, and failed later: as a TypeError comparing a float side with a
    # str, a ZeroDivisionError on a grid of 0, or a check that passed every request.
    providers.register_provider("declaring", declaring(limits=declared))
    with pytest.raises(errors.ConfigurationError, match="limits") as caught:
        get_adapter("declaring")
    assert "declaring" in str(caught.value)


# --- What the parse methods return ---------------------------------------------------------


def _image(url: str = RESULT_URL) -> ResultImage:
    return ResultImage(url=url)


RETURNED_REFUSED: dict[str, Callable[[], object]] = {
    "none": lambda: None,
    "dict": lambda: {"images": [RESULT_URL]},
    "images-a-number": lambda: Answer(images=5),  # type: ignore[arg-type]
    "images-urls": lambda: Answer(images=(RESULT_URL,)),  # type: ignore[arg-type]
    "images-unreadable": lambda: Answer(images=raising_iterable()),  # type: ignore[arg-type]
    "a-done": lambda: Done(answer=Answer(images=(_image(),))),
    # A paid call "succeeded" with nothing to show for it; the built-in adapters refuse it.
    "no-image": lambda: Answer(images=()),
    "no-image-generated": lambda: Answer(images=iter(())),  # type: ignore[arg-type]
}


def raising_iterable() -> Iterator[ResultImage]:
    yield _image()
    raise Odd("half way")


@pytest.mark.parametrize("returned", RETURNED_REFUSED.values(), ids=RETURNED_REFUSED.keys())
def test_parse_response_returning_no_answer_is_a_response_format_error(
    returned: Callable[[], object],
) -> None:
    sync, (async_, _) = edited(Hostile(parse_response=lambda response: returned()))
    for outcome in (sync, async_):
        assert isinstance(outcome, errors.ResponseFormatError), repr(outcome)
        assert outcome.status_code == 200


def test_images_given_as_a_generator_or_a_list_are_all_kept() -> None:
    # The images were checked by iterating over them, which used a generator up: the result
    # had no image at all, and the call "succeeded".
    def generated(response: Any) -> Answer:
        return Answer(images=(image for image in (_image(), _image(RESULT_URL + "?2"))))  # type: ignore[arg-type]

    def listed(response: Any) -> Answer:
        return Answer(images=[_image(), _image(RESULT_URL + "?2")])  # type: ignore[arg-type]

    for parse in (generated, listed):
        sync, (async_, _) = edited(Hostile(parse_response=parse))
        for outcome in (sync, async_):
            assert isinstance(outcome, EditResult), repr(outcome)
            assert isinstance(outcome.images, tuple)
            assert [image.url for image in outcome.images] == [RESULT_URL, RESULT_URL + "?2"]


USAGES: dict[str, tuple[object, Usage | None]] = {
    "a-dict": ({"credits_used": 4}, None),
    "a-number": (4, None),
    "credits-text": (Usage(credits_used="4", tokens_used=10), Usage(tokens_used=10)),  # type: ignore[arg-type]
    "credits-nan": (Usage(credits_used=float("nan")), None),
    "credits-negative": (Usage(credits_used=-3.0, output_mp=1.0), Usage(output_mp=1.0)),
    "credits-huge-int": (Usage(credits_used=10**400), None),
    "credits-bool": (Usage(credits_used=True), None),
    "tokens-float": (Usage(tokens_used=1.5, input_mp=0.5), Usage(input_mp=0.5)),  # type: ignore[arg-type]
    "sound": (Usage(credits_used=4, tokens_used=10), Usage(credits_used=4, tokens_used=10)),
}


@pytest.mark.parametrize(("reported", "kept"), USAGES.values(), ids=USAGES.keys())
def test_a_malformed_usage_is_dropped_with_a_warning_and_the_images_kept(
    reported: object, kept: Usage | None, caplog: pytest.LogCaptureFixture
) -> None:
    # A dict there ended the paid call with AttributeError ('dict' object has no attribute
    # 'credits_used') after the image was made; a figure of the wrong type reached cost_usd.
    def parse(response: Any) -> Answer:
        return Answer(images=(_image(),), usage=reported)  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING, logger="flux_adapters"):
        sync, (async_, _) = edited(Hostile(parse_response=parse))
    for outcome in (sync, async_):
        assert isinstance(outcome, EditResult), repr(outcome)
        assert outcome.usage == kept
        assert [image.url for image in outcome.images] == [RESULT_URL]
    if kept != reported:
        assert "usage" in caplog.text
        assert "hostile" in caplog.text
    else:
        assert "usage" not in caplog.text


class HostileJobs(BflAdapter):
    """BFL's adapter, with one parse method replaced by what a provider package got wrong."""

    name = "hostile-jobs"

    def __init__(self, method: str, returned: Callable[[], object]) -> None:
        self._method, self._returned = method, returned

    def parse_submit(self, response: Any) -> Any:
        return (
            self._returned() if self._method == "parse_submit" else super().parse_submit(response)
        )

    def parse_poll(self, response: Any, job: Job) -> Any:
        if self._method == "parse_poll":
            return self._returned()
        return super().parse_poll(response, job)


JOB_RETURNS: dict[str, tuple[str, Callable[[], object]]] = {
    "submit-none": ("parse_submit", lambda: None),
    "submit-dict": ("parse_submit", lambda: {"id": "job-1"}),
    "submit-id-number": (
        "parse_submit",
        lambda: Submitted(
            id=5,  # type: ignore[arg-type]
            poll_url="https://api.eu2.bfl.ai/v1/get_result?id=job-1",
        ),
    ),
    "submit-usage-dict": (
        "parse_submit",
        lambda: Submitted(
            id="job-1",
            poll_url="https://api.eu2.bfl.ai/v1/get_result?id=job-1",
            usage={"credits_used": 3},  # type: ignore[arg-type]
        ),
    ),
    "poll-dict": ("parse_poll", lambda: {"status": "Ready"}),
    "poll-done-dict": ("parse_poll", lambda: Done(answer={"images": []})),  # type: ignore[arg-type]
}


@both
@pytest.mark.parametrize(("method", "returned"), JOB_RETURNS.values(), ids=JOB_RETURNS.keys())
def test_a_job_parse_method_returning_the_wrong_type_is_typed_and_never_resubmitted(
    kind: str, method: str, returned: Callable[[], object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "lz-key-0123456789abcdef")
    monkeypatch.setenv("BFL_API_KEY", JOBS_KEY)
    everything = Both(FakeBfl())
    outcome: object
    try:
        outcome = run(
            kind,
            everything,
            T2I,
            provider=[HostileJobs(method, returned), "laozhang"],
            polling=QUICK,
            # A submit answer that cannot be read is ambiguous: the caller may opt in to fail
            # over on it. Once the job is taken, never, whatever the caller said.
            failover_on_ambiguous=method == "parse_poll",
        )
    except errors.FluxError as error:
        outcome = error
    assert everything.bfl.count("POST") == 1
    assert everything.laozhang == []  # the submit was accepted: never paid twice
    if isinstance(outcome, EditResult):  # a job followed, only a usage it cannot read dropped
        assert method == "parse_submit"
        assert outcome.usage is None
    else:
        assert isinstance(outcome, errors.FluxError)
        assert not isinstance(outcome.__cause__, AttributeError | TypeError)


class NumberedJobs(BflAdapter):
    """BFL's adapter taking the job id as its provider sent it: a number, or not at all."""

    name = "numbered-jobs"

    def __init__(self, ident: object) -> None:
        self.ident = ident

    def parse_submit(self, response: Any) -> Submitted:
        return attrs.evolve(super().parse_submit(response), id=self.ident)  # type: ignore[arg-type]


ENDINGS: dict[str, dict[str, Any]] = {
    "job-failed": {"pending": 0, "outcome": {"status": "Error"}},
    "deadline": {"pending": 10**6},
    "poll-refused": {"poll_faults": [httpx.Response(401, json={"detail": "revoked"})]},
}


@both
@pytest.mark.parametrize("ending", ENDINGS.values(), ids=ENDINGS.keys())
def test_a_numeric_job_id_is_kept_as_its_text_and_every_ending_is_typed(
    kind: str, ending: dict[str, Any]
) -> None:
    # Every error after the acceptance looked for the keys in the id: a bare TypeError, the
    # job it carried lost.
    fake = FakeBfl(**ending)
    polling = attrs.evolve(QUICK, deadline=0.2)
    with pytest.raises(errors.FluxError) as caught:
        run(kind, fake, T2I, provider=NumberedJobs(12345), polling=polling)
    assert caught.value.job is not None
    assert caught.value.job.id == "12345"  # text: it can be journalled and resumed
    assert fake.count("POST") == 1


@both
@pytest.mark.parametrize(
    "ident", [None, 1.5, {"id": 1}, ""], ids=["none", "float", "dict", "empty"]
)
def test_a_job_accepted_with_no_usable_id_is_an_unreadable_acceptance(
    kind: str, ident: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "lz-key-0123456789abcdef")
    monkeypatch.setenv("BFL_API_KEY", JOBS_KEY)
    everything = Both(FakeBfl(pending=0, outcome={"status": "Error"}))
    with pytest.raises(errors.ResponseFormatError, match="id of") as caught:
        run(kind, everything, T2I, provider=[NumberedJobs(ident), "laozhang"], polling=QUICK)
    assert caught.value.status_code == 200  # may have been billed: final, never failed over
    assert everything.laozhang == []
    assert everything.bfl.count("POST") == 1


# --- The command line with a broken provider package installed -----------------------------


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def broken(plugins: Plugins) -> Plugins:
    """A working provider package, one that fails at import, and two that claim one id."""
    plugins.add("goodforge", ADAPTER.format(name="goodforge"))
    plugins.add("brokenforge", "raise ImportError('needs numpy<1')\n", package="brokenforge-dist")
    plugins.add("twinforge", ADAPTER.format(name="twinforge"), package="twin-a")
    plugins.add("twinforge", ADAPTER.format(name="twinforge"), package="twin-b")
    return plugins


@pytest.mark.parametrize("style", [[], ["--markdown"]], ids=["console", "markdown"])
def test_models_lists_every_provider_and_says_which_could_not_be_loaded(
    broken: Plugins, style: list[str]
) -> None:
    # One package failing at import ended the whole command with "unexpected" or a config
    # error: no provider was listed at all, built-in ones included.
    code, out, _ = cli("models", *style)
    assert code == 0
    for listed in ("laozhang", "bfl", "goodforge"):
        assert listed in out
    assert "brokenforge" in out
    assert "needs numpy<1" in out
    assert "twin-a" in out
    assert "twin-b" in out


def test_models_json_gives_the_error_of_each_provider_that_could_not_be_loaded(
    broken: Plugins,
) -> None:
    code, out, _ = cli("models", "--json")
    assert code == 0
    entries = {entry["provider"]: entry for entry in json.loads(out)}
    assert entries["goodforge"]["models"]
    assert "error" not in entries["goodforge"]
    assert entries["brokenforge"]["models"] == []
    assert "needs numpy<1" in entries["brokenforge"]["error"]
    assert "twin-a" in entries["twinforge"]["error"]


def test_explain_explains_for_the_others_and_says_which_could_not_be_loaded(
    broken: Plugins,
) -> None:
    code, out, _ = cli("explain", "a robot", "-m", "flux-2-pro")
    assert code == 0
    sections = dict(part.split("\n", 1) for part in out.split("=== ")[1:])
    assert "POST https://api.laozhang.ai/v1/images/generations" in sections["laozhang"]
    assert "POST https://api.laozhang.ai/v1/images/generations" in sections["goodforge"]
    assert "could not be loaded" in sections["brokenforge"]
    assert "needs numpy<1" in sections["brokenforge"]
    code, out, _ = cli("explain", "a robot", "-m", "flux-2-pro", "--json")
    assert code == 0
    documents = {entry["provider"]: entry for entry in json.loads(out)["providers"]}
    assert documents["goodforge"]["accepted"] is True
    assert documents["brokenforge"]["accepted"] is False
    assert "needs numpy<1" in documents["brokenforge"]["error"]


def test_explain_of_only_a_broken_provider_is_a_configuration_error(broken: Plugins) -> None:
    code, _, err = cli("explain", "a robot", "-p", "brokenforge")
    assert code == 5
    assert "needs numpy<1" in err


def test_check_of_every_provider_checks_the_others_and_says_which_could_not_be_loaded(
    broken: Plugins, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FLUX_PROVIDERS", raising=False)
    monkeypatch.delenv("FLUX_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no flux-adapters.toml: every known provider is checked
    code, out, _ = cli("check", "a robot", "-m", "flux-2-pro")
    assert code == 2  # not every provider can take it: one could not even be loaded
    assert "laozhang: accepted" in out
    assert "goodforge: accepted" in out
    assert "needs numpy<1" in out
    code, out, _ = cli("check", "a robot", "-m", "flux-2-pro", "--json")
    entries = {entry["provider"]: entry for entry in json.loads(out)["providers"]}
    assert entries["goodforge"]["accepted"] is True
    assert "twin-b" in entries["twinforge"]["error"]


DECLARED_REFUSED: dict[str, tuple[str, dict[str, object]]] = {
    "no-model": ("limits", {"limits": {}}),
    "source-not-text": ("limits", {"limits": _limits(source=None)}),
    "edit-wire-model-number": ("limits", {"limits": _limits(edit_wire_model=5)}),
    "price-negative": ("prices", {"prices": {"flux-2-pro": PerCall(usd=-0.01)}}),
    "price-nan": ("prices", {"prices": {"flux-2-pro": PerCall(usd=float("nan"))}}),
    "price-text": ("prices", {"prices": {"flux-2-pro": PerCall(usd="0.03")}}),  # type: ignore[arg-type]
    "price-per-mp-inf": (
        "prices",
        {"prices": {"flux-2-pro": PerMegapixel(usd_first=0.03, usd_extra=float("inf"))}},
    ),
    "price-not-a-price": ("prices", {"prices": {"flux-2-pro": 0.03}}),
    "price-for-no-model-offered": ("prices", {"prices": {"flux-2-klein-4b": PerCall(usd=0.01)}}),
    "prices-a-list": ("prices", {"prices": [PerCall(usd=0.01)]}),
    "credit-text": ("usd_per_credit", {"usd_per_credit": "0.01"}),
    "credit-negative": ("usd_per_credit", {"usd_per_credit": -0.01}),
    "credit-nan": ("usd_per_credit", {"usd_per_credit": float("nan")}),
    "auth-text": ("auth", {"auth": "Bearer"}),
}


@pytest.mark.parametrize(
    ("field", "declared"), DECLARED_REFUSED.values(), ids=DECLARED_REFUSED.keys()
)
def test_unusable_declared_data_is_refused_when_the_adapter_is_loaded(
    plugins: Plugins, field: str, declared: dict[str, object]
) -> None:
    # A negative or NaN price ranked the provider first under routing="cheapest" (or broke the
    # sort); a price that was no Price was ignored without a word; an auth that was no KeyAuth
    # was refused only when a client was built, and broke `models` and `explain` before that.
    providers.register_provider("declaring", declaring(**declared))
    with pytest.raises(errors.ConfigurationError, match=field) as caught:
        get_adapter("declaring")
    assert "declaring" in str(caught.value)


@pytest.mark.parametrize(
    "price",
    [
        PerCall(usd=float("nan")),
        PerCall(usd=-1.0),
        PerCall(usd="free"),  # type: ignore[arg-type]
        PerMegapixel(usd_first=0.03, usd_extra=-1.0),
    ],
    ids=["nan", "negative", "text", "per-mp-negative"],
)
def test_a_callers_price_that_is_no_amount_is_refused_when_the_client_is_built(
    price: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    monkeypatch.setenv("APIYI_API_KEY", KEY)
    with pytest.raises(errors.ConfigurationError, match="prices="):
        FluxClient(
            providers=["laozhang", "apiyi"],
            routing="cheapest",
            prices={("laozhang", "flux-2-pro"): price},  # type: ignore[dict-item]
        )


IDENTITY_REFUSED: dict[str, tuple[str, dict[str, object]]] = {
    "name-line-break": ("name", {"name": "evil\r\nX-Injected: 1"}),
    "name-spaces": ("name", {"name": "pixel forge"}),
    "name-upper": ("name", {"name": "PixelForge"}),
    "prefix-line-break": ("env_prefix", {"env_prefix": "EVIL\nX"}),
    "prefix-equals": ("env_prefix", {"env_prefix": "A=B"}),
    "prefix-empty": ("env_prefix", {"env_prefix": ""}),
    "prefix-number": ("env_prefix", {"env_prefix": 5}),
    "base-url-line-break": ("default_base_url", {"default_base_url": "https://x.example\r\nX: 1"}),
    "base-url-ftp": ("default_base_url", {"default_base_url": "ftp://x.example"}),
    "base-url-number": ("default_base_url", {"default_base_url": 5}),
    "base-url-with-user": ("default_base_url", {"default_base_url": "https://u:p@x.example"}),
}


@pytest.mark.parametrize(
    ("field", "declared"), IDENTITY_REFUSED.values(), ids=IDENTITY_REFUSED.keys()
)
def test_an_adapter_given_to_a_client_must_have_a_usable_name_prefix_and_base_url(
    field: str, declared: dict[str, object]
) -> None:
    # An adapter object given to a client was not checked as a registered one is: a line break
    # in its name went into every message and log line, a prefix into the names of variables,
    # and its default base URL was used as it was (never checked like a configured one).
    with pytest.raises(errors.ConfigurationError, match=field) as caught:
        FluxClient(declaring(**declared)(), api_key=KEY)
    assert "\n" not in str(caught.value)
    assert "\r" not in str(caught.value)


# --- Where an adapter's key may go ---------------------------------------------------------


@pytest.mark.parametrize(
    "hosts",
    [
        "*.bfl.ai",  # a str, not a tuple: its characters were the patterns, "*" among them
        ("*",),
        ("*.ai",),  # every host under a top-level domain
        ("*.*.bfl.ai",),
        ("api.bfl.a?",),
        ("[a-z]*.bfl.ai",),
        ("bfl.*",),
        ("",),
        ("https://api.bfl.ai",),
        (5,),
    ],
    ids=repr,
)
def test_key_hosts_that_would_send_the_key_beyond_the_provider_are_refused(hosts: object) -> None:
    # KeyAuth(hosts="*.bfl.ai") allowed the key to go to https://attacker.example: a polling
    # URL from a hostile or compromised answer carried the user's key away.
    with pytest.raises(errors.ConfigurationError, match="hosts"):
        KeyAuth(hosts=hosts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("hosts", "base"),
    [
        (("*.bfl.ai",), "https://api.bfl.ai"),
        # The declared hosts apply only while the base URL is at one of them (the provider's
        # own API): here localhost, not api.bfl.ai, which this adapter does not declare.
        (("localhost", "api.eu.bfl.ai"), "https://localhost:8443"),
        (["*.bfl.ai"], "https://api.bfl.ai"),
    ],
)
def test_key_hosts_naming_the_providers_own_hosts_are_taken(hosts: object, base: str) -> None:
    auth = KeyAuth(hosts=hosts)  # type: ignore[arg-type]
    assert isinstance(auth.hosts, tuple)
    assert auth.allows("https://api.eu.bfl.ai/v1/get_result", base)
    assert not auth.allows("https://attacker.example/v1/get_result", base)


def _odd_property(self: object) -> object:
    raise Odd("property")


@pytest.mark.parametrize(
    "attribute", ["name", "limits", "not_taken", "prices", "auth", "env_prefix"]
)
def test_an_adapter_attribute_raising_anything_is_a_configuration_error(
    plugins: Plugins, attribute: str
) -> None:
    providers.register_provider("declaring", declaring(**{attribute: property(_odd_property)}))
    with pytest.raises(errors.ConfigurationError):
        get_adapter("declaring")


def test_limits_whose_items_raise_anything_are_a_configuration_error(plugins: Plugins) -> None:
    class Limits(dict[str, ModelLimits]):
        def items(self) -> Any:
            raise Odd("items")

    providers.register_provider("declaring", declaring(limits=Limits(LaozhangAdapter.limits)))
    with pytest.raises(errors.ConfigurationError, match="limits"):
        get_adapter("declaring")


def test_an_entry_point_under_an_unusable_id_is_named_when_that_id_is_asked_for(
    plugins: Plugins, caplog: pytest.LogCaptureFixture
) -> None:
    # It was dropped without a word: "unknown provider", as if the package were not installed.
    plugins.add("Pixel Forge", ADAPTER.format(name="pixelforge"), package="pixel-forge-dist")
    with (
        caplog.at_level(logging.WARNING, logger="flux_adapters"),
        pytest.raises(errors.ConfigurationError) as caught,
    ):
        get_adapter("pixel forge")
    assert "pixel-forge-dist" in str(caught.value)
    assert "not a usable provider id" in str(caught.value)
    assert "pixel-forge-dist" in caplog.text


class _Unreadable:
    """An installed package whose entry_points.txt has a line without "=" (in any group)."""

    name = "careless-dist"

    @property
    def entry_points(self) -> Any:
        raise TypeError("Pair.__new__() missing 1 required positional argument: 'value'")


def test_a_package_whose_entry_points_cannot_be_parsed_hides_no_other_provider(
    plugins: Plugins, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # importlib.metadata parses every package's entry points before it filters by group: one
    # unparsable file made every lookup of a provider package's id a bare TypeError.
    plugins.add("pixelforge", ADAPTER.format(name="pixelforge"), package="pixelforge-dist")

    def entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        raise TypeError("Pair.__new__() missing 1 required positional argument: 'value'")

    good = SimpleNamespace(
        name="pixelforge-dist", entry_points=importlib.metadata.EntryPoints(plugins.points)
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [_Unreadable(), good])
    with caplog.at_level(logging.WARNING, logger="flux_adapters"):
        assert get_adapter("pixelforge").name == "pixelforge"
    assert "pixelforge" in providers.PROVIDERS
    assert "'careless-dist' cannot be read" in caplog.text
    with pytest.raises(errors.ConfigurationError, match="unknown provider"):
        get_adapter("nosuchforge")


def test_an_entry_point_claiming_a_built_in_id_is_ignored_with_a_warning(
    plugins: Plugins, caplog: pytest.LogCaptureFixture
) -> None:
    plugins.add("LaoZhang", ADAPTER.format(name="laozhang"), package="laozhang-fork")
    with caplog.at_level(logging.WARNING, logger="flux_adapters"):
        assert providers.PROVIDERS["laozhang"] == "built in"
    assert type(get_adapter("laozhang")) is LaozhangAdapter
    assert "laozhang-fork" in caplog.text
    assert "built in" in caplog.text


@pytest.mark.parametrize(
    "source",
    [
        "raise RuntimeError('needs a GPU')\n",
        "raise tests.test_attack_plugins.Odd('needs a GPU')\n",
        "def broken(:\n",
    ],
    ids=["runtime-error", "base-exception", "syntax-error"],
)
def test_conformance_with_an_adapter_module_failing_at_import_is_a_configuration_error(
    plugins: Plugins, source: str, tmp_path: Path
) -> None:
    # Only ImportError and AttributeError were caught: anything else the module raised ended
    # the command as "unexpected", with a traceback.
    module = plugins.add("unused", f"import tests.test_attack_plugins\n{source}")
    code, _, err = cli(
        "conformance", "--adapter", f"{module}:Adapter", "--report-dir", str(tmp_path / "out")
    )
    assert code == 5
    assert "could not be loaded" in err
    assert "Traceback" not in err


# --- A reseller adapter that reuses another provider's limits rows -------------------------


class Reseller(LaozhangAdapter):
    """A "laozhang-compatible" reseller: laozhang's wire and its limits rows, as they are."""

    name = "reseller"
    env_prefix = "RESELLER"
    default_base_url = "https://api.reseller.example"


def test_a_request_refused_by_a_reseller_reusing_rows_names_the_reseller() -> None:
    # The rows say provider="laozhang": the refusal named laozhang, and its RequestError too,
    # though laozhang was not even configured.
    too_many = EditRequest(prompt="a robot", model="flux-2-pro", images=[b"x"] * 9)
    with pytest.raises(errors.RequestError) as caught:
        FluxClient(Reseller(), api_key=KEY).edit(too_many)
    assert caught.value.provider == "reseller"
    assert "laozhang" not in str(caught.value)


def test_a_price_given_for_a_reseller_reusing_rows_is_the_one_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The price was looked up under the rows' provider: the caller's price for the reseller was
    # never used, and laozhang's own price (or the caller's price for laozhang) was used instead.
    monkeypatch.setenv("RESELLER_API_KEY", KEY)
    monkeypatch.setenv("APIYI_API_KEY", KEY)
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(200, json=OK)

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = FluxClient(
            providers=["apiyi", Reseller()],
            routing="cheapest",
            prices={("reseller", "flux-2-pro"): PerCall(usd=0.0001)},
            http_client=http,
        )
        result = client.edit(REQUEST)
    assert result.provider == "reseller"
    assert result.cost_usd == pytest.approx(0.0001)
    assert hosts == ["api.reseller.example"]


def test_an_adapter_class_given_in_place_of_an_adapter_is_refused_with_the_fix() -> None:
    # The class passed every check (its attributes are class attributes, its methods callable)
    # and each call then failed as "laozhang could not build it ... missing 1 required
    # positional argument", an adapter bug, though the adapter was fine.
    with pytest.raises(errors.ConfigurationError, match=r"LaozhangAdapter\(\)"):
        FluxClient(LaozhangAdapter, api_key=KEY)  # type: ignore[arg-type]
    with pytest.raises(errors.ConfigurationError, match=r"LaozhangAdapter\(\)"):
        FluxClient(providers=[LaozhangAdapter, "apiyi"])  # type: ignore[list-item]


def test_models_shows_a_plugins_text_as_text_not_as_console_markup(plugins: Plugins) -> None:
    # A wire id "flux[/]pro" was read as rich markup: `models` ended with MarkupError, exit 1;
    # "[bold]" in a source restyled the table.
    row = attrs.evolve(
        LaozhangAdapter.limits["flux-2-pro"], wire_model="flux[/]pro", source="doc [bold]x"
    )
    providers.register_provider("declaring", declaring(limits={"flux-2-pro": row}))
    code, out, err = cli("models")
    assert code == 0, err
    assert "flux[/]pro" in out
    assert "doc [bold]x" in out


@pytest.mark.parametrize(
    "changes",
    [
        {"wire_model": "flux-2-pro\x1b[2J"},
        {"source": "https://docs.example\r\nInjected: yes"},
        {"output_formats": ("png", "jp\u202eeg")},
    ],
    ids=["wire-model-escape", "source-line-break", "format-bidi"],
)
def test_declared_text_with_control_characters_is_refused_when_loaded(
    plugins: Plugins, changes: dict[str, object]
) -> None:
    # Such text reached the terminal through `models` and `explain`, and the wire as it was.
    row = attrs.evolve(LaozhangAdapter.limits["flux-2-pro"], **changes)  # type: ignore[arg-type]
    providers.register_provider("declaring", declaring(limits={"flux-2-pro": row}))
    with pytest.raises(errors.ConfigurationError, match="control") as caught:
        get_adapter("declaring")
    assert "\x1b" not in str(caught.value)
    assert "\r" not in str(caught.value)


@pytest.mark.parametrize(
    "model", ["flux-2-pro\x1b[2J", "flux-2-pro\r\nInjected: yes", "flux-2-pro\u202e"]
)
def test_a_model_id_with_control_characters_is_refused_when_loaded(
    plugins: Plugins, model: str
) -> None:
    # The key of a limits row went to the terminal as it was: `models` cleared the screen.
    base = LaozhangAdapter.limits["flux-2-pro"]
    row = attrs.evolve(base, model=model)
    limits = {"flux-2-pro": base, model: row}
    providers.register_provider("declaring", declaring(limits=limits))
    with pytest.raises(errors.ConfigurationError, match="printable") as caught:
        get_adapter("declaring")
    assert model not in str(caught.value)
    code, out, err = cli("models")
    assert code == 0, err
    assert "\x1b" not in out + err
    assert "\r" not in out + err
    assert "\u202e" not in out + err


class CancelRaises(BflAdapter):
    """BFL's adapter whose cancel and job_failure raise what no adapter should."""

    name = "cancel-raises"

    def build_cancel(self, job: Job) -> Any:
        raise Odd("cancel")

    def job_failure(self, response: Any, job: Job) -> Any:
        raise Odd("failure")


@both
def test_a_cancel_that_raises_anything_still_ends_the_job_as_timed_out(kind: str) -> None:
    # The cancel is built when the deadline passes: an exception outside Exception there hid
    # the JobTimeout (and the job it carries) behind the adapter's own.
    brief = Polling(first=0.001, factor=1.5, longest=0.005, jitter=0.0, deadline=0.05)
    with pytest.raises(errors.JobTimeout) as caught:
        run(kind, FakeBfl(pending=10**6), T2I, provider=CancelRaises(), polling=brief)
    assert caught.value.job is not None


# --- "Not billed" only where a job was accepted --------------------------------------------


def _unbilled(*args: Any) -> errors.JobFailed:
    return errors.JobFailed("generation failed", provider="hostile", job_id="-", billed=False)


def raising_unbilled(*args: Any) -> Any:
    raise _unbilled()


@pytest.mark.parametrize(
    ("status", "methods"),
    [
        (200, {"parse_response": raising_unbilled}),  # a 200 that may have been billed
        (500, {"parse_error": _unbilled}),  # a 500 that may have been billed
        (502, {"parse_error": raising_unbilled}),
    ],
    ids=["200-parse-response-raises", "500-parse-error-returns", "502-parse-error-raises"],
)
def test_a_synchronous_adapter_cannot_call_an_ambiguous_answer_unbilled(
    status: int, methods: dict[str, Callable[..., Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # JobFailed(billed=False) is the row "a job the provider accepted failed, not charged":
    # raised by a synchronous adapter (no job at all) for a 200 or a 5xx, it made the router
    # fail over after an answer that may have been billed: the image paid twice.
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    monkeypatch.setenv("HOSTILE_API_KEY", KEY)
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(status, json=OK)

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = FluxClient(providers=[Hostile(**methods), "laozhang"], http_client=http)
        with pytest.raises(errors.FluxError) as caught:
            client.edit(REQUEST)
    assert hosts == ["api.laozhang.ai"]  # Hostile is laozhang's wire: one host, one call
    assert [attempt.billing for attempt in caught.value.attempts] != ["job-not-billed"]


class PollRaisesUnbilled(BflAdapter):
    """BFL's adapter whose build_poll says the job failed unbilled: no answer says so."""

    name = "poll-unbilled"

    def build_poll(self, job: Job) -> Any:
        raise _unbilled()


@both
def test_a_build_method_cannot_call_an_accepted_job_unbilled(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # JobFailed(billed=False) from build_poll passed through as the answer's verdict: the
    # router failed over to laozhang while the accepted job at bfl could still run and bill.
    monkeypatch.setenv("LAOZHANG_API_KEY", "lz-key-0123456789abcdef")
    monkeypatch.setenv("BFL_API_KEY", JOBS_KEY)
    everything = Both(FakeBfl())
    with pytest.raises(errors.FluxError) as caught:
        run(kind, everything, T2I, provider=[PollRaisesUnbilled(), "laozhang"], polling=QUICK)
    assert everything.bfl.count("POST") == 1
    assert everything.laozhang == []  # never sent elsewhere: the job may be billed
    assert caught.value.job is not None
    assert [attempt.billing for attempt in caught.value.attempts] == ["job-accepted"]


def test_a_package_name_with_control_characters_is_shown_escaped(plugins: Plugins) -> None:
    # The distribution's name comes from the package's own metadata: it went into `models` and
    # into every message about the provider as it was, escape sequences included.
    plugins.add("pixelforge", ADAPTER.format(name="pixelforge"), package="evil\x1b[2J\r\nname")
    origin = providers.provider_origin("pixelforge")
    assert "\x1b" not in origin
    assert "\n" not in origin
    assert "evil" in origin
    code, out, _ = cli("models", "--markdown")
    assert code == 0
    assert "\x1b[2J" not in out


def test_models_markdown_keeps_a_pipe_in_a_wire_id_inside_its_cell(plugins: Plugins) -> None:
    source = """
import attrs
from flux_adapters.providers.laozhang import LaozhangAdapter

class Adapter(LaozhangAdapter):
    name = "pipeforge"
    env_prefix = "PLUGIN"
    limits = {
        model: attrs.evolve(row, wire_model="flux|pro")
        for model, row in LaozhangAdapter.limits.items()
    }
"""
    plugins.add("pipeforge", source)
    code, out, _ = cli("models", "--markdown")
    assert code == 0
    section = out.split("pipeforge (", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `flux-2-pro`")]
    assert rows
    assert "`flux\\|pro`" in rows[0]  # escaped: the row keeps its eleven cells
    assert rows[0].replace("\\|", "").count("|") == 12


class Rebate(PerCall):
    """A price whose estimate is not its figure: it pays the caller to be chosen."""

    def estimate(self, request: Any, plan: Any) -> float:
        return -1.0


def test_a_price_subclass_with_its_own_estimate_is_refused(plugins: Plugins) -> None:
    # Its figure passed the check, its estimate (what ranks providers under "cheapest" and
    # reserves a cumulative budget) was never looked at: -1.0 put it first on every call.
    providers.register_provider("declaring", declaring(prices={"flux-2-pro": Rebate(usd=0.01)}))
    with pytest.raises(errors.ConfigurationError, match="PerCall or PerMegapixel"):
        get_adapter("declaring")


@attrs.frozen(kw_only=True)
class RegionalPerCall(PerCall):
    """A price with a field of its caller's own, estimating as PerCall does."""

    region: str = "eu"


def test_a_price_subclass_that_keeps_the_estimate_is_taken(plugins: Plugins) -> None:
    # Before the exact-class check any PerCall was taken: a subclass adding only data of its
    # own (a region, a contract id) estimates by its checked figure, so it stays usable.
    price = RegionalPerCall(usd=0.02)
    providers.register_provider("declaring", declaring(prices={"flux-2-pro": price}))
    assert getattr(get_adapter("declaring"), "prices", None) == {"flux-2-pro": price}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=OK))
    with httpx.Client(transport=transport) as http:
        client = FluxClient(
            provider="laozhang",
            api_key=KEY,
            prices={("laozhang", "flux-2-pro"): price},
            http_client=http,
        )
        assert client.edit(REQUEST).cost_usd == pytest.approx(0.02)


def test_a_price_subclass_keeping_the_estimate_still_has_its_figures_checked(
    plugins: Plugins,
) -> None:
    with pytest.raises(errors.ConfigurationError, match="dollar amounts"):
        FluxClient(
            provider="laozhang",
            api_key="sk-test-key",
            prices={("laozhang", "flux-2-pro"): RegionalPerCall(usd=-1.0)},
        )
