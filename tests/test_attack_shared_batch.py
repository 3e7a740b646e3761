"""A batch shared through Redis, attacked as a hostile host and a careless operator would.

Real parts only, as in tests/test_shared_batch.py: a redis-server, the loopback emulator (whose
ledger says what was billed) and the batch's own code; a stall is the process not running
(as under SIGSTOP) for longer than its lease.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flux_adapters._journal import JOURNAL_NAME, SHARED_MARK, JobState
from flux_adapters._shared_batch import (
    Ended,
    Lines,
    LocalOutput,
    SharedOptions,
    _Run,
    batch_id,
    open_output,
    output_location,
)
from flux_adapters._shared_batch_store import Claim, Store
from flux_adapters.client import AsyncFluxClient
from flux_adapters.emulator import Fault, run_emulator
from flux_adapters.errors import (
    ConfigurationError,
    OutputError,
    RequestError,
    StateUnavailable,
)
from flux_adapters.state import open_state
from flux_adapters.state._redis import RedisState
from tests.hostile_redis import Reply, hostile_redis, resp
from tests.redis_server import RedisServer, redis_server
from tests.test_attack_state import scripts
from tests.test_shared_batch import (
    _close,
    _store,
    environment,
    started,
    summary,
    wait_for,
    worker,
    write_jobs,
)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.mark.parametrize("taken", [True, False], ids=["taken-over", "not-taken"])
def test_a_worker_stalled_after_its_sent_record_never_sends_a_job_another_took_over(
    tmp_path: Path, redis: RedisServer, taken: bool
) -> None:
    # The `sent` record was acknowledged (the worker held the block when Redis wrote it), then
    # the worker stopped running (SIGSTOP) past its lease; another worker took the block over
    # and decided by the journal (reported the job, or sent it with --resend-unconfirmed).
    # Resumed (SIGCONT), the first worker sent the request all the same: a job the other had
    # taken over, sent by a worker that no longer held it, maybe billed twice. Had no one
    # taken the block, the job goes on (its lease renewed), not failed for the stall.
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 1), tmp_path / "out"
    lines = Lines(source)
    batch = batch_id(lines.digest, str(folder))

    async def scenario(base_url: str) -> tuple[Ended, list[Claim]]:
        stalled = await _store(redis, batch, "stalled", total=1, block=1, lease_ms=300)
        other = await _store(redis, batch, "other", total=1, block=1, lease_ms=300)
        options = SharedOptions(state_url=redis.url, output=str(folder), block=1, lease_s=0.3)
        client = AsyncFluxClient("laozhang", api_key="test-key-1234", base_url=base_url)
        run = _Run(
            client,
            lines,
            LocalOutput(folder),
            stalled,
            options,
            asyncio.Event(),
            lambda ended: None,
            lambda counts: None,
        )
        taken_over: list[Claim] = []
        durable = run.writer.durable

        async def durable_then_stopped(job: int, record: Any) -> None:
            await durable(job, record)
            if record.get("k") == "sent":
                time.sleep(0.5)  # the process does not run: its lease (300 ms) ends
                if taken:
                    claim = await other.claim()
                    assert isinstance(claim, Claim)
                    taken_over.append(claim)

        run.writer.durable = durable_then_stopped  # type: ignore[method-assign]
        claim = await stalled.claim()
        assert isinstance(claim, Claim)
        run._take(claim, time.monotonic())
        async with client:
            ended = await run.run_job(0, False, ())
        await run.writer.close()
        await _close(stalled, other)
        return ended, taken_over

    with run_emulator() as emulator:
        ended, taken_over = asyncio.run(scenario(emulator.base_url("laozhang")))
        calls = emulator.calls()
    lines.close()
    if not taken:  # its lease lapsed, no one took the block: confirmed again, and sent once
        assert ended.status == "ok", ended
        assert len(calls) == 1
        assert len(ended.files) == 1
        return
    assert calls == []  # the stalled worker sent nothing
    assert ended.status != "ok"
    assert "lease" in str(ended.error)
    # What the other worker found: a `sent` record, so it reports the job (or sends it when
    # asked to): it is never sent by both.
    [other] = taken_over
    assert other.taken_over
    state = JobState()
    for record in other.jobs[0][3]:
        state.fold(record)
    assert state.may_be_billed


# --- two jobs files, one output ---------------------------------------------------------------


def _worker_run(
    source: Path, folder: Path, url: str, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        worker(source, str(folder), url, *extra),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_jobs_file_edited_after_a_job_went_unconfirmed_never_sends_it_again(
    tmp_path: Path, redis: RedisServer
) -> None:
    # The batch ended with job 2 unconfirmed (sent by a worker that died: it may have been
    # billed). The operator adds a line to the jobs file and runs it again: another file is
    # another batch, whose journal is empty, and job 2 (no image in the output) was sent again
    # without --resend-unconfirmed.
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 4), tmp_path / "out"
    lines = Lines(source)
    batch = batch_id(lines.digest, str(folder))
    lines.close()

    asyncio.run(_dead_worker_sent(redis, batch, lines.digest, folder, job=2, total=4))
    with run_emulator() as emulator:
        env = environment(emulator)
        first = _worker_run(source, folder, redis.url, env)
        assert emulator.billed() != []
        before = len(emulator.billed())
        with source.open("a") as stream:  # one more job, at the end
            stream.write(json.dumps({"id": "job-004", "prompt": "job 4", "size": "256x256"}) + "\n")
        again = _worker_run(source, folder, redis.url, env)
        refused = [entry.prompt for entry in emulator.billed()[before:]]
        asked = _worker_run(source, folder, redis.url, env, "--resend-unconfirmed")
        ledger = Counter(entry.prompt for entry in emulator.billed())
    assert first.returncode == 8, first.stderr
    assert summary(first.stdout)["unconfirmed"] == 1
    assert refused == []  # job 2 not sent again, nor anything else
    assert again.returncode == 5, again.stderr  # a configuration error
    assert "unconfirmed" in again.stderr
    assert "--resend-unconfirmed" in again.stderr
    assert "Traceback" not in again.stderr
    # Asked to: job 2 is sent again (once), with the new job; the saved ones are skipped.
    assert asked.returncode == 0, asked.stderr
    assert ledger["job 2"] == 1
    assert ledger["job 4"] == 1
    assert max(ledger.values()) == 1


async def _dead_worker_sent(
    redis: RedisServer, batch: str, digest: str, folder: Path, *, job: int, total: int
) -> None:
    """What a worker leaves when it dies just after sending *job* (its lease ends in 1 s)."""
    store = Store(RedisState(redis.url), batch, worker="dead", keep_s=600)
    await store.begin(
        total=total, block=total, lease_ms=1000, file_digest=digest,
        output=output_location(str(folder)),
    )  # fmt: skip
    claim = await store.claim()
    assert isinstance(claim, Claim)
    sent = json.dumps({"k": "sent", "p": "laozhang"})
    assert await store.journal([[str(job), sent, "", 0, ""]]) == [True]
    await _close(store)


def test_a_jobs_file_edited_while_its_batch_runs_is_not_a_second_batch_on_the_same_output(
    tmp_path: Path, redis: RedisServer
) -> None:
    # One line of the file changed in place while a worker runs, then another worker started:
    # its file is another batch, and both batches did the same jobs into the same folder, each
    # job billed twice.
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 40), tmp_path / "out"
    args = ("--block", "5", "--concurrency", "2", "--lease", "5")
    with run_emulator() as emulator:
        emulator.inject("laozhang", Fault(delay=0.1))
        env = environment(emulator)
        first = started(source, folder, redis.url, env, *args)
        wait_for(lambda: len(emulator.calls()) >= 4, first)
        assert first.poll() is None
        text = source.read_text()
        source.write_text(text.replace('"job 39"', '"job 39, in blue"'))  # in place
        second = _worker_run(source, folder, redis.url, env, *args)
        stdout, stderr = first.communicate(timeout=120)
        ledger = Counter(entry.prompt for entry in emulator.billed())
    assert second.returncode == 5, second.stderr  # a configuration error
    assert "another jobs file" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, stderr
    assert summary(stdout)["saved"] == 40  # every job, by the batch it began with
    assert max(ledger.values()) == 1, ledger.most_common(3)


# --- the jobs file changed under a running worker ---------------------------------------------------


def test_a_line_changed_in_place_under_a_running_worker_is_not_sent_as_its_job(
    tmp_path: Path,
) -> None:
    # A worker reads each job's line again when it claims it, at the place the line had when
    # the file was digested. Two lines swapped in place (an editor writing over the file): job
    # 0 was read as job-001's line, so job-001 was done twice (as job 0, and as itself) and
    # job-000 never; a line changed was sent as a job of a batch whose digest it is not in.
    source = write_jobs(tmp_path / "jobs.jsonl", 3)
    lines = Lines(source)
    try:
        first, second, _ = source.read_bytes().splitlines(keepends=True)
        assert len(first) == len(second)
        with source.open("r+b") as stream:  # in place: the same file, the same offsets
            stream.write(second + first)
        name, request = lines.job(0)
        assert isinstance(request, RequestError)
        assert "changed since this worker read the file" in str(request)
        assert name != "job-001"
        assert isinstance(lines.job(1)[1], RequestError)
        assert lines.job(2)[0] == "job-002"  # a line not changed is still its job
        # A line grown huge in place is not read whole: no more than the line it was.
        with source.open("r+b") as stream:
            stream.write(b'{"id": "job-000", "prompt": "' + b"x" * 5_000_000)
        tracemalloc.start()
        try:
            assert isinstance(lines.job(0)[1], RequestError)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000
    finally:
        lines.close()


def test_a_jobs_file_replaced_by_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    # Checked (check_file), then replaced by a FIFO before the worker indexed it: the open
    # waited for a writer that never came.
    source = tmp_path / "jobs.jsonl"
    os.mkfifo(source)
    code = (
        "from pathlib import Path; from flux_adapters._shared_batch import Lines; Lines(Path(%r))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code % str(source)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert "RequestError" in run.stderr
    assert "is not a regular file" in run.stderr


# --- outputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "named"),
    [
        ("nosuchproto://user:hunter2pw@host/run", "ValueError"),
        ("ftp://user:hunter2pw@127.0.0.1:9/run", "Error"),  # refused at once (discard port)
        ("zip://run::file:///nonexistent-attack38.zip", "FileNotFoundError"),
    ],
)
def test_an_output_url_that_cannot_be_opened_is_an_output_error_without_its_password(
    output: str, named: str
) -> None:
    # The file system is made (and connects, for ftp://) before its folder is created: its
    # failure escaped as the file system's own exception (exit 1, "unexpected"), outside the
    # FluxError tree.
    with pytest.raises(OutputError) as caught:
        open_output(output)
    assert named in str(caught.value)
    assert "hunter2pw" not in str(caught.value)
    assert "hunter2pw" not in repr(caught.value)
    assert caught.value.__cause__ is None


def test_two_batches_taking_one_output_at_once_never_both_have_it(redis: RedisServer) -> None:
    async def scenario() -> list[BaseException | None]:
        stores = [
            await _store(redis, f"race-out-{n}", f"w{n}", total=4, block=4, lease_ms=60_000)
            for n in range(2)
        ]
        taken = await asyncio.gather(
            *(store.take_output("file:///same", resend_unconfirmed=False) for store in stores),
            return_exceptions=True,
        )
        # The one that has it ends every job, with nothing unconfirmed: then the other may.
        winner = stores[taken.index(None)]
        loser = stores[1 - taken.index(None)]
        claim = await winner.claim()
        assert isinstance(claim, Claim)
        ops: list[list[object]] = [[str(n), "", "ok", 1, ""] for n, *_ in claim.jobs]
        assert all(await winner.journal([*ops, ["", "finished", "", 0, str(claim.block)]]))
        await loser.take_output("file:///same", resend_unconfirmed=False)
        await _close(*stores)
        return taken

    taken = asyncio.run(scenario())
    assert taken.count(None) == 1
    [refused] = [error for error in taken if error is not None]
    assert isinstance(refused, ConfigurationError)


# --- the client's shared state in a shared batch ------------------------------------------------


def test_a_configured_budget_is_kept_across_the_workers_of_a_shared_batch(
    tmp_path: Path, redis: RedisServer
) -> None:
    # The configuration sets a budget and no state_url: each worker's client kept the budget
    # in its own process, so two workers of one batch spent it twice over (its breakers and
    # its key's rate limit were each worker's own as well), though every worker was given a
    # Redis (--state) to share.
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 24), tmp_path / "out"
    config = tmp_path / "flux-adapters.toml"
    config.write_text('providers = ["laozhang"]\nbudget_usd = 0.3\nbudget_period = "total"\n')
    with run_emulator() as emulator:
        emulator.inject("laozhang", Fault(delay=0.05))
        env = environment(emulator) | {"FLUX_CONFIG": str(config)}
        env.pop("FLUX_STATE_URL", None)
        command = [
            sys.executable, "-m", "flux_adapters", "batch", str(source), "-o", str(folder),
            "--state", redis.url, "--json", "--block", "4", "--concurrency", "2",
        ]  # fmt: skip
        workers = [
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        done = [process.communicate(timeout=120) for process in workers]
        billed = len(emulator.billed())
    for process, (_, stderr) in zip(workers, done, strict=True):
        assert "Traceback" not in stderr
        assert process.returncode == 3, stderr  # jobs failed: refused by the budget
    assert billed == 10  # $0.30 at $0.03 a call, by both workers together
    assert summary(done[0][0])["saved"] == 10


def test_a_batch_running_longer_than_its_state_expiry_keeps_its_output(
    tmp_path: Path, redis: RedisServer
) -> None:
    # The output's key was given the batch's expiry when a worker began, and never again: past
    # --state-expiry, with the batch still running, another batch found the output free.
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 16), tmp_path / "out"
    other = write_jobs(tmp_path / "other.jsonl", 16, tag="other")
    args = ("--block", "4", "--concurrency", "1", "--lease", "1", "--state-expiry", "1")
    with run_emulator() as emulator:
        emulator.inject("laozhang", Fault(delay=0.2))
        env = environment(emulator)
        first = started(source, folder, redis.url, env, *args)
        # Past the expiry (1 s) twice over, the batch under way (16 jobs of 0.2 s, one at a
        # time): 10 jobs in, 2 s at least since it began.
        wait_for(lambda: len(emulator.calls()) >= 10, first)
        assert first.poll() is None
        second = _worker_run(other, folder, redis.url, env, *args)
        _, stderr = first.communicate(timeout=120)
        prompts = [call for call in emulator.billed() if call.prompt.startswith("other")]
    assert first.returncode == 0, stderr
    assert second.returncode == 5, second.stderr
    assert "a worker is on it" in second.stderr
    assert prompts == []


def test_the_options_of_a_shared_batch_show_no_password_of_the_output_or_redis() -> None:
    options = SharedOptions(
        state_url="redis://:hunter2redis@host/0", output="ftp://user:hunter2ftp@host/run"
    )
    assert "hunter2" not in repr(options)
    assert "ftp://user:***@host/run" in repr(options)


def test_a_folder_of_a_batch_run_without_state_is_not_paid_again_by_a_shared_one(
    tmp_path: Path, redis: RedisServer
) -> None:
    # A batch run without --state ended with its jobs unconfirmed (a 500 after the work: billed),
    # its journal in the folder. The same jobs run again as a shared batch, on the same folder:
    # its journal is in Redis and knew nothing of them, so each was sent (and billed) again.
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 3), tmp_path / "out"
    alone = [sys.executable, "-m", "flux_adapters", "batch", str(source), "-o", str(folder)]
    with run_emulator() as emulator:
        env = environment(emulator)
        emulator.inject("laozhang", Fault(status=500, after_work=True))
        first = subprocess.run(
            [*alone, "-p", "laozhang"], env=env, capture_output=True, text=True, timeout=120
        )
        emulator.clear_faults()
        billed = len(emulator.billed())
        shared = _worker_run(source, folder, redis.url, env)
        refused = len(emulator.billed()) - billed
        # A batch without --state writing there now (it holds its journal locked) is never
        # joined, even with --resend-unconfirmed.
        fd = os.open(folder / JOURNAL_NAME, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            busy = _worker_run(source, folder, redis.url, env, "--resend-unconfirmed")
        finally:
            os.close(fd)
        asked = _worker_run(source, folder, redis.url, env, "--resend-unconfirmed")
        ledger = Counter(entry.prompt for entry in emulator.billed())
        # Their images saved now, the old journal holds nothing unsettled: a rerun is let in.
        again = _worker_run(source, folder, redis.url, env)
        after = len(emulator.billed())
    assert first.returncode == 8, first.stderr
    assert billed == 3
    assert shared.returncode == 5, shared.stderr  # a configuration error
    assert "3 job(s) that may have been billed" in shared.stderr
    assert refused == 0
    assert busy.returncode == 5, busy.stderr
    assert "running there now" in busy.stderr
    assert asked.returncode == 0, asked.stderr  # asked to: each sent again, once
    assert set(ledger.values()) == {2}
    assert again.returncode == 0, again.stderr
    assert after == sum(ledger.values())


def test_a_shared_batchs_folder_is_not_paid_again_by_a_batch_run_without_state(
    tmp_path: Path, redis: RedisServer
) -> None:
    # The reverse: a shared batch ended with its jobs unconfirmed (a 500 after the work:
    # billed), its journal in Redis. The same jobs run without --state on the same folder
    # found no journal there and sent each again. Once a shared batch ends with nothing
    # unsettled, its mark is gone and such a run is let in (nothing left to send).
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 3), tmp_path / "out"
    alone = [sys.executable, "-m", "flux_adapters", "batch", str(source), "-o", str(folder),
             "-p", "laozhang"]  # fmt: skip
    with run_emulator() as emulator:
        env = environment(emulator)
        emulator.inject("laozhang", Fault(status=500, after_work=True))
        shared = _worker_run(source, folder, redis.url, env)
        emulator.clear_faults()
        billed = len(emulator.billed())
        refused = subprocess.run(alone, env=env, capture_output=True, text=True, timeout=120)
        refused_billed = len(emulator.billed()) - billed
        settled = _worker_run(source, folder, redis.url, env, "--resend-unconfirmed")
        mark_left = (folder / SHARED_MARK).exists()
        billed = len(emulator.billed())
        rerun = subprocess.run(alone, env=env, capture_output=True, text=True, timeout=120)
        rerun_billed = len(emulator.billed()) - billed
    assert shared.returncode == 8, shared.stderr  # unconfirmed jobs
    assert refused.returncode == 5, refused.stderr  # a configuration error, before sending
    assert "output of a batch shared through Redis" in refused.stderr
    assert "--resend-unconfirmed" in refused.stderr
    assert refused_billed == 0
    assert settled.returncode == 0, settled.stderr
    assert not mark_left  # it ended with nothing unsettled
    assert rerun.returncode == 0, rerun.stderr  # every image there: nothing sent
    assert rerun_billed == 0


@pytest.mark.parametrize(
    "holder",
    [
        resp(["weird", "0"]),  # a state the script never gives: not taken for "ended"
        resp(["ended", "many"]),
        resp(["ended"]),
        b":1\r\n",
    ],
)
def test_an_output_holder_answer_of_the_wrong_shape_is_state_unavailable(holder: bytes) -> None:
    def reply(command: list[bytes]) -> Reply:
        if command[2] == b"1":  # the output's key: another batch holds it
            return Reply(resp("other-batch"))
        return Reply(holder)  # what is left of that batch

    async def take() -> None:
        state = open_state(server.url, timeout=2.0)
        assert isinstance(state, RedisState)
        try:
            await Store(state, "b" * 24, worker="w", keep_s=60).take_output(
                "file:///out", resend_unconfirmed=False
            )
        finally:
            await state.aclose()

    with (
        hostile_redis(scripts(reply)) as server,
        pytest.raises(StateUnavailable, match="cannot be read"),
    ):
        asyncio.run(take())


def test_a_line_edited_between_the_check_and_the_index_is_not_sent_unchecked(
    tmp_path: Path, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file was checked (ids unique), then edited in place before the worker indexed it:
    # the index (and the batch) took the edited lines, which no check had seen: here a second
    # "job-000", whose image went under the first one's name.
    from flux_adapters import _batch_files
    from flux_adapters.cli import main

    source, folder = write_jobs(tmp_path / "jobs.jsonl", 3), tmp_path / "out"
    checked = _batch_files.check_file

    def check_then_edited(path: Path) -> int:
        count = checked(path)
        text = path.read_text()
        path.write_text(text.replace('"job-001"', '"job-000"'))  # the same length, in place
        return count

    monkeypatch.setattr(_batch_files, "check_file", check_then_edited)
    out, err = io.StringIO(), io.StringIO()
    with run_emulator() as emulator:
        for name, value in environment(emulator).items():
            monkeypatch.setenv(name, value)
        status = main(
            ["batch", str(source), "-o", str(folder), "-p", "laozhang", "--state", redis.url,
             "--json"],
            out,
            err,
        )  # fmt: skip
        billed = [entry.prompt for entry in emulator.billed()]
    assert "job 1" not in billed, err.getvalue()
    assert sorted(billed) == ["job 0", "job 2"]
    assert status == 3, err.getvalue()  # the edited line: failed, not sent
    assert "changed since this worker read the file" in err.getvalue()


@pytest.mark.parametrize("how", ["garbage", "fifo", "folder", "huge"])
def test_a_damaged_shared_mark_still_keeps_a_batch_without_state_out(
    tmp_path: Path, how: str
) -> None:
    # Whatever is at the mark's name says a shared batch wrote there: read without waiting (a
    # FIFO), without reading much, and refused all the same.
    from flux_adapters._batch import _refuse_shared_output
    from flux_adapters._journal import shared_batch_in

    mark = tmp_path / SHARED_MARK
    if how == "garbage":
        mark.write_bytes(b"\xff{not json")
    elif how == "fifo":
        os.mkfifo(mark)
    elif how == "folder":
        mark.mkdir()
    else:
        mark.write_text(json.dumps({"state": "redis://h/0", "batch": "b" * 10_000_000}))
    assert shared_batch_in(tmp_path) == {"state": "", "batch": ""}
    with pytest.raises(ConfigurationError, match="output of a batch shared through Redis"):
        _refuse_shared_output(tmp_path)


def test_a_shared_mark_names_the_state_without_its_password(tmp_path: Path) -> None:
    from flux_adapters._batch import _refuse_shared_output
    from flux_adapters._journal import mark_shared, unmark_shared
    from flux_adapters._redact import shown_state_url

    os.close(
        mark_shared(tmp_path, shown_state_url("redis://:hunter2-secret@cache:6379/0"), "batch-1")
    )
    with pytest.raises(ConfigurationError) as refused:
        _refuse_shared_output(tmp_path)
    assert "cache:6379/0" in str(refused.value)
    assert "batch-1" in str(refused.value)
    assert "hunter2" not in (tmp_path / SHARED_MARK).read_text() + str(refused.value)
    unmark_shared(tmp_path, "another-batch")  # not the one that left it: stays
    assert (tmp_path / SHARED_MARK).exists()
    unmark_shared(tmp_path, "batch-1")
    assert not (tmp_path / SHARED_MARK).exists()
    _refuse_shared_output(tmp_path)  # let in


def test_a_batch_without_state_told_to_resend_stays_out_while_shared_workers_run(
    tmp_path: Path,
) -> None:
    # --resend-unconfirmed lets a batch without --state into a shared batch's output once it
    # ended; while its workers run there it would send again the jobs they are sending now
    # (billed twice). A worker holds its mark locked while it runs; a second worker of the
    # same batch keeps the mark (and its lock) as it is.
    from flux_adapters._journal import mark_shared
    from tests.test_batch import Provider, batch

    first = mark_shared(tmp_path, "redis://cache:6379/0", "batch-1")
    second = mark_shared(tmp_path, "redis://cache:6379/0", "batch-1")
    provider = Provider()
    os.close(first)
    with pytest.raises(ConfigurationError, match="whose workers run there now"):
        batch(provider, ["a"], tmp_path, resend_unconfirmed=True)
    os.close(second)
    assert not provider.posts
    batch(provider, ["a"], tmp_path, resend_unconfirmed=True)  # ended: let in, as told
    assert provider.posts == {"a": 1}
