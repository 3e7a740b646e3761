"""Attacks on the gateway, the shared state and the shared batch (issue 12's new code): a hostile
client, a hostile provider, a careless operator. Each test is a problem that was found, shown on
real parts (the loopback emulator, a real redis-server, real files), then fixed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux_adapters import AsyncFluxClient, errors
from flux_adapters.emulator import Emulator, Fault, run_emulator
from flux_adapters.gateway import FileKeys, run_gateway
from tests.conftest import image_bytes
from tests.redis_server import RedisServer, redis_server
from tests.test_gateway import PROVIDER_SECRET, single


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_emulator(emulator: Emulator) -> None:
    emulator.clear_faults()


# -- a careless or hostile client ----------------------------------------------------------------


@pytest.mark.parametrize("seed", ["--5", "\u00b2", "- 5"])
def test_a_multipart_number_that_only_looks_like_digits_is_a_400_not_a_500(
    seed: str, emulator: Emulator, tmp_path: Path
) -> None:
    # "--5".lstrip("-") and "²" pass str.isdigit(), and int() then refused them: a 500.
    before = len(emulator.calls("laozhang"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        answer = httpx.post(
            gateway.url + "/images/edits",
            data={"prompt": "x", "seed": seed},
            files={"image": ("a.png", image_bytes(64, 64), "image/png")},
            headers={"authorization": f"Bearer {key}"},
        )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "seed"
    assert len(emulator.calls("laozhang")) == before


def test_a_json_body_of_a_million_tiny_values_is_refused_before_it_is_parsed(
    emulator: Emulator, tmp_path: Path
) -> None:
    # 3 MB of "{}," would parse into a million dicts (about 64 MB of Python objects): refused
    # from its bytes. A prompt with thousands of commas is still a prompt.
    before = len(emulator.calls("laozhang"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        bomb = b'{"prompt": "x", "user": [' + b"{}," * 1_000_000 + b"{}]}"
        refused = httpx.post(gateway.url + "/images/generations", content=bomb, headers=headers)
        assert len(emulator.calls("laozhang")) == before
        commas = httpx.post(
            gateway.url + "/images/generations",
            json={"prompt": "a robot, " * 2000, "size": "64x64"},
            headers=headers,
        )
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "invalid_json"
    assert "more than 100,000 JSON values" in refused.json()["error"]["message"]
    assert commas.status_code == 200, commas.text


def test_a_json_body_of_long_numbers_is_refused_before_they_are_converted(
    emulator: Emulator, tmp_path: Path
) -> None:
    # Within the values cap, 24,000 numbers of 4,000 digits (96 MB) took 1.6 s of the gateway's
    # loop to convert (a bare str-to-int is quadratic in its digits): every other call waited.
    # No field of a generation has a number of more than a few digits.
    before = len(emulator.calls("laozhang"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        long = b"9" * 4000
        body = b'{"prompt": "x", "user": [' + b",".join([long] * 3) + b"]}"
        refused = httpx.post(gateway.url + "/images/generations", content=body, headers=headers)
        seeded = httpx.post(
            gateway.url + "/images/generations",
            json={"prompt": "x", "size": "64x64", "seed": 4294967295},
            headers=headers,
        )
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "invalid_json"
    assert "a number of more than 40 digits" in refused.json()["error"]["message"]
    assert len(emulator.calls("laozhang")) == before + 1  # only the call with plain numbers
    assert seeded.status_code == 200, seeded.text


@pytest.mark.parametrize(
    "damaged",
    [
        '{"keys": [',  # cut short by a full disk, say
        # a hand edit: a number too large for a float (json reads it as an int; float() of it
        # raised OverflowError, outside the refusals of a damaged record)
        json.dumps({"keys": [{"id": "a", "key_hash": "0" * 64, "budget_usd": 10**400}]}),
        json.dumps({"keys": [{"id": "a", "key_hash": "0" * 64, "created": 10**400}]}),
    ],
    ids=["cut-short", "huge-budget", "huge-created"],
)
def test_a_damaged_key_file_is_a_500_that_names_the_problem_in_the_log_not_a_bug(
    damaged: str, emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.json"
    keys = FileKeys(path)
    with run_gateway(
        files_dir=tmp_path / "files", clients=single(emulator, "laozhang"), keys=keys
    ) as gateway:
        key, _ = gateway.add_key()
        path.write_text(damaged, encoding="utf-8")
        with caplog.at_level("ERROR", logger="flux_adapters.gateway"):
            answer = httpx.post(
                gateway.url + "/images/generations",
                json={"prompt": "x"},
                headers={"authorization": f"Bearer {key}"},
            )
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "keys_unreadable"
    assert answer.headers["x-should-retry"] == "false"
    assert str(path) not in answer.text  # the caller learns nothing of the server's files
    logged = [record.getMessage() for record in caplog.records]
    assert any(f"cannot read the key file {path}" in line for line in logged), logged
    assert not any(record.exc_info for record in caplog.records)  # no traceback: not a bug


@pytest.mark.parametrize(
    ("field", "value"),
    [
        # a hand edit: one provider written as a string was read as the letters b, f and l,
        # so every call of the key was refused (403) and the file never called damaged
        ("allowed_providers", "bfl"),
        ("allowed_models", "flux-2-pro"),
        ("allowed_models", ["flux-2-pro", 2]),
        ("budget_usd", "50"),  # read as 50.0 before
        ("rate_per_minute", True),
        ("created", "yesterday"),
        ("name", 5),  # read as "5" before
        ("id", 12345678),
    ],
)
def test_a_key_record_with_a_field_of_another_type_is_damaged_not_converted(
    field: str, value: object
) -> None:
    from flux_adapters.errors import ConfigurationError
    from flux_adapters.gateway._keys import new_key, record_from_dict, record_to_dict

    _, record = new_key(name="ci", budget_usd=5, allowed_providers=["bfl"], rate_per_minute=60)
    written = record_to_dict(record)
    assert record_from_dict(written) == record  # what it writes, it reads back
    with pytest.raises(ConfigurationError, match="a gateway key record is damaged"):
        record_from_dict({**written, field: value})


@pytest.mark.parametrize("field", ["prompt", "seed", "image_urls"])
def test_a_file_sent_in_a_text_field_is_refused_not_sent_as_text(
    field: str, emulator: Emulator, tmp_path: Path
) -> None:
    # A file part named "prompt" became the prompt "(a file)", sent (and billed) as such.
    before = len(emulator.calls("laozhang"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        data = {} if field == "prompt" else {"prompt": "x"}
        answer = httpx.post(
            gateway.url + "/images/edits",
            data=data,
            files=[
                (field, ("p.txt", b"a red robot", "text/plain")),
                ("image", ("a.png", image_bytes(64, 64))),
            ],
            headers={"authorization": f"Bearer {key}"},
        )
    assert answer.status_code == 400
    assert field in answer.json()["error"]["message"]
    assert len(emulator.calls("laozhang")) == before


def test_an_image_given_as_text_in_an_edit_is_refused_not_dropped(
    emulator: Emulator, tmp_path: Path
) -> None:
    # ``image=http://...`` as a text part was dropped without a word: the edit ran without it.
    before = len(emulator.calls("laozhang"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "laozhang")) as gateway:
        key, _ = gateway.add_key()
        answer = httpx.post(
            gateway.url + "/images/edits",
            data={"prompt": "x", "image": "https://example.com/robot.png"},
            files={"image[]": ("a.png", image_bytes(64, 64), "image/png")},
            headers={"authorization": f"Bearer {key}"},
        )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "image"
    assert len(emulator.calls("laozhang")) == before


# -- a hostile provider --------------------------------------------------------------------------


def test_a_key_budget_counts_a_job_the_provider_accepted_then_moderated(
    emulator: Emulator, tmp_path: Path
) -> None:
    # fal bills a job it accepted and then moderated; the gateway refunded the key's budget for
    # it (the answer's may_be_billed is about moderation), so moderated calls spent without end.
    emulator.inject("fal", Fault(outcome="content-moderated", pending=0))
    billed = len(emulator.billed("fal"))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, "fal")) as gateway:
        key, _ = gateway.add_key(budget_usd=0.09)  # fal: $0.03 a megapixel; 1024x1024 is $0.03+
        statuses = []
        for _ in range(6):
            answer = httpx.post(
                gateway.url + "/images/generations",
                json={"prompt": "moderated", "width": 1024, "height": 1024},
                headers={"authorization": f"Bearer {key}"},
                timeout=60,
            )
            statuses.append((answer.status_code, answer.json()["error"]["code"]))
    spent = len(emulator.billed("fal")) - billed
    assert (429, "budget_exceeded") in statuses
    assert spent <= 3  # the $0.09 budget, passed by at most one call's price


@pytest.mark.parametrize("provider", ["bfl", "fal"])
@pytest.mark.parametrize("status", [400, 401, 402])
def test_a_refused_poll_of_an_accepted_job_says_it_may_be_billed(
    provider: str, status: int, emulator: Emulator, tmp_path: Path
) -> None:
    # The job was accepted (and billed), then a poll was refused: the answer said
    # may_be_billed false (a 400, 402 or "key refused"), inviting a caller to send it again.
    emulator.inject(provider, Fault(on="poll", status=status))
    billed = len(emulator.billed(provider))
    with run_gateway(files_dir=tmp_path, clients=single(emulator, provider)) as gateway:
        key, _ = gateway.add_key()
        answer = httpx.post(
            gateway.url + "/images/generations",
            json={"prompt": "accepted", "width": 512, "height": 512},
            headers={"authorization": f"Bearer {key}"},
            timeout=60,
        )
    assert len(emulator.billed(provider)) == billed + 1
    assert answer.status_code == 502
    assert answer.json()["error"]["may_be_billed"] is True
    assert answer.json()["error"]["code"] == "provider_error_may_be_billed"
    assert answer.headers["x-should-retry"] == "false"


# -- a careless operator -------------------------------------------------------------------------


def test_a_key_file_that_is_a_fifo_is_an_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "keys.json"
    os.mkfifo(fifo)
    outcome: list[BaseException | object] = []

    def look() -> None:
        try:
            outcome.append(FileKeys(fifo).list_sync())
        except BaseException as exc:  # reported to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=look, daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():  # unblock the reader so the thread ends, then fail
        with open(fifo, "w"):
            pass
        worker.join(timeout=30)
        pytest.fail("reading a FIFO key file hung")
    assert isinstance(outcome[0], errors.ConfigurationError)
    assert "keys.json" in str(outcome[0])


def test_a_key_file_in_a_missing_folder_is_a_configuration_error(tmp_path: Path) -> None:
    from flux_adapters.gateway import new_key

    _, record = new_key(name="x")
    with pytest.raises(errors.ConfigurationError):
        FileKeys(tmp_path / "no-such-folder" / "keys.json").put_sync(record)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2-SECRET@127.0.0.1:notaport/0",
        "redis://:hunter2-SECRET@127.0.0.1:99999/0",
        "redis://:hunter2-SECRET@127.0.0.1:6379/0?socket_timeout=abc",
        "unix://:hunter2-SECRET@/tmp/r.sock?db=x",
        "redis://:hunter2-SECRET@[::1/0",
    ],
)
def test_an_unusable_redis_url_is_a_configuration_error_without_its_password(url: str) -> None:
    from flux_adapters.state import open_state

    with pytest.raises(errors.ConfigurationError) as caught:
        open_state(url)
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(caught.value.__cause__)
    assert caught.value.__cause__ is None or "hunter2" not in str(caught.value.__cause__)


def test_a_client_with_an_unusable_redis_url_raises_a_flux_error(emulator: Emulator) -> None:
    with pytest.raises(errors.ConfigurationError):
        AsyncFluxClient(
            "laozhang",
            api_key=PROVIDER_SECRET,
            base_url=emulator.base_url("laozhang"),
            state="redis://127.0.0.1:notaport/0",
        )


# -- the shared batch ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def redis_contents(redis: RedisServer) -> bytes:
    """Every key and value in *redis*, as one blob to search."""
    client: Any = redis.client()
    found = []
    for key in client.scan_iter():
        kind = client.type(key)
        if kind == b"hash":
            found.append(repr(client.hgetall(key)))
        elif kind == b"string":
            found.append(repr(client.get(key)))
        elif kind == b"zset":
            found.append(repr(client.zrange(key, 0, -1, withscores=True)))
        elif kind == b"set":
            found.append(repr(client.smembers(key)))
        found.append(repr(key))
    client.close()
    return "\n".join(found).encode()


def test_a_password_in_a_shared_batchs_output_url_is_not_kept_in_redis(
    tmp_path: Path, redis: RedisServer, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fsspec URLs may carry credentials (ftp://user:pw@host/dir, sftp://, smb://): the output
    # location went into Redis as it was given, and into the error naming another batch.
    from flux_adapters._shared_batch import Lines, SharedOptions, run_shared

    source = tmp_path / "jobs.jsonl"
    source.write_text('{"id": "a", "prompt": "a red robot", "size": "256x256"}\n')
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.setenv("LAOZHANG_BASE_URL", emulator.base_url("laozhang"))
    output = "memory://user:hunter2-SECRET@host/run"

    async def run() -> Any:
        lines = Lines(source)
        try:
            async with AsyncFluxClient(providers=["laozhang"]) as client:
                return await run_shared(
                    client,
                    lines,
                    SharedOptions(state_url=redis.url, output=output),
                    stop=asyncio.Event(),
                    on_end=lambda ended: None,
                    on_progress=lambda counts: None,
                )
        finally:
            lines.close()

    done = asyncio.run(run())
    assert done.totals["ok"] == 1
    assert b"hunter2" not in redis_contents(redis)


@pytest.mark.parametrize("seconds", ["604800", "172800"])
def test_the_documented_state_expiry_can_be_given(seconds: str, tmp_path: Path) -> None:
    # --state-expiry defaults to 604800 s (7 days), but took at most 86400: neither the default
    # nor two days could be asked for.
    from flux_adapters.cli import _parser

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "a", "prompt": "x"}\n')
    parsed = _parser().parse_args(
        ["batch", str(jobs), "-o", "out", "--state", "redis://x", "--state-expiry", seconds]
    )
    assert parsed.state_expiry == float(seconds)


def test_keys_created_at_once_by_several_processes_are_all_kept(tmp_path: Path) -> None:
    # Each `keys create` read the file, added its key and wrote the file back: processes at once
    # overwrote each other's keys, shown to their users and then refused by the gateway.
    import subprocess
    import sys

    path = tmp_path / "keys.json"
    code = (
        "import sys\n"
        "from flux_adapters.gateway import FileKeys, new_key\n"
        "FileKeys(sys.argv[1]).put_sync(new_key(name=sys.argv[2])[1])\n"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", code, str(path), f"k{n}"]) for n in range(12)
    ]
    assert [process.wait(timeout=120) for process in processes] == [0] * 12
    assert sorted(record.name for record in FileKeys(path).list_sync()) == sorted(
        f"k{n}" for n in range(12)
    )


def test_state_url_in_the_configuration_file_keeps_the_gateway_keys_in_redis(
    tmp_path: Path, redis: RedisServer, emulator: Emulator
) -> None:
    # docs/gateway.md: with state_url in the configuration file, keys live in Redis. `keys` and
    # `serve` read only --state and $FLUX_STATE_URL for them: the keys went to a file on each
    # machine, while budgets were in Redis.
    import subprocess
    import sys

    (tmp_path / "flux-adapters.toml").write_text(
        f'providers = ["laozhang"]\nstate_url = "{redis.url}"\n'
    )
    env = {
        **os.environ,
        "LAOZHANG_API_KEY": PROVIDER_SECRET,
        "LAOZHANG_BASE_URL": emulator.base_url("laozhang"),
    }
    for name in ("FLUX_CONFIG", "FLUX_STATE_URL", "FLUX_GATEWAY_KEYS", "FLUX_PROVIDERS"):
        env.pop(name, None)
    made = subprocess.run(
        [sys.executable, "-m", "flux_adapters", "keys", "create", "--name", "in-redis"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    key = made.stdout.splitlines()[0]
    assert not (tmp_path / "flux-adapters-keys.json").exists()
    client: Any = redis.client()
    stored = [client.get(b"flux:gwkey:" + member) for member in client.smembers(b"flux:gwkeys")]
    client.close()
    assert any(b"in-redis" in (value or b"") for value in stored)
    process = subprocess.Popen(
        [sys.executable, "-m", "flux_adapters", "serve", "--port", "0",
         "--files-dir", str(tmp_path / "files")],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        root = process.stdout.readline().split()[3]
        answer = httpx.post(
            root + "/v1/images/generations",
            json={"prompt": "a key kept in redis"},
            headers={"authorization": f"Bearer {key}"},
            timeout=60,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert answer.status_code == 200, answer.text


# -- the shared state ----------------------------------------------------------------------------


def test_a_reservation_made_while_redis_was_down_is_not_refunded_to_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With state_fallback = "local", a call admitted while Redis was down reserved in this
    # process's state; when it ended after Redis was back, its refund was taken off the shared
    # budget, which had never held it: every such refund was room to overspend.
    import flux_adapters.state._redis as redis_module
    from flux_adapters.state import open_state

    monkeypatch.setattr(redis_module, "_RETRY_LOCAL", 0.0)  # try Redis again at the next call

    async def run(url: str, server: RedisServer) -> list[bool]:
        state = open_state(url, fallback="local", timeout=0.2, prefix="flux:fallback:")
        try:
            for _ in range(3):
                server.freeze()
                try:
                    local = await state.reserve("gw", 0.03, 0.03, "total")  # made locally
                finally:
                    server.thaw()
                assert local is not None
                await state.settle(local, 0.0)  # refused by the provider: refunded
            return [await state.reserve("gw", 0.03, 0.03, "total") is not None for _ in range(4)]
        finally:
            await state.aclose()

    with redis_server() as server:
        # the $0.03 shared budget takes one $0.03 call, not four
        assert asyncio.run(run(server.url, server)) == [True, False, False, False]


def test_a_shared_reservation_settled_while_redis_is_down_is_not_refunded_locally(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The other way round: a reservation Redis held, refunded while Redis was down, was
    # refunded to this process's state, which never held it: room to overspend while it lasts.
    from flux_adapters.state import open_state

    async def run(url: str, server: RedisServer) -> list[bool]:
        state = open_state(url, fallback="local", timeout=0.2, prefix="flux:fallback2:")
        try:
            shared = [await state.reserve("gw", 0.03, 0.09, "total") for _ in range(3)]
            server.freeze()
            try:
                for reservation in shared:
                    if reservation is not None:
                        await state.settle(reservation, 0.0)  # Redis does not answer
                return [
                    await state.reserve("gw", 0.03, 0.09, "total") is not None for _ in range(6)
                ]
            finally:
                server.thaw()
        finally:
            await state.aclose()

    with redis_server() as server:
        # this process's $0.09 while Redis is down: three $0.03 calls, not six
        assert asyncio.run(run(server.url, server)) == [True] * 3 + [False] * 3


def test_redis_lost_after_a_billed_try_is_not_answered_as_nothing_sent(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # failover_on_ambiguous = true: laozhang did the job and answered 502; Redis died before the
    # next provider's admission, and the call ended as StateUnavailable, "nothing was sent",
    # with no attempts: the gateway answered 503 x-should-retry: true, so an OpenAI SDK sent
    # (and paid for) it again.
    from flux_adapters.config import ProviderSettings

    monkeypatch.setenv("ATTACK_LAOZHANG_KEY", PROVIDER_SECRET)
    monkeypatch.setenv("ATTACK_AIMLAPI_KEY", PROVIDER_SECRET)
    emulator.inject("laozhang", Fault(status=502, after_work=True, delay=1.0, first=1))
    billed = len(emulator.billed("laozhang"))
    with redis_server() as server:

        def make(only: tuple[str, ...] | None) -> AsyncFluxClient:
            names = ("laozhang", "aimlapi")
            return AsyncFluxClient(
                providers=list(names),  # type: ignore[arg-type]
                settings={
                    name: ProviderSettings(
                        name=name,
                        api_key_env=f"ATTACK_{name.upper()}_KEY",
                        base_url=emulator.base_url(name),
                    )
                    for name in names
                },
                state=server.url,
                failover_on_ambiguous=True,
            )

        def kill_redis_once_laozhang_has_it() -> None:
            while len(emulator.calls("laozhang")) == calls_before:
                threading.Event().wait(0.005)
            server.kill()

        calls_before = len(emulator.calls("laozhang"))
        killer = threading.Thread(target=kill_redis_once_laozhang_has_it, daemon=True)
        with run_gateway(files_dir=tmp_path, clients=make) as gateway:
            key, _ = gateway.add_key()
            killer.start()
            answer = httpx.post(
                gateway.url + "/images/generations",
                json={"prompt": "billed at laozhang", "size": "1024x1024"},
                headers={"authorization": f"Bearer {key}"},
                timeout=60,
            )
    assert len(emulator.billed("laozhang")) == billed + 1
    assert answer.headers["x-should-retry"] == "false"
    assert answer.json()["error"]["may_be_billed"] is True
    assert "laozhang" in [a["provider"] for a in answer.json()["error"]["attempts"]]


def test_a_key_replaced_within_one_tick_of_the_clock_and_at_the_same_size_is_seen(
    tmp_path: Path,
) -> None:
    # The gateway reads the key file again when it changed; judged by its time and size alone,
    # a revoke and a create of a key of the same length within one tick of the file system's
    # clock left the revoked key working.
    import attrs

    from flux_adapters.gateway._keys import new_key

    path = tmp_path / "keys.json"
    serving, other = FileKeys(path), FileKeys(path)
    _, revoked = new_key(name="a")
    serving.put_sync(revoked)
    assert serving.get_sync(revoked.key_hash) == revoked
    written = os.stat(path)
    _, created = new_key(name="b")
    other.delete_sync(revoked.id)
    other.put_sync(attrs.evolve(created, created=revoked.created))
    os.utime(path, ns=(written.st_atime_ns, written.st_mtime_ns))  # the same tick
    assert os.stat(path).st_size == written.st_size
    assert serving.get_sync(revoked.key_hash) is None
    assert serving.get_sync(created.key_hash) is not None


def test_a_key_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    # Notepad and other Windows editors save UTF-8 with a BOM: a hand-edited key file is not
    # damaged for it (every call was a 500 keys_unreadable).
    from flux_adapters.gateway._keys import new_key

    path = tmp_path / "keys.json"
    _, record = new_key(name="edited")
    FileKeys(path).put_sync(record)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert FileKeys(path).get_sync(record.key_hash) == record


def test_a_changed_key_file_is_read_off_the_gateways_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A key file of up to 64 MiB was parsed on the event loop when it changed: every call the
    # gateway had under way waited for it. An unchanged file is looked up on the loop, a stat.
    import asyncio
    import json
    import threading

    from flux_adapters.gateway._keys import new_key

    path = tmp_path / "keys.json"
    keys = FileKeys(path)
    _, first = new_key(name="a")
    _, second = new_key(name="b")
    FileKeys(path).put_sync(first)
    parsed_in: list[threading.Thread] = []
    real_loads = json.loads

    def loads(text: str) -> object:
        parsed_in.append(threading.current_thread())
        return real_loads(text)

    async def lookups(*hashes: str) -> list[object]:
        monkeypatch.setattr(json, "loads", loads)
        try:
            return [await keys.get_key(key_hash) for key_hash in hashes]
        finally:
            monkeypatch.setattr(json, "loads", real_loads)

    assert asyncio.run(lookups(first.key_hash, first.key_hash, "0" * 64)) == [first, first, None]
    FileKeys(path).put_sync(second)  # another process's `keys create`
    assert asyncio.run(lookups(second.key_hash, first.key_hash)) == [second, first]
    assert len(parsed_in) == 2  # once after each change, never when the file stayed the same
    assert threading.main_thread() not in parsed_in  # the loop's thread


@pytest.mark.parametrize("swapped_in", ["fifo", "large"])
def test_a_key_file_swapped_after_its_stat_is_judged_as_the_file_read(
    tmp_path: Path, swapped_in: str
) -> None:
    # The checks (a regular file, at most 64 MiB) were made on the path's stat, then the path
    # was read: a FIFO put there in between blocked the reading thread for ever (holding the
    # lock every later lookup waits on), a larger file was read whole.
    from flux_adapters.gateway import _keys
    from flux_adapters.gateway._keys import new_key

    path = tmp_path / "keys.json"
    keys = FileKeys(path)
    _, record = new_key(name="a")
    keys.put_sync(record)
    swapped = tmp_path / "swapped"
    if swapped_in == "fifo":
        os.mkfifo(swapped)
    else:
        swapped.write_bytes(b" " * (_keys._MAX_FILE_BYTES + 1))
    real_stamp = keys._stamp

    def stamp_then_swap() -> tuple[int, int, int, int] | None:
        found = real_stamp()
        os.replace(swapped, path)  # between the look and the read
        return found

    keys._stamp = stamp_then_swap  # type: ignore[method-assign]
    outcome: list[object] = []
    reader = threading.Thread(target=lambda: outcome.append(_raised(keys.list_sync)), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "the key file's reader blocked"
    [error] = outcome
    assert isinstance(error, errors.ConfigurationError)
    expected = "is not a regular file" if swapped_in == "fifo" else "is larger than 64 MiB"
    assert expected in str(error)


def _raised(call: Callable[[], object]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:  # the test looks at what came out
        return exc
    return None


def test_a_spare_file_the_sweep_judged_expired_is_not_given_an_image(tmp_path: Path) -> None:
    # The spare file is made ahead and may wait, empty, for longer than the retention while the
    # gateway is idle. The sweep (in a worker thread) reads each file's age and then removes
    # it: had the spare been written between the two, the answer linked a file the sweep then
    # removed, and a paid image was lost. A spare that old is not used.
    from flux_adapters.gateway._files import FileStore

    store = FileStore(tmp_path, 60)
    store.replenish()
    spare = next(tmp_path.iterdir())
    past = time.time() - 120  # idle for two retentions
    os.utime(spare, (past, past))
    judged, written = threading.Event(), threading.Event()
    unlink = os.unlink

    def slow_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(path) == os.fspath(spare) and threading.current_thread() is sweeper:
            judged.set()  # the sweep has read the spare's age and is about to remove it
            written.wait(10)
        unlink(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "unlink", slow_unlink)
        sweeper = threading.Thread(target=store.sweep)
        sweeper.start()
        assert judged.wait(10)
        name = store._write_new(image_bytes())
        written.set()
        sweeper.join(10)
    assert (tmp_path / name).read_bytes() == image_bytes()
    store.close()


def test_a_spare_file_no_longer_at_its_name_is_not_given_an_image(tmp_path: Path) -> None:
    # The spare was judged by its link count after the write: one renamed away (the folder
    # rotated, `mv files files.old && mkdir files`) still has a link, so the answer named a
    # file that is not in the folder, and the paid image was lost behind a 404. Without a
    # spare the file is made at its name, in the folder as it is now.
    from flux_adapters.gateway._files import FileStore

    folder = tmp_path / "files"
    store = FileStore(folder, 60)
    store.replenish()
    folder.rename(tmp_path / "files.old")
    folder.mkdir()
    name = store._write_new(image_bytes())
    assert (folder / name).read_bytes() == image_bytes()

    store.replenish()
    [spare] = [path for path in folder.iterdir() if path.name != name]
    spare.unlink()
    spare.symlink_to(tmp_path / "elsewhere.png")  # replaced by someone else
    name = store._write_new(image_bytes())
    assert name != spare.name
    assert (folder / name).read_bytes() == image_bytes()
    assert not (tmp_path / "elsewhere.png").exists()
    store.close()
