"""The gateway against a careless client, a hostile provider and a failing shared state: what a
client that leaves, a provider that lies and a Redis that goes away get. Each test is a problem
that was found (attack 31), shown on real parts (the loopback emulator, real sockets), then
fixed."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux_adapters.emulator import Emulator, run_emulator
from flux_adapters.gateway import RunningGateway, run_gateway
from tests.conftest import held_at_the_provider
from tests.test_gateway import PROVIDER_SECRET, RewrittenBfl, single


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_emulator(emulator: Emulator) -> None:
    emulator.clear_faults()


def _raw_generation(gateway: RunningGateway, key: str) -> socket.socket:
    """A connection that has sent a whole generation call and reads nothing back."""
    host, port = gateway.root.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"prompt": "a robot", "size": "64x64"}).encode()
    head = (
        "POST /v1/images/generations HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    connection = socket.create_connection((host, int(port)))
    connection.sendall(head.encode() + body)
    return connection


def _access_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """The gateway's access line for the one image call, once it is logged (bounded wait)."""
    for _ in range(1000):
        for record in caplog.records:
            if record.name == "flux_adapters.gateway.access":
                line: dict[str, Any] = json.loads(record.getMessage())
                if line["route"] == "/v1/images/generations":
                    return line
        time.sleep(0.01)
    raise AssertionError("no access line")


def test_a_client_gone_before_its_paid_answer_is_logged_as_possibly_billed(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The client left while the provider made (and billed) its image: uvicorn drops the answer
    # without a word, and the access line said 200 as if it had been given. Nothing said that
    # a paid job reached no one.
    caplog.set_level(logging.INFO, logger="flux_adapters.gateway")
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, record = gateway.add_key()
        with held_at_the_provider() as reached:
            connection = _raw_generation(gateway, key)
            assert reached.wait(30)
            connection.close()  # before the provider answers
        line = _access_line(caplog)
    assert line["client_gone"] is True
    assert line["provider"] == "laozhang"
    gone = [
        json.loads(r.getMessage())
        for r in caplog.records
        if r.name == "flux_adapters.gateway" and '"client-gone"' in r.getMessage()
    ]
    assert len(gone) == 1, [r.getMessage() for r in caplog.records]
    assert gone[0]["may_be_billed"] is True
    assert gone[0]["request_id"] == line["request_id"]
    assert gone[0]["key"] == record.id
    assert key not in caplog.text


class _HeldBudget:
    """Holds the next budget reservation until the test releases it (from its thread)."""

    def __init__(self, gateway: RunningGateway) -> None:
        self.reached, self.release = threading.Event(), threading.Event()
        state = gateway.gateway.state
        self._reserve = state.reserve
        state.reserve = self.reserve  # type: ignore[method-assign]

    async def reserve(self, *args: Any, **kwargs: Any) -> Any:
        self.reached.set()
        while not self.release.is_set():
            await asyncio.sleep(0.005)
        return await self._reserve(*args, **kwargs)


def test_a_client_gone_before_its_call_was_sent_is_not_paid_for(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The client left while its call waited for its key's budget (a slow Redis): the call was
    # sent to the provider all the same, paid for an image no one would get (and an OpenAI SDK
    # that gave up sends the call again: paid twice).
    caplog.set_level(logging.INFO, logger="flux_adapters.gateway")
    before = len(emulator.calls("laozhang"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, record = gateway.add_key(budget_usd=1)
        held = _HeldBudget(gateway)
        connection = _raw_generation(gateway, key)
        assert held.reached.wait(30)
        connection.shutdown(socket.SHUT_RDWR)
        connection.close()
        held.release.set()
        line = _access_line(caplog)
        spent = asyncio.run_coroutine_threadsafe(
            gateway.gateway.state.spent(f"key:{record.id}", record.period), gateway._loop
        ).result(30)
    assert len(emulator.calls("laozhang")) == before
    assert line["status"] == 499
    assert line["client_gone"] is True
    assert spent == 0


def _inflated_cost(body: dict[str, Any], request: httpx.Request) -> None:
    """The emulator's BFL reporting a cost of 10^12 credits ($10^10) for each job."""
    body["cost"] = 1e12


def test_a_cost_reported_beyond_what_a_budget_holds_still_spends_the_keys_budget(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The key's budget was settled at the provider's own figure, refused by the state (more
    # than $1e9): the settle failed, the budget kept only the $0.03 estimate, and the key
    # went on calling as if nothing had been spent.
    inflated = RewrittenBfl(emulator, _inflated_cost)
    before = len(emulator.calls("bfl", kind="submit"))
    with run_gateway(files_dir=tmp_path, clients=inflated) as gateway:
        key, _ = gateway.add_key(budget_usd=1)
        headers = {"authorization": f"Bearer {key}"}
        call = {"prompt": "a robot", "size": "64x64"}
        first = httpx.post(gateway.url + "/images/generations", json=call, headers=headers)
        second = httpx.post(gateway.url + "/images/generations", json=call, headers=headers)
        inflated.close(gateway)
    assert first.status_code == 200, first.text
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "budget_exceeded"
    assert len(emulator.calls("bfl", kind="submit")) == before + 1


@pytest.mark.parametrize("guidance", ["0_5", "\u0665"])
def test_a_multipart_guidance_that_only_looks_like_a_number_is_a_400_not_sent(
    guidance: str, emulator: Emulator, tmp_path: Path
) -> None:
    # float() takes "0_5" and an Arabic-Indic five as 5.0: the edit went to the provider (and
    # was paid for) with a guidance the client never wrote; the integer fields refuse them.
    from tests.conftest import image_bytes

    before = len(emulator.calls("bfl", kind="submit"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "bfl")) as gateway:
        key, _ = gateway.add_key()
        answer = httpx.post(
            gateway.url + "/images/edits",
            data={"prompt": "x", "model": "flux-2-flex", "guidance": guidance},
            files={"image": ("a.png", image_bytes(64, 64), "image/png")},
            headers={"authorization": f"Bearer {key}"},
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "guidance"
    assert len(emulator.calls("bfl", kind="submit")) == before


def test_a_json_field_named_by_a_lone_surrogate_is_a_400_that_names_it_not_a_500(
    emulator: Emulator, tmp_path: Path
) -> None:
    # JSON's "\udcff" is a lone surrogate: the 400 naming the unknown field could not be
    # encoded as UTF-8, and the client got a 500 "internal error in the gateway".
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        answer = httpx.post(
            gateway.url + "/images/generations",
            content=b'{"prompt": "x", "\\udcff": 1}',
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["violations"][0]["field"] == "\udcff"


def _multipart(prompt: bytes, name: bytes = b"prompt") -> bytes:
    from tests.conftest import image_bytes

    return (
        b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + image_bytes(64, 64) + b"\r\n"
        b'--XyZ\r\nContent-Disposition: form-data; name="'
        + name
        + b'"\r\n\r\n'
        + prompt
        + b"\r\n--XyZ--\r\n"
    )


@pytest.mark.parametrize(
    ("prompt", "name"),
    [
        ("机器人在温室里".encode("gbk"), b"prompt"),  # a terminal in GBK, curl -F prompt=...
        ("ロボット".encode("shift_jis"), b"prompt"),
        (b"a robot", "prömpt".encode("latin-1")),
    ],
)
def test_multipart_text_that_is_not_utf_8_is_refused_not_sent_as_mojibake(
    prompt: bytes, name: bytes, emulator: Emulator, tmp_path: Path
) -> None:
    # Starlette decodes a multipart field that is not UTF-8 as Latin-1, silently: the prompt
    # went to the provider (and was paid for) as "»úÆ÷ÈËÔÚÎÂÊÒÀï".
    before = len(emulator.calls("laozhang"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        headers = {"authorization": f"Bearer {key}"}
        refused = httpx.post(
            gateway.url + "/images/edits",
            content=_multipart(prompt, name),
            headers={**headers, "content-type": "multipart/form-data; boundary=XyZ"},
        )
        assert len(emulator.calls("laozhang")) == before
        served = httpx.post(  # the same text in UTF-8 is a prompt
            gateway.url + "/images/edits",
            content=_multipart("机器人 ロボット".encode(), b"prompt"),
            headers={**headers, "content-type": "multipart/form-data; charset=UTF-8; boundary=XyZ"},
        )
    assert refused.status_code == 400, refused.text
    assert "is not UTF-8 text" in refused.json()["error"]["message"]
    assert served.status_code == 200, served.text


@pytest.mark.parametrize(
    ("settings", "damaged"),
    [
        ({"budget_usd": 1}, "flux:budget:key:{id}:total"),
        ({"rate_per_minute": 60}, "flux:rate:gwkey-{id}"),
    ],
)
def test_a_shared_state_failing_a_keys_budget_or_rate_is_logged_and_counted(
    settings: dict[str, Any],
    damaged: str,
    emulator: Emulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Redis failing the key's own budget or rate limit (here a key of the wrong type: WRONGTYPE)
    # was answered 503 by an exception handler: no access line, not in requests_total, and not
    # in flux_gateway_state_failures_total, which the docs give for alerting on it.
    from tests.redis_server import redis_server

    caplog.set_level(logging.INFO, logger="flux_adapters.gateway")
    before = len(emulator.calls("laozhang"))
    with (
        redis_server() as redis,
        run_gateway(
            files_dir=tmp_path, clients=single(emulator, "laozhang"), state_url=redis.url
        ) as gateway,
    ):
        key, record = gateway.add_key(**settings)
        redis.client().rpush(damaged.format(id=record.id), "not a number")  # type: ignore[attr-defined]
        answer = httpx.post(
            gateway.url + "/images/generations",
            json={"prompt": "a robot", "size": "64x64"},
            headers={"authorization": f"Bearer {key}"},
        )
        line = _access_line(caplog)
        metrics = httpx.get(gateway.root + "/metrics").text
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "state_unavailable"
    assert len(emulator.calls("laozhang")) == before
    assert line["status"] == 503
    assert line["key"] == record.id
    assert 'flux_gateway_state_failures_total{step="call"} 1.0' in metrics
    assert 'flux_gateway_requests_total{route="/v1/images/generations",status="503"} 1.0' in metrics


def test_a_client_gone_while_sending_its_body_is_in_the_access_log(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The call ended with a bare 499 that bypassed the access line and the request metrics: a
    # client dropping its uploads was invisible.
    caplog.set_level(logging.INFO, logger="flux_adapters.gateway")
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, record = gateway.add_key()
        host, port = gateway.root.removeprefix("http://").rsplit(":", 1)
        connection = socket.create_connection((host, int(port)))
        connection.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: gw\r\n"
            + f"Authorization: Bearer {key}\r\n".encode()
            + b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"prompt": '
        )
        connection.shutdown(socket.SHUT_RDWR)
        connection.close()
        line = _access_line(caplog)
        metrics = httpx.get(gateway.root + "/metrics").text
    assert line["status"] == 499
    assert line["client_gone"] is True
    assert line["key"] == record.id
    assert 'route="/v1/images/generations",status="499"' in metrics


def test_a_paid_call_cut_at_shutdown_while_its_image_is_fetched_is_logged(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The provider had made (and billed) the image; the gateway was fetching it to keep it when
    # the shutdown's grace ran out. Only a cut inside the provider call was logged: this one
    # left no cut-at-shutdown line and no access line, a paid call lost silently.
    import signal
    import subprocess

    from flux_adapters.emulator import Fault, _answers
    from tests.test_gateway_cli import serve

    fetching = threading.Event()
    download = _answers.download

    def watched(*args: Any) -> Any:
        fetching.set()
        return download(*args)

    monkeypatch.setattr(_answers, "download", watched)
    emulator.inject("laozhang", Fault(download="drip", drip=0.5))  # never ends in time
    process, root, key = serve(emulator, tmp_path, "--shutdown-timeout", "0")
    try:
        caller = threading.Thread(
            target=lambda: httpx.post(
                root + "/v1/images/generations",
                json={"prompt": "cut", "model": "flux-2-pro"},
                headers={"authorization": f"Bearer {key}"},
                timeout=60,
            ),
            daemon=True,
        )
        caller.start()
        assert fetching.wait(30)  # the image is being fetched: the job was done, and billed
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    finally:
        process.kill()
    assert len(emulator.billed("laozhang")) >= 1
    cut = [json.loads(line) for line in err.splitlines() if '"cut-at-shutdown"' in line]
    assert len(cut) == 1, err
    assert cut[0]["may_be_billed"] is True
    assert key not in err


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "a robot", "size": "64x64", "size": "128x128"}',
        b'{"prompt": "a robot", "size": "64x64", "prompt": "a cat"}',
    ],
)
def test_a_json_field_given_twice_is_refused_not_half_dropped(
    body: bytes, emulator: Emulator, tmp_path: Path
) -> None:
    # json.loads keeps the last of two same-named fields, silently: the call was sent (and paid)
    # with one of them dropped; a multipart field given twice is refused.
    before = len(emulator.calls("laozhang"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        answer = httpx.post(
            gateway.url + "/images/generations",
            content=body,
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        )
    assert answer.status_code == 400, answer.text
    assert "given twice" in answer.json()["error"]["message"]
    assert len(emulator.calls("laozhang")) == before


def test_with_state_fallback_local_a_known_key_is_served_while_redis_is_down(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # state_fallback = "local" kept budgets and rate limits going when Redis died, and /readyz
    # said ready ("state": "local"), but every call was a 503: the gateway keys live in Redis and
    # their lookup never fell back. A load balancer kept sending calls to a gateway that could
    # serve none of them.
    from tests.redis_server import redis_server

    monkeypatch.delenv("FLUX_STATE_URL", raising=False)
    monkeypatch.setenv("A31_LAOZHANG_KEY", PROVIDER_SECRET)
    before = len(emulator.calls("laozhang"))
    with redis_server() as redis:
        config = tmp_path / "flux-adapters.toml"
        config.write_text(
            f'providers = ["laozhang"]\nstate_url = "{redis.url}"\nstate_fallback = "local"\n'
            f'[provider.laozhang]\napi_key_env = "A31_LAOZHANG_KEY"\n'
            f'base_url = "{emulator.base_url("laozhang")}"\n'
        )
        with run_gateway(files_dir=tmp_path / "files", config=config) as gateway:
            key, _ = gateway.add_key(budget_usd=5)
            stranger, _ = gateway.add_key()  # stored, never used before the outage
            call = {"prompt": "a robot", "size": "64x64"}
            first = httpx.post(
                gateway.url + "/images/generations",
                json=call,
                headers={"authorization": f"Bearer {key}"},
            )
            redis.kill()
            during = httpx.post(
                gateway.url + "/images/generations",
                json=call,
                headers={"authorization": f"Bearer {key}"},
            )
            unknown = httpx.post(
                gateway.url + "/images/generations",
                json=call,
                headers={"authorization": f"Bearer {stranger}"},
            )
            ready = httpx.get(gateway.root + "/readyz")
    assert first.status_code == 200, first.text
    assert ready.json()["state"] == "local"
    assert during.status_code == 200, during.text
    # A key never seen cannot be checked without Redis: nothing is sent for it.
    assert unknown.status_code == 503, unknown.text
    assert unknown.json()["error"]["code"] == "state_unavailable"
    assert len(emulator.calls("laozhang")) == before + 2


def test_with_state_fallback_local_a_frozen_redis_is_waited_for_once_not_at_every_call(
    emulator: Emulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A frozen Redis (SIGSTOP: connected, answering nothing) made every call wait out the key
    # lookup's timeout before the gateway used the key it remembered: the lookup never skipped
    # Redis after a failure, as the state's budgets and rate limits do. And the key lookup and
    # each provider subset's client had a Redis state of their own: the lookup waited for it,
    # then the call's admission again, and each state warned of the same outage.
    from tests.redis_server import redis_server

    monkeypatch.delenv("FLUX_STATE_URL", raising=False)
    monkeypatch.setenv("A31_LAOZHANG_KEY", PROVIDER_SECRET)
    caplog.set_level(logging.DEBUG, logger="flux_adapters")
    call = {"prompt": "a robot", "size": "64x64"}
    with redis_server() as redis:
        config = tmp_path / "flux-adapters.toml"
        config.write_text(
            f'providers = ["laozhang"]\nstate_url = "{redis.url}?socket_timeout=0.3"\n'
            f'state_fallback = "local"\n[provider.laozhang]\napi_key_env = "A31_LAOZHANG_KEY"\n'
            f'base_url = "{emulator.base_url("laozhang")}"\n'
        )
        with run_gateway(files_dir=tmp_path / "files", config=config) as gateway:
            key, _ = gateway.add_key()
            headers = {"authorization": f"Bearer {key}"}
            first = httpx.post(gateway.url + "/images/generations", json=call, headers=headers)
            redis.freeze()
            try:
                during = [
                    httpx.post(gateway.url + "/images/generations", json=call, headers=headers)
                    for _ in range(3)
                ]
            finally:
                redis.thaw()
    assert first.status_code == 200, first.text
    assert [answer.status_code for answer in during] == [200, 200, 200]
    taken = [r.getMessage() for r in caplog.records if "taken as last read" in r.getMessage()]
    assert len(taken) == 3
    assert (
        sum("did not answer within 0.3 s" in said for said in taken) == 1
    )  # Redis waited for once
    outages = [r for r in caplog.records if "shared state unavailable" in r.getMessage()]
    assert len(outages) == 1, [r.getMessage() for r in outages]  # one state, one outage
    assert key not in caplog.text


@pytest.mark.parametrize(
    ("field", "value"), [("model", ""), ("model", False), ("response_format", "")]
)
def test_an_empty_model_or_format_is_refused_not_taken_as_the_default(
    field: str, value: object, emulator: Emulator, tmp_path: Path
) -> None:
    # `values.pop("model") or default` took "" (an unset variable in the client's template)
    # and false as "flux-2-pro": the call was sent, and paid, for a model nobody named.
    before = len(emulator.calls("laozhang"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        answer = httpx.post(
            gateway.url + "/images/generations",
            json={"prompt": "a robot", "size": "64x64", field: value},
            headers={"authorization": f"Bearer {key}"},
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field
    assert len(emulator.calls("laozhang")) == before


def test_an_image_made_but_not_kept_is_logged_as_possibly_billed(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The client got a 502 result_not_kept, may_be_billed; the access line, which says
    # may_be_billed for every failed call, said nothing of it: a paid 502 looked like any other.
    from flux_adapters.emulator import Fault

    caplog.set_level(logging.INFO, logger="flux_adapters.gateway")
    emulator.inject("laozhang", Fault(download="html"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        answer = httpx.post(
            gateway.url + "/images/generations",
            json={"prompt": "a robot", "size": "64x64"},
            headers={"authorization": f"Bearer {key}"},
        )
        line = _access_line(caplog)
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["code"] == "result_not_kept"
    assert line["status"] == 502
    assert line["may_be_billed"] is True
