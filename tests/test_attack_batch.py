"""Attacks on batches, their journal and report: a second process, a crash at the wrong moment,
a journal edited by hand, a caller that stops reading, and what each promises afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, errors
from flux_adapters._journal import JOURNAL_NAME, JsonLines, read_lines, request_digest
from flux_adapters.emulator import Fault, run_emulator
from flux_adapters.providers import Answer
from flux_adapters.providers.laozhang import LaozhangAdapter
from flux_adapters.result import BatchItem
from flux_adapters.routing import RoutingPolicy
from flux_adapters.wire import HttpResponse
from tests.test_batch import KEY, PNG, Provider, batch


@contextmanager
def held(path: Path, lock: int, data: bytes) -> Iterator[None]:
    """Another process's handle on *path*, locked, in the middle of appending *data*."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        fcntl.flock(fd, lock)
        os.write(fd, data)
        yield
    finally:
        os.close(fd)


def test_a_batch_refused_by_the_lock_leaves_the_running_batchs_journal_alone(
    tmp_path: Path,
) -> None:
    # The running batch's group commit is half way through its write: to anyone else the last
    # line looks torn. Cutting it would take durable "sent" records with it (paid twice later).
    writing = b'{"id":"a","k":"sent","p":"laozhang"}\n{"id":"b","k":"se'
    journal = tmp_path / JOURNAL_NAME
    provider = Provider()
    with held(journal, fcntl.LOCK_EX, writing):
        with pytest.raises(errors.ConfigurationError, match="another batch"):
            batch(provider, ["p"], tmp_path, names=["b"])
        assert journal.read_bytes() == writing
    assert provider.posts == {}


def test_a_report_another_process_is_appending_to_is_not_cut(tmp_path: Path) -> None:
    path = tmp_path / "report.jsonl"
    writing = b'{"id": "a", "status": "ok"}\n{"id": "b", "sta'
    with held(path, fcntl.LOCK_SH, writing):
        lines = JsonLines(path)
        lines.close()
        assert path.read_bytes() == writing
    lines = JsonLines(path)  # alone now: the torn line is cut off
    lines.append({"id": "c", "status": "ok"})
    lines.close()
    assert [record["id"] for record in read_lines(path)] == ["a", "c"]


def journal_of(folder: Path, *records: dict[str, object]) -> None:
    lines = [json.dumps(record) for record in records]
    (folder / JOURNAL_NAME).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "record",
    [
        {"k": "answered", "p": "laozhang", "urls": 5},
        {"k": "answered", "p": "laozhang", "urls": "https://cdn.example/p.png"},
        {"k": "answered", "p": "laozhang", "urls": [None]},
        {"k": "answered", "p": "laozhang", "urls": ["relative/p.png"]},
        {"k": "answered", "p": "laozhang", "urls": ["https://" + "x" * 100_000]},
        {"k": "saved", "files": 5},
        {"k": "saved", "files": ["nul\0byte.png"]},
        {"k": "saved", "files": ["../elsewhere.png"]},
        {"k": "attempt", "p": [], "proves": 5, "e": {"x": 1}},
        {"k": 5},
    ],
)
def test_a_journal_edited_by_hand_or_by_another_version_never_breaks_a_rerun(
    record: dict[str, object], tmp_path: Path
) -> None:
    # The job was sent; then a record of the wrong shape. It may have been billed: the rerun
    # says so, sends nothing, and raises nothing.
    (tmp_path / "elsewhere.png").write_bytes(PNG)
    folder = tmp_path / "out"
    folder.mkdir()
    digest = request_digest(EditRequest(prompt="p", model="flux-2-pro"))
    journal_of(
        folder,
        {"id": "job", "k": "accepted", "d": digest},
        {"id": "job", "k": "sent", "p": "laozhang"},
        {"id": "job", **record},
    )
    provider = Provider()
    [item] = batch(provider, ["p"], folder, names=["job"])
    assert item.status == "unconfirmed", item
    assert "may have been billed" in item.reason
    assert provider.posts == {}
    assert item.saved == ()


@pytest.mark.parametrize("status", [500, 503])
def test_a_forced_new_request_that_fails_is_never_given_the_old_requests_image(
    status: int, tmp_path: Path
) -> None:
    provider = Provider({"a blue robot": lambda request: httpx.Response(status, content=b"x")})
    batch(provider, ["a red robot"], tmp_path, names=["robot"])
    [forced] = batch(provider, ["a blue robot"], tmp_path, names=["robot"], force=True)
    assert forced.status == ("unconfirmed" if status == 500 else "failed")
    [again] = batch(provider, ["a blue robot"], tmp_path, names=["robot"])
    # Not "ok, downloaded again": the URL the journal holds is the red robot's.
    assert again.status == forced.status
    assert "downloaded again" not in again.reason
    assert provider.posts["a blue robot"] == (1 if status == 500 else 2)


def without(folder: Path, kinds: set[str]) -> None:
    """The journal as a kill would have left it before records of *kinds* were written."""
    path = folder / JOURNAL_NAME
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["k"] not in kinds]
    path.write_text("".join(line + "\n" for line in kept))


def test_an_image_saved_just_before_a_kill_is_not_reported_unconfirmed(tmp_path: Path) -> None:
    # Killed after the image was renamed into place, before its records reached the journal:
    # the next run must not call it unconfirmed (a --resend-unconfirmed would pay again).
    provider = Provider()
    [first] = batch(provider, ["robot"], tmp_path, names=["robot"])
    assert first.status == "ok"
    without(tmp_path, {"answered", "saved"})
    [again] = batch(provider, ["robot"], tmp_path, names=["robot"])
    assert (again.status, again.saved) == ("skipped", (tmp_path / "robot.png",))
    [third] = batch(provider, ["robot"], tmp_path, names=["robot"], resend_unconfirmed=True)
    assert third.status == "skipped"  # recorded as saved by the second run
    assert provider.posts == {"robot": 1}


def test_an_old_image_under_a_forced_jobs_name_is_not_taken_for_its_new_one(
    tmp_path: Path,
) -> None:
    provider = Provider()
    batch(provider, ["a red robot"], tmp_path, names=["robot"])
    old = (tmp_path / "robot.png").stat()
    # Forced with a new request, killed after sending: robot.png is still the red robot.
    provider.answers["a blue robot"] = lambda request: httpx.Response(500, content=b"x")
    batch(provider, ["a blue robot"], tmp_path, names=["robot"], force=True)
    without(tmp_path, {"attempt"})
    assert (tmp_path / "robot.png").stat().st_ino == old.st_ino
    [again] = batch(provider, ["a blue robot"], tmp_path, names=["robot"])
    assert again.status == "unconfirmed"
    assert "sent to laozhang" in again.reason


def test_what_a_job_recorded_reaches_the_journal_without_waiting_for_the_batch_to_end(
    tmp_path: Path,
) -> None:
    journal = tmp_path / JOURNAL_NAME

    async def run() -> set[str]:
        transport = httpx.MockTransport(Provider())
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
            requests = [EditRequest(prompt="robot", model="flux-2-pro")]
            async for _ in client.edit_many(requests, output_dir=tmp_path, names=["robot"]):
                # The batch is still open (a kill now loses what is only in memory).
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    kinds = {record["k"] for record in read_lines(journal)}
                    if "saved" in kinds:
                        return kinds
                    await asyncio.sleep(0.01)
                return kinds
        return set()

    assert asyncio.run(run()) >= {"accepted", "sent", "answered", "saved"}


def test_without_a_folder_a_job_cut_short_after_sending_is_unconfirmed_not_failed() -> None:
    # "failed" promises the job was not billed and may be sent again: not true of these.
    async def run() -> dict[str, BatchItem]:
        stop = asyncio.Event()

        async def provider(request: httpx.Request) -> httpx.Response:
            prompt = json.loads(request.content)["prompt"]
            if prompt == "bug":
                raise RuntimeError("a transport bug once the body went out")
            if prompt == "busy":
                return httpx.Response(503, content=b"busy")
            stop.set()
            await asyncio.sleep(30)  # "hang": in flight when the grace runs out
            raise AssertionError("never answered")

        prompts = ["bug", "busy", "hang"]
        async with httpx.AsyncClient(transport=httpx.MockTransport(provider)) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
            requests = [EditRequest(prompt=prompt, model="flux-2-pro") for prompt in prompts]
            items = client.edit_many(requests, names=prompts, concurrency=3, stop=stop, grace=0.1)
            return {item.name: item async for item in items}

    items = asyncio.run(run())
    assert {name: item.status for name, item in items.items()} == {
        "bug": "unconfirmed",
        "busy": "failed",
        "hang": "unconfirmed",
    }


def test_a_caller_that_stops_reading_stops_the_batch_from_running_on(tmp_path: Path) -> None:
    provider = Provider()

    async def run() -> tuple[int, int]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(provider)) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
            requests = (EditRequest(prompt=f"p{n}", model="flux-2-pro") for n in range(300))
            items = client.edit_many(requests, output_dir=tmp_path, concurrency=4)
            async for _ in items:
                break  # still holding `items`: it is not closed yet
            await asyncio.sleep(0.5)  # long enough for 300 jobs on this transport
            sent_while_held = sum(provider.posts.values())
            async with contextlib.aclosing(items):
                pass
            return sent_while_held, sum(provider.posts.values())

    held, closed = asyncio.run(run())
    # The jobs in flight, and as many again waiting for the reader: not the other 290.
    assert held <= 3 * 4, held
    assert closed == held
    # Closed: the journal is released, and the rerun sends only what was never sent.
    items = batch(provider, [f"p{n}" for n in range(300)], tmp_path)
    assert {item.status for item in items} <= {"ok", "skipped"}
    assert set(provider.posts.values()) == {1}


def test_a_second_ctrl_c_still_reports_the_jobs_it_cut_short(tmp_path: Path) -> None:
    source, folder = tmp_path / "jobs.jsonl", tmp_path / "out"
    lines = [json.dumps({"id": f"job-{n:02d}", "prompt": f"job {n}"}) for n in range(40)]
    source.write_text("\n".join(lines) + "\n")
    with run_emulator() as emulator:
        emulator.inject("laozhang", Fault(delay=2.0))
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
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            time.sleep(0.1)
            process.send_signal(signal.SIGINT)  # at once: the four in flight are cut short
            out, err = process.communicate(timeout=30)
        sent = len(emulator.calls())
    assert process.returncode == 130
    assert "Traceback" not in err
    report = [json.loads(line) for line in (folder / "report.jsonl").read_text().splitlines()]
    # Each job that went out is in the report, as unconfirmed (it may have been billed), and
    # counted so in the summary, not as "not started".
    assert len(report) == sent == 4
    assert {line["status"] for line in report} == {"unconfirmed"}
    assert "4 unconfirmed" in out
    assert "36 not started" in out


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    environment = os.environ | {"LAOZHANG_API_KEY": KEY, "LAOZHANG_BASE_URL": "http://127.0.0.1:9"}
    return subprocess.run(
        [sys.executable, "-m", "flux_adapters", "batch", *arguments, "-p", "laozhang"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_report_that_is_the_journal_itself_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "jobs.jsonl"
    source.write_text('{"id": "a", "prompt": "p"}\n')
    folder = tmp_path / "out"
    done = run_cli(str(source), "-o", str(folder), "--report", str(folder / JOURNAL_NAME))
    assert done.returncode == 7, done.stderr
    assert "journal" in done.stderr
    assert not (folder / JOURNAL_NAME).exists()


def test_lines_added_to_the_file_while_the_batch_runs_are_checked_too(tmp_path: Path) -> None:
    # The file is read twice: checked whole, then lazily as jobs are taken. A line added in
    # between (a careless edit) is that line's failure, not the end of the batch.
    from flux_adapters._batch_files import requests

    source = tmp_path / "jobs.jsonl"
    source.write_text('{"id": "a", "prompt": "p"}\n')
    refused: list[str] = []
    jobs = requests(source, lambda name, error: refused.append(name))
    assert next(jobs)[0] == "a"
    with source.open("a") as stream:
        stream.write('not json\n{"id": "c", "promt": "typo"}\n{"id": "d", "prompt": "p"}\n')
    assert [name for name, _ in jobs] == ["d"]
    assert refused == ["2", "c"]


def test_a_paid_image_that_cannot_be_saved_comes_back_and_a_rerun_saves_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "robot.png").mkdir()  # the image cannot be renamed into place
    provider = Provider()
    [item] = batch(provider, ["robot"], tmp_path, names=["robot"])
    assert item.status == "unconfirmed"
    assert isinstance(item.error, errors.OutputError)
    assert item.result is not None  # paid for: the caller still has it
    assert item.result.images[0].url == "https://cdn.example/robot.png"
    assert "a rerun downloads it again" in item.reason
    (tmp_path / "robot.png").rmdir()
    [again] = batch(provider, ["robot"], tmp_path, names=["robot"])
    assert (again.status, again.saved) == ("ok", (tmp_path / "robot.png",))
    assert provider.posts == {"robot": 1}


def test_names_that_differ_only_in_unicode_normalisation_are_one_file_and_refused(
    tmp_path: Path,
) -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"  # one file on macOS
    provider = Provider()
    names = [composed, decomposed.upper()]
    items = batch(provider, ["one", "two"], tmp_path, names=names, concurrency=1)
    assert [item.status for item in items] == ["ok", "failed"]
    assert provider.posts == {"one": 1}


def test_every_request_that_goes_out_has_its_sent_record_on_disk_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Retries after a 429, failover after a 503 and a refused connection: each request sent.
    folder = tmp_path / "new" / "out"
    synced: list[tuple[int, int]] = []  # (inode, size) of each fsync'd file or folder
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        found = os.fstat(fd)
        synced.append((found.st_ino, found.st_size))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    monkeypatch.setenv("AIMLAPI_API_KEY", KEY)
    posts: Counter[tuple[str, str]] = Counter()
    asked: Counter[str] = Counter()

    def provider(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, content=PNG)
        name = "laozhang" if "laozhang" in request.url.host else "aimlapi"
        prompt = str(json.loads(request.content)["prompt"])
        journal = folder / JOURNAL_NAME
        inode = journal.stat().st_ino
        durable = max((size for ino, size in synced if ino == inode), default=0)
        records = [json.loads(line) for line in journal.read_bytes()[:durable].splitlines()]
        sent = sum(1 for r in records if r == {"id": prompt, "k": "sent", "p": name})
        posts[prompt, name] += 1
        assert sent >= posts[prompt, name], (prompt, name)  # one durable record per request
        # ... and the journal's name, and its new folder's, were made durable too.
        assert {folder.stat().st_ino, folder.parent.stat().st_ino} <= {ino for ino, _ in synced}
        asked[prompt] += 1
        if name == "laozhang" and prompt == "slow-down" and asked[prompt] == 1:
            return httpx.Response(429, headers={"retry-after": "0"}, content=b"{}")
        if name == "laozhang" and prompt == "busy":
            return httpx.Response(503, content=b"{}")
        if name == "laozhang" and prompt == "refused":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json={"data": [{"url": f"https://cdn.example/{prompt}.png"}]})

    async def run() -> list[BatchItem]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(provider)) as http:
            client = AsyncFluxClient(
                providers=["laozhang", "aimlapi"],
                http_client=http,
                policy=RoutingPolicy(retries=1, backoff=0, cooldown=0),
            )
            prompts = ["slow-down", "busy", "refused", "plain"]
            requests = [EditRequest(prompt=p, model="flux-2-pro", size="512x512") for p in prompts]
            items = client.edit_many(requests, names=prompts, output_dir=folder, concurrency=4)
            return [item async for item in items]

    items = asyncio.run(run())
    assert {item.name: item.status for item in items} == dict.fromkeys(
        ["slow-down", "busy", "refused", "plain"], "ok"
    )
    assert posts == Counter(
        {
            ("slow-down", "laozhang"): 2,
            ("busy", "laozhang"): 1,
            ("busy", "aimlapi"): 1,
            ("refused", "laozhang"): 2,
            ("refused", "aimlapi"): 1,
            ("plain", "laozhang"): 1,
        }
    )


@pytest.mark.parametrize(
    ("requests", "names", "problem"),
    [
        (EditRequest(prompt="p", model="flux-2-pro"), None, "not a single EditRequest"),
        (None, None, "not NoneType"),
        ([EditRequest(prompt="p", model="flux-2-pro")], 5, "not int"),
        ([EditRequest(prompt="p", model="flux-2-pro")] * 3, "abc", "not a single str"),
    ],
)
def test_requests_or_names_that_are_not_a_list_are_refused_before_anything(
    requests: object, names: object, problem: str, tmp_path: Path
) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(Provider())) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
            items = client.edit_many(requests, names=names, output_dir=tmp_path / "out")  # type: ignore[arg-type]
            async for _ in items:
                pass

    with pytest.raises(errors.ConfigurationError, match=problem):
        asyncio.run(run())
    assert not (tmp_path / "out").exists()


class _ReadsAnswersBadly(LaozhangAdapter):
    """An adapter from another package that raises typed errors of the wrong kind on answers."""

    def __init__(self, error: errors.FluxError) -> None:
        self.error = error

    def parse_response(self, response: HttpResponse) -> Answer:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        errors.RequestError([errors.Violation("answer", "unexpected", "a known shape", "?")]),
        errors.TransportError("could not read", provider="laozhang", sent=False),
        errors.FluxError("something"),
    ],
)
def test_an_adapter_failing_on_an_answer_never_makes_it_look_not_taken(
    error: errors.FluxError, tmp_path: Path
) -> None:
    # The provider answered 200: it did the job. "Not taken" would retry at once, fail over, or
    # let a rerun send it again; all pay twice.
    provider = Provider()

    async def run() -> list[BatchItem]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(provider)) as http:
            client = AsyncFluxClient(_ReadsAnswersBadly(error), api_key=KEY, http_client=http)
            requests = [EditRequest(prompt="robot", model="flux-2-pro")]
            return [i async for i in client.edit_many(requests, output_dir=tmp_path, names=["r"])]

    [item] = asyncio.run(run())
    assert item.status == "unconfirmed"
    assert isinstance(item.error, errors.ResponseFormatError)
    [again] = asyncio.run(run())
    assert again.status == "unconfirmed"
    assert provider.posts == {"robot": 1}


class _DocumentsA500AsNotBilled(LaozhangAdapter):
    not_taken: ClassVar[dict[int, str]] = {500: "https://docs.example/billing"}


def test_the_journal_judges_an_attempt_by_the_same_rule_as_the_router(tmp_path: Path) -> None:
    # The adapter cites its document: a 500 is not billed. The router fails over on it; the
    # journal must not call the job "may have been billed" (unconfirmed, never sent again).
    provider = Provider({"robot": lambda request: httpx.Response(500, content=b"down")})

    async def run() -> list[BatchItem]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(provider)) as http:
            client = AsyncFluxClient(_DocumentsA500AsNotBilled(), api_key=KEY, http_client=http)
            requests = [EditRequest(prompt="robot", model="flux-2-pro")]
            return [i async for i in client.edit_many(requests, output_dir=tmp_path, names=["r"])]

    [item] = asyncio.run(run())
    assert item.error is not None
    assert [a.billing for a in item.error.attempts] == ["provider-rule"]
    assert item.status == "failed"
    provider.answers.clear()
    [again] = asyncio.run(run())
    assert again.status == "ok"


def test_a_requests_file_gone_or_replaced_by_a_fifo_after_the_check_is_a_typed_error(
    tmp_path: Path,
) -> None:
    from flux_adapters._batch_files import requests

    source = tmp_path / "jobs.jsonl"
    with pytest.raises(errors.RequestError, match="No such file"):
        next(requests(source, lambda name, error: None))
    os.mkfifo(source)  # opened without waiting for a writer, and refused
    with pytest.raises(errors.RequestError, match="not a regular file"):
        next(requests(source, lambda name, error: None))


def test_a_program_that_ends_while_holding_a_stopped_batch_still_exits(tmp_path: Path) -> None:
    # The grace ran out while the reader held the iterator without reading; then the program
    # returns. asyncio.run cancels every task: none may swallow that cancel and wait forever.
    async def main() -> None:
        stop = asyncio.Event()

        async def provider(request: httpx.Request) -> httpx.Response:
            await asyncio.sleep(0.05)
            prompt = json.loads(request.content)["prompt"]
            return httpx.Response(200, json={"data": [{"url": f"https://cdn.example/{prompt}"}]})

        http = httpx.AsyncClient(transport=httpx.MockTransport(provider))
        client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
        requests = [EditRequest(prompt=f"p{n}", model="flux-2-pro") for n in range(50)]
        items = client.edit_many(requests, concurrency=4, stop=stop, grace=0.05)
        async for _ in items:
            stop.set()
            await asyncio.sleep(0.5)  # the grace runs out; the workers wait for this reader
            break
        kept.append(items)  # still referenced: not closed before the loop shuts down

    kept: list[object] = []
    runner = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    runner.start()
    runner.join(timeout=20)
    assert not runner.is_alive()


def test_a_full_disk_stops_a_batch_before_sending_with_one_line_and_no_traceback(
    tmp_path: Path,
) -> None:
    source, folder = tmp_path / "jobs.jsonl", tmp_path / "out"
    lines = [json.dumps({"id": f"job-{n:02d}", "prompt": f"job {n}"}) for n in range(20)]
    source.write_text("\n".join(lines) + "\n")

    # Files can grow to 200 bytes only: a full disk, for this process (set in the child itself).
    limited = (
        "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200)); "
        "sys.argv[0] = 'flux-adapters'; runpy.run_module('flux_adapters', run_name='__main__')"
    )
    with run_emulator() as emulator:
        environment = os.environ | {
            "LAOZHANG_API_KEY": KEY,
            "LAOZHANG_BASE_URL": emulator.base_url("laozhang"),
        }
        done = subprocess.run(
            [sys.executable, "-c", limited, "batch", str(source), "-o", str(folder), "-p", "laozhang", "--concurrency", "4"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        calls = emulator.calls()
    assert done.returncode == 7, done.stderr
    assert "Traceback" not in done.stderr
    assert "never retrieved" not in done.stderr
    assert calls == []
    # Nothing of the failed writes is left to make a job look sent (and billed) later.
    assert [r for r in read_lines(folder / JOURNAL_NAME) if r["k"] == "sent"] == []


def test_a_write_the_disk_cut_short_leaves_nothing_of_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "report.jsonl"
    lines = JsonLines(path)
    lines.append({"id": "a"})
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:30]))
    with pytest.raises(errors.OutputError, match="No space left"):
        lines.write(b'{"id":"b","k":"sent"}\n{"id":"c","k":"sent"}\n')
    monkeypatch.undo()
    lines.close()
    assert [record["id"] for record in read_lines(path)] == ["a"]


def test_a_result_url_that_echoes_the_key_never_reaches_the_journal(tmp_path: Path) -> None:
    from tests.test_hostile_provider import KEY as LIVE_KEY
    from tests.test_hostile_provider import leaks

    def echo(request: httpx.Request) -> httpx.Response:
        key = request.headers["authorization"].removeprefix("Bearer ")
        return httpx.Response(200, json={"data": [{"url": f"https://cdn.example/r.png?k={key}"}]})

    async def run() -> list[BatchItem]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(Provider({"r": echo}))) as http:
            client = AsyncFluxClient("laozhang", api_key=LIVE_KEY, http_client=http)
            requests = [EditRequest(prompt="r", model="flux-2-pro")]
            return [i async for i in client.edit_many(requests, output_dir=tmp_path, names=["r"])]

    [item] = asyncio.run(run())
    assert item.status == "ok"  # the image itself is saved
    assert leaks((tmp_path / JOURNAL_NAME).read_text(), LIVE_KEY) == []


def test_a_job_stopped_while_its_sent_record_was_syncing_was_not_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.3)  # a slow disk: the grace runs out while the record is being synced
        real_fsync(fd)

    provider = Provider()

    async def run(stop_at_once: bool) -> list[BatchItem]:
        stop = asyncio.Event()
        if stop_at_once:
            asyncio.get_running_loop().call_later(0.1, stop.set)
        async with httpx.AsyncClient(transport=httpx.MockTransport(provider)) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
            requests = [EditRequest(prompt="robot", model="flux-2-pro")]
            items = client.edit_many(requests, output_dir=tmp_path, stop=stop, grace=0.05)
            return [item async for item in items]

    monkeypatch.setattr(os, "fsync", slow_fsync)
    [item] = asyncio.run(run(stop_at_once=True))
    monkeypatch.undo()
    assert provider.posts == {}
    assert item.status == "failed"  # not billed: a rerun sends it, as it should
    [again] = asyncio.run(run(stop_at_once=False))
    assert again.status == "ok"
    assert provider.posts == {"robot": 1}
