"""The flux-adapters command: explain, models, edit against the emulator, and its exit codes."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from flux_adapters.cli import main
from flux_adapters.emulator import Emulator, Fault, run_emulator
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


def test_explain_shows_four_different_wire_requests(tmp_path: Path) -> None:
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
    assert set(sections) == {"laozhang", "apiyi", "apiyi-multipart", "aimlapi"}
    assert "POST https://api.laozhang.ai/v1/images/generations" in sections["laozhang"]
    assert '"width": 1184' in sections["laozhang"]
    assert '"aspect_ratio": "4:3"' in sections["apiyi"]
    assert "POST https://api.apiyi.com/v1/images/edits" in sections["apiyi-multipart"]
    assert 'image[]  (file "robot.png", image/png' in sections["apiyi-multipart"]
    assert '"image_size": "landscape_4_3"' in sections["aimlapi"]
    assert '"model": "blackforestlabs/flux-2-pro-edit"' in sections["aimlapi"]
    assert "Authorization: Bearer [redacted]" in out
    assert "data:image/png;base64,… <64x48 png" in out
    assert len(set(sections.values())) == 4


def test_explain_lists_violations_instead_of_sending(tmp_path: Path) -> None:
    code, out, _ = run(
        "explain", "p", *["-i", "https://ex.com/a.png"] * 4, "--seed", "0", "-p", "aimlapi"
    )
    assert code == 2
    assert "refused before sending" in out
    assert "images: too many reference images" in out
    assert "seed: is out of range" in out


def test_models_lists_limits_and_prices() -> None:
    code, out, _ = run("models")
    assert code == 0
    assert "blackforestlabs/flux-2-pro-edit" in out
    assert "flux-2-pro $0.03 per call (as of 2026-09-24)" in out
    assert "prices: not documented" in out


def test_edit_saves_the_image_and_reports(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APIYI_API_KEY", "k")
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


def test_edit_exit_codes(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "k")
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
    assert code == 5
    assert "unknown fault part" in err


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
    command = [
        sys.executable,
        "-m",
        "flux_adapters",
        "emulate",
        "--port",
        str(port),
        "--fault",
        "aimlapi:503,first=1",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None
            banner = [server.stdout.readline() for _ in range(6)]
            assert f"  laozhang         http://127.0.0.1:{port}/laozhang/v1\n" in banner
            url = f"http://127.0.0.1:{port}/aimlapi/v1/images/generations"
            body = {"model": "blackforestlabs/flux-2-pro", "prompt": "p"}
            for _ in range(100):  # the banner is printed just before the server binds
                try:
                    first = httpx.post(url, json=body, headers={"Authorization": "Bearer k"})
                    break
                except httpx.ConnectError:
                    time.sleep(0.05)
            second = httpx.post(url, json=body, headers={"Authorization": "Bearer k"})
            assert (first.status_code, second.status_code) == (503, 200)
        finally:
            server.terminate()
