"""A provider from another package: Nimbus (examples/nimbus), installed with pip, used by name.

Nimbus is asynchronous (submit, poll, fetch images, cancel) and sends its key as
``Authorization: Token <key>``. Its package registers the adapter through the entry-point group
``flux_adapters.providers`` and imports nothing private from flux-adapters; here it is used the
way a user would: ``FluxClient("nimbus")``, ``from_env``, a configuration file, the command line
and a failover list, against its own sandbox (``nimbus_flux.sandbox``) on loopback, with
laozhang on the bundled emulator. Nothing here patches the registry or puts the example on the
import path: if the package were not installed, these tests would fail.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import nimbus_flux
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nimbus_flux import NimbusAdapter
from nimbus_flux.sandbox import REVOKED, Sandbox, run_sandbox
from PIL import Image

from flux_adapters import (
    AsyncFluxClient,
    EditRequest,
    EditResult,
    FluxClient,
    ProviderName,
    errors,
)
from flux_adapters.emulator import Emulator, run_emulator
from flux_adapters.jobs import Job, Pending, Polling
from flux_adapters.providers import PROVIDERS, get_adapter, provider_origin
from flux_adapters.wire import HttpResponse, JsonBody
from tests.conftest import image_bytes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
KEY = "nimbus-test-key-0123456789"
NIMBUS = ProviderName("nimbus")
"""Installed, not built in: named on purpose for the type checker, as a user would."""
FAST = Polling(first=0.01, factor=1.5, longest=0.05, jitter=0.1, deadline=30.0)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with run_sandbox() as running:
        yield running


@pytest.fixture(scope="module")
def cli_sandbox() -> Iterator[Sandbox]:
    """A sandbox whose tasks answer one poll as pending, not two: the command line polls at
    the library's default pace (0.5 s, then 0.75 s), which no option of it makes shorter."""
    with run_sandbox(pending_polls=1) as running:
        yield running


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


@pytest.fixture(autouse=True)
def _no_settings_around(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No configuration file or provider variable of the developer's leaks in."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("FLUX_", "NIMBUS_", "LAOZHANG_")):
            monkeypatch.delenv(name)


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def calls_since(sandbox: Sandbox, before: int) -> list[Any]:
    return sandbox.calls()[before:]


# --- no private import, no patch: the package as a user installs it ------------------------


PRIVATE = (re.compile(rb"flux_adapters\._"), re.compile(rb"flux_adapters\.[a-z_.]*\._"))


def test_no_example_imports_anything_private() -> None:
    """The acceptance check: ``grep -r "flux_adapters\\._" examples/`` finds nothing."""
    found = []
    for path in sorted(EXAMPLES.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            data = path.read_bytes()
            found += [f"{path.relative_to(ROOT)}" for pattern in PRIVATE if pattern.search(data)]
    assert found == []
    assert sum(1 for _ in EXAMPLES.rglob("*.py")) >= 6  # the walk did see the examples


def test_the_private_pattern_would_be_found() -> None:
    for text in (b"from flux_adapters._flows import x", b"flux_adapters.emulator._images"):
        assert any(pattern.search(text) for pattern in PRIVATE)
    assert not any(pattern.search(b"flux_adapters.emulator.images") for pattern in PRIVATE)


def test_nimbus_is_installed_from_this_checkout_and_registered_by_entry_point() -> None:
    points = {point.name: point for point in entry_points(group="flux_adapters.providers")}
    assert points["nimbus"].value == "nimbus_flux:NimbusAdapter"
    assert points["nimbus"].dist is not None
    assert points["nimbus"].dist.name == "nimbus-flux"
    assert Path(nimbus_flux.__file__).resolve().is_relative_to(EXAMPLES / "nimbus" / "src")
    assert str(EXAMPLES / "nimbus") not in sys.path  # found as an installed package
    assert PROVIDERS["nimbus"] == "entry point of nimbus-flux"
    assert provider_origin(" NIMBUS ") == "entry point of nimbus-flux"
    assert isinstance(get_adapter("Nimbus"), NimbusAdapter)


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("FLUX_", "NIMBUS_", "LAOZHANG_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "flux_adapters", *argv],
        env=environment | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_models_lists_nimbus_with_the_package_it_comes_from() -> None:
    finished = run_cli("models", "--markdown")
    assert finished.returncode == 0, finished.stderr
    assert "\nnimbus (entry point of nimbus-flux)\n" in finished.stdout
    section = finished.stdout.split("nimbus (entry point of nimbus-flux)")[1]
    assert "| `flux-2-pro` | `flux.2-pro` | 0..6 |" in section
    assert "flux-2-pro $0.04 per call" in section
    table = run_cli("models")  # the table drawn for a terminal names it the same way
    assert "\nnimbus (entry point of nimbus-flux)" in table.stdout


def test_conformance_replays_nimbus_when_named_and_the_built_in_providers_by_default(
    tmp_path: Path,
) -> None:
    cassettes = Path(__file__).parents[1] / "examples/nimbus/tests/cassettes"
    named = run_cli("conformance", "-p", "Nimbus", "--cassettes", str(cassettes),
                    "--report-dir", str(tmp_path / "nimbus"))  # fmt: skip
    assert named.returncode == 0, named.stdout + named.stderr
    report = json.loads((tmp_path / "nimbus/conformance.json").read_text())
    assert {verdict["provider"] for verdict in report["verdicts"]} == {"nimbus"}

    built_in = Path(__file__).parents[1] / "cassettes"
    default = run_cli("conformance", "--cassettes", str(built_in),
                      "--report-dir", str(tmp_path / "default"))  # fmt: skip
    assert default.returncode == 0, default.stdout + default.stderr
    report = json.loads((tmp_path / "default/conformance.json").read_text())
    assert {verdict["provider"] for verdict in report["verdicts"]} == {
        "laozhang", "apiyi", "apiyi-multipart", "aimlapi", "bfl", "fal"
    }  # fmt: skip


# --- by name: FluxClient, AsyncFluxClient, from_env, a configuration file -----------------


def check_nimbus_job(
    sandbox: Sandbox, before: int, result: EditResult, images: list[bytes]
) -> None:
    """One submit, pending polls then the answer, the image downloaded without the key."""
    assert result.provider == "nimbus"
    assert result.job is not None
    assert result.job.id.startswith("tsk_")
    assert result.cost_usd == pytest.approx(0.04)  # 4 credits reported by Nimbus
    assert result.cost_source == "provider"
    kinds = [call.kind for call in calls_since(sandbox, before)]
    assert kinds == ["submit", "poll", "poll", "poll", "download"]  # queued, running, succeeded
    for call in calls_since(sandbox, before):
        assert call.key == (None if call.kind == "download" else KEY), call
    assert decoded(images[0]).size == (512, 384)


def test_flux_client_by_name_submits_polls_and_downloads(sandbox: Sandbox) -> None:
    before = len(sandbox.calls())
    request = EditRequest(prompt="a robot", model="flux-2-pro", width=512, height=384)
    with FluxClient(NIMBUS, api_key=KEY, base_url=sandbox.url, polling=FAST) as client:
        result = client.edit(request)
        images = [image.read() for image in result.images]
    check_nimbus_job(sandbox, before, result, images)


def test_async_client_by_name_in_any_case(sandbox: Sandbox) -> None:
    before = len(sandbox.calls())
    request = EditRequest(
        prompt="image 1 in front of image 2",
        model="flux-2-pro",
        images=[image_bytes(40, 30), "https://example.com/scene.png"],
        width=512,
        height=384,
    )

    async def main() -> tuple[EditResult, list[bytes]]:
        async with AsyncFluxClient(
            ProviderName("Nimbus"), api_key=KEY, base_url=sandbox.url, polling=FAST
        ) as c:
            result = await c.edit(request)
            return result, [await image.read_async() for image in result.images]

    result, images = asyncio.run(main())
    check_nimbus_job(sandbox, before, result, images)


def test_from_env_reads_flux_providers_and_the_nimbus_variables(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUX_PROVIDERS", "nimbus")
    monkeypatch.setenv("NIMBUS_API_KEY", KEY)
    monkeypatch.setenv("NIMBUS_BASE_URL", sandbox.url)
    before = len(sandbox.calls())
    with FluxClient.from_env() as client:
        assert client.providers == ("nimbus",)
        result = client.edit(EditRequest(prompt="from env", model="flux-2-pro", size="512x384"))
        images = [result.images[0].read()]
    check_nimbus_job(sandbox, before, result, images)


def test_a_configuration_file_names_nimbus_its_key_variable_and_base_url(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "flux-adapters.toml").write_text(
        'providers = ["Nimbus"]\n\n'
        "[provider.nimbus]\n"
        'api_key_env = "MY_NIMBUS_KEY"\n'
        f'base_url = "{sandbox.url}"\n'
    )
    monkeypatch.setenv("MY_NIMBUS_KEY", KEY)
    before = len(sandbox.calls())
    with FluxClient.from_env() as client:
        result = client.edit(EditRequest(prompt="from a file", model="flux-2-pro", size="512x384"))
        images = [result.images[0].read()]
    check_nimbus_job(sandbox, before, result, images)


def test_a_job_accepted_by_nimbus_can_be_resumed_from_its_record(sandbox: Sandbox) -> None:
    with FluxClient(NIMBUS, api_key=KEY, base_url=sandbox.url, polling=FAST) as client:
        first = client.edit(EditRequest(prompt="resume me", model="flux-2-pro"))
        assert first.job is not None
        record = Job.from_dict(json.loads(json.dumps(first.job.to_dict())))
        assert record == first.job
        submits = len(sandbox.calls("submit"))
        again = client.resume(record)
    assert len(sandbox.calls("submit")) == submits  # polled again, never submitted again
    assert again.provider == "nimbus"
    assert again.images[0].url


# --- how a Nimbus job ends without an image: typed outcomes, the key's hosts -----------------


@pytest.mark.parametrize(
    ("word", "error", "check"),
    [
        ("[sandbox:blocked]", errors.Moderated, lambda e: e.stage == "request"),
        ("[sandbox:blocked-output]", errors.Moderated, lambda e: e.stage == "content"),
        ("[sandbox:failed]", errors.JobFailed, lambda e: e.billed is False),
        ("[sandbox:failed-charged]", errors.JobFailed, lambda e: e.billed is True),
        ("[sandbox:expired]", errors.JobNotFound, lambda e: True),
        ("[sandbox:prompt-blocked]", errors.ContentModerated, lambda e: e.status_code == 400),
        ("[sandbox:overloaded]", errors.ProviderUnavailable, lambda e: e.status_code == 503),
        ("[sandbox:no-credits]", errors.InsufficientBalance, lambda e: e.status_code == 402),
        ("[sandbox:rate-limited]", errors.RateLimited, lambda e: e.retry_after == 7),
        ("[sandbox:malformed]", errors.ResponseFormatError, lambda e: e.status_code == 200),
    ],
)
def test_each_way_a_nimbus_task_ends_is_typed(
    sandbox: Sandbox, word: str, error: type[errors.FluxError], check: Any
) -> None:
    request = EditRequest(prompt=f"a robot {word}", model="flux-2-pro")
    client = FluxClient(NIMBUS, api_key=KEY, base_url=sandbox.url, polling=FAST)
    with client, pytest.raises(error) as caught:
        client.edit(request)
    assert check(caught.value)
    assert KEY not in str(caught.value)
    assert KEY not in repr(caught.value)
    refused = ("prompt-blocked", "overloaded", "no-credits", "rate-limited", "malformed")
    assert (caught.value.job is None) == any(f"[sandbox:{name}]" == word for name in refused)


@pytest.mark.parametrize("outcome", ["failed", "expired"])
def test_a_sandbox_base_url_makes_every_task_there_end_one_way(
    sandbox: Sandbox, outcome: str
) -> None:
    """Every task under a /sandbox/<outcome> base URL ends that way; its URLs keep the prefix."""
    before = len(sandbox.calls())
    base_url = f"{sandbox.url}/sandbox/{outcome}"
    client = FluxClient(NIMBUS, api_key=KEY, base_url=base_url, polling=FAST)
    with client, pytest.raises(errors.JobError) as caught:
        client.edit(EditRequest(prompt="an ordinary prompt", model="flux-2-pro"))
    wanted = errors.JobFailed if outcome == "failed" else errors.JobNotFound
    assert type(caught.value) is wanted
    calls = calls_since(sandbox, before)
    assert {call.kind for call in calls} == {"submit", "poll"}
    assert all(call.url.startswith(base_url + "/v1/tasks") for call in calls)


def test_a_task_past_its_deadline_is_cancelled_once(sandbox: Sandbox) -> None:
    before = len(sandbox.calls())
    polling = Polling(first=0.01, longest=0.02, deadline=0.3)
    client = FluxClient(NIMBUS, api_key=KEY, base_url=sandbox.url, polling=polling)
    with client, pytest.raises(errors.JobTimeout) as caught:
        client.edit(EditRequest(prompt="forever [sandbox:stuck]", model="flux-2-pro"))
    assert caught.value.cancelled is True
    kinds = [call.kind for call in calls_since(sandbox, before)]
    assert kinds.count("submit") == 1
    assert kinds.count("cancel") == 1
    cancel = next(call for call in calls_since(sandbox, before) if call.kind == "cancel")
    assert cancel.method == "POST"
    assert cancel.url.endswith("/cancel")
    assert cancel.key == KEY


def test_the_key_goes_to_no_host_nimbus_does_not_declare() -> None:
    """A status URL on another host (here ``localhost`` for ``127.0.0.1``) gets no key."""
    with run_sandbox() as elsewhere:
        elsewhere.public_url = elsewhere.url.replace("127.0.0.1", "localhost")
        client = FluxClient(NIMBUS, api_key=KEY, base_url=elsewhere.url, polling=FAST)
        with client, pytest.raises(errors.AuthenticationFailed) as caught:
            client.edit(EditRequest(prompt="a robot", model="flux-2-pro"))
        calls = elsewhere.calls()
    assert caught.value.job is not None  # accepted: never submitted again
    assert [call.kind for call in calls] == ["submit", "poll"]
    assert calls[0].key == KEY
    assert calls[1].url.startswith("http://localhost:")
    assert calls[1].authorization is None  # no key, in no form
    assert KEY not in str(caught.value)


# --- a failover list: ["nimbus", "laozhang"] -----------------------------------------------


@pytest.fixture
def failover_env(
    sandbox: Sandbox, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    settings = {
        "NIMBUS_API_KEY": KEY,
        "NIMBUS_BASE_URL": sandbox.url,
        "LAOZHANG_API_KEY": "laozhang-test-key",
        "LAOZHANG_BASE_URL": emulator.base_url("laozhang"),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return settings


def failover(kind: str, request: EditRequest, polling: Polling = FAST) -> EditResult:
    if kind == "sync":
        with FluxClient(providers=[NIMBUS, "laozhang"], polling=polling) as client:
            return client.edit(request)

    async def main() -> EditResult:
        async with AsyncFluxClient(
            providers=[ProviderName("NIMBUS"), "laozhang"], polling=polling
        ) as client:
            return await client.edit(request)

    return asyncio.run(main())


both = pytest.mark.parametrize("kind", ["sync", "async"])


@both
def test_a_nimbus_503_on_submit_fails_over_to_laozhang(
    kind: str, sandbox: Sandbox, emulator: Emulator, failover_env: dict[str, str]
) -> None:
    prompt = f"overloaded {kind} [sandbox:overloaded]"
    before = len(sandbox.calls())
    result = failover(kind, EditRequest(prompt=prompt, model="flux-2-pro"))
    assert result.provider == "laozhang"
    first, second = result.attempts
    assert (first.provider, first.outcome, first.billing) == ("nimbus", "failed", "overloaded")
    assert isinstance(first.error, errors.ProviderUnavailable)
    assert (second.provider, second.outcome) == ("laozhang", "ok")
    assert [call.kind for call in calls_since(sandbox, before)] == ["submit"]  # no task made
    assert [job.prompt for job in emulator.billed("laozhang")].count(prompt) == 1


def test_from_env_fails_over_in_the_order_flux_providers_gives(
    sandbox: Sandbox, emulator: Emulator, failover_env: dict[str, str], monkeypatch: Any
) -> None:
    monkeypatch.setenv("FLUX_PROVIDERS", "nimbus,laozhang")
    with FluxClient.from_env() as client:
        result = client.edit(EditRequest(prompt="env [sandbox:overloaded]", model="flux-2-pro"))
    assert [attempt.provider for attempt in result.attempts] == ["nimbus", "laozhang"]
    assert result.provider == "laozhang"


@both
@pytest.mark.parametrize(
    "word",
    ["[sandbox:failed-charged]", "[sandbox:blocked]", "[sandbox:expired]", "[sandbox:stuck]"],
)
def test_never_a_failover_once_nimbus_accepted_the_task(
    kind: str, word: str, sandbox: Sandbox, emulator: Emulator, failover_env: dict[str, str]
) -> None:
    prompt = f"accepted {kind} {word}"
    before, laozhang = len(sandbox.calls()), len(emulator.calls("laozhang"))
    with pytest.raises(errors.FluxError) as caught:
        failover(kind, EditRequest(prompt=prompt, model="flux-2-pro"), Polling(first=0.01, longest=0.02, deadline=0.4))  # fmt: skip
    assert len(emulator.calls("laozhang")) == laozhang  # laozhang never asked
    assert caught.value.job is not None
    assert caught.value.job.provider == "nimbus"
    assert [call.kind for call in calls_since(sandbox, before)].count("submit") == 1


def test_a_failure_nimbus_says_was_not_charged_may_go_to_the_next_provider(
    sandbox: Sandbox, emulator: Emulator, failover_env: dict[str, str]
) -> None:
    """The one failover after acceptance: the task is over and Nimbus says it is unpaid."""
    prompt = "lost worker [sandbox:failed]"
    result = failover("sync", EditRequest(prompt=prompt, model="flux-2-pro"))
    first, second = result.attempts
    assert (first.provider, first.billing) == ("nimbus", "job-not-billed")
    assert (second.provider, result.provider) == ("laozhang", "laozhang")
    assert [job.prompt for job in emulator.billed("laozhang")].count(prompt) == 1


# --- the command line: edit, batch, explain, conformance, with the provider's name -----------


def test_cli_edit_with_nimbus_by_name(cli_sandbox: Sandbox, tmp_path: Path) -> None:
    output = tmp_path / "nimbus.png"
    before = len(cli_sandbox.calls())
    finished = run_cli(
        "edit", "a robot on a skateboard", "-p", "nimbus", "--base-url", cli_sandbox.url,
        "--width", "512", "--height", "384", "-o", str(output),
        env={"NIMBUS_API_KEY": KEY},
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert decoded(output.read_bytes()).size == (512, 384)
    assert "cost:     $0.040 (reported by nimbus)" in finished.stdout  # 4 credits
    assert KEY not in finished.stdout + finished.stderr
    assert [call.kind for call in calls_since(cli_sandbox, before)].count("submit") == 1


def test_cli_edit_reads_the_nimbus_variables_and_flux_providers(
    cli_sandbox: Sandbox, tmp_path: Path
) -> None:
    output = tmp_path / "nimbus.jpeg"
    environment = {
        "FLUX_PROVIDERS": "nimbus",
        "NIMBUS_API_KEY": KEY,
        "NIMBUS_BASE_URL": cli_sandbox.url,
    }
    finished = run_cli("edit", "a robot", "--format", "jpeg", "-o", str(output), env=environment)
    assert finished.returncode == 0, finished.stderr
    assert decoded(output.read_bytes()).format == "JPEG"


def test_cli_batch_with_nimbus_journals_and_saves_each_job(
    cli_sandbox: Sandbox, tmp_path: Path
) -> None:
    source = tmp_path / "jobs.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": f"job-{n}", "prompt": f"batch {n}", "size": "256x256"}) + "\n"
            for n in range(3)
        )
    )
    submits = len(cli_sandbox.calls("submit"))
    finished = run_cli(
        "batch", str(source), "-o", str(tmp_path / "out"), "-p", "nimbus",
        env={"NIMBUS_API_KEY": KEY, "NIMBUS_BASE_URL": cli_sandbox.url},
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    saved = sorted(path.name for path in (tmp_path / "out").glob("job-*.png"))
    assert saved == ["job-0.png", "job-1.png", "job-2.png"]
    assert len(cli_sandbox.calls("submit")) - submits == 3
    again = run_cli(
        "batch", str(source), "-o", str(tmp_path / "out"), "-p", "nimbus",
        env={"NIMBUS_API_KEY": KEY, "NIMBUS_BASE_URL": cli_sandbox.url},
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert len(cli_sandbox.calls("submit")) - submits == 3  # saved jobs are not sent again


def test_cli_explain_shows_nimbus_wire_request_and_token_header(tmp_path: Path) -> None:
    picture = tmp_path / "robot.png"
    picture.write_bytes(image_bytes(64, 48))
    finished = run_cli(
        "explain", "image 1 on a skateboard", "-p", "nimbus", "-i", str(picture), "--seed", "7",
        env={"NIMBUS_API_KEY": KEY},
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    out = finished.stdout
    assert out.startswith("=== nimbus\nPOST https://api.nimbus.example/v1/tasks\n")
    assert "\nAuthorization: Token [redacted]\n" in out
    assert '"model": "flux.2-pro"' in out
    assert '"type": "base64"' in out
    assert '"media_type": "image/png"' in out
    assert "<plain base64>" in out  # bare base64, as Nimbus documents
    assert KEY not in out


def test_cli_conformance_by_provider_name_reproduces_the_committed_report(tmp_path: Path) -> None:
    finished = run_cli(
        "conformance", "-p", "nimbus",
        "--cassettes", str(EXAMPLES / "nimbus" / "tests" / "cassettes"),
        "--report-dir", str(tmp_path),
    )  # fmt: skip
    assert finished.returncode == 0, finished.stdout + finished.stderr
    committed = (EXAMPLES / "nimbus" / "conformance-report.md").read_text()
    assert (tmp_path / "conformance.md").read_text() == committed
    verdicts = json.loads((tmp_path / "conformance.json").read_text())["verdicts"]
    assert {v["outcome"] for v in verdicts if v["scenario"] == "text-to-image"} == {"pass"}


def test_the_nimbus_cassettes_hold_neither_recording_key_nor_any_credential() -> None:
    from flux_adapters.conformance import scan_for_secrets

    cassettes = EXAMPLES / "nimbus" / "tests" / "cassettes"
    assert len(list(cassettes.rglob("*.yaml"))) >= 11
    assert scan_for_secrets(cassettes, ["sandbox-key", REVOKED]) == []


# --- the adapter itself: golden bodies and hostile answers ---------------------------------


ADAPTER = NimbusAdapter()
JOB = Job(
    provider="nimbus",
    model="flux-2-pro",
    id="tsk_1",
    poll_url="https://api.nimbus.example/v1/tasks/tsk_1",
    cancel_url="https://api.nimbus.example/v1/tasks/tsk_1/cancel",
)


def submit_body(request: EditRequest) -> dict[str, object]:
    from flux_adapters import check

    assert check(request, NIMBUS) == ()
    limits = ADAPTER.limits[request.model]
    from flux_adapters.limits import plan

    wire = ADAPTER.build_submit(request, plan(request, limits), "https://api.nimbus.example")
    assert (wire.method, wire.url) == ("POST", "https://api.nimbus.example/v1/tasks")
    assert isinstance(wire.body, JsonBody)
    return wire.body.materialize()


def test_golden_submit_bodies() -> None:
    png = image_bytes(16, 8)
    assert submit_body(
        EditRequest(
            prompt="image 1 on image 2",
            model="flux-2-pro",
            images=["https://example.com/a.png", png],
            width=768,
            height=512,
            seed=7,
            output_format="webp",
        )
    ) == {
        "model": "flux.2-pro",
        "input": {
            "prompt": "image 1 on image 2",
            "references": [
                {"type": "url", "url": "https://example.com/a.png"},
                {
                    "type": "base64",
                    "media_type": "image/png",
                    "data": base64.b64encode(png).decode(),
                },
            ],
            "width": 768,
            "height": 512,
            "seed": 7,
        },
        "output": {"format": "webp"},
    }
    assert submit_body(EditRequest(prompt="p", model="flux-kontext-pro", aspect_ratio="16:9")) == {
        "model": "flux.1-kontext-pro",
        "input": {"prompt": "p", "aspect_ratio": "16:9"},
    }
    assert submit_body(EditRequest(prompt="p", model="flux-2-flex", steps=28, guidance=3.5)) == {
        "model": "flux.2-flex",
        "input": {"prompt": "p", "steps": 28, "guidance": 3.5},
    }


@given(count=st.integers(0, 6))
def test_reference_order_and_count_survive_translation(count: int) -> None:
    sources = [image_bytes(8 + n, 8) for n in range(count)]
    body = submit_body(EditRequest(prompt="p", model="flux-2-pro", images=sources))
    task = body["input"]
    assert isinstance(task, dict)
    sent = task.get("references", [])
    assert [base64.b64decode(item["data"]) for item in sent] == sources


def answer(body: object, status: int = 200, **headers: str) -> HttpResponse:
    return HttpResponse(status_code=status, headers=headers, content=json.dumps(body).encode())


def test_hostile_status_answers_are_typed_or_bounded() -> None:
    pending = ADAPTER.parse_poll(
        answer({"state": "running", "progress": 7, "queue_position": True, "poll_after_ms": 1e12}),
        JOB,
    )
    assert isinstance(pending, Pending)
    assert (pending.progress, pending.position, pending.retry_after) == (None, None, 60.0)
    bodies: list[object] = [
        [],
        {"state": "succeeded"},
        {"state": "succeeded", "output": {"images": [{"url": "javascript:alert(1)"}]}},
        {"state": "succeeded", "output": {"images": [{"url": "https://x/\r\n"}]}},
        {"state": "succeeded", "output": {"images": [{}] * 17}},
        {"state": "paused"},
    ]
    for body in bodies:
        with pytest.raises(errors.ResponseFormatError):
            ADAPTER.parse_poll(answer(body), JOB)
    with pytest.raises(errors.ResponseFormatError):
        ADAPTER.parse_poll(HttpResponse(status_code=200, headers={}, content=b"[" * 100_000), JOB)
    with pytest.raises(errors.JobFailed) as failed:
        ADAPTER.parse_poll(answer({"state": "failed", "error": {"charged": "no"}}), JOB)
    assert failed.value.billed is None  # only a real boolean says


def test_error_answers_map_by_status_and_nimbus_codes() -> None:
    def error(status: int, code: str, **headers: str) -> errors.ProviderError:
        body = {"error": {"code": code, "message": f"{code} {KEY}"}}
        return ADAPTER.parse_error(answer(body, status, **headers))

    assert type(error(400, "prompt_blocked")) is errors.ContentModerated
    assert type(error(500, "prompt_blocked")) is errors.ProviderUnavailable
    assert type(error(422, "validation_failed")) is errors.ProviderRejected
    assert type(error(401, "invalid_token")) is errors.AuthenticationFailed
    assert type(error(402, "insufficient_credits")) is errors.InsufficientBalance
    assert type(error(503, "overloaded")) is errors.ProviderUnavailable
    limited = error(429, "rate_limited", **{"retry-after": "7"})
    assert isinstance(limited, errors.RateLimited)
    assert limited.retry_after == 7
    assert error(400, "prompt_blocked").code == "prompt_blocked"


# --- the public API the examples need ------------------------------------------------------


def test_the_public_modules_for_outside_packages_pin_their_names() -> None:
    from flux_adapters.emulator import images
    from flux_adapters.providers import answers

    assert answers.__all__ == [
        "json_object",
        "number",
        "parse_error",
        "parse_images",
        "required_text",
        "required_url",
        "retry_after",
        "unreadable",
        "url_problem",
        "words",
    ]
    assert images.__all__ == ["FORMATS", "decode", "encode", "placeholder", "render"]
    for module in (answers, images):
        for name in module.__all__:
            value = getattr(module, name)
            assert callable(value) is False or (value.__doc__ or "").strip(), name


def test_register_provider_is_exported_at_the_top_as_the_contract_says() -> None:
    import flux_adapters
    from flux_adapters import providers

    assert flux_adapters.register_provider is providers.register_provider
    assert "register_provider" in flux_adapters.__all__


def test_importing_the_answer_readers_loads_no_emulator_or_http_client() -> None:
    code = (
        "import sys, flux_adapters, flux_adapters.providers.answers; "
        "print(sorted(m for m in ('PIL', 'starlette', 'uvicorn', 'httpx') if m in sys.modules))"
    )
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert finished.stdout.strip() == "[]", finished.stderr


def test_the_emulator_images_draw_encode_and_read_back() -> None:
    from flux_adapters.emulator.images import FORMATS, decode, encode, placeholder, render

    tile = placeholder("https://example.com/a.png")
    assert tile.getpixel((0, 0)) == placeholder("https://example.com/a.png").getpixel((0, 0))
    assert tile.getpixel((0, 0)) != placeholder("https://example.com/b.png").getpixel((0, 0))
    for output_format in FORMATS:
        data = encode(render(96, 64, [tile, decode(image_bytes(20, 10))], "p", 1), output_format)
        assert decode(data).size == (96, 64)
    for garbage in (b"", b"GIF89a" + b"\0" * 40, image_bytes(20, 10)[:40]):
        with pytest.raises(ValueError, match="not a readable"):
            decode(garbage)
