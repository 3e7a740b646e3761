"""`flux-adapters batch` end to end: bad answers among good ones, a key echoed into errors,
and Ctrl-C in the middle, against loopback servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flux_adapters.emulator import Emulator, Fault, run_emulator
from tests.conftest import serving
from tests.test_hostile_provider import KEY, leaks


def jobs_file(folder: Path, count: int, size: str = "256x256") -> Path:
    path = folder / "jobs.jsonl"
    lines = [
        json.dumps({"id": f"job-{n:02d}", "prompt": f"job {n}", "size": size, "seed": n + 1})
        for n in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def batch(
    source: Path, folder: Path, base_url: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    environment = os.environ | {"LAOZHANG_API_KEY": KEY, "LAOZHANG_BASE_URL": base_url}
    return subprocess.run(
        [sys.executable, "-m", "flux_adapters", "batch", str(source), "-o", str(folder), "-p", "laozhang", *extra],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def report(folder: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (folder / "report.jsonl").read_text().splitlines()]


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


def test_bad_answers_among_good_ones_through_the_command_line(
    emulator: Emulator, tmp_path: Path
) -> None:
    for fault in (
        Fault(body="bad-b64", after_work=True, first=1),
        Fault(body="nested", after_work=True, first=1),
        Fault(download="html", first=1),
        Fault(download="redirect", first=1),
    ):
        emulator.inject("laozhang", fault)
    source, folder = jobs_file(tmp_path, 10), tmp_path / "out"
    first = batch(source, folder, emulator.base_url("laozhang"), "--concurrency", "1")
    assert first.returncode == 8, first.stderr  # some jobs may have been billed, without image
    lines = {str(line["id"]): line for line in report(folder)}
    bad = {name for name, line in lines.items() if line["status"] == "unconfirmed"}
    assert len(bad) == 4
    assert all(str(lines[name]["error"]).startswith("ResponseFormatError") for name in bad)
    assert {name for name, line in lines.items() if line["status"] == "ok"} == set(lines) - bad
    billed = Counter(entry.prompt for entry in emulator.billed())

    # Each job that did not succeed is one line on stderr as it ends, with its id.
    for name in bad:
        [said] = [line for line in first.stderr.splitlines() if f": {name}: " in line]
        assert said.startswith(f"flux-adapters: {name}: unconfirmed: ResponseFormatError: ")

    again = batch(source, folder, emulator.base_url("laozhang"))
    assert again.returncode == 8
    assert Counter(entry.prompt for entry in emulator.billed()) == billed  # nothing sent again
    # One line per job after the rerun: the saved ones keep the line that says how they were
    # made (not "skipped"), the unconfirmed ones have this run's line.
    rerun = report(folder)
    assert sorted(str(line["id"]) for line in rerun) == sorted(lines)
    assert {str(line["id"]) for line in rerun if line["status"] == "unconfirmed"} == bad
    assert all(
        line["status"] == "ok" and line["provider"] == "laozhang"
        for line in rerun
        if line["id"] not in bad
    )
    assert "Traceback" not in first.stderr + again.stderr


class _Echo(BaseHTTPRequestHandler):
    """A provider that refuses every key, quoting it back at a different place each time."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        offset = int(str(body["prompt"]).split()[-1]) * 9
        key = self.headers["authorization"].removeprefix("Bearer ")
        message = "x" * offset + f"key {key} is not valid"
        data = json.dumps({"error": {"message": message, "code": "invalid_api_key"}}).encode()
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_a_changed_job_is_told_with_the_commands_flag(emulator: Emulator, tmp_path: Path) -> None:
    # The command's messages name its flags (docs/cli.md): --force, not edit_many's force=True.
    source, folder = tmp_path / "jobs.jsonl", tmp_path / "out"
    source.write_text(json.dumps({"id": "robot", "prompt": "a red robot", "size": "256x256"}))
    assert batch(source, folder, emulator.base_url("laozhang")).returncode == 0
    source.write_text(json.dumps({"id": "robot", "prompt": "a blue robot", "size": "256x256"}))
    second = batch(source, folder, emulator.base_url("laozhang"))
    assert second.returncode == 3, second.stderr
    said = "the request for this id is not the one sent before (run with --force to send it)"
    assert f"flux-adapters: robot: changed: {said}" in second.stderr
    assert "force=True" not in second.stderr
    [line] = report(folder)
    assert (line["status"], line["reason"]) == ("changed", said)


def test_a_key_echoed_in_every_position_never_reaches_the_report_or_the_terminal(
    tmp_path: Path,
) -> None:
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), _Echo)) as server:
        source, folder = jobs_file(tmp_path, 64), tmp_path / "out"
        done = batch(source, folder, f"http://127.0.0.1:{server.server_address[1]}")
    assert done.returncode == 3  # refused: failed, not billed
    lines = report(folder)
    assert len(lines) == 64
    assert all(line["status"] == "failed" for line in lines)
    written = (folder / "report.jsonl").read_text() + done.stdout + done.stderr
    assert leaks(written) == []
    assert leaks((folder / ".flux-journal.jsonl").read_text()) == []


@pytest.mark.parametrize("key", [KEY + "\r\n", "ключ-" + KEY])
def test_an_unusable_key_stops_the_batch_before_anything_is_sent(
    key: str, emulator: Emulator, tmp_path: Path
) -> None:
    source = jobs_file(tmp_path, 3)
    environment = os.environ | {
        "LAOZHANG_API_KEY": key,
        "LAOZHANG_BASE_URL": emulator.base_url("laozhang"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "flux_adapters", "batch", str(source), "-o", str(tmp_path / "o"), "-p", "laozhang"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 5
    assert "LAOZHANG_API_KEY" in done.stderr
    assert leaks(done.stdout + done.stderr, key.strip()) == []
    assert emulator.calls() == []


def test_ctrl_c_stops_taking_jobs_lets_those_in_flight_finish_and_prints_the_summary(
    emulator: Emulator, tmp_path: Path
) -> None:
    emulator.inject("laozhang", Fault(delay=0.5))
    source, folder = jobs_file(tmp_path, 40), tmp_path / "out"
    environment = os.environ | {
        "LAOZHANG_API_KEY": KEY,
        "LAOZHANG_BASE_URL": emulator.base_url("laozhang"),
    }
    command = [sys.executable, "-m", "flux_adapters", "batch", str(source), "-o", str(folder), "-p", "laozhang", "--concurrency", "4"]  # fmt: skip
    with subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        deadline = time.monotonic() + 20
        while len(emulator.calls()) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)  # until four jobs are in flight, each answered after 0.5 s
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "Traceback" not in err
    assert "stopping: no new jobs" in err
    assert "not started" in out  # the summary
    lines = report(folder)
    assert 0 < len(lines) < 40
    assert all(line["status"] == "ok" for line in lines)  # those in flight finished and saved
    assert len(emulator.calls()) == len(lines)  # nothing started after the stop
    for line in lines:
        files = line["files"]
        assert isinstance(files, list)
        assert len(files) == 1
        assert Path(str(files[0])).is_file()


def test_a_refused_line_is_told_how_to_fix_it_as_a_line_of_the_batch_spells_it(
    tmp_path: Path,
) -> None:
    source = tmp_path / "jobs.jsonl"
    line = {"id": "wide", "prompt": "x", "model": "flux-kontext-pro", "width": 1000, "height": 700}
    source.write_text(json.dumps(line) + "\n")
    done = batch(source, tmp_path / "out", "http://127.0.0.1:9")  # refused before any call

    assert done.returncode == 3, done.stderr  # a request refused
    [said] = [line for line in done.stderr.splitlines() if ": wide: failed: " in line]
    assert 'pass "aspect_ratio": "10:7" or "allow_conversions": true' in said
    assert "allow_conversions=True" not in said  # the Python spelling, not a JSON field
    [entry] = report(tmp_path / "out")
    assert entry["status"] == "failed"
    # The report's line says it the same way (it gave the Python spelling before).
    assert 'pass "aspect_ratio": "10:7" or "allow_conversions": true' in str(entry["error"])
    assert "allow_conversions=True" not in str(entry["error"])
