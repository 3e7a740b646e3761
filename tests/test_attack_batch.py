"""Attacks on batches, their journal and report: a second process, a crash at the wrong moment,
a journal edited by hand, a caller that stops reading, and what each promises afterwards."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from flux_adapters import EditRequest, errors
from flux_adapters._journal import JOURNAL_NAME, JsonLines, read_lines, request_digest
from tests.test_batch import PNG, Provider, batch


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
