"""The flux-adapters command: explain, models, edit against the emulator, and its exit codes."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from PIL import Image

from flux_adapters import cli
from flux_adapters.cli import main
from flux_adapters.emulator import Emulator, Fault, run_emulator
from flux_adapters.providers import PROVIDERS
from flux_adapters.wire import HttpRequest, JsonBody
from tests.conftest import image_bytes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_explain_shows_every_providers_wire_request_and_auth_header(tmp_path: Path) -> None:
    picture = tmp_path / "robot.png"
    picture.write_bytes(image_bytes(64, 48))
    code, out, _ = run(
        "explain",
        "image 1 in a greenhouse",
        "-i",
        str(picture),
        "--aspect-ratio",
        "4:3",
        "--allow-conversions",
    )
    assert code == 0
    sections = dict(part.split("\n", 1) for part in out.split("=== ")[1:])
    built_in = {"laozhang", "apiyi", "apiyi-multipart", "aimlapi", "bfl", "fal"}
    assert set(sections) == set(PROVIDERS) >= built_in  # and any installed provider package
    assert "POST https://api.laozhang.ai/v1/images/generations" in sections["laozhang"]
    assert '"width": 1184' in sections["laozhang"]
    assert '"aspect_ratio": "4:3"' in sections["apiyi"]
    assert "POST https://api.apiyi.com/v1/images/edits" in sections["apiyi-multipart"]
    assert 'image[]  (file "robot.png", image/png' in sections["apiyi-multipart"]
    assert '"image_size": "landscape_4_3"' in sections["aimlapi"]
    assert '"model": "blackforestlabs/flux-2-pro-edit"' in sections["aimlapi"]
    assert "Authorization: Bearer [redacted]" in sections["laozhang"]
    assert "POST https://api.bfl.ai/v1/flux-2-pro\nx-key: [redacted]" in sections["bfl"]
    assert '"input_image": "<plain base64>… <64x48 png' in sections["bfl"]  # no data: prefix
    assert "POST https://queue.fal.run/fal-ai/flux-2-pro/edit" in sections["fal"]
    assert "Authorization: Key [redacted]" in sections["fal"]
    assert '"image_size": "landscape_4_3"' in sections["fal"]
    assert "data:image/png;base64,… <64x48 png" in out
    assert len(set(sections.values())) == len(sections)  # no two providers alike


def test_explain_lists_violations_instead_of_sending(tmp_path: Path) -> None:
    code, out, _ = run(
        "explain", "p", *["-i", "https://ex.com/a.png"] * 4, "--seed", "0", "-p", "aimlapi"
    )
    assert code == 2
    assert "refused before sending" in out
    assert "--image: too many reference images" in out  # the flags, not the library's fields
    assert "--seed: is out of range" in out


def _raises(built: HttpRequest) -> HttpRequest:
    raise KeyError("seed")


def _with(**changes: Any) -> Callable[[HttpRequest], object]:
    return lambda built: attrs.evolve(built, **changes)


UNSENDABLE: dict[str, Callable[[HttpRequest], object]] = {
    "headers-triple": _with(headers=(("X-Trace", "a", "b"),)),
    "headers-text": _with(headers="ab"),
    "headers-none": _with(headers=None),
    "header-int-value": _with(headers=(("X-Seed", 5),)),
    "header-line-break": _with(headers=(("X-Trace", "a\r\nX-Key: b"),)),
    "url-line-break": _with(url="https://api.laozhang.ai/v1/images\r\nX-Key: b"),
    "url-int": _with(url=5),
    "body-not-json": _with(body=JsonBody({"prompt": {"a", "b"}})),  # type: ignore[dict-item]
    "not-a-request": lambda built: None,
    "build-raises": _raises,
}
"""What an outside adapter may build that a client refuses before sending anything."""


@pytest.mark.parametrize("build", UNSENDABLE.values(), ids=UNSENDABLE.keys())
@pytest.mark.parametrize("json_output", [False, True], ids=["text", "json"])
def test_explain_refuses_an_outside_adapters_unsendable_request_as_a_client_would(
    build: Callable[[HttpRequest], object], json_output: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client refuses such a request with a RequestError, nothing sent; explain printed a line
    # break in a header or the request line as if it would go, or failed with a bare ValueError,
    # TypeError or AttributeError ("unexpected", exit 1).
    from flux_adapters.providers import _REGISTRY, register_provider
    from flux_adapters.providers.laozhang import LaozhangAdapter

    monkeypatch.setattr(_REGISTRY, "_targets", dict(_REGISTRY._targets))
    monkeypatch.setattr(_REGISTRY, "_loaded", dict(_REGISTRY._loaded))

    class Shapeless(LaozhangAdapter):
        name = "shapeless"

        def build_request(self, *args: Any) -> HttpRequest:
            return build(super().build_request(*args))  # type: ignore[return-value]

    register_provider("shapeless", Shapeless())
    code, out, err = run("explain", "p", "-p", "shapeless", "-p", "laozhang",
                         *["--json"] * json_output)  # fmt: skip
    assert (code, err) == (0, "")  # laozhang's request is shown
    if json_output:
        refused, shown = json.loads(out)["providers"]
        assert (refused["accepted"], refused["request"]) == (False, None)
        assert refused["violations"][0]["field"] == "request"
        assert shown["accepted"] is True
    else:
        section = out.split("=== ")[1]
        assert section.startswith("shapeless\nrefused before sending:\n  - request: shapeless ")
        assert "\nX-Key: b\n" not in out


def test_models_lists_limits_and_prices() -> None:
    code, out, _ = run("models", "--markdown")
    assert code == 0
    assert "blackforestlabs/flux-2-pro-edit" in out
    assert "flux-2-pro $0.03 per call (as of 2026-09-24)" in out
    assert "prices: not documented" in out


def test_edit_saves_the_image_and_reports(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APIYI_API_KEY", "test-key")
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(image_bytes(200, 100))
    second.write_bytes(image_bytes(300, 200))
    target = tmp_path / "out" / "result.jpeg"
    code, out, err = run(
        "edit", "image 1 on image 2", "-i", str(first), "-i", str(second), "--provider", "apiyi-multipart",
        "--base-url", emulator.base_url("apiyi-multipart"), "--size", "512x256", "-o", str(target),
    )  # fmt: skip
    assert code == 0, err
    assert "provider: apiyi-multipart" in out
    assert "cost:     unknown" in out
    assert f"saved:    {target}" in out
    assert "generating flux-2-pro with 2 reference image(s)" in err
    with Image.open(target) as picture:
        assert picture.size == (512, 256)


def test_edit_json_tells_a_provider_skipped_for_its_limits_in_the_commands_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the attempt's error in --json gave the library's advice (aspect_ratio="4:3" or
    # allow_conversions=True); everything else the command says names its flags.
    monkeypatch.setenv("FLUX_PROVIDERS", "apiyi,laozhang")
    monkeypatch.chdir(tmp_path)
    with run_emulator() as own:  # not the module's: other tests count its calls
        for provider in ("apiyi", "laozhang"):
            monkeypatch.setenv(f"{provider.upper()}_API_KEY", "test-key")
            monkeypatch.setenv(f"{provider.upper()}_BASE_URL", own.base_url(provider))
        code, out, err = run("edit", "a robot", "--size", "1024x768", "-o", "a.png", "--json")
    assert code == 0, err
    skipped, served = json.loads(out)["attempts"]
    assert (skipped["provider"], skipped["outcome"]) == ("apiyi", "skipped")
    assert "pass --aspect-ratio 4:3 or --allow-conversions" in skipped["error"]
    assert "allow_conversions" not in skipped["error"]
    assert served["provider"] == "laozhang"


def test_edit_saves_to_a_file_named_dash_when_the_path_says_so(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "-o -" is refused (standard output to most tools); "./-" names the file plainly and was
    # refused as well, since Path("./-") == Path("-").
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.chdir(tmp_path)
    base = ["--provider", "laozhang", "--base-url", emulator.base_url("laozhang")]
    code, _, err = run("edit", "p", *base, "-o", "-")
    assert code == 2
    assert "the image cannot go to standard output" in err
    assert emulator.calls("laozhang") == []
    code, out, err = run("edit", "p", *base, "-o", "./-")
    assert code == 0, err
    assert "saved:    -\n" in out
    with Image.open(tmp_path / "-") as picture:
        picture.verify()  # the image the provider made, whole


def test_edit_exit_codes(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.delenv("FLUX_PROVIDERS", raising=False)
    base = ["--provider", "laozhang", "--base-url", emulator.base_url("laozhang")]
    assert run("edit", "p", "--width", "1000", "--height", "1000", *base)[0] == 2
    emulator.inject("laozhang", Fault(status=402, first=1))
    code, _, err = run("edit", "p", *base)
    assert code == 3
    assert "InsufficientBalance" in err
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    assert run("edit", "p", "--provider", "laozhang", "--base-url", closed)[0] == 4
    assert run("edit", "p")[0] == 5  # no provider chosen
    monkeypatch.delenv("LAOZHANG_API_KEY")
    assert run("edit", "p", *base)[0] == 5  # no key


def test_emulate_rejects_a_bad_fault_spec() -> None:
    code, _, err = run("emulate", "--fault", "laozhang:teapot")
    assert code == 2  # a bad argument: refused before the server starts
    assert "unknown fault part 'teapot'" in err


def test_the_demo_runs_end_to_end(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    assert "checked:  out/demo.png is a 1280x768 PNG image" in finished.stdout
    with Image.open(tmp_path / "out" / "demo.png") as picture:
        assert picture.size == (1280, 768)


def test_emulate_serves_in_the_foreground_with_faults_from_the_command_line() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "flux_adapters", "emulate", "--port", str(port),
               "--fault", "aimlapi:503,first=1", "--pending-polls", "3"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None
            banner = [server.stdout.readline() for _ in range(8)]
            root = f"http://127.0.0.1:{port}"
            for line in (f"  laozhang         {root}/laozhang\n", f"  bfl              {root}/bfl\n",
                         f"  fal              {root}/fal\n"):  # fmt: skip
                assert line in banner  # the base URLs to give a client, as printed
            url = f"{root}/aimlapi/v1/images/generations"
            body = {"model": "blackforestlabs/flux-2-pro", "prompt": "p"}
            for _ in range(100):  # the banner is printed once bound, just before it listens
                try:
                    first = httpx.post(url, json=body, headers={"Authorization": "Bearer k"})
                    break
                except httpx.ConnectError:
                    time.sleep(0.05)
            second = httpx.post(url, json=body, headers={"Authorization": "Bearer k"})
            assert (first.status_code, second.status_code) == (503, 200)

            submitted = httpx.post(f"{root}/bfl/v1/flux-2-pro", json={"prompt": "p"},
                                   headers={"x-key": "k"}).json()  # fmt: skip
            statuses = [
                httpx.get(submitted["polling_url"], headers={"x-key": "k"}).json()["status"]
                for _ in range(4)
            ]
            assert statuses == ["Pending", "Pending", "Pending", "Ready"]  # --pending-polls 3
        finally:
            server.terminate()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        ([], "any non-empty API key is accepted\n"),
        (["--bad-key", "b"], "any non-empty API key is accepted (but those given with --bad-key)\n"),
        (["--key", "a"], "only the given API keys are accepted\n"),
        (["--key", "a", "--bad-key", "b"], "only the given API keys are accepted (but those given with --bad-key)\n"),
    ],
)  # fmt: skip
def test_emulate_banner_says_which_keys_are_accepted(
    flags: list[str], said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A --bad-key is refused (401, bfl 403): the banner must not say every key is accepted.
    import flux_adapters.emulator

    def serve(**options: Any) -> None:
        assert options["bad_keys"] == (["b"] if "--bad-key" in flags else [])
        options["on_ready"]("http://127.0.0.1:1")

    monkeypatch.setattr(flux_adapters.emulator, "serve", serve)
    code, out, _ = run("emulate", *flags)
    assert code == 0
    assert out.endswith(said)


@pytest.mark.parametrize(
    "spec", ["laozhang:on=poll,503", "aimlapi:pending=3", "apiyi:failed", "bfl:on=fetch,500"]
)
def test_emulate_refuses_a_fault_the_provider_cannot_have(spec: str) -> None:
    code, _, err = run("emulate", "--fault", spec)
    assert code == 2
    assert spec in err
    assert "Traceback" not in err


def edit_at(emulator: Emulator, *argv: str) -> tuple[int, str, str]:
    return run("edit", "p", "-p", "laozhang", "--base-url", emulator.base_url("laozhang"), *argv)


def test_an_output_path_that_cannot_be_written_is_refused_before_the_paid_call(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    (tmp_path / "a-file").write_text("")
    sent = len(emulator.calls())
    for target in (tmp_path, tmp_path / "a-file" / "robot.png"):
        code, _, err = edit_at(emulator, "-o", str(target))
        assert code == 7
        assert f"OutputError: cannot write {target}" in err
    assert len(emulator.calls()) == sent


@contextmanager
def folder_replaced_by_a_file_once_sent(emulator: Emulator, folder: Path) -> Iterator[None]:
    """While the provider works (1 s), *folder* becomes a file: saving there fails after the check."""
    emulator.inject("laozhang", Fault(delay=1.0, first=1))
    sent = len(emulator.calls())

    def replace() -> None:
        deadline = time.monotonic() + 10
        while len(emulator.calls()) == sent and time.monotonic() < deadline:
            time.sleep(0.01)
        folder.rmdir()
        folder.write_text("no longer a folder")

    swapper = threading.Thread(target=replace)
    swapper.start()
    try:
        yield
    finally:
        swapper.join()
        emulator.clear_faults()


def test_an_image_that_cannot_be_saved_after_the_paid_call_is_saved_elsewhere(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.chdir(tmp_path)
    wanted = tmp_path / "wanted"
    wanted.mkdir()
    sent = len(emulator.calls())
    with folder_replaced_by_a_file_once_sent(emulator, wanted):
        code, out, err = edit_at(emulator, "-o", str(wanted / "robot.png"), "--size", "512x256")
    assert code == 7
    assert len(emulator.calls()) == sent + 1  # paid once, and not again for the fallback
    [fallback] = (tmp_path / "out").iterdir()
    assert f"saved:    out/{fallback.name} (instead of {wanted / 'robot.png'})" in out
    assert f"OutputError: cannot write {wanted}" in err
    assert f"saved in out/{fallback.name} instead" in err
    with Image.open(fallback) as picture:
        assert picture.size == (512, 256)


def test_an_image_that_cannot_be_saved_anywhere_leaves_its_download_address(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").write_text("a file where the fallback folder would go")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "out" / "tmp"))
    wanted = tmp_path / "wanted"
    wanted.mkdir()
    with folder_replaced_by_a_file_once_sent(emulator, wanted):
        code, _, err = edit_at(emulator, "-o", str(wanted / "robot.png"))
    assert code == 7
    address = err.split("download it within 10 minutes from ", 1)[1].strip()
    assert httpx.get(address).status_code == 200


def test_a_result_that_expired_before_its_download_ends_with_6(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    with run_emulator() as expiring:
        expiring.ttl = -1.0  # every URL it signs is already past its expiry
        code, _, err = edit_at(expiring, "-o", str(tmp_path / "robot.png"))
    assert code == 6
    assert "flux-adapters: ResultExpired: the result URL has expired" in err
    assert "download it" not in err
    assert not (tmp_path / "robot.png").exists()


def test_a_bug_is_one_line_and_the_traceback_only_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(arguments: object, out: object) -> int:
        raise RuntimeError("boom\nacross lines")

    monkeypatch.setattr(cli, "_models", broken)
    monkeypatch.delenv("FLUX_DEBUG", raising=False)
    code, _, err = run("models")
    assert code == 1
    assert err == (
        "flux-adapters: RuntimeError: boom across lines "
        "(unexpected; FLUX_DEBUG=1 shows the traceback)\n"
    )
    monkeypatch.setenv("FLUX_DEBUG", "1")
    code, _, err = run("models")
    assert code == 1
    assert err.startswith("Traceback (most recent call last):")


@pytest.mark.parametrize("stdin", [None, io.StringIO("y\n")], ids=["closed", "not a terminal"])
def test_recording_asks_only_a_person_at_a_terminal(
    stdin: io.StringIO | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, err = run(
        "conformance", "--record", "-p", "laozhang", "--base-url", "http://127.0.0.1:9",
        "--cassettes", str(tmp_path / "cassettes"), "--report-dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 5
    assert "may be billed" in out
    assert "not recorded" in err
    assert not (tmp_path / "cassettes").exists()


def spawn(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flux_adapters", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_ctrl_c_while_waiting_for_the_provider_ends_with_130(tmp_path: Path) -> None:
    with run_emulator(faults={"laozhang": [Fault(delay=3)]}) as slow:
        env = {**os.environ, "LAOZHANG_API_KEY": "test-key"}
        base = slow.base_url("laozhang")
        with spawn("edit", "p", "-p", "laozhang", "--base-url", base, "-o", str(tmp_path / "x.png"), "--json", env=env) as edit:  # fmt: skip
            deadline = time.monotonic() + 10
            while not slow.calls() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert slow.calls(), "the request never arrived"
            edit.send_signal(signal.SIGINT)
            out, err = edit.communicate(timeout=10)
    assert edit.returncode == 130
    # The request reached the provider: the user learns it may have been taken, and billed.
    said = "the request to laozhang was under way: laozhang may have taken it, and may bill it"
    assert err.splitlines()[-2:] == ["flux-adapters: interrupted", f"flux-adapters: {said}"]
    assert "Traceback" not in err
    # A program reading --json finds it as a field of its own, beside the one-line message.
    assert json.loads(out) == {
        "error": {
            "type": "KeyboardInterrupt",
            "message": f"interrupted; {said}",
            "exit_status": 130,
            "notes": [said],
        }
    }
    assert not (tmp_path / "x.png").exists()


def test_ctrl_c_stops_the_emulator_with_130_and_port_0_takes_a_free_port() -> None:
    with spawn("emulate", "--port", "0") as server:
        assert server.stdout is not None
        first = server.stdout.readline()
        root = first.split(" on ", 1)[1].split(" ", 1)[0]
        assert not root.endswith(":0")
        for _ in range(100):
            try:
                httpx.get(f"{root}/")  # any answer: it listens on the port it announced
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        else:
            pytest.fail(f"nothing listens at {root}")
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=10)
    assert server.returncode == 130
    assert err == "flux-adapters: interrupted\n"


EXIT_STATUSES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 130, 141)


def test_every_exit_status_is_in_the_help_and_the_documentation() -> None:
    code, _, _ = run("--help")
    assert code == 0
    helped = subprocess.run(
        [sys.executable, "-m", "flux_adapters", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    documented = (ROOT / "docs" / "cli.md").read_text()
    for status in EXIT_STATUSES:
        assert re.search(rf"^\s+{status}\s+\w", helped, re.MULTILINE), status
        assert f"| `{status}` |" in documented, status
    assert "FLUX_DEBUG" in helped
    assert "FLUX_DEBUG" in documented


def test_two_edits_in_the_same_second_keep_both_images(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    base = ["--provider", "laozhang", "--base-url", emulator.base_url("laozhang")]
    for seed in ("1", "2"):
        assert run("edit", "p", "--seed", seed, "--size", "64x64", *base)[0] == 0
    assert len(list((tmp_path / "out").iterdir())) == 2  # no second image written over the first


@pytest.mark.parametrize(
    ("stop", "json_flag"),
    [(signal.SIGINT, []), (signal.SIGINT, ["--json"]), (signal.SIGTERM, [])],
    ids=["ctrl-c", "ctrl-c-json", "sigterm"],
)
def test_ctrl_c_while_saving_a_paid_image_says_where_it_can_still_be_fetched(
    stop: signal.Signals, json_flag: list[str], tmp_path: Path
) -> None:
    """The image was made and billed; its URL lives minutes: Ctrl-C must not lose it quietly.

    Under ``--json`` the URL is in the failure's ``notes`` too: a script reads only stdout.
    SIGTERM (``timeout``, a supervisor) is taken as Ctrl-C: it ended the process at once, the
    image lost without a word and its ``.part`` file left behind.
    """
    # A byte every 20 ms: the first bytes (enough to tell the format) are saved within a second,
    # the whole image would take minutes.
    with run_emulator(faults={"laozhang": [Fault(download="drip", drip=0.02)]}) as cdn:
        env = {**os.environ, "LAOZHANG_API_KEY": "test-key"}
        base = cdn.base_url("laozhang")
        with spawn("edit", "p", "-p", "laozhang", "--base-url", base, "-o", str(tmp_path / "x.png"), *json_flag, env=env) as edit:  # fmt: skip

            def downloading() -> bool:  # the answer came, and the first dripped bytes are saved
                return any(part.stat().st_size for part in tmp_path.glob(".x.png.*.part"))

            deadline = time.monotonic() + 10
            while not downloading() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert cdn.billed(), "the request never arrived"
            assert downloading(), "the download never started"
            edit.send_signal(stop)
            out, err = edit.communicate(timeout=10)
    assert edit.returncode == 130
    where = "not saved; download it within 10 minutes from http://127.0.0.1:"
    assert err.splitlines()[-2] == "flux-adapters: interrupted"
    assert err.splitlines()[-1].startswith(f"flux-adapters: {where}"), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    if json_flag:
        (note,) = json.loads(out)["error"]["notes"]
        assert note.startswith(where), note
        assert note.split(" from ", 1)[1] == err.splitlines()[-1].split(" from ", 1)[1]


@pytest.mark.parametrize(
    ("provider", "fate"),
    [
        ("bfl", "goes on (bfl offers no cancel): it may still finish, and be billed"),
        ("fal", "(fal accepted the cancel); if it had, it may still finish, and be billed"),
    ],
)
def test_ctrl_c_while_a_job_runs_says_what_became_of_the_job(
    provider: str, fate: str, tmp_path: Path
) -> None:
    """Ctrl-C after the provider took the job: the job may go on and be billed. Say so."""
    with run_emulator(faults={provider: [Fault(pending=10**9)]}) as emulator:
        env = {**os.environ, f"{provider.upper()}_API_KEY": "test-key"}
        base = emulator.base_url(provider)
        with spawn("edit", "p", "-p", provider, "--base-url", base, "-o", str(tmp_path / "x.png"), env=env) as edit:  # fmt: skip
            deadline = time.monotonic() + 10
            while not emulator.calls(kind="poll") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert emulator.calls(kind="poll"), "the job was never polled"
            edit.send_signal(signal.SIGINT)
            _, err = edit.communicate(timeout=20)
        cancels = len(emulator.calls(kind="cancel"))
    assert edit.returncode == 130
    assert cancels == (provider == "fal")
    lines = err.splitlines()
    assert lines[-2] == "flux-adapters: interrupted", err
    assert lines[-1].startswith(f"flux-adapters: the {provider} job '"), err
    assert lines[-1].endswith(fate), err
    assert "Traceback" not in err


@pytest.mark.parametrize("how", ["--timeout", "$FLUX_JOB_DEADLINE"])
def test_edit_at_a_job_provider_gives_up_on_the_whole_job_at_its_deadline(
    how: str, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BFL_API_KEY", "test-key")
    emulator.inject("bfl", Fault(pending=10**9, first=1))  # a job that never ends
    argv = ["edit", "p", "-p", "bfl", "--base-url", emulator.base_url("bfl")]
    argv += ["-o", str(tmp_path / "x.png")]
    if how == "--timeout":
        argv += ["--timeout", "1"]
    else:
        monkeypatch.setenv("FLUX_JOB_DEADLINE", "1")
    code, _, err = run(*argv)
    assert code != 0
    assert "JobTimeout" in err
    assert "within 1 s" in err  # the deadline given, not the 600 s default


def test_a_bad_flux_job_deadline_is_a_configuration_error_before_sending(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BFL_API_KEY", "test-key")
    monkeypatch.setenv("FLUX_JOB_DEADLINE", "soon")
    sent = len(emulator.calls("bfl"))
    code, _, err = run("edit", "p", "-p", "bfl", "--base-url", emulator.base_url("bfl"))
    assert code != 0
    assert "$FLUX_JOB_DEADLINE" in err
    assert len(emulator.calls("bfl")) == sent


def test_conformance_replays_the_shipped_cassettes_from_a_folder_without_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./cassettes here
    code, out, _ = run("conformance", "-p", "laozhang", "--report-dir", "report")
    assert code == 0, out
    assert "replaying the cassettes shipped with flux-adapters" in out
    assert "| `text-to-image` | pass |" in out
    assert not (tmp_path / "cassettes").exists()  # nothing recorded or created


def test_conformance_records_into_the_current_folder_never_into_the_installed_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(
        "conformance", "--record", "--emulator", "-p", "laozhang", "--report-dir", "report"
    )
    assert code == 0, out
    assert (tmp_path / "cassettes/laozhang/text-to-image.yaml").is_file()
    assert "replaying the cassettes shipped" not in out


def test_a_recording_run_counts_scenarios_before_and_exchanges_and_accepted_paid_requests_after(
    tmp_path: Path,
) -> None:
    code, out, _ = run(
        "conformance", "--record", "--emulator", "-p", "fal",
        "--cassettes", str(tmp_path / "cassettes"), "--report-dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0, out
    before = re.search(
        r"fal: (\d+) scenario\(s\) to record against the emulator, (\d+) of them", out
    )
    after = re.search(
        r"fal: (\d+) scenario\(s\) recorded in (\d+) exchange\(s\), (\d+) of them", out
    )
    assert before is not None, out
    assert after is not None, out
    recorded = list((tmp_path / "cassettes/fal").glob("*.yaml"))
    exchanges = sum(path.read_text().count("\n- request:") for path in recorded)
    assert int(after[1]) == int(before[1]) == len(recorded)
    assert int(after[2]) == exchanges > len(recorded)  # a job is more than its submit
    assert int(after[3]) == int(before[2])  # what was announced as may-be-billed, and no more


def test_recording_honours_the_providers_base_url_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like a client: $<PROVIDER>_BASE_URL when --base-url is not given (here, an emulator)."""
    from flux_adapters.conformance.scenarios import by_id

    revoked = by_id("error-401").api_key
    assert revoked is not None
    with run_emulator(bad_keys={revoked}) as server:
        monkeypatch.setenv("LAOZHANG_API_KEY", "recording-key-0123456789")
        monkeypatch.setenv("LAOZHANG_BASE_URL", server.base_url("laozhang"))
        code, out, err = run(
            "conformance", "--record", "--yes", "-p", "laozhang",
            "--cassettes", str(tmp_path / "cassettes"), "--report-dir", str(tmp_path / "out"),
        )  # fmt: skip
        assert code == 0, out + err
        assert f"to record against {server.base_url('laozhang')}," in out
        assert server.calls("laozhang")  # recorded there, not at api.laozhang.ai
    recorded = (tmp_path / "cassettes/laozhang/text-to-image.yaml").read_text()
    assert f"where: base URL {server.base_url('laozhang')}" in recorded


def test_a_malformed_base_url_variable_stops_a_recording_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "recording-key-0123456789")
    monkeypatch.setenv("LAOZHANG_BASE_URL", "ftp://nowhere")
    code, _, err = run(
        "conformance", "--record", "--yes", "-p", "laozhang",
        "--cassettes", str(tmp_path / "cassettes"), "--report-dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert code != 0
    assert "$LAOZHANG_BASE_URL" in err
    assert not (tmp_path / "cassettes").exists()


def test_a_cumulative_budget_with_no_room_is_status_2_not_a_bug(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Status 1 is "unexpected failure (a bug)"; a budget refusing the call before anything is
    # sent is refused like a request the limits refuse.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLUX_PROVIDERS", raising=False)
    monkeypatch.delenv("FLUX_CONFIG", raising=False)
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.setenv("LAOZHANG_BASE_URL", emulator.base_url("laozhang"))
    (tmp_path / "flux-adapters.toml").write_text('providers = ["laozhang"]\nbudget_usd = 0.01\n')
    sent = len(emulator.calls("laozhang"))
    code, _, err = run("edit", "p")
    assert code == 2, err
    assert "BudgetExceeded" in err
    code, out, _ = run("edit", "p", "--json")
    assert code == 2
    assert json.loads(out)["error"]["exit_status"] == 2
    assert len(emulator.calls("laozhang")) == sent  # nothing was sent
