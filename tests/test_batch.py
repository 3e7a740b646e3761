"""edit_many and its journal, through httpx.MockTransport: a batch never dies of one job, never
re-sends a job that may have been billed, and never sends a request before its record is on disk.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, errors
from flux_adapters._journal import JOURNAL_NAME, JobState, Journal, JsonLines, read_lines
from flux_adapters.result import BatchItem, ResultImage
from tests.conftest import image_bytes

KEY = "sk-test-0123456789abcdef"
PNG = image_bytes(32, 24)


class Provider:
    """A MockTransport handler: answers each prompt as *answers* says (default: an image URL)."""

    def __init__(self, answers: dict[str, Callable[[httpx.Request], httpx.Response]] | None = None):
        self.answers = answers or {}
        self.posts: Counter[str] = Counter()
        self.before_post: Callable[[str], None] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            name = request.url.path.rsplit("/", 1)[-1]
            special = self.answers.get(f"GET {name}")
            return special(request) if special else httpx.Response(200, content=PNG)
        prompt = json.loads(request.content)["prompt"]
        if self.before_post is not None:
            self.before_post(prompt)
        self.posts[prompt] += 1
        special = self.answers.get(prompt)
        if special is not None:
            return special(request)
        return httpx.Response(200, json={"data": [{"url": f"https://cdn.example/{prompt}.png"}]})


def batch(
    provider: Provider,
    prompts: Iterable[str],
    folder: Path | None,
    *,
    names: Iterable[str] | None = None,
    **options: Any,
) -> list[BatchItem]:
    async def run() -> list[BatchItem]:
        transport = httpx.MockTransport(provider)
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
            requests = [EditRequest(prompt=prompt, model="flux-2-pro") for prompt in prompts]
            return [
                item
                async for item in client.edit_many(
                    requests, output_dir=folder, names=names, **options
                )
            ]

    return asyncio.run(run())


def by_name(items: list[BatchItem]) -> dict[str, BatchItem]:
    return {item.name: item for item in items}


def answer(status: int, body: bytes | dict[str, object], **headers: str) -> Callable[..., Any]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return lambda request: httpx.Response(status, content=content, headers=headers)


BAD = {
    "bad-b64": answer(200, {"data": [{"b64_json": "!!not base64!!"}]}),
    "nested": answer(200, b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "html-image": answer(200, {"data": [{"url": "https://cdn.example/html-image.png"}]}),
    "GET html-image.png": answer(200, b"<html>login</html>", **{"content-type": "text/html"}),
    "redirect": answer(200, {"data": [{"url": "https://cdn.example/redirect.png"}]}),
    "GET redirect.png": answer(302, b"", location="https://cdn.example/login.html"),
    "GET login.html": answer(200, b"<html>login</html>"),
    "a-500": answer(500, b"Internal Server Error"),
}


def test_one_bad_answer_never_stops_the_others_and_is_never_sent_again(tmp_path: Path) -> None:
    def bug(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug in some transport")

    provider = Provider({**BAD, "bug": bug})
    prompts = ["bad-b64", "nested", "html-image", "redirect", "a-500", "bug"]
    prompts += [f"good-{n}" for n in range(6)]
    items = by_name(batch(provider, prompts, tmp_path, names=prompts, concurrency=4))
    assert len(items) == len(prompts)  # every job is accounted for
    for good in (f"good-{n}" for n in range(6)):
        assert items[good].status == "ok"
        assert items[good].saved == (tmp_path / f"{good}.png",)
        assert items[good].saved[0].read_bytes() == PNG
    expected = {
        "bad-b64": errors.ResponseFormatError,
        "nested": errors.ResponseFormatError,
        "html-image": errors.ResponseFormatError,
        "redirect": errors.ResponseFormatError,
        "a-500": errors.ProviderUnavailable,
        "bug": errors.FluxError,
    }
    for name, kind in expected.items():
        assert items[name].status == "unconfirmed", name  # sent: it may have been billed
        assert isinstance(items[name].error, kind), (name, items[name].error)
        assert not list(tmp_path.glob(f"{name}.*")), name  # nothing saved under its name
    assert isinstance(items["bug"].error, errors.TransportError)  # typed at the transport
    assert "RuntimeError: a bug in some transport" in str(items["bug"].error)
    assert all(count == 1 for count in provider.posts.values())

    again = by_name(batch(provider, prompts, tmp_path, names=prompts))
    assert all(count == 1 for count in provider.posts.values())  # nothing sent twice
    assert {name for name, item in again.items() if item.status == "unconfirmed"} == set(expected)
    assert all(again[f"good-{n}"].status == "skipped" for n in range(6))
    assert "may have been billed" in again["a-500"].reason

    batch(provider, prompts, tmp_path, names=prompts, resend_unconfirmed=True)
    assert {name for name, count in provider.posts.items() if count == 2} == set(expected)


def test_a_bug_in_one_job_is_contained_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ResultImage._save_async  # what a batch saves with (its folder is checked once)

    async def buggy(self: ResultImage, path: Any, *, add_suffix: bool = False) -> Path:
        if "broken" in str(self.url):
            raise KeyError("a bug while saving")
        return await real(self, path, add_suffix=add_suffix)

    monkeypatch.setattr(ResultImage, "_save_async", buggy)
    provider = Provider()
    items = by_name(batch(provider, ["broken", "fine"], tmp_path, names=["broken", "fine"]))
    assert items["fine"].status == "ok"
    assert items["broken"].status == "unconfirmed"  # answered, so billed: never sent again
    assert "unexpected KeyError" in str(items["broken"].error)


def test_jobs_provably_not_taken_are_sent_again(tmp_path: Path) -> None:
    provider = Provider({"busy": answer(503, b"overloaded"), "no-money": answer(402, b"pay")})
    items = by_name(batch(provider, ["busy", "no-money"], tmp_path, names=["busy", "no-money"]))
    assert {item.status for item in items.values()} == {"failed"}
    provider.answers.clear()
    items = by_name(batch(provider, ["busy", "no-money"], tmp_path, names=["busy", "no-money"]))
    assert {item.status for item in items.values()} == {"ok"}
    assert provider.posts == Counter({"busy": 2, "no-money": 2})


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "..", ".hidden", "", "nul\0byte", "back\\slash", "x" * 201]
)
def test_a_name_that_would_leave_the_output_folder_is_refused_before_sending(
    name: str, tmp_path: Path
) -> None:
    provider = Provider()
    [item] = batch(provider, ["p"], tmp_path / "out", names=[name])
    assert item.status == "failed"
    assert isinstance(item.error, errors.RequestError)
    assert provider.posts == Counter()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_the_same_name_twice_in_one_batch_is_refused(tmp_path: Path) -> None:
    provider = Provider()
    items = batch(provider, ["one", "two"], tmp_path, names=["same", "same"], concurrency=1)
    assert [item.status for item in items] == ["ok", "failed"]
    assert provider.posts == Counter({"one": 1})


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("__repr__")


class Trapped(str):
    def casefold(self) -> str:
        raise RuntimeError("casefold")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("__eq__")

    __hash__ = str.__hash__


def test_a_hostile_name_fails_its_own_job_and_no_other(tmp_path: Path) -> None:
    provider = Provider()
    names: list[Any] = ["good-1", Unprintable(), Trapped("trapped"), 42, "good-2"]
    items = by_name(batch(provider, ["a", "b", "c", "d", "e"], tmp_path, names=names))
    assert items["good-1"].status == items["good-2"].status == "ok"
    assert items["trapped"].status == "ok"  # used as the plain text it holds
    others = [item for name, item in items.items() if not name.startswith(("good", "trapped"))]
    assert [item.status for item in others] == ["failed", "failed"]
    assert all(isinstance(item.error, errors.RequestError) for item in others)


def test_names_that_differ_only_in_case_are_one_file_and_refused(tmp_path: Path) -> None:
    provider = Provider()
    items = batch(provider, ["one", "two"], tmp_path, names=["Robot", "robot"], concurrency=1)
    assert [item.status for item in items] == ["ok", "failed"]


def test_a_report_or_journal_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "report.jsonl")
    with pytest.raises(errors.OutputError, match="not a regular file"):
        JsonLines(tmp_path / "report.jsonl")
    os.mkfifo(tmp_path / JOURNAL_NAME)
    with pytest.raises(errors.OutputError, match="not a regular file"):
        batch(Provider(), ["p"], tmp_path)


def test_a_changed_request_is_reported_and_force_sends_it(tmp_path: Path) -> None:
    provider = Provider()
    batch(provider, ["a red robot"], tmp_path, names=["robot"])
    [item] = batch(provider, ["a blue robot"], tmp_path, names=["robot"])
    assert item.status == "changed"
    assert item.reason.endswith("(force=True sends it)")  # the argument, for a caller in Python
    assert provider.posts == Counter({"a red robot": 1})
    [item] = batch(provider, ["a blue robot"], tmp_path, names=["robot"], force=True)
    assert item.status == "ok"
    [item] = batch(provider, ["a blue robot"], tmp_path, names=["robot"], force=True)
    assert item.status == "ok"  # force runs even a saved job again, on purpose
    assert provider.posts == Counter({"a red robot": 1, "a blue robot": 2})


def test_a_saved_image_that_went_missing_is_downloaded_again_for_free(tmp_path: Path) -> None:
    provider = Provider()
    batch(provider, ["robot"], tmp_path, names=["robot"])
    (tmp_path / "robot.png").unlink()
    [item] = batch(provider, ["robot"], tmp_path, names=["robot"])
    assert (item.status, item.reason) == ("ok", "downloaded again from its result URL")
    assert (tmp_path / "robot.png").read_bytes() == PNG
    assert provider.posts == Counter({"robot": 1})


@pytest.mark.parametrize("left", [0, 40, len(PNG) - 12])
def test_a_saved_image_cut_short_by_a_power_loss_is_downloaded_again_for_free(
    tmp_path: Path, left: int
) -> None:
    # Images are not synced: after a power loss the rename may be on disk and only part of the
    # bytes (none, the first page of a large image). A header alone does not make it saved.
    provider = Provider()
    batch(provider, ["robot"], tmp_path, names=["robot"])
    image = tmp_path / "robot.png"
    image.write_bytes(PNG[:left])
    [item] = batch(provider, ["robot"], tmp_path, names=["robot"])
    assert (item.status, item.reason) == ("ok", "downloaded again from its result URL")
    assert image.read_bytes() == PNG
    assert provider.posts == Counter({"robot": 1})


def test_a_cut_short_image_in_a_folder_without_a_journal_is_not_taken_for_the_jobs(
    tmp_path: Path,
) -> None:
    (tmp_path / "robot.png").write_bytes(PNG[:-12])
    (tmp_path / "whole.png").write_bytes(PNG)
    provider = Provider()
    items = by_name(batch(provider, ["robot", "whole"], tmp_path, names=["robot", "whole"]))
    assert items["whole"].status == "skipped"  # an image already there is the job's own
    assert items["robot"].status == "ok"
    assert (tmp_path / "robot.png").read_bytes() == PNG
    assert provider.posts == Counter({"robot": 1})


def test_without_a_folder_results_come_back_and_nothing_is_written(tmp_path: Path) -> None:
    provider = Provider({"a-500": answer(500, b"down")})
    items = by_name(batch(provider, ["ok", "a-500"], None, names=["ok", "a-500"]))
    assert items["ok"].status == "ok"
    assert items["ok"].result is not None
    assert items["a-500"].status == "unconfirmed"  # judged from the attempts alone
    assert list(tmp_path.iterdir()) == []


def test_a_stop_lets_jobs_in_flight_finish_and_starts_no_more(tmp_path: Path) -> None:
    provider = Provider()

    async def run() -> list[BatchItem]:
        stop = asyncio.Event()

        async def slow(request: httpx.Request) -> httpx.Response:
            stop.set()  # the first jobs are in flight when the stop comes
            await asyncio.sleep(0.2)
            return provider(request)

        transport = httpx.MockTransport(slow)
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
            requests = [EditRequest(prompt=f"p{n}", model="flux-2-pro") for n in range(50)]
            return [
                item
                async for item in client.edit_many(
                    requests, output_dir=tmp_path, concurrency=4, stop=stop, grace=5
                )
            ]

    items = asyncio.run(run())
    assert len(items) == 4  # the four in flight finished and were saved; none started after
    assert all(item.status == "ok" and item.saved for item in items)


def test_a_stop_past_its_grace_reports_jobs_in_flight_as_unconfirmed(tmp_path: Path) -> None:
    async def run() -> list[BatchItem]:
        stop = asyncio.Event()

        async def hang(request: httpx.Request) -> httpx.Response:
            stop.set()
            await asyncio.sleep(30)
            raise AssertionError("never answered")

        transport = httpx.MockTransport(hang)
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
            requests = [EditRequest(prompt=f"p{n}", model="flux-2-pro") for n in range(10)]
            return [
                item
                async for item in client.edit_many(
                    requests, output_dir=tmp_path, concurrency=2, stop=stop, grace=0.1
                )
            ]

    items = asyncio.run(run())
    assert [item.status for item in items] == ["unconfirmed", "unconfirmed"]
    assert all("interrupted" in str(item.error) for item in items)


@pytest.mark.parametrize("slow", [0.0, 0.02], ids=["disk", "slow-disk"])
def test_no_request_leaves_before_its_sent_record_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: float
) -> None:
    journal = tmp_path / JOURNAL_NAME
    durable = [0]
    """Bytes of the journal on disk: its size when an fsync began, once that fsync returned."""
    syncs: list[int] = []
    under_way: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        found = os.fstat(fd)  # what this fsync covers: the bytes written before it starts
        under_way.append(fd)
        assert len(under_way) == 1, "two fsyncs at once: group commit runs one at a time"
        time.sleep(slow)  # a slow disk: records of other jobs pile up meanwhile
        real_fsync(fd)
        under_way.remove(fd)
        if found.st_ino == journal.stat().st_ino:
            durable[0] = max(durable[0], found.st_size)
            syncs.append(found.st_size)

    monkeypatch.setattr(os, "fsync", fsync)
    provider = Provider()

    def check(prompt: str) -> None:
        records = [json.loads(line) for line in journal.read_bytes()[: durable[0]].splitlines()]
        assert {"id": prompt, "k": "sent", "p": "laozhang"} in records

    provider.before_post = check
    prompts = [f"job-{n}" for n in range(40)]
    items = batch(provider, prompts, tmp_path, names=prompts, concurrency=16)
    assert {item.status for item in items} == {"ok"}  # a failed check makes its job unconfirmed
    assert sum(provider.posts.values()) == 40
    assert len(syncs) < 40  # group commit: one fsync covered several jobs


def test_a_torn_last_line_is_cut_off_and_the_rest_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "report.jsonl"
    path.write_bytes(b'{"id": "a", "status": "ok"}\n{"id": "b", "sta')
    lines = JsonLines(path)
    lines.append({"id": "c", "status": "ok"})
    lines.close()
    assert [record["id"] for record in read_lines(path)] == ["a", "c"]
    assert path.read_bytes().endswith(b"\n")


def test_a_damaged_journal_is_read_as_far_as_it_makes_sense(tmp_path: Path) -> None:
    provider = Provider()
    batch(provider, ["robot"], tmp_path, names=["robot"])
    with (tmp_path / JOURNAL_NAME).open("a") as journal:
        journal.write('{"id": "robot", "k": "saved", "files": 5}\n')  # the wrong shape
        journal.write('{"id": 7, "k": "sent"}\n{"k": "sent"}\n[1, 2]\nnot json\n')
        journal.write('{"id": "x", "k": "answered", "urls": {"a": 1}, "p": ["laozhang"]}\n')
    [item] = batch(provider, ["robot"], tmp_path, names=["robot"])
    # The record of the wrong shape is ignored: the earlier "saved" stands; nothing is sent.
    assert (item.status, item.reason) == ("skipped", "already saved")
    assert provider.posts == Counter({"robot": 1})


def test_a_new_request_under_a_name_starts_a_new_billing_history() -> None:
    state = JobState()
    state.fold({"k": "accepted", "d": "first"})
    state.fold({"k": "sent", "p": "laozhang"})
    state.fold({"k": "attempt", "p": "laozhang", "proves": "may be billed", "e": "500"})
    assert state.may_be_billed
    state.fold({"k": "accepted", "d": "first"})  # the same request sent again: history stays
    assert state.may_be_billed
    state.fold({"k": "accepted", "d": "second"})  # a different request (force): a new job
    assert not state.may_be_billed


def test_one_journal_per_folder_at_a_time(tmp_path: Path) -> None:
    async def run() -> None:
        first = Journal(tmp_path)
        try:
            with pytest.raises(errors.ConfigurationError, match="another batch"):
                Journal(tmp_path)
        finally:
            await first.close()
        await Journal(tmp_path).close()  # free again once the first is closed

    asyncio.run(run())


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"concurrency": 0}, "concurrency="),
        ({"concurrency": True}, "concurrency="),
        ({"per_provider": 0}, "per_provider="),
        ({"grace": float("nan")}, "grace="),
        ({"force": "yes"}, "force="),
        ({"stop": True}, "stop="),
    ],
)
def test_batch_options_are_checked(options: dict[str, Any], problem: str, tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigurationError, match=problem):
        batch(Provider(), ["p"], tmp_path, **options)


def test_names_and_requests_of_different_lengths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigurationError, match="different lengths"):
        batch(Provider(), ["a", "b"], tmp_path, names=["a"])


def test_inline_images_are_saved_with_their_real_extension(tmp_path: Path) -> None:
    jpeg = image_bytes(16, 16, "JPEG")
    inline = answer(200, {"data": [{"b64_json": base64.b64encode(jpeg).decode()}]})
    [item] = batch(Provider({"inline": inline}), ["inline"], tmp_path, names=["robot"])
    assert item.saved == (tmp_path / "robot.jpeg",)
    assert item.saved[0].read_bytes() == jpeg
