"""``flux-adapters keys`` and ``flux-adapters serve``: keys made, listed and revoked from the
command line; the gateway served by the command in its own process, stopped by SIGTERM while a
paid call is under way (which finishes), or with no time to finish (which is reported)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from flux_adapters.cli import main
from flux_adapters.emulator import Emulator, Fault, run_emulator
from tests.conftest import held_at_the_provider

EXIT_CONFIG = 5


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    file = str(tmp_path / "keys.json")
    code, out, _ = run("keys", "--keys-file", file, "create", "--name", "web app",
                       "--budget-usd", "50", "--per-day", "--model", "flux-2-pro",
                       "--rate-per-minute", "30")  # fmt: skip
    assert code == 0
    key = out.splitlines()[0]
    key_id = key.split("_")[1]
    assert key.startswith(f"fxg_{key_id}_")
    assert "shown once" in out
    stored = Path(file).read_text()
    assert key not in stored
    assert key.split("_", 2)[2] not in stored
    code, listed, _ = run("keys", "--keys-file", file, "list")
    assert code == 0
    assert listed == f"{key_id}  web app  $50 per day, 30/min, models flux-2-pro\n"
    code, as_json, _ = run("keys", "--keys-file", file, "list", "--json")
    [record] = json.loads(as_json)["keys"]
    assert (record["id"], record["budget_usd"], record["key_hash"]) == (key_id, 50.0, None)
    assert run("keys", "--keys-file", file, "revoke", key_id)[0] == 0
    assert run("keys", "--keys-file", file, "list")[1] == ""
    code, _, err = run("keys", "--keys-file", file, "revoke", key_id)
    assert code == EXIT_CONFIG
    assert "no gateway key with id" in err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (("--model", "flux-9"), "argument --model: invalid choice: 'flux-9'"),
        (
            ("--budget-usd", "-1"),
            "argument --budget-usd: must be above 0 and at most 1e+09, got '-1'",
        ),
        (
            ("--rate-per-minute", "0"),
            "argument --rate-per-minute: the rate must be a number of requests a minute, at "
            "least one a day (1/1440) and at most 1000000, not 0.0",
        ),
        # Stored before: the key's first call held the next for 10^300 s.
        (("--rate-per-minute", "1e-300"), "argument --rate-per-minute: the rate must be"),
        # Above what the key store takes: as bad an argument as 0 (exit 2, nothing opened).
        (("--budget-usd", "1e300"), "argument --budget-usd: must be above 0 and at most"),
        (("--rate-per-minute", "1e300"), "argument --rate-per-minute: the rate must be"),
        (("--name", "two\nlines"), "argument --name: must be printable text"),
        (("--provider", "laozang"), "argument --provider: unknown provider 'laozang'"),
    ],
)
def test_keys_create_refuses_unusable_settings_as_bad_arguments(
    argv: tuple[str, ...], said: str, tmp_path: Path
) -> None:
    code, out, err = run("keys", "--keys-file", str(tmp_path / "k.json"), "create", *argv)
    assert code == 2, err  # bad arguments, as the help's exit table says
    assert said in err
    assert out == ""
    assert not (tmp_path / "k.json").exists()


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (("--public-url", "https://ops:hunter2@img.example.com"), "argument --public-url: must be"),
        (("--public-url", "https://img.example.com/?v=1"), "argument --public-url: must be"),
        (("--public-url", "https://img.example.com:0"), "argument --public-url: must be"),
        (("--max-body-mb", "10", "--max-bodies-mb", "5"), "--max-bodies-mb 5 is less than"),
    ],
)
def test_serve_refuses_unusable_settings_as_bad_arguments_naming_its_flags(
    argv: tuple[str, ...], said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a configuration error (exit 5) naming the library's fields ("GatewaySettings:
    # public_url", "max_bodies_bytes"), where every other message of the command names its
    # flags and a bad argument is exit 2.
    monkeypatch.setenv("FLUX_PROVIDERS", "laozhang")
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    code, out, err = run("serve", "--port", "0", "--files-dir", str(tmp_path / "files"), *argv)
    assert code == 2, err
    assert said in err
    assert "GatewaySettings" not in err
    assert "_bytes" not in err
    assert "hunter2" not in err
    assert out == ""


def test_serve_keeps_images_for_up_to_a_year(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: --retention was refused above 86400, its default, so the command could keep
    # images for less than a day only, though GatewaySettings (and run_gateway) take a year.
    import flux_adapters.gateway

    given: dict[str, object] = {}
    monkeypatch.setattr(flux_adapters.gateway, "serve", lambda **options: given.update(options))
    code, _, err = run("serve", "--port", "0", "--retention", "604800")
    assert code == 0, err
    assert given["retention"] == 604800.0  # a week
    code, _, err = run("serve", "--port", "0", "--retention", str(365 * 86400 + 1))
    assert code == 2
    assert "argument --retention: must be seconds above 0 to 31536000 (a year)" in err


# -- the served gateway, in its own process ------------------------------------------------------


@pytest.fixture
def slow_emulator() -> Iterator[Emulator]:
    with run_emulator() as emulator:
        yield emulator


def serve(
    emulator: Emulator, tmp_path: Path, *extra: str
) -> tuple[subprocess.Popen[str], str, str]:
    """``flux-adapters serve`` on a free port fronting laozhang; its process, root URL and a key."""
    env = {
        **os.environ,
        "FLUX_PROVIDERS": "laozhang",
        "LAOZHANG_API_KEY": "provider-secret-key",
        "LAOZHANG_BASE_URL": emulator.base_url("laozhang"),
        "FLUX_GATEWAY_KEYS": str(tmp_path / "keys.json"),
    }
    env.pop("FLUX_CONFIG", None)
    made = subprocess.run(
        [sys.executable, "-m", "flux_adapters", "keys", "create"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    key = made.stdout.splitlines()[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "flux_adapters", "serve", "--port", "0",
         "--files-dir", str(tmp_path / "files"), *extra],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    banner = process.stdout.readline()
    assert banner.startswith("flux-adapters gateway on http://127.0.0.1:"), banner
    root = banner.split()[3]
    return process, root, key


def test_serve_finishes_a_paid_call_under_way_on_sigterm(
    slow_emulator: Emulator, tmp_path: Path
) -> None:
    process, root, key = serve(slow_emulator, tmp_path)
    assert process.stderr is not None
    err = ""
    try:
        answers: list[object] = []

        def call() -> None:
            with openai.OpenAI(base_url=root + "/v1", api_key=key, max_retries=0) as client:
                try:
                    answers.append(client.images.generate(model="flux-2-pro", prompt="slow"))
                except openai.APIError as error:
                    answers.append(error)

        caller = threading.Thread(target=call)
        # The paid call is held at the provider until the gateway says it drains (or ends).
        with held_at_the_provider() as reached:
            caller.start()
            reached.wait(30)  # the paid call has reached the provider
            process.send_signal(signal.SIGTERM)
            while line := process.stderr.readline():
                err += line
                if '"event": "draining"' in line:
                    break
        caller.join(timeout=60)
        rest = process.communicate(timeout=60)[1]
        err += rest
    finally:
        process.kill()
    assert process.returncode == 0
    [answer] = answers
    assert isinstance(answer, openai.types.ImagesResponse), answer
    assert len(slow_emulator.billed("laozhang")) == 1
    assert '"event": "draining", "in_flight": 1' in err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    served = [line for line in lines if line.get("route") == "/v1/images/generations"]
    assert served[0]["status"] == 200
    assert "provider-secret-key" not in err
    assert key not in err


def test_serve_reports_a_paid_call_it_had_to_cut(slow_emulator: Emulator, tmp_path: Path) -> None:
    process, root, key = serve(slow_emulator, tmp_path, "--shutdown-timeout", "0")
    try:
        slow_emulator.inject("laozhang", Fault(delay=30.0, first=1))
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
        while not slow_emulator.calls("laozhang"):
            threading.Event().wait(0.01)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    cut = [json.loads(line) for line in err.splitlines() if '"cut-at-shutdown"' in line]
    assert len(cut) == 1
    assert cut[0]["may_be_billed"] is True
    assert cut[0]["model"] == "flux-2-pro"
