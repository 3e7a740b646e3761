"""What a batch costs, counted rather than timed: each image written once and renamed once, a
memory that does not grow with the number of jobs, and one ``fsync`` for many journal records,
never one that began before a record was written.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux_adapters import AsyncFluxClient, EditRequest
from flux_adapters import _batch as batch_module
from flux_adapters._batch import NameSet, file_key
from flux_adapters._batch_files import check_file, compact_report
from flux_adapters._journal import JOURNAL_NAME, SHARED_MARK, Journal, read_lines
from tests.test_batch import KEY, PNG, Provider, answer, batch

# --- one write per image -----------------------------------------------------------------------


def test_each_image_is_written_once_renamed_once_and_never_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Counter[str] = Counter()
    real_open, real_replace, real_unlink = os.open, os.replace, os.unlink
    real_io_open = io.open

    def watched_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        # The journal, and the shared batch's mark looked for once a batch: not an image's.
        if Path(path).parent == tmp_path and Path(path).name not in (JOURNAL_NAME, SHARED_MARK):
            calls["create" if flags & os.O_CREAT else "open to read"] += 1
        return real_open(path, flags, *args, **kwargs)

    def watched_io_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, str | Path) and Path(path).parent == tmp_path:
            calls["open to read"] += 1
        return real_io_open(path, *args, **kwargs)

    def watched_replace(source: Any, target: Any) -> None:
        calls["rename"] += 1
        real_replace(source, target)

    def watched_unlink(path: Any) -> None:
        calls["unlink"] += 1
        real_unlink(path)

    monkeypatch.setattr(os, "open", watched_open)
    monkeypatch.setattr(io, "open", watched_io_open)
    monkeypatch.setattr(os, "replace", watched_replace)
    monkeypatch.setattr(os, "unlink", watched_unlink)
    prompts = [f"job-{n}" for n in range(20)]
    items = batch(Provider(), prompts, tmp_path, names=prompts, concurrency=4)
    monkeypatch.undo()

    assert {item.status for item in items} == {"ok"}
    # One temporary file and one rename per image; nothing opened again to learn what it is.
    assert calls == {"create": 20, "rename": 20}, calls
    assert sorted(path.name for path in tmp_path.glob("job-*")) == sorted(
        f"{name}.png" for name in prompts
    )
    assert not list(tmp_path.glob(".*.part"))
    # What the bytes are is known from the bytes written: the format and the size.
    [image] = items[0].result.images if items[0].result else ()
    assert (image.format, image.byte_size) == ("png", len(PNG))


def test_a_temporary_name_already_taken_is_passed_over_and_names_need_no_random_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import itertools

    from flux_adapters import _files
    from flux_adapters._files import atomic_image

    monkeypatch.setattr(_files, "_numbers", itertools.count(0xFFFFFFFF))
    taken = tmp_path / ".x.png.ffffffff.part"  # another writer's (or a killed run's) file
    taken.write_bytes(b"not mine")

    def no_random(size: int) -> bytes:
        raise AssertionError("os.urandom called for a temporary name")

    monkeypatch.setattr(os, "urandom", no_random)
    with atomic_image(tmp_path / "x.png") as out:
        out.write(PNG)
    # The next number, wrapped to 8 hex digits as remove_partial_files expects.
    assert (tmp_path / "x.png").read_bytes() == PNG
    assert taken.read_bytes() == b"not mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == [taken.name, "x.png"]


# --- memory that does not grow with the number of jobs --------------------------------------

JOBS = 1000
"""Far more than the bounds below (each a few times CONCURRENCY): a task or a state kept per job
shows at any such count."""
CONCURRENCY = 8


def test_a_1000_job_batch_holds_a_bounded_number_of_jobs_tasks_and_states(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journals: list[Journal] = []

    class Watched(Journal):
        def __init__(self, folder: Path) -> None:
            super().__init__(folder)
            journals.append(self)

    monkeypatch.setattr(batch_module, "Journal", Watched)
    pulled = [0]
    most: Counter[str] = Counter()

    def requests() -> Iterator[EditRequest]:
        for number in range(JOBS):
            pulled[0] += 1
            yield EditRequest(prompt=f"p{number}", model="flux-2-pro")

    def high_water(mark: str, value: int) -> None:
        most[mark] = max(most[mark], value)

    provider = Provider()

    def handler(request: httpx.Request) -> httpx.Response:
        high_water("tasks", len(asyncio.all_tasks()))
        high_water("states", len(journals[0].states))
        return provider(request)

    async def run() -> int:
        done = 0
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
            items = client.edit_many(requests(), output_dir=tmp_path, concurrency=CONCURRENCY)
            async for item in items:
                assert item.status == "ok", item
                done += 1
                high_water("taken, not yet yielded", pulled[0] - done)
                high_water("tasks", len(asyncio.all_tasks()))
        return done

    assert asyncio.run(run()) == JOBS
    assert sum(provider.posts.values()) == JOBS
    # Workers, this reader, the journal's syncer, the batch's watchdog: never a task per job.
    assert most["tasks"] <= CONCURRENCY + 4, most
    # Jobs are read lazily: those in flight and those whose items wait for the reader.
    assert most["taken, not yet yielded"] <= 2 * CONCURRENCY + 1, most
    # The journal keeps the states of the jobs in flight only; the file keeps every record.
    assert most["states"] <= CONCURRENCY, most
    assert journals[0].states == {}
    saved = {r["id"] for r in read_lines(tmp_path / JOURNAL_NAME) if r["k"] == "saved"}
    assert len(saved) == JOBS


def test_a_rerun_holds_earlier_jobs_packed_and_lets_each_go_once_taken_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flux_adapters._journal import load_states

    names = [f"job-{n}" for n in range(300)]
    provider = Provider({"job-7": answer(503, b"overloaded")})  # not taken: sent again
    batch(provider, names, tmp_path, names=names)
    known = load_states(tmp_path / JOURNAL_NAME)
    journals: list[Journal] = []

    class Watched(Journal):
        def __init__(self, folder: Path) -> None:
            super().__init__(folder)
            journals.append(self)
            # What the journal knew, packed, is what folding its records says.
            assert {name: self.state(name) for name in names} == known

    monkeypatch.setattr(batch_module, "Journal", Watched)
    earlier: list[int] = []
    real_forget = Journal.forget

    def forget(self: Journal, job: str) -> None:
        real_forget(self, job)
        earlier.append(len(self._earlier))
        assert len(self.states) <= CONCURRENCY

    monkeypatch.setattr(Journal, "forget", forget)
    provider.answers.clear()
    items = batch(provider, names, tmp_path, names=names)
    assert Counter(item.status for item in items) == {"skipped": 299, "ok": 1}
    # Each job's earlier state goes as its job ends: nothing is held for the whole run.
    assert earlier == sorted(earlier, reverse=True)
    assert earlier[-1] == 0
    assert journals[0].states == {}


def test_a_rerun_holds_what_the_journal_knew_outside_python_memory(tmp_path: Path) -> None:
    import tracemalloc

    from flux_adapters._journal import EarlierStates, load_states

    jobs = 3000
    lines = []
    for n in range(jobs):  # a first run's four records a job, eight jobs interleaved
        name = f"job-{n:05d}"
        lines += [
            {"id": name, "k": "accepted", "d": f"{n:032x}"},
            {"id": name, "k": "sent", "p": "laozhang"},
            {"id": name, "k": "answered", "p": "laozhang", "urls": [f"https://r.example/{n}"]},
            {"id": name, "k": "saved", "files": [f"{name}.png"]},
        ]
    lines.append({"id": "job-00007", "k": "accepted", "d": "f" * 32})  # forced, long after
    (tmp_path / JOURNAL_NAME).write_text("".join(json.dumps(line) + "\n" for line in lines))
    known = load_states(tmp_path / JOURNAL_NAME)
    tracemalloc.start()
    try:
        journal = Journal(tmp_path)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert isinstance(journal._earlier, EarlierStates)
        # A dict of packed states held about 300 bytes a job (900 KB here).
        assert held < 150_000, held
        assert len(journal._earlier) == jobs
        assert all(journal.state(name) == state for name, state in known.items())
        assert journal.state("job-00007").digest == "f" * 32
        assert not journal.knows("job-99999")
    finally:
        asyncio.run(journal.close())
    assert [entry.name for entry in os.scandir(tmp_path)] == [JOURNAL_NAME]  # no file left


class _FewHashes:
    """An `EarlierStates` whose names share a handful of hashes: every lookup meets others'."""

    @staticmethod
    def _hash(job: str) -> int:
        return (len(job) % 3) << 62


operations = st.lists(
    st.tuples(st.sampled_from(["add", "get", "pop", "in"]), st.text(max_size=4), st.binary()),
    max_size=400,
)


@given(operations, st.booleans())
def test_earlier_states_answer_as_a_dict_would(
    steps: list[tuple[str, str, bytes]], few_hashes: bool
) -> None:
    import tempfile

    from flux_adapters._journal import EarlierStates

    kind = type("Few", (_FewHashes, EarlierStates), {}) if few_hashes else EarlierStates
    model: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as folder:
        states = kind(Path(folder))
        try:
            for step, name, packed in steps:
                if step == "add" and name not in model:
                    states.add(name, packed)
                    model[name] = packed
                elif step == "get":
                    assert states.get(name) == model.get(name)
                elif step == "pop":
                    assert states.pop(name) == model.pop(name, None)
                else:
                    assert (name in states) == (name in model)
                assert len(states) == len(model)
            assert all(states.get(name) == packed for name, packed in model.items())
        finally:
            states.close()


def test_earlier_states_taken_and_put_back_do_not_grow_the_table(tmp_path: Path) -> None:
    """A journal's jobs each read back and kept again (records far apart) leave taken slots:
    the table is made again without them, not doubled for them."""
    from flux_adapters._journal import EarlierStates

    states = EarlierStates(tmp_path)
    try:
        for n in range(500):
            states.add(f"job-{n}", b"first")
        size = states.table_bytes
        for round_ in range(20):
            for n in range(500):
                assert states.pop(f"job-{n}") == (b"first" if round_ == 0 else b"again")
                states.add(f"job-{n}", b"again")
        assert states.table_bytes == size
        assert len(states) == 500
    finally:
        states.close()


def test_earlier_states_grow_and_keep_every_state(tmp_path: Path) -> None:
    from flux_adapters._journal import EarlierStates

    states = EarlierStates(tmp_path)
    try:
        for n in range(5000):
            states.add(f"job-{n}", b"x" * (n % 700))  # some longer than a first read
            if n % 3 == 0:
                assert states.pop(f"job-{n // 2}") == (b"x" * ((n // 2) % 700))
        left = {f"job-{n}" for n in range(5000)} - {f"job-{n // 2}" for n in range(0, 5000, 3)}
        assert len(states) == len(left)
        assert all(states.get(name) == b"x" * (int(name[4:]) % 700) for name in left)
    finally:
        states.close()


def test_a_rerun_checks_each_saved_image_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flux_adapters import _journal

    names = [f"job-{n}" for n in range(50)]
    provider = Provider()
    batch(provider, names, tmp_path, names=names)
    checked: Counter[str] = Counter()
    real = _journal.is_image_file

    def counted(path: Path) -> bool:
        checked[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(_journal, "is_image_file", counted)
    items = batch(provider, names, tmp_path, names=names)
    assert Counter(item.status for item in items) == {"skipped": 50}
    assert all(item.saved and item.saved[0].name == f"{item.name}.png" for item in items)
    assert checked == {f"{name}.png": 1 for name in names}  # was opened twice: verdict, then names


def test_a_batch_file_is_checked_in_one_pass_that_keeps_a_digest_per_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets: list[NameSet] = []
    real = NameSet.__init__

    def watched(self: NameSet, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        sets.append(self)

    monkeypatch.setattr(NameSet, "__init__", watched)
    source = tmp_path / "jobs.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"j{n}", "prompt": "p"}) + "\n" for n in range(JOBS))
    )
    assert check_file(source) == JOBS
    [names] = sets
    assert len(names) == JOBS
    assert names.table_bytes <= JOBS * 3 * 16  # 16 bytes a name, the table at least 1/3 full


# --- NameSet: a set of names in a few bytes each -----------------------------------------------

names = st.lists(st.text(min_size=0, max_size=6), max_size=300)


@given(names)
def test_a_name_set_answers_as_a_set_of_the_names_would(given_names: list[str]) -> None:
    seen: set[str] = set()
    digests = NameSet()
    for name in given_names:
        assert digests.add(name) == (name not in seen)
        seen.add(name)
    assert len(digests) == len(seen)


def test_a_name_set_grows_and_keeps_every_name() -> None:
    digests = NameSet()
    assert all(digests.add(f"job-{n}") for n in range(20_000))
    assert not any(digests.add(f"job-{n}") for n in range(20_000))
    assert len(digests) == 20_000
    assert 16 * 20_000 * 3 // 2 <= digests.table_bytes <= 16 * 20_000 * 3


def test_names_one_file_apart_are_one_name_to_the_batch() -> None:
    digests = NameSet()
    assert digests.add(file_key("Caf\u00e9"))
    assert not digests.add(file_key("cafe\u0301"))  # one file on macOS


# --- the report: compacted only when an id has two lines, checked exactly -----------------------


def report_of(path: Path, ids: list[str]) -> bytes:
    path.write_text("".join(json.dumps({"id": job, "status": "ok"}) + "\n" for job in ids))
    return path.read_bytes()


def test_a_report_without_repeated_ids_is_left_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "report.jsonl"
    written = report_of(path, [f"j{n}" for n in range(100)])
    assert compact_report(path) is False
    # Even when the cheap first look (8-byte digests) mistakes two ids for one.
    monkeypatch.setattr(NameSet, "add", lambda self, name: False)
    assert compact_report(path) is False
    assert path.read_bytes() == written


def test_a_report_with_repeated_ids_keeps_one_line_each(tmp_path: Path) -> None:
    path = tmp_path / "report.jsonl"
    report_of(path, ["a", "b", "a"])
    assert compact_report(path) is True
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b"]


def _compacted_by_a_dict(lines: list[bytes]) -> list[bytes]:
    """What `compact_report` wrote before `ChosenLines`: the same rule, with a dict of ids."""
    from flux_adapters._batch_files import _id_and_status

    chosen: dict[str, bytes] = {}
    skipped: dict[str, bool] = {}
    for raw in lines:
        job, status = _id_and_status(raw)
        if job is not None and (job not in chosen or skipped[job] or status != "skipped"):
            chosen[job], skipped[job] = raw, status == "skipped"
    out, written = [], set()
    for raw in lines:
        job, _ = _id_and_status(raw)
        if job is None:
            out.append(raw)
        elif job not in written:
            written.add(job)
            out.append(chosen[job])
    return out


report_lines = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["a", "b", "c", "é", "d\ud800"]),
            st.sampled_from(["ok", "skipped", "failed"]),
            st.integers(0, 3),
        ).map(lambda t: (json.dumps({"id": t[0], "status": t[1], "n": t[2]}) + "\n").encode()),
        st.sampled_from([b"not json\n", b'{"status": "ok"}\n', b"[1]\n", b"\n"]),
    ),
    max_size=40,
)


@given(report_lines)
def test_a_compacted_report_keeps_the_lines_a_dict_of_ids_kept(lines: list[bytes]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "report.jsonl"
        path.write_bytes(b"".join(lines))
        if compact_report(path):
            assert path.read_bytes() == b"".join(_compacted_by_a_dict(lines))
        else:
            assert path.read_bytes() == b"".join(lines)
            assert _compacted_by_a_dict(lines) == lines


def test_a_large_report_is_compacted_without_a_dict_of_its_ids(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "report.jsonl"
    ids = [f"job-{n:05d}" for n in range(5000)]
    first = [(json.dumps({"id": job, "status": "ok"}) + "\n").encode() for job in ids]
    again = [(json.dumps({"id": job, "status": "skipped"}) + "\n").encode() for job in ids]
    path.write_bytes(b"".join(first + again))
    tracemalloc.start()
    try:
        assert compact_report(path) is True
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.read_bytes() == b"".join(first)  # each job's line that says how it was done
    assert peak < 300_000, peak  # a dict and a set of 5,000 ids took about 1.2 MB


_FOLDER_NOT_HELD: Final = 128 * 1024
"""Peak memory of a look through a folder of 2,000 entries that holds none of them: a list of
its entries alone takes 400 KB. Not tighter: tracemalloc counts what every thread allocates
meanwhile (a daemon thread another test left running, in a full run)."""


def test_looking_for_a_killed_compactions_leftovers_does_not_hold_the_folder_in_memory(
    tmp_path: Path,
) -> None:
    # The report is often beside a batch's images: 100,000 of them at the end of a large one.
    import tracemalloc

    for number in range(2000):
        (tmp_path / f"job-{number:05d}.png").touch()
    stale = tmp_path / ".report.jsonl.0badf00d.tmp"
    stale.touch()
    path = tmp_path / "report.jsonl"
    report_of(path, [f"job-{n:05d}" for n in range(10)])
    tracemalloc.start()
    try:
        assert compact_report(path) is False  # nothing repeated
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not stale.exists()
    assert peak < _FOLDER_NOT_HELD, peak


def test_a_rerun_removes_a_killed_runs_partial_images_without_listing_its_folder(
    tmp_path: Path,
) -> None:
    import tracemalloc

    from flux_adapters._files import remove_partial_files

    for number in range(2000):  # a rerun's folder: the images of the run before
        (tmp_path / f"job-{number:05d}.png").touch()
    partial = [tmp_path / f".job-{n:05d}.0badf00{n}.part" for n in range(3)]
    for path in partial:
        path.touch()
    kept = tmp_path / ".job-1.notmine.part"  # not a name atomic_image gives
    kept.touch()
    tracemalloc.start()
    try:
        assert remove_partial_files(tmp_path) == 3
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not any(path.exists() for path in partial)
    assert kept.exists()
    assert len(list(tmp_path.glob("job-*.png"))) == 2000
    assert peak < _FOLDER_NOT_HELD, peak


# --- group commit: one fsync for many records, never one that began before a record ------------


def test_a_record_written_while_an_fsync_runs_waits_for_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal_path = tmp_path / JOURNAL_NAME
    gates = [threading.Event() for _ in range(3)]
    began: list[int] = []
    """The journal's size as each of its fsyncs began."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        found = os.fstat(fd)
        if journal_path.exists() and found.st_ino == journal_path.stat().st_ino:
            began.append(found.st_size)
            assert gates[len(began) - 1].wait(10), "never released"
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(2000):
            if condition():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the condition never came true")

    async def run() -> None:
        journal = Journal(tmp_path)
        first = asyncio.create_task(journal.durable("a", "sent", p="x"))
        await until(lambda: len(began) == 1)  # the first fsync is under way, for "a" alone
        later = [asyncio.create_task(journal.durable(job, "sent", p="x")) for job in "bcd"]
        await until(lambda: journal_path.stat().st_size > began[0])  # written meanwhile
        gates[0].set()
        await first
        await until(lambda: len(began) == 2)  # one more fsync, for all three
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in later)  # the first fsync did not cover them
        assert began[1] == journal_path.stat().st_size  # the second covers all they wrote
        gates[1].set()
        await asyncio.gather(*later)
        gates[2].set()  # the fsync of close()
        await journal.close()

    asyncio.run(run())
    assert len(began) == 3
    records = [record["id"] for record in read_lines(journal_path)]
    assert records == ["a", "b", "c", "d"]


@pytest.mark.parametrize("fault", ["disk-full", "no-new-file"])
def test_a_rerun_with_no_room_beside_the_journal_holds_what_it_knew_in_memory(
    fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk full, or a folder that takes no new file (its journal still writable): the rerun
    goes on as before the earlier states were kept beside the journal, not refused."""
    import errno
    import tempfile

    from flux_adapters import _journal

    lines = []
    for n in range(300):  # more than the jobs held unpacked while reading
        name = f"job-{n:05d}"
        lines += [
            {"id": name, "k": "accepted", "d": f"{n:032x}"},
            {"id": name, "k": "saved", "files": [f"{name}.png"]},
        ]
    (tmp_path / JOURNAL_NAME).write_text("".join(json.dumps(line) + "\n" for line in lines))
    known = _journal.load_states(tmp_path / JOURNAL_NAME)
    real_pwrite = os.pwrite
    writes = [0]

    def full(fd: int, data: bytes, place: int) -> int:
        writes[0] += 1
        if writes[0] > 20:  # some states written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, place)

    def refused(*args: object, **kwargs: object) -> object:
        raise OSError(errno.EACCES, "Permission denied")

    if fault == "disk-full":
        monkeypatch.setattr(os, "pwrite", full)
    else:
        monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    journal = Journal(tmp_path)
    try:
        assert all(journal.state(name) == state for name, state in known.items())
        assert journal.knows("job-00000")
        assert not journal.knows("job-99999")
    finally:
        asyncio.run(journal.close())
