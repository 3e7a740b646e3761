"""The gateway (``flux-adapters serve``) called with the real OpenAI Python SDK, fronting the
loopback emulator: every built-in provider, failover and its headers, keys, budgets, rate limits,
error shapes and what a hostile client gets. Nothing leaves the machine."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from flux_adapters import AsyncFluxClient, errors
from flux_adapters._serving import LoopbackServer
from flux_adapters.emulator import Emulator, Fault, run_emulator
from flux_adapters.errors import ConfigurationError
from flux_adapters.gateway import FileKeys, RunningGateway, run_gateway
from flux_adapters.gateway._app import GatewaySettings
from flux_adapters.jobs import Polling
from tests.conftest import held_at_the_provider, image_bytes

PROVIDER_SECRET = "sk-provider-SECRET-0123456789abcdef"
FAST_POLLS = Polling(first=0.01, factor=1.0, longest=0.01, jitter=0.0)

# Per provider: how to ask for a 1024x768 output in the form it takes, and what comes back.
SIZED: dict[str, dict[str, object]] = {
    "laozhang": {"width": 1024, "height": 768},
    "apiyi": {"aspect_ratio": "4:3"},
    "apiyi-multipart": {"size": "1024x768"},
    "aimlapi": {"width": 1024, "height": 768},
    "bfl": {"width": 1024, "height": 768},
    "fal": {"width": 1024, "height": 768},
}
EXPECTED = {
    "laozhang": (1024, 768),
    "apiyi": (1184, 880),
    "apiyi-multipart": (1024, 768),
    "aimlapi": (1024, 768),
    "bfl": (1024, 768),
    "fal": (1024, 768),
}


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_emulator(emulator: Emulator) -> None:
    emulator.clear_faults()


def single(emulator: Emulator, name: str) -> Callable[[tuple[str, ...] | None], AsyncFluxClient]:
    def make(only: tuple[str, ...] | None) -> AsyncFluxClient:
        return AsyncFluxClient(
            name,  # type: ignore[arg-type]
            api_key=PROVIDER_SECRET,
            base_url=emulator.base_url(name),
            polling=FAST_POLLS,
        )

    return make


class RewrittenBfl:
    """The gateway's clients: BFL on *emulator*, each submit answer changed by *rewrite*
    (`tests.conftest.SubmitRewritten`). The httpx clients they send with are the test's to
    close, in the gateway's loop (`close`)."""

    def __init__(self, emulator: Emulator, rewrite: Callable[[dict[str, Any], Any], None]):
        self._base_url = emulator.base_url("bfl")
        self._rewrite = rewrite
        self._made: list[httpx.AsyncClient] = []

    def __call__(self, only: tuple[str, ...] | None) -> AsyncFluxClient:
        from tests.conftest import SubmitRewritten

        self._made.append(httpx.AsyncClient(transport=SubmitRewritten(self._rewrite)))
        return AsyncFluxClient(
            "bfl",
            api_key=PROVIDER_SECRET,
            base_url=self._base_url,
            polling=FAST_POLLS,
            http_client=self._made[-1],
        )

    def close(self, gateway: RunningGateway) -> None:
        for http in self._made:
            asyncio.run_coroutine_threadsafe(http.aclose(), gateway._loop).result(30)


def providers_env(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, where: Path, *names: str
) -> None:
    """*names* in this order on the emulator, keys from the environment, no config file."""
    monkeypatch.setenv("FLUX_PROVIDERS", ",".join(names))
    monkeypatch.delenv("FLUX_CONFIG", raising=False)
    monkeypatch.chdir(where)  # no flux-adapters.toml here
    for name in names:
        monkeypatch.setenv(f"{name.upper()}_API_KEY", PROVIDER_SECRET)
        monkeypatch.setenv(f"{name.upper()}_BASE_URL", emulator.base_url(name))


@pytest.fixture
def failover_env(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """apiyi first, then laozhang (which has a price: $0.03 a call), keys from the environment."""
    providers_env(emulator, monkeypatch, tmp_path_factory.mktemp("cwd"), "apiyi", "laozhang")


_OPENED: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    yield
    while _OPENED:
        _OPENED.pop().close()


def sdk(gateway: RunningGateway, key: str, retries: int = 0) -> openai.OpenAI:
    client = openai.OpenAI(base_url=gateway.url, api_key=key, max_retries=retries)
    _OPENED.append(client)
    return client


def fetched(url: str) -> bytes:
    answer = httpx.get(url)
    assert answer.status_code == 200
    return answer.content


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as picture:
        return picture.size


# -- every built-in provider, through the SDK ----------------------------------------------------


@pytest.mark.parametrize("provider", ["laozhang", "apiyi", "aimlapi", "bfl", "fal"])
def test_sdk_generate_reaches_each_provider(
    provider: str, emulator: Emulator, tmp_path: Path
) -> None:
    before = len(emulator.billed(provider))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, provider)) as gateway:
        key, _ = gateway.add_key(name="app")
        raw = sdk(gateway, key).images.with_raw_response.generate(
            model="flux-2-pro",
            prompt="a red robot",
            extra_body={"seed": 7, "output_format": "png", **SIZED[provider]},
        )
        images = raw.parse()
        assert raw.headers["x-flux-provider"] == provider
        assert raw.headers["x-flux-attempts"] == "1"
        assert raw.headers["x-request-id"].startswith("gw-")
        assert images.data is not None
        url = images.data[0].url
        assert url is not None
        assert url.startswith(gateway.root + "/v1/files/")
        data = fetched(url)
    assert data.startswith(b"\x89PNG")
    assert size_of(data) == EXPECTED[provider]
    billed = emulator.billed(provider)[before:]
    assert [(job.prompt, job.seed) for job in billed] == [("a red robot", 7)]


@pytest.mark.parametrize(
    "provider", ["laozhang", "apiyi", "apiyi-multipart", "aimlapi", "bfl", "fal"]
)
def test_sdk_edit_sends_every_image_in_order(
    provider: str, emulator: Emulator, tmp_path: Path
) -> None:
    robot = image_bytes(300, 400, color="red")
    scene = image_bytes(600, 400, "JPEG", color="green")
    before = len(emulator.calls(provider, "submit"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, provider)) as gateway:
        key, _ = gateway.add_key()
        result = sdk(gateway, key).images.edit(
            model="flux-2-pro",
            prompt="image 1 in image 2",
            image=[("robot.png", robot, "image/png"), ("scene.jpg", scene, "image/jpeg")],
            response_format="b64_json",
            extra_body={"seed": "5", **{k: str(v) for k, v in SIZED[provider].items()}},
        )
    import base64

    assert result.data is not None
    encoded = result.data[0].b64_json
    assert encoded is not None
    assert size_of(base64.b64decode(encoded)) == EXPECTED[provider]
    assert len(emulator.calls(provider, "submit")) == before + 1


# -- failover, billing and the headers -----------------------------------------------------------


def test_failover_behind_the_gateway_shows_attempts_and_cost(
    emulator: Emulator, failover_env: None, tmp_path: Path
) -> None:
    emulator.inject("apiyi", Fault(status=503, first=1))
    with run_gateway(files_dir=tmp_path) as gateway:
        key, record = gateway.add_key()
        raw = sdk(gateway, key).images.with_raw_response.generate(
            model="flux-2-pro",
            prompt="failover please",
            extra_body={"aspect_ratio": "1:1", "allow_conversions": True},
        )
        raw.parse()
        assert raw.headers["x-flux-provider"] == "laozhang"
        assert raw.headers["x-flux-attempts"] == "2"
        assert raw.headers["x-flux-attempt-log"] == "apiyi=failed:overloaded; laozhang=ok"
        assert float(raw.headers["x-flux-cost-usd"]) == pytest.approx(0.03)
        assert "1024x1024" in raw.headers["x-flux-warnings"]  # laozhang takes sizes only
        metrics = httpx.get(gateway.root + "/metrics").text
    assert 'flux_gateway_failovers_total{provider="apiyi"} 1.0' in metrics
    assert f'flux_gateway_spend_usd_total{{key="{record.id}",provider="laozhang"}} 0.03' in metrics
    assert [job.prompt for job in emulator.billed() if job.prompt == "failover please"] == [
        "failover please"
    ]


def test_an_ambiguous_failure_is_not_retried_by_the_sdk_and_says_it_may_be_billed(
    emulator: Emulator, failover_env: None, tmp_path: Path
) -> None:
    emulator.inject("apiyi", Fault(status=500, first=1))
    before = len(emulator.calls(kind="submit"))
    with run_gateway(files_dir=tmp_path) as gateway:
        key, _ = gateway.add_key()
        client = sdk(gateway, key, retries=2)  # the SDK's default: it would retry a 5xx
        with pytest.raises(openai.InternalServerError) as caught:
            client.images.generate(
                model="flux-2-pro",
                prompt="maybe paid",
                extra_body={"aspect_ratio": "1:1", "allow_conversions": True},
            )
    error = caught.value
    assert error.status_code == 502
    assert error.response.headers["x-should-retry"] == "false"
    body: Any = error.body
    assert body["may_be_billed"] is True
    assert "may have done, and billed, the job" in body["message"]
    assert [a["provider"] for a in body["attempts"]] == ["apiyi"]
    # One call to apiyi, none to laozhang, none repeated by the SDK.
    assert len(emulator.calls(kind="submit")) == before + 1


def test_a_provider_rate_limit_keeps_its_meaning(emulator: Emulator, tmp_path: Path) -> None:
    emulator.inject("laozhang", Fault(status=429, retry_after=7))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        with pytest.raises(openai.RateLimitError) as caught:
            sdk(gateway, key).images.generate(model="flux-2-pro", prompt="busy")
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.response.headers["x-should-retry"] == "true"
    body: Any = caught.value.body
    assert (body["code"], body["may_be_billed"]) == ("provider_rate_limited", False)


# docs/gateway.md: a provider's failure is answered with `may_be_billed`, the field a client
# reads before it sends a call again. Each failure that proves nothing was billed says `false`
# (was: a model_unavailable answer, a 4xx naming the model or a 503 with no channel, had none).
NOT_BILLED: list[tuple[errors.FluxError, str]] = [
    (errors.ModelUnavailable("m", provider="x", status_code=404), "model_unavailable"),
    (errors.ModelUnavailable("m", provider="x", status_code=503), "model_unavailable"),
    (errors.ProviderUnavailable("m", provider="x", status_code=503), "provider_overloaded"),
    (errors.TransportError("m", provider="x", sent=False), "provider_unreachable"),
    (errors.RateLimited("m", provider="x", status_code=429), "provider_rate_limited"),
    (
        errors.InsufficientBalance("m", provider="x", status_code=402),
        "provider_insufficient_balance",
    ),
    (errors.AuthenticationFailed("m", provider="x", status_code=401), "provider_key_refused"),
    (errors.ProviderRejected("m", provider="x", status_code=400), "provider_rejected"),
    (errors.ContentModerated("m", provider="x", status_code=400), "content_policy_violation"),
    (errors.JobFailed("m", provider="x", job_id="j", billed=False), "job_failed"),
    # The gateway's clients closed as it stops: a 503 like a call arriving while it drains.
    (errors.ClientClosedError("the connection pool is closed; nothing was sent"), "shutting_down"),
]


@pytest.mark.parametrize(
    ("error", "code"), NOT_BILLED, ids=[f"{type(e).__name__}-{code}" for e, code in NOT_BILLED]
)
def test_a_provider_failure_that_billed_nothing_says_so(error: errors.FluxError, code: str) -> None:
    from flux_adapters.gateway._errors import error_answer

    inner: Any = error_answer(error).body["error"]
    assert (inner["code"], inner["may_be_billed"]) == (code, False)


# -- keys, budgets, rate limits ------------------------------------------------------------------


def test_keys_are_checked_and_never_stored_or_shown(emulator: Emulator, tmp_path: Path) -> None:
    keys = FileKeys(tmp_path / "keys.json")
    with run_gateway(
        files_dir=tmp_path / "files", clients=single(emulator, "laozhang"), keys=keys
    ) as gateway:
        key, record = gateway.add_key(name="web")
        assert key.startswith(f"fxg_{record.id}_")
        stored = (tmp_path / "keys.json").read_text()
        assert key not in stored
        assert record.key_hash in stored
        assert (tmp_path / "keys.json").stat().st_mode & 0o777 == 0o600
        for wrong in ("not-a-key", key[:-1] + ("A" if key[-1] != "A" else "B"), "x" * 5000):
            with pytest.raises(openai.AuthenticationError):
                sdk(gateway, wrong).models.list()
        assert [m.id for m in sdk(gateway, key).models.list()][:1] == ["flux-2-pro"]
        assert keys.delete_sync(record.id)
        with pytest.raises(openai.AuthenticationError):
            sdk(gateway, key).models.list()


def test_no_key_at_all_is_a_401_in_openai_shape(emulator: Emulator, tmp_path: Path) -> None:
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        answer = httpx.post(gateway.url + "/images/generations", json={"prompt": "x"})
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"


def test_a_call_while_the_gateway_drains_is_a_503_that_says_so(
    emulator: Emulator, tmp_path: Path
) -> None:
    before = len(emulator.calls("laozhang"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        gateway.gateway.draining = True  # as a SIGTERM makes it
        answer = httpx.post(
            gateway.url + "/images/generations",
            json={"model": "flux-2-pro", "prompt": "late"},
            headers={"authorization": f"Bearer {key}"},
        )
    assert answer.status_code == 503
    assert answer.headers["x-should-retry"] == "true"  # another replica may take it
    assert answer.json()["error"]["code"] == "shutting_down"
    assert len(emulator.calls("laozhang")) == before  # nothing sent


def test_a_key_limited_to_models_gets_a_403_for_others(emulator: Emulator, tmp_path: Path) -> None:
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key(allowed_models=["flux-2-max"])
        client = sdk(gateway, key)
        assert [m.id for m in client.models.list()] == ["flux-2-max"]
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.images.generate(model="flux-2-pro", prompt="not mine")
    body: Any = caught.value.body
    assert body["code"] == "model_not_allowed"


def test_a_budget_stops_calls_before_they_are_sent(emulator: Emulator, tmp_path: Path) -> None:
    before = len(emulator.calls("laozhang"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key(budget_usd=0.05, period="day")  # laozhang: $0.03 a call
        client = sdk(gateway, key, retries=2)
        client.images.generate(model="flux-2-pro", prompt="first")
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(model="flux-2-pro", prompt="second")
    body: Any = caught.value.body
    assert body["code"] == "budget_exceeded"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(emulator.calls("laozhang")) == before + 1  # the second was never sent


def test_a_key_with_a_budget_never_uses_a_provider_without_a_price(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # aimlapi has no known price for a flux-2-pro text-to-image: a call there could not be
    # counted against a budget, so a key with one is routed past it (or refused), never to it.
    (tmp_path / "cwd").mkdir()
    providers_env(emulator, monkeypatch, tmp_path / "cwd", "aimlapi", "laozhang")
    before = len(emulator.calls("aimlapi"))
    size = {"width": 512, "height": 512}
    with run_gateway(files_dir=tmp_path / "files") as gateway:
        key, _ = gateway.add_key(budget_usd=1.0)
        budgeted = sdk(gateway, key).images.with_raw_response.generate(
            model="flux-2-pro", prompt="priced only", extra_body=size
        )
        budgeted.parse()
        unlimited, _ = gateway.add_key()
        free = sdk(gateway, unlimited).images.with_raw_response.generate(
            model="flux-2-pro", prompt="any provider", extra_body=size
        )
        free.parse()
        only_unpriced, _ = gateway.add_key(budget_usd=1.0, allowed_providers=["aimlapi"])
        with pytest.raises(openai.PermissionDeniedError) as caught:
            sdk(gateway, only_unpriced).images.generate(
                model="flux-2-pro", prompt="cannot be counted", extra_body=size
            )
    assert budgeted.headers["x-flux-attempt-log"] == "laozhang=ok"
    assert free.headers["x-flux-provider"] == "aimlapi"  # without a budget, the order holds
    body: Any = caught.value.body
    assert body["code"] == "no_priced_provider"
    assert "aimlapi" in body["message"]
    assert len(emulator.calls("aimlapi")) == before + 1  # the unlimited key's call only


def test_a_call_ended_by_a_bug_keeps_its_reservation(emulator: Emulator, tmp_path: Path) -> None:
    # Whatever ends a call in a way the router did not judge (a bug of the library or of a
    # provider package) may have come after the provider billed it: the budget keeps it.
    class Broken(AsyncFluxClient):
        async def edit(self, *args: Any, **kwargs: Any) -> Any:
            await super().edit(*args, **kwargs)  # the provider does, and bills, the job
            raise RuntimeError("a bug after the answer")

    def make(only: tuple[str, ...] | None) -> AsyncFluxClient:
        return Broken("laozhang", api_key=PROVIDER_SECRET, base_url=emulator.base_url("laozhang"))

    before = len(emulator.calls("laozhang"))
    with run_gateway(files_dir=tmp_path, clients=make) as gateway:
        key, _ = gateway.add_key(budget_usd=0.03)  # laozhang: $0.03 a call
        client = sdk(gateway, key, retries=2)  # the SDK's default: told not to retry this one
        with pytest.raises(openai.InternalServerError) as failed:
            client.images.generate(model="flux-2-pro", prompt="billed, then a bug")
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(model="flux-2-pro", prompt="no room left")
    assert failed.value.response.headers["x-should-retry"] == "false"
    body: Any = caught.value.body
    assert body["code"] == "budget_exceeded"
    assert len(emulator.calls("laozhang")) == before + 1  # one call, never sent again


def test_a_refused_call_refunds_its_reservation(emulator: Emulator, tmp_path: Path) -> None:
    emulator.inject("laozhang", Fault(status=429, first=1))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key(budget_usd=0.03)
        client = sdk(gateway, key)
        with pytest.raises(openai.RateLimitError):
            client.images.generate(model="flux-2-pro", prompt="not taken")
        client.images.generate(model="flux-2-pro", prompt="taken")  # the $0.03 is still there


def test_a_key_rate_limit_answers_429_with_retry_after(emulator: Emulator, tmp_path: Path) -> None:
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key(rate_per_minute=1)
        client = sdk(gateway, key)
        client.images.generate(model="flux-2-pro", prompt="one")
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(model="flux-2-pro", prompt="two")
    body: Any = caught.value.body
    assert body["code"] == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after"]) >= 1


# -- error shapes and hostile clients ------------------------------------------------------------


def test_a_bad_request_lists_every_violation(emulator: Emulator, tmp_path: Path) -> None:
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        with pytest.raises(openai.BadRequestError) as caught:
            sdk(gateway, key).images.generate(
                model="flux-2-pro",
                prompt="x",
                n=2,
                extra_body={"seed": "seven", "quality": "hd", "width": 1000, "height": 1000},
            )
    body: Any = caught.value.body
    fields = {v["field"] for v in body["violations"]}
    assert {"n", "seed", "quality"} <= fields
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_provider_limits_are_reported_for_the_provider(emulator: Emulator, tmp_path: Path) -> None:
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        with pytest.raises(openai.BadRequestError) as caught:
            sdk(gateway, key).images.generate(
                model="flux-2-pro", prompt="x", extra_body={"width": 1000, "height": 1000}
            )
    body: Any = caught.value.body
    assert body["violations"][0]["provider"] == "laozhang"
    assert "width" in body["violations"][0]["field"] or "size" in body["violations"][0]["field"]


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"{not json", {"content-type": "application/json"}, 400),
        (b"[1, 2]", {"content-type": "application/json"}, 400),
        (b"[" * 100_000, {"content-type": "application/json"}, 400),
        (b'{"prompt": "x"}', {"content-type": "text/plain"}, 415),
        (
            json.dumps({"prompt": 5, "model": ["x"]}).encode(),
            {"content-type": "application/json"},
            400,
        ),
        (
            json.dumps({"prompt": "a\r\nb", "image_urls": "http://x"}).encode(),
            {"content-type": "application/json"},
            400,
        ),
    ],
)
def test_hostile_bodies_get_openai_shaped_4xx(
    content: bytes, headers: dict[str, str], status: int, emulator: Emulator, tmp_path: Path
) -> None:
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        answer = httpx.post(
            gateway.url + "/images/generations",
            content=content,
            headers={**headers, "authorization": f"Bearer {key}"},
        )
    assert answer.status_code == status
    assert set(answer.json()["error"]) >= {"message", "type", "code"}


def test_a_huge_body_is_refused_without_being_read(emulator: Emulator, tmp_path: Path) -> None:
    with run_gateway(
        files_dir=tmp_path, clients=single(emulator, "laozhang"), max_body_bytes=1000
    ) as gateway:
        key, _ = gateway.add_key()
        declared = httpx.post(
            gateway.url + "/images/generations",
            json={"prompt": "x" * 5000},
            headers={"authorization": f"Bearer {key}"},
        )

        def chunks() -> Iterator[bytes]:
            yield b'{"prompt": "'
            for _ in range(100):
                yield b"x" * 100

        streamed = httpx.post(
            gateway.url + "/images/generations",
            content=chunks(),
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        )
    assert declared.status_code == streamed.status_code == 413


def test_a_body_dripped_slower_than_its_deadline_is_a_408(
    emulator: Emulator, tmp_path: Path
) -> None:
    before = len(emulator.calls("laozhang"))
    with run_gateway(
        files_dir=tmp_path, clients=single(emulator, "laozhang"), body_timeout=0.3
    ) as gateway:
        key, _ = gateway.add_key()
        address = httpx.URL(gateway.url)
        with socket.create_connection((address.host, address.port), timeout=30) as conn:
            conn.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nhost: gateway\r\n"
                + f"authorization: Bearer {key}\r\n".encode()
                + b"content-type: application/json\r\ncontent-length: 100\r\n\r\n"
                + b'{"prompt": "'  # and then nothing more: the rest never comes
            )
            answer = b""
            while piece := conn.recv(65536):  # to the end: the gateway closes the connection
                answer += piece  # (bounded by the socket's 30 s timeout)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer.replace(b" ", b"")
    assert len(emulator.calls("laozhang")) == before


@contextlib.contextmanager
def one_call_under_way(
    url: str, headers: dict[str, str], body: Mapping[str, object]
) -> Iterator[concurrent.futures.Future[httpx.Response]]:
    """A call POSTed in a thread, held at the provider while the block runs; it is answered
    once the block ends."""
    # The pool outlives the hold: its end waits for the call, answered once released.
    with concurrent.futures.ThreadPoolExecutor(1) as pool, held_at_the_provider() as reached:
        first = pool.submit(httpx.post, url, json=body, headers=headers, timeout=30)
        for _ in range(3000):  # until the call reached the provider (bounded)
            if reached.wait(0.01) or first.done():
                break
        yield first


def test_calls_past_the_bodies_the_gateway_may_hold_are_a_503_before_reading(
    emulator: Emulator, tmp_path: Path
) -> None:
    before = len(emulator.calls("laozhang"))
    with run_gateway(
        files_dir=tmp_path,
        clients=single(emulator, "laozhang"),
        max_body_bytes=4000,
        # the first call's 3,000-odd bytes, three times over once read (bytes, text, values),
        # leave room for a small call, not for another such one
        max_bodies_bytes=12_000,
    ) as gateway:
        key, _ = gateway.add_key()
        headers = {"authorization": f"Bearer {key}"}
        url = gateway.url + "/images/generations"
        body = {"prompt": "held", "model": "flux-2-pro", "user": "x" * 3000}
        with one_call_under_way(url, headers, body) as first:
            busy = httpx.post(url, json=body, headers=headers, timeout=30)
            small = httpx.post(url, json={"prompt": "small"}, headers=headers, timeout=30)
        assert first.result().status_code == 200
        after = httpx.post(url, json=body, headers=headers, timeout=30)
    assert busy.status_code == 503
    assert busy.json()["error"]["code"] == "server_busy"
    assert busy.headers["retry-after"] == "1"
    assert small.status_code == 200  # 3,000-odd bytes fit beside the first call
    assert after.status_code == 200  # the first call's body was given back
    assert len(emulator.calls("laozhang")) == before + 3  # the busy one was never sent


@pytest.mark.parametrize(
    ("text", "fits"),
    [("a" * 1000, True), ("é" * 500, True), ("€" * 333, False), ("🐱" * 250, False)],
    ids=["ascii", "latin-1", "bmp", "emoji"],
)
def test_a_json_body_counts_what_reading_it_takes_beside_other_calls(
    text: str, fits: bool, emulator: Emulator, tmp_path: Path
) -> None:
    # json decodes a body into one string as wide as its widest character, then parses values
    # as wide: 1,000 bytes of emoji become 4,000 bytes of text and as much again of values.
    # Counted at their bytes only, many such bodies at once took several times the limit.
    before = len(emulator.calls("laozhang"))
    with run_gateway(
        files_dir=tmp_path,
        clients=single(emulator, "laozhang"),
        max_body_bytes=4000,
        max_bodies_bytes=5000,
    ) as gateway:
        key, _ = gateway.add_key()
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        url = gateway.url + "/images/generations"
        wide = json.dumps({"prompt": "wide", "user": text}, ensure_ascii=False).encode()
        with one_call_under_way(url, headers, {"prompt": "held"}) as first:
            beside = httpx.post(url, content=wide, headers=headers, timeout=30)
        assert first.result().status_code == 200
        alone = httpx.post(url, content=wide, headers=headers, timeout=30)
    if fits:  # about 1,000 bytes, 3,000 once read, beside a small call: within 5,000
        assert beside.status_code == 200, beside.text
    else:  # about 1,000 bytes, 5,000 (2 bytes a character) or 9,000 (4) once read
        assert beside.status_code == 503, beside.text
        assert beside.json()["error"]["code"] == "server_busy"
    assert alone.status_code == 200, alone.text  # alone, a call is read whatever it takes
    assert len(emulator.calls("laozhang")) == before + (3 if fits else 2)


@pytest.mark.parametrize(
    "setting",
    [
        {"retention": 0},
        {"retention": float("nan")},
        {"body_timeout": -1},
        # serve --body-timeout refused more than a day; the library took up to a year.
        {"body_timeout": 86400.5},
        {"body_timeout": 30 * 86400},
        {"max_body_bytes": 0},
        {"max_body_bytes": 2.5},
        {"max_body_bytes": True},
        {"max_bodies_bytes": 0},
        {"max_body_bytes": 2000, "max_bodies_bytes": 1000},
    ],
)
def test_gateway_settings_out_of_range_are_refused(
    setting: dict[str, object], tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(setting))):
        GatewaySettings(files_dir=tmp_path, **setting)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "timeout",
    [
        {"send_timeout": 0},
        {"send_timeout": "60"},
        {"send_timeout": float("inf")},
        {"send_timeout": 86400.5},
        {"header_timeout": -1},
        {"header_timeout": None},
    ],
)
def test_connection_timeouts_out_of_range_are_refused_before_listening(
    timeout: dict[str, object], emulator: Emulator, tmp_path: Path
) -> None:
    name = next(iter(timeout))
    with (
        pytest.raises(ConfigurationError, match=f"{name} must be a number of seconds > 0"),
        run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang"), **timeout),  # type: ignore[arg-type]
    ):
        pass


def test_serve_takes_a_send_timeout_of_up_to_a_day(tmp_path: Path) -> None:
    from flux_adapters._options import MAX_SECONDS
    from flux_adapters.cli import _parser, _UsageError

    parser = _parser()
    assert parser.parse_args(["serve"]).send_timeout == 60
    assert parser.parse_args(["serve", "--send-timeout", "86400"]).send_timeout == MAX_SECONDS
    for refused in ("0", "86401", "nan"):
        with pytest.raises(_UsageError, match="--send-timeout"):
            parser.parse_args(["serve", "--send-timeout", refused])


def test_the_longest_body_timeout_is_the_one_serve_takes(tmp_path: Path) -> None:
    from flux_adapters._options import MAX_SECONDS
    from flux_adapters.cli import _parser

    assert GatewaySettings(files_dir=tmp_path, body_timeout=MAX_SECONDS).body_timeout == 86400
    arguments = _parser().parse_args(["serve", "--body-timeout", str(MAX_SECONDS)])
    assert arguments.body_timeout == MAX_SECONDS


@pytest.mark.parametrize(
    "url",
    [
        "images.example.com",
        "ftp://images.example.com",
        "https://",
        "https://h:99999",
        "https://h/?a=1",
        "https://h/\r\nx: y",
        8080,
    ],
)
def test_a_public_url_that_cannot_root_links_is_refused(url: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="public_url must be an http:// or https://"):
        GatewaySettings(files_dir=tmp_path, public_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "https://links:hunter2-secret@images.example.com",
        "https://hunter2-secret@images.example.com/flux/",
        "https://links:hunter2-secret@images.example.com:0/",
    ],
)
def test_a_public_url_with_credentials_is_refused_without_showing_them(
    url: str, tmp_path: Path
) -> None:
    # The root of every image link handed to every caller: a user or password in it would be
    # given to all of them, and the refusal must not print it either.
    with pytest.raises(ConfigurationError, match="no user or password") as refused:
        GatewaySettings(files_dir=tmp_path, public_url=url)
    assert "hunter2" not in str(refused.value)


def test_image_links_follow_the_public_url_without_a_doubled_slash(
    emulator: Emulator, tmp_path: Path
) -> None:
    with run_gateway(
        files_dir=tmp_path,
        clients=single(emulator, "laozhang"),
        public_url="http://images.example.com/flux/",
    ) as gateway:
        key, _ = gateway.add_key()
        made = sdk(gateway, key).images.generate(model="flux-2-pro", prompt="x").data
    assert made is not None
    assert made[0].url is not None
    assert made[0].url.startswith("http://images.example.com/flux/v1/files/")


def test_a_files_dir_that_is_a_file_is_a_configuration_error(
    emulator: Emulator, tmp_path: Path
) -> None:
    taken = tmp_path / "taken"
    taken.write_bytes(b"not a folder")
    for folder in (taken, taken / "below"):
        with (
            pytest.raises(ConfigurationError, match=r"files_dir .* cannot be used as a folder"),
            run_gateway(files_dir=folder, clients=single(emulator, "laozhang")),
        ):
            pass


def test_an_image_that_cannot_be_kept_is_a_502_that_shows_no_gateway_path(
    emulator: Emulator, tmp_path: Path
) -> None:
    files = tmp_path / "kept-here"
    with run_gateway(files_dir=files, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        files.rmdir()
        files.write_bytes(b"not a folder any more")
        with pytest.raises(openai.APIStatusError) as caught:
            sdk(gateway, key, retries=2).images.generate(model="flux-2-pro", prompt="made, lost")
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"  # it was billed
    body: Any = caught.value.body
    assert (body["code"], body["may_be_billed"]) == ("result_not_kept", True)
    assert "could not store it" in body["message"]
    assert "kept-here" not in json.dumps(body)


def test_secrets_never_leave_the_gateway(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider that refuses (and echoes) the provider key: neither key shows anywhere."""
    seen: list[str] = []
    with run_emulator(bad_keys=[PROVIDER_SECRET]) as refusing:
        caplog.set_level(logging.DEBUG)
        with run_gateway(files_dir=tmp_path, clients=single(refusing, "laozhang")) as gateway:
            key, _ = gateway.add_key()
            with pytest.raises(openai.APIStatusError) as caught:
                sdk(gateway, key).images.generate(model="flux-2-pro", prompt="x")
            seen += [caught.value.response.text, str(caught.value.response.headers)]
            seen.append(httpx.get(gateway.root + "/metrics").text)
    assert caught.value.status_code == 502
    body: Any = caught.value.body
    assert body["code"] == "provider_key_refused"
    seen += [record.getMessage() for record in caplog.records]
    for text in seen:
        assert PROVIDER_SECRET not in text
        assert key not in text
        assert key.split("_", 2)[2] not in text


def test_access_logs_are_json_lines_without_secrets(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flux_adapters.gateway.access")
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, record = gateway.add_key()
        sdk(gateway, key).images.generate(model="flux-2-pro", prompt="logged")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith(".access")]
    served = [line for line in lines if line["route"] == "/v1/images/generations"]
    assert served[-1]["status"] == 200
    assert (served[-1]["key"], served[-1]["provider"]) == (record.id, "laozhang")
    assert all(key not in json.dumps(line) for line in lines)


def test_kept_images_expire(emulator: Emulator, tmp_path: Path) -> None:
    with run_gateway(
        files_dir=tmp_path, clients=single(emulator, "laozhang"), retention=60.0
    ) as gateway:
        key, _ = gateway.add_key()
        made = sdk(gateway, key).images.generate(model="flux-2-pro", prompt="x").data
        assert made is not None
        url = made[0].url
        assert url is not None
        assert httpx.get(url).status_code == 200
        kept = tmp_path / url.rsplit("/", 1)[1]
        past = time.time() - 3600
        os.utime(kept, (past, past))
        gone = httpx.get(url)
        probing = httpx.get(gateway.url + "/files/..%2Fkeys.json")
    assert gone.status_code == 404
    assert not kept.exists()
    assert probing.status_code == 404


def test_health_readiness_and_metrics(emulator: Emulator, tmp_path: Path) -> None:
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        assert httpx.get(gateway.root + "/healthz").json() == {"status": "ok"}
        ready = httpx.get(gateway.root + "/readyz").json()
        metrics = httpx.get(gateway.root + "/metrics")
    assert ready == {"status": "ready", "providers": ["laozhang"]}
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "flux_gateway_request_seconds" in metrics.text


# -- the event loop ------------------------------------------------------------------------------


def loops_started(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.AbstractEventLoop]:
    """The event loop of each server (gateway or emulator) started from now on, in order."""
    started: list[asyncio.AbstractEventLoop] = []
    original = LoopbackServer.startup

    async def startup(self: LoopbackServer, sockets: list[socket.socket] | None = None) -> None:
        started.append(asyncio.get_running_loop())
        await original(self, sockets)

    monkeypatch.setattr(LoopbackServer, "startup", startup)
    return started


@pytest.mark.parametrize("installed", [True, False], ids=["uvloop", "without-uvloop"])
def test_the_gateway_serves_on_uvloop_when_installed_else_on_asyncio(
    installed: bool, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvloop

    started = loops_started(monkeypatch)
    if not installed:
        monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` fails, as if absent
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key(name="app")
        images = sdk(gateway, key).images.generate(
            model="flux-2-pro", prompt="a robot", extra_body={"width": 64, "height": 64}
        )
        assert images.data is not None
        assert images.data[0].url is not None
        data = fetched(images.data[0].url)
    assert size_of(data) == (64, 64)
    [loop] = started
    assert isinstance(loop, uvloop.Loop) is installed
    assert isinstance(loop, asyncio.BaseEventLoop) is not installed  # asyncio's own


def test_the_emulator_stays_on_asyncio_beside_the_gateways_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The emulator is the baseline of the gateway's benchmark: uvloop installed changes nothing."""
    import uvloop  # installed here (the gateway extra), so uvicorn's default would take it

    started = loops_started(monkeypatch)
    with run_emulator():
        pass
    [loop] = started
    assert not isinstance(loop, uvloop.Loop)
    assert isinstance(loop, asyncio.BaseEventLoop)


# -- several gateways, one Redis -----------------------------------------------------------------


def test_two_gateways_share_keys_and_one_budget_through_redis(
    emulator: Emulator, tmp_path: Path
) -> None:
    from tests.redis_server import redis_server

    before = len(emulator.billed("laozhang"))
    with (
        redis_server() as redis,
        run_gateway(
            files_dir=tmp_path / "a", clients=single(emulator, "laozhang"), state_url=redis.url
        ) as first,
        run_gateway(
            files_dir=tmp_path / "b", clients=single(emulator, "laozhang"), state_url=redis.url
        ) as second,
    ):
        key, _ = first.add_key(budget_usd=0.05, period="day")  # laozhang: $0.03 a call
        sdk(first, key).images.generate(model="flux-2-pro", prompt="on the first")
        with pytest.raises(openai.RateLimitError) as caught:
            sdk(second, key).images.generate(model="flux-2-pro", prompt="on the second")
    body: Any = caught.value.body
    assert body["code"] == "budget_exceeded"
    assert [job.prompt for job in emulator.billed("laozhang")[before:]] == ["on the first"]


def test_redis_down_is_a_503_before_anything_is_sent(emulator: Emulator, tmp_path: Path) -> None:
    from tests.redis_server import redis_server

    before = len(emulator.calls("laozhang"))
    with (
        redis_server() as redis,
        run_gateway(
            files_dir=tmp_path, clients=single(emulator, "laozhang"), state_url=redis.url
        ) as gateway,
    ):
        key, _ = gateway.add_key(budget_usd=1.0)
        redis.kill()
        with pytest.raises(openai.InternalServerError) as caught:
            sdk(gateway, key).images.generate(model="flux-2-pro", prompt="no state")
    assert caught.value.status_code == 503
    body: Any = caught.value.body
    assert body["code"] == "state_unavailable"
    assert caught.value.response.headers["x-should-retry"] == "true"
    assert len(emulator.calls("laozhang")) == before


def test_readiness_says_not_ready_while_the_shared_state_does_not_answer(
    emulator: Emulator, tmp_path: Path
) -> None:
    from tests.redis_server import redis_server

    with (
        redis_server() as redis,
        run_gateway(
            files_dir=tmp_path, clients=single(emulator, "laozhang"), state_url=redis.url
        ) as gateway,
    ):
        up = httpx.get(gateway.root + "/readyz", timeout=30)
        redis.kill()
        down = httpx.get(gateway.root + "/readyz", timeout=30)
        alive = httpx.get(gateway.root + "/healthz", timeout=30)
    assert (up.status_code, up.json()["state"]) == (200, "redis")
    assert down.status_code == 503  # a load balancer sends calls elsewhere
    assert down.json()["status"] == "state_unavailable"
    assert "Redis" in down.json()["detail"]
    assert "nothing was sent" not in down.json()["detail"]  # no call was made
    assert alive.status_code == 200  # alive, only not ready


def test_a_key_limited_to_providers_is_routed_among_them_only(
    emulator: Emulator, failover_env: None, tmp_path: Path
) -> None:
    before = len(emulator.calls("apiyi"))
    with run_gateway(files_dir=tmp_path) as gateway:
        key, _ = gateway.add_key(allowed_providers=["laozhang"])
        raw = sdk(gateway, key).images.with_raw_response.generate(
            model="flux-2-pro", prompt="laozhang only", extra_body={"width": 512, "height": 512}
        )
        raw.parse()
        everyone, _ = gateway.add_key()
        models = [m.id for m in sdk(gateway, everyone).models.list()]
        limited = [m.id for m in sdk(gateway, key).models.list()]
    assert raw.headers["x-flux-attempt-log"] == "laozhang=ok"  # apiyi, first in order, not tried
    assert len(emulator.calls("apiyi")) == before
    assert "flux-2-pro" in models
    assert "flux-2-klein-4b" in models  # apiyi offers it, laozhang does not
    assert "flux-2-klein-4b" not in limited
    assert "flux-2-pro" in limited


@pytest.mark.parametrize("held_bytes", [256 * 1024, 100])
def test_kept_images_are_served_whole_and_leave_no_temporary_file(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held_bytes: int
) -> None:
    """Small images are written once from memory; larger ones stream through a temporary file.

    (100 bytes held: the emulator's image is larger, so it takes the streaming path.)
    """
    from flux_adapters.gateway import _files

    monkeypatch.setattr(_files, "_IN_MEMORY", held_bytes)
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        client = sdk(gateway, key)
        made = client.images.generate(model="flux-2-pro", prompt="kept").data
        inline = client.images.generate(
            model="flux-2-pro", prompt="kept", response_format="b64_json"
        ).data
        assert made is not None
        assert made[0].url is not None
        served = httpx.get(made[0].url)
    assert inline is not None
    assert inline[0].b64_json is not None
    kept = sorted(path.name for path in tmp_path.iterdir())
    assert len(kept) == 2
    assert all(not name.startswith(".") for name in kept)
    assert served.status_code == 200
    assert served.content == (tmp_path / made[0].url.rsplit("/", 1)[1]).read_bytes()
    Image.open(io.BytesIO(served.content)).load()  # raises on a cut image
    decoded = base64.b64decode(inline[0].b64_json)
    Image.open(io.BytesIO(decoded)).load()
    assert decoded in [(tmp_path / name).read_bytes() for name in kept]


def test_an_image_is_kept_the_same_in_a_spare_file_as_in_a_new_one(tmp_path: Path) -> None:
    """The spare file made ahead (`FileStore.replenish`) holds what a new file would hold.

    Used only under the image's own extension, never twice, not when a sweep removed it
    meanwhile; one not used is removed on closing; with no spare, the file is made as before.
    """
    from flux_adapters.errors import OutputError
    from flux_adapters.gateway._files import FileStore

    png, jpeg = image_bytes(fmt="PNG"), image_bytes(fmt="JPEG")
    plain = FileStore(tmp_path / "plain", 60)
    store = FileStore(tmp_path / "spare", 60)

    def spare_of(at: FileStore) -> tuple[str, int] | None:
        return at._spare

    def kept(at: FileStore, data: bytes) -> tuple[str, bytes]:
        name = at._write_new(data)
        return name.rpartition(".")[2], (at.folder / name).read_bytes()

    store.replenish()  # under png, the format of none kept yet
    spare_name = store._spare[0] if store._spare else None
    assert spare_name is not None
    assert spare_name.endswith(".png")
    name = store._write_new(png)
    assert name == spare_name  # written into the spare
    assert (store.folder / name).read_bytes() == png
    assert kept(plain, png) == ("png", png)
    store._last_format = "png"
    store.replenish()
    waiting = store._spare
    assert waiting is not None
    assert kept(store, jpeg) == ("jpeg", jpeg)  # another format: a new file, the spare waits
    assert store._spare == waiting
    store.replenish()  # one spare at most
    assert store._spare == waiting
    os.unlink(store.folder / waiting[0])  # as a sweep would, had it waited past the retention
    name = store._write_new(png)
    assert name != waiting[0]  # written anew, under a name of its own
    assert name.endswith(".png")
    assert (store.folder / name).read_bytes() == png
    store.replenish()
    left = store._spare
    assert left is not None
    store.close()
    assert not (store.folder / left[0]).exists()
    store.replenish()  # closed: none made after
    assert spare_of(store) is None
    assert sorted(p.read_bytes() for p in store.folder.iterdir()) == sorted([png, jpeg, png])
    assert all(p.stat().st_size for p in store.folder.iterdir())

    gone = FileStore(tmp_path / "gone", 60)
    gone.folder.rmdir()
    gone.replenish()  # cannot: no spare, and the write says why, as without one
    assert gone._spare is None
    with pytest.raises(OutputError):
        gone._write_new(png)


def test_a_spare_file_is_made_off_the_event_loop_and_never_left_behind(tmp_path: Path) -> None:
    """`FileStore.replenish_async` creates the file in a worker thread (the next request, most
    often already there, is served meanwhile); closed or cancelled while the thread works, the
    file it made is removed; at most one spare is made at a time."""
    import threading

    from flux_adapters.gateway._files import FileStore

    made_in: list[threading.Thread] = []
    finished: list[object] = []
    entered, release = threading.Semaphore(0), threading.Event()

    def held(store: FileStore) -> FileStore:
        """*store*, its spares made only once `release` is set."""
        new_spare = store._new_spare

        def slow(extension: str) -> Any:
            made_in.append(threading.current_thread())
            entered.release()
            release.wait(5)
            made = new_spare(extension)
            finished.append(made)
            return made

        store._new_spare = slow  # type: ignore[method-assign]
        return store

    async def making(store: FileStore) -> asyncio.Future[None]:
        """`replenish_async` started, once its worker thread is at work."""
        release.clear()
        task = asyncio.ensure_future(store.replenish_async())
        assert await asyncio.to_thread(entered.acquire, timeout=5)
        return task

    async def scenario() -> None:
        store = held(FileStore(tmp_path, 60))
        made = await making(store)
        await store.replenish_async()  # one under way: nothing more started
        assert made_in[0] is not threading.current_thread()  # the loop went on meanwhile
        release.set()
        await made
        assert len(made_in) == 1
        assert store._spare is not None
        assert (tmp_path / store._spare[0]).exists()
        store.close()  # removes the spare
        assert list(tmp_path.iterdir()) == []

        closed = held(FileStore(tmp_path, 60))
        late = await making(closed)
        closed.close()  # while the thread makes one: that one goes too
        release.set()
        await late
        assert closed._spare is None
        assert list(tmp_path.iterdir()) == []

        cancelled = held(FileStore(tmp_path, 60))
        cut = await making(cancelled)
        cut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cut
        release.set()
        for _ in range(500):  # the thread's file, removed once made
            if len(finished) == 3 and not list(tmp_path.iterdir()):
                break
            await asyncio.sleep(0.01)
        assert finished[2] is not None  # a file was made, and then removed
        assert list(tmp_path.iterdir()) == []
        assert cancelled._spare is None

    asyncio.run(scenario())


def _changed_after_writing(how: str, path: Path) -> None:
    if how == "removed":
        path.unlink()
    elif how == "re-dated":  # past the retention, as test_kept_images_expire does
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    elif how == "replaced":  # another file at the name, of the same size
        other = path.with_name("other")
        other.write_bytes(bytes(reversed(path.read_bytes())))
        os.replace(other, path)
    elif how == "cut":  # the same file, shorter
        with path.open("r+b") as file:
            file.truncate(10)
    elif how == "modified":  # the same file, the same size, other bytes, a second later
        written = path.stat().st_mtime_ns
        with path.open("r+b") as file:
            file.write(bytes(reversed(path.read_bytes())))
        os.utime(path, ns=(written + 10**9, written + 10**9))  # a clock's tick may be coarse
    else:
        assert how == "as written"


@pytest.mark.parametrize(
    "how", ["as written", "removed", "re-dated", "replaced", "cut", "modified"]
)
def test_a_first_fetch_from_the_bytes_written_is_what_reading_the_file_gives(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image written last is fetched first from its bytes in memory (`FileStore.fresh`).

    Whatever befell its file since (removed, expired, replaced, cut short), that fetch answers
    what reading the file answers; only the file written, as written, is served without
    opening it; a second fetch reads the file.
    """
    from types import SimpleNamespace

    from flux_adapters.gateway import _app
    from flux_adapters.gateway._files import FileStore

    png = image_bytes(fmt="PNG")
    answers: list[object] = []
    for from_memory in (True, False):
        store = FileStore(tmp_path / str(from_memory), 60)
        store.replenish()
        name = store._write_new(png)
        path = store.path(name)
        assert path is not None
        if not from_memory:
            store._fresh.clear()
        _changed_after_writing(how, Path(path))
        gateway: Any = SimpleNamespace(files=store)
        try:
            answers.append(_app._small_file(gateway, path, name))
        except OSError as exc:
            answers.append(type(exc))
    assert answers[0] == answers[1]
    assert (
        answers[0]
        == {
            "as written": png,
            "removed": FileNotFoundError,
            "re-dated": None,
            "replaced": bytes(reversed(png)),
            "cut": png[:10],
            "modified": bytes(reversed(png)),
        }[how]
    )

    if how == "as written":  # without opening the file, once
        store = FileStore(tmp_path / "once", 60)
        store.replenish()
        name = store._write_new(png)
        path = store.path(name)
        assert path is not None
        gateway = SimpleNamespace(files=store)
        opened: list[str] = []
        real_open = os.open

        def counted(file: str, *rest: Any, **named: Any) -> int:
            opened.append(file)
            return real_open(file, *rest, **named)

        monkeypatch.setattr(os, "open", counted)
        assert _app._small_file(gateway, path, name) == png
        assert opened == []
        assert _app._small_file(gateway, path, name) == png
        assert opened == [path]


def test_calls_after_the_first_keep_their_image_in_a_spare_file(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the gateway: each served image is its kept file, the spares are used, and none
    is left behind once the gateway stops."""
    from flux_adapters.gateway._files import FileStore

    spares: list[str] = []
    keep_spare = FileStore._keep_spare

    def recording(self: FileStore, made: Any) -> None:
        keep_spare(self, made)
        if self._spare is not None and self._spare[0] not in spares:
            spares.append(self._spare[0])

    monkeypatch.setattr(FileStore, "_keep_spare", recording)
    names = []
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        client = sdk(gateway, key)
        for _ in range(4):
            made = client.images.generate(model="flux-2-pro", prompt="kept").data
            assert made is not None
            assert made[0].url is not None
            served = httpx.get(made[0].url)
            name = made[0].url.rsplit("/", 1)[1]
            assert served.status_code == 200
            assert served.content == (tmp_path / name).read_bytes()
            Image.open(io.BytesIO(served.content)).load()
            names.append(name)
        inline = client.images.generate(
            model="flux-2-pro", prompt="kept", response_format="b64_json"
        ).data
        assert inline is not None
        assert inline[0].b64_json is not None
    assert set(names[1:]) <= set(spares)  # the first call made its own (png guessed, jpeg came)
    kept = sorted(path.name for path in tmp_path.iterdir())
    assert len(kept) == 5  # the four served, the one inline: no spare left
    assert set(names) <= set(kept)
    assert base64.b64decode(inline[0].b64_json) in [(tmp_path / n).read_bytes() for n in kept]


def test_every_kind_of_call_ending_gives_back_the_bodies_it_held(
    emulator: Emulator, tmp_path: Path
) -> None:
    # A body counted in and never counted out shrinks the room for every later call, for good:
    # after enough such endings every call is a 503 server_busy. Every kind of ending, then the
    # count must be back at nothing.
    with (
        contextlib.ExitStack() as after_the_gateway,
        run_gateway(
            files_dir=tmp_path,
            clients=single(emulator, "laozhang"),
            max_body_bytes=4000,
            max_bodies_bytes=12_000,
            body_timeout=0.3,
        ) as running,
    ):
        key, _ = running.add_key()
        gateway = running.gateway
        good = {"authorization": f"Bearer {key}"}
        url = running.url + "/images/generations"
        address = httpx.URL(running.url)

        def raw(head: bytes, body: bytes, *, wait: bool) -> bytes:
            with socket.create_connection((address.host, address.port), timeout=30) as conn:
                conn.sendall(
                    b"POST /v1/images/generations HTTP/1.1\r\nhost: gateway\r\n"
                    + f"authorization: Bearer {key}\r\n".encode()
                    + head
                    + b"\r\n"
                    + body
                )
                answer = b""
                while wait and (piece := conn.recv(65536)):  # to the end (30 s bound)
                    answer += piece
                return answer

        codes = []
        for _ in range(1):  # one of each: a single leak leaves a count above nothing
            codes.append(httpx.post(url, json={"prompt": "p"}, timeout=30).status_code)  # 401
            broken = httpx.post(  # a multipart body cut short
                running.url + "/images/edits",
                content=b'--b\r\ncontent-disposition: form-data; name="prompt"\r\n\r\np',
                headers={**good, "content-type": "multipart/form-data; boundary=b"},
                timeout=30,
            )
            codes.append(broken.status_code)
            codes.append(  # 413, declared
                httpx.post(url, json={"prompt": "x" * 5000}, headers=good, timeout=30).status_code
            )
            codes.append(  # invalid JSON
                httpx.post(
                    url,
                    content=b"{not json",
                    headers={**good, "content-type": "application/json"},
                    timeout=30,
                ).status_code
            )
            codes.append(  # a number too long
                httpx.post(
                    url,
                    content=b'{"prompt": "p", "n": ' + b"9" * 100 + b"}",
                    headers={**good, "content-type": "application/json"},
                    timeout=30,
                ).status_code
            )
            # 408: a body that stops coming
            answer = raw(
                b"content-type: application/json\r\ncontent-length: 100\r\n",
                b'{"prompt": "',
                wait=True,
            )
            codes.append(int(answer.split()[1]))
            # the client gone mid-body, and mid-call (the provider holding its answer)
            raw(b"content-type: application/json\r\ncontent-length: 100\r\n", b"{", wait=False)
            emulator.inject("laozhang", Fault(status=500, first=1))
            codes.append(
                httpx.post(url, json={"prompt": "p"}, headers=good, timeout=30).status_code
            )
            with one_call_under_way(url, good, {"prompt": "x" * 3000}) as first:
                busy = httpx.post(url, json={"prompt": "y" * 3000}, headers=good, timeout=30)
                codes.append(busy.status_code)  # 503
            assert first.result().status_code == 200
            body = json.dumps({"prompt": "gone"}).encode()
            with held_at_the_provider() as reached:
                raw(
                    b"content-type: application/json\r\n"
                    + f"content-length: {len(body)}\r\n".encode(),
                    body,
                    wait=False,
                )
                reached.wait(30)  # the gone call is at the provider, which holds its answer
                codes.append(
                    httpx.post(url, json={"prompt": "ok"}, headers=good, timeout=30).status_code
                )
        for _ in range(3000):  # the calls cut short end on the gateway's side (bounded)
            if gateway.bodies_held == 0:
                break
            time.sleep(0.01)
        assert gateway.bodies_held == 0, (gateway.bodies_held, codes)
        # shutdown with a call under way (cancelled, or left to finish): the call is held at the
        # provider until after the gateway stopped, its client waiting in a thread till then
        pool = after_the_gateway.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        reached = after_the_gateway.enter_context(held_at_the_provider())
        pool.submit(
            raw,
            b"content-type: application/json\r\ncontent-length: 17\r\n",
            b'{"prompt": "end"}',
            wait=True,
        )
        reached.wait(30)
        assert gateway.bodies_held
    assert gateway.bodies_held == 0
    assert set(codes) == {401, 413, 400, 408, 502, 503, 200}, codes


def test_a_shutdown_cut_short_leaves_no_spare_file(tmp_path: Path) -> None:
    # A second Ctrl-C cancels the closing while a client or the state is still being closed:
    # the empty spare made for the next call must not stay behind in the images' folder.
    from flux_adapters.gateway._app import Gateway

    class Stuck:
        async def aclose(self) -> None:
            await asyncio.Event().wait()  # never closes

    stuck: Any = Stuck()
    gateway = Gateway(GatewaySettings(files_dir=tmp_path), lambda only: stuck, stuck, stuck)
    gateway.files.replenish()
    assert len(list(tmp_path.iterdir())) == 1  # the spare

    async def shut_down() -> None:
        closing = asyncio.ensure_future(gateway.aclose())
        await asyncio.sleep(0.05)
        assert not closing.done()  # held by the state's close
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing

    asyncio.run(shut_down())
    assert list(tmp_path.iterdir()) == []


def test_request_ids_differ_whoever_seeds_random_and_after_a_fork() -> None:
    """Code beside the gateway seeding `random`'s shared generator (``random.seed(0)``, common
    for reproducible runs) does not make every call's id the same (they key the paid calls
    under way, and name each in the logs); a forked child makes ids of its own."""
    import random

    from flux_adapters.gateway._app import _request_id

    state = random.getstate()
    try:
        ids = set()
        for _ in range(3):
            random.seed(0)
            ids.add(_request_id())
    finally:
        random.setstate(state)
    assert len(ids) == 3

    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.write(write, _request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read, "rb") as pipe:
        theirs = pipe.read().decode()
    assert theirs.startswith("gw-")
    assert theirs != _request_id()
