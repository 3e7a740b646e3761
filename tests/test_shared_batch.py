"""A batch shared by many workers through Redis (``flux-adapters batch --state``).

Real parts only: a redis-server process (tests/redis_server.py), `flux-adapters batch` worker
processes, and the loopback emulator, whose ledger says which jobs were billed and how often.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flux_adapters._files import image_format
from flux_adapters._journal import JobState
from flux_adapters._shared_batch import (
    Ended,
    Lines,
    LocalOutput,
    SharedOptions,
    _Run,
    batch_id,
    output_location,
)
from flux_adapters._shared_batch_store import Claim, Store
from flux_adapters.emulator import Emulator, Fault, run_emulator
from flux_adapters.state._redis import RedisState
from tests.conftest import serving
from tests.redis_server import RedisServer, redis_server


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def write_jobs(path: Path, count: int, tag: str = "job") -> Path:
    lines = [
        json.dumps({"id": f"{tag}-{n:03d}", "prompt": f"{tag} {n}", "size": "256x256", "seed": n})
        for n in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def worker(
    source: Path, output: str, state: str, *extra: str, provider: str = "laozhang"
) -> list[str]:
    return [
        sys.executable, "-m", "flux_adapters", "batch", str(source), "-o", output,
        "-p", provider, "--state", state, "--json", *extra,
    ]  # fmt: skip


def started(
    source: Path, folder: Path, state: str, env: dict[str, str], *extra: str
) -> subprocess.Popen[str]:
    """A worker (`worker`) running in the background, its output piped."""
    return subprocess.Popen(
        worker(source, str(folder), state, *extra),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def environment(emulator: Emulator, provider: str = "laozhang") -> dict[str, str]:
    prefix = provider.upper()
    return os.environ | {
        f"{prefix}_API_KEY": "test-key",
        f"{prefix}_BASE_URL": emulator.base_url(provider),
    }


def summary(stdout: str) -> dict[str, Any]:
    document = json.loads(stdout)
    assert isinstance(document, dict)
    return document


def images(folder: Path) -> Counter[str]:
    return Counter(
        path.name.split(".")[0]
        for path in folder.iterdir()
        if path.suffix in (".png", ".jpeg", ".webp") and not path.name.startswith(".")
    )


def wait_for(condition: Any, process: subprocess.Popen[str], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


def two_workers_under_way(
    source: Path, folder: Path, url: str, env: dict[str, str], emulator: Emulator
) -> list[subprocess.Popen[str]]:
    """Two workers of one shared batch (blocks of 10), once the emulator saw 40 calls."""
    workers = [
        started(source, folder, url, env, "--block", "10", "--concurrency", "4") for _ in range(2)
    ]
    wait_for(lambda: len(emulator.calls()) >= 40, workers[0])
    return workers


def dumped(command: list[str]) -> list[str]:
    """*command* (a `worker`) run by tests/dumped_worker.py: SIGUSR1 dumps its stacks."""
    assert command[1:3] == ["-m", "flux_adapters"]
    return [command[0], "-m", "tests.dumped_worker", *command[3:]]


def finish(
    command: list[str], *, env: dict[str, str], seconds: float, evidence: Any
) -> subprocess.CompletedProcess[str]:
    """Run *command* (`dumped`) to its end; past *seconds*, fail with where it was stuck.

    The failure holds the stacks of its threads and asyncio tasks (SIGUSR1), its stderr and
    what *evidence*() returns: a hang seen once can be diagnosed from the test's report alone.
    """
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)  # its loop writes the tasks' stacks when it gets control back
        process.kill()
        stdout, stderr = process.communicate()
    if process.returncode == -signal.SIGKILL:
        pytest.fail(
            f"the worker ran past {seconds} s; its stacks and stderr:\n{stderr}\n"
            f"its stdout:\n{stdout}\n{evidence()}",
            pytrace=False,
        )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def shared_state(client: Any, batch: str) -> str:
    """What Redis holds of *batch* (no secret is stored there), for a failure's message."""
    base = f"flux:batch:{{{batch}}}:"
    found = [
        f"TIME {client.time()}",
        f"meta {client.hgetall(base + 'meta')}",
        f"leases {client.zrange(base + 'leases', 0, -1, withscores=True)}",
        f"owners {client.hgetall(base + 'owners')}",
        f"jobs {client.hgetall(base + 'jobs')}",
        f"saved {client.get(base + 'saved')!r} done {client.get(base + 'done')!r}",
        f"counts {client.hgetall(base + 'counts')}",
    ]
    return "shared state:\n" + "\n".join(found) + "\n"


def emulator_calls(emulator: Emulator) -> str:
    return "emulator calls:\n" + "\n".join(map(repr, emulator.calls())) + "\n"


# --- three workers, one killed --------------------------------------------------------------------


def test_three_workers_share_600_jobs_and_one_killed_never_makes_a_job_done_twice(
    tmp_path: Path, redis: RedisServer
) -> None:
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 600), tmp_path / "out"
    with run_emulator() as emulator:
        emulator.inject("laozhang", Fault(delay=0.05))  # so that the kill lands with jobs in flight
        env = environment(emulator)
        options = ("--block", "10", "--lease", "2", "--concurrency", "6")
        reports = [tmp_path / f"report-{n}.jsonl" for n in range(3)]
        workers = [
            started(source, folder, redis.url, env, *options, "--report", str(report))
            for report in reports
        ]
        victim = workers[0]
        # Killed once the provider has had a third of the jobs: the batch is well under way.
        wait_for(lambda: len(emulator.calls()) >= 200, victim)
        assert victim.poll() is None, victim.communicate()
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=10)
        billed_at_kill = len(emulator.billed())
        done = [process.communicate(timeout=300) for process in workers[1:]]
        ledger = Counter(entry.prompt for entry in emulator.billed())

    assert 0 < billed_at_kill < 600
    for process, (_, stderr) in zip(workers[1:], done, strict=True):
        assert "Traceback" not in stderr, stderr
        assert process.returncode in (0, 8), stderr
    first, second = (summary(stdout) for stdout, _ in done)
    # Progress and summary are the batch's: both survivors report the same totals.
    totals = ("saved", "already_saved", "failed", "unconfirmed", "changed", "not_started")
    assert {key: first[key] for key in totals} == {key: second[key] for key in totals}
    assert first["batch"] == second["batch"]
    assert first["finished"]
    assert second["finished"]
    assert first["not_started"] == 0
    assert first["saved"] + first["unconfirmed"] == 600, first  # every job ended, once
    assert first["failed"] == first["changed"] == first["already_saved"] == 0
    # Each worker's own share is its own; the killed one's is the rest (it did work too).
    own = sum(s["worker"]["saved"] + s["worker"]["unconfirmed"] for s in (first, second))
    assert 0 < own < 600

    # Saved exactly once: one whole image per saved job, none for an unconfirmed one.
    saved = images(folder)
    assert sum(saved.values()) == first["saved"]
    assert set(saved.values()) == {1}
    for path in folder.iterdir():
        if path.suffix in (".png", ".jpeg", ".webp"):
            assert image_format(path.read_bytes()[:16]) is not None
    assert not [path for path in folder.iterdir() if path.name.endswith(".part")]

    # The survivors' reports: every unconfirmed job is one the killed worker had sent.
    lines = [json.loads(line) for report in reports[1:] for line in report.read_text().splitlines()]
    unconfirmed = {line["id"] for line in lines if line["status"] == "unconfirmed"}
    assert len(unconfirmed) <= first["unconfirmed"]
    assert all(saved[name] == 0 for name in unconfirmed)
    # (Sent and acknowledged, then killed: the provider may or may not have done it; once at most.)

    # No job was ever done (and billed) twice, and each saved one was billed.
    assert max(ledger.values()) == 1, ledger.most_common(3)
    assert sum(ledger.values()) >= first["saved"]

    # A rerun is a new round: what was saved is skipped, nothing is sent, nothing billed.
    with run_emulator() as emulator:
        rerun = subprocess.run(
            worker(source, str(folder), redis.url),
            env=environment(emulator),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert emulator.billed() == []
    again = summary(rerun.stdout)
    assert again["round"] == first["round"] + 1
    assert again["already_saved"] == first["saved"]
    assert again["unconfirmed"] == first["unconfirmed"]
    assert rerun.returncode == (8 if again["unconfirmed"] else 0)


# --- claims and leases, at the level of the store -------------------------------------------------


async def _store(
    redis: RedisServer, batch: str, name: str, *, total: int, block: int, lease_ms: int = 300
) -> Store:
    state = RedisState(redis.url, prefix="t:")
    store = Store(state, batch, worker=name, keep_s=600)
    await store.begin(total=total, block=block, lease_ms=lease_ms, file_digest="f", output="o")
    return store


async def _close(*stores: Store) -> None:
    for store in stores:
        await store._state.aclose()


def test_a_dead_workers_block_is_taken_over_when_its_lease_ends_and_it_is_fenced_out(
    redis: RedisServer,
) -> None:
    async def scenario() -> None:
        dead = await _store(redis, "takeover", "dead", total=20, block=10)
        alive = await _store(redis, "takeover", "alive", total=20, block=10)
        claim = await dead.claim()
        assert isinstance(claim, Claim)
        assert claim.block == 0
        assert not claim.taken_over
        # The dead worker had sent job 3 (acknowledged), then died: no more renewals.
        sent = json.dumps({"k": "sent", "p": "laozhang"})
        assert await dead.journal([["3", sent, "", 0, ""]]) == [True]
        other = await alive.claim()
        assert isinstance(other, Claim)
        assert other.block == 1  # never the block another holds
        # Until the lease ends, the block is no one else's; then the next claim takes it over.
        taken: Claim | float | None = await alive.claim()
        deadline = time.monotonic() + 30
        while not isinstance(taken, Claim) and time.monotonic() < deadline:
            assert isinstance(taken, float)  # others still work: wait for a lease to end
            await asyncio.sleep(min(taken, 0.1))
            taken = await alive.claim()
        assert isinstance(taken, Claim)
        assert taken.block == 0
        assert taken.taken_over
        # The journal of its jobs comes with the claim: job 3 may have been billed.
        records = {number: found for number, _, _, found in taken.jobs}
        state = JobState()
        for record in records[3]:
            state.fold(record)
        assert state.may_be_billed
        assert state.open_sends == ["laozhang"]
        assert all(not records[n] for n in records if n != 3)
        # The dead worker, if it ever comes back, can neither send nor record for it.
        assert await dead.journal([["4", sent, "", 0, ""]]) == [False]
        lost, _, _ = await dead.renew([0])
        assert lost == {0}
        assert await alive.journal([["4", sent, "", 0, ""]]) == [True]
        await _close(dead, alive)

    asyncio.run(scenario())


def test_a_block_lost_and_claimed_back_comes_with_what_the_other_worker_recorded(
    tmp_path: Path, redis: RedisServer
) -> None:
    # A worker whose loop stalled past its lease: another took its block over, sent job 3 and
    # gave the block back (stopped), all before the first worker's renewal noticed the loss.
    # Its next claim brings the block back: it must not go on with what it knew before
    # (job 3 not sent), which would send job 3 a second time, and pay twice.
    source = write_jobs(tmp_path / "jobs.jsonl", 10)

    async def scenario() -> None:
        stalled = await _store(redis, "lost-back", "stalled", total=10, block=10)
        other = await _store(redis, "lost-back", "other", total=10, block=10)
        lines = Lines(source)
        options = SharedOptions(state_url=redis.url, output=str(tmp_path / "out"), block=10)
        run = _Run(
            None,  # type: ignore[arg-type]  # no job is run: only what is queued is looked at
            lines,
            LocalOutput(tmp_path / "out"),
            stalled,
            options,
            asyncio.Event(),
            lambda ended: None,
            lambda counts: None,
        )
        first = await stalled.claim()
        assert isinstance(first, Claim)
        run._take(first, time.monotonic())
        await asyncio.sleep(0.4)  # the lease (300 ms) ends: the worker's loop stalled
        taken = await other.claim()
        assert isinstance(taken, Claim)
        assert taken.block == 0
        assert not taken.own
        sent = json.dumps({"k": "sent", "p": "laozhang"})
        assert await other.journal([["3", sent, "", 0, ""], ["", "given up", "", 0, "0"]]) == [
            True,
            True,
        ]
        back = await stalled.claim()
        assert isinstance(back, Claim)
        assert back.block == 0
        assert not back.own
        run._take(back, time.monotonic())
        # What a worker task would start job 3 with: the claim current for its block, and the
        # records that came with it.
        queued = [run.queue.get_nowait() for _ in range(run.queue.qsize())]
        started = [
            item for item in queued if item is not None and run.claims.get(item.block) == item.claim
        ]
        [job3] = [item for item in started if item.job == 3]
        state = JobState()
        for record in job3.records:
            state.fold(record)
        assert state.may_be_billed  # recovered (or reported), never sent again
        assert len(started) == 10
        assert run.held[0] == 10
        # Its own lease lapsed again, and no one took the block meanwhile: the same claim goes
        # on (its jobs are queued or in flight already), nothing is queued twice.
        await asyncio.sleep(0.4)
        mine = await stalled.claim()
        assert isinstance(mine, Claim)
        assert mine.block == 0
        assert mine.own
        current = run.claims[0]
        run._take(mine, time.monotonic())
        assert run.claims[0] == current
        assert run.queue.qsize() == 0
        await run.writer.close()
        lines.close()
        await _close(stalled, other)

    asyncio.run(scenario())


def test_a_job_in_flight_when_its_block_is_claimed_back_ends_once_and_every_other_job_runs(
    tmp_path: Path, redis: RedisServer
) -> None:
    # Job 0 was in flight when its stalled worker claimed its block back: the claim queues
    # every job of the block again, job 0 included. Job 0 ending before its new turn came
    # counted for the new claim, and its new turn ran it again and counted it again: the block
    # was released one job early, and its last job was never run in the round.
    source = write_jobs(tmp_path / "jobs.jsonl", 10)

    async def scenario() -> list[str]:
        stalled = await _store(redis, "in-flight", "stalled", total=10, block=10)
        other = await _store(redis, "in-flight", "other", total=10, block=10)
        lines = Lines(source)
        ended: list[str] = []
        options = SharedOptions(state_url=redis.url, output=str(tmp_path / "out"), block=10)
        run = _Run(
            None,  # type: ignore[arg-type]  # jobs are run by the stand-in below
            lines,
            LocalOutput(tmp_path / "out"),
            stalled,
            options,
            asyncio.Event(),
            lambda job: ended.append(job.name),
            lambda counts: None,
        )
        release = asyncio.Event()

        async def run_job(number: int, saved: bool, records: Any) -> Ended:
            if number == 0 and not ended:
                await release.wait()  # in flight while the block is lost and claimed back
            return Ended(f"job-{number:03d}", "ok")

        run.run_job = run_job  # type: ignore[method-assign]
        first = await stalled.claim()
        assert isinstance(first, Claim)
        run._take(first, time.monotonic())
        worker = asyncio.create_task(run.worker())  # one worker: the others wait their turn
        await asyncio.sleep(0.4)  # the lease (300 ms) ends: the worker's loop stalled
        taken = await other.claim()
        assert isinstance(taken, Claim)
        assert await other.journal([["", "given up", "", 0, "0"]]) == [True]
        back = await stalled.claim()
        assert isinstance(back, Claim)
        run._take(back, time.monotonic())
        release.set()
        deadline = time.monotonic() + 30
        while 0 in run.held and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        run.queue.put_nowait(None)
        await asyncio.wait_for(worker, 30)
        await run.writer.close()
        lines.close()
        await _close(stalled, other)
        return ended

    ended = asyncio.run(scenario())
    assert sorted(ended) == [f"job-{n:03d}" for n in range(10)]  # each once, none left


def test_workers_claiming_at_once_never_hold_one_block_together(redis: RedisServer) -> None:
    async def scenario() -> None:
        stores = [
            await _store(redis, "race", f"w{n}", total=1000, block=7, lease_ms=60_000)
            for n in range(12)
        ]
        held: dict[int, str] = {}
        twice: list[int] = []
        ended: Counter[str] = Counter()

        async def work(store: Store) -> None:
            while True:
                claim = await store.claim()
                if claim is None:
                    return
                if isinstance(claim, float):
                    await asyncio.sleep(0.01)
                    continue
                if claim.block in held:
                    twice.append(claim.block)
                held[claim.block] = store.worker
                ops: list[list[object]] = [[str(n), "", "ok", 1, ""] for n, *_ in claim.jobs]
                ops.append(["", "finished", "", 0, str(claim.block)])
                assert all(await store.journal(ops))
                ended[store.worker] += len(claim.jobs)

        await asyncio.gather(*(work(store) for store in stores))
        assert twice == []
        assert sorted(held) == list(range(143))  # ceil(1000 / 7) blocks, each claimed once
        assert sum(ended.values()) == 1000
        assert len(ended) > 1  # shared, not one worker doing everything
        totals = await stores[0].totals()
        assert totals is not None
        assert totals["ok"] == 1000
        await _close(*stores)

    asyncio.run(scenario())


# --- batch ids ------------------------------------------------------------------------------------


def test_the_batch_id_is_the_jobs_files_content_and_the_output(tmp_path: Path) -> None:
    one = Lines(write_jobs(tmp_path / "a.jsonl", 5))
    same = Lines(write_jobs(tmp_path / "b.jsonl", 5))  # another name, the same bytes
    other = Lines(write_jobs(tmp_path / "c.jsonl", 6))
    try:
        assert one.digest == same.digest != other.digest
        assert batch_id(one.digest, "out") == batch_id(same.digest, str(Path("out").absolute()))
        assert batch_id(one.digest, "out") == batch_id(
            one.digest, "file://" + os.path.abspath("out")
        )
        assert batch_id(one.digest, "out") != batch_id(other.digest, "out")
        assert batch_id(one.digest, "out") != batch_id(one.digest, "out2")
        assert batch_id(one.digest, "s3://b/run/") == batch_id(one.digest, "s3://b/run")
        assert output_location("memory://x/") == "memory://x"
    finally:
        for lines in (one, same, other):
            lines.close()


def test_another_jobs_file_on_the_same_redis_is_another_batch(
    tmp_path: Path, redis: RedisServer
) -> None:
    first = write_jobs(tmp_path / "first.jsonl", 12, tag="first")
    second = write_jobs(tmp_path / "second.jsonl", 7, tag="second")
    folder = str(tmp_path / "out")
    secret = "sk-shared-batch-secret-9f3c"
    with run_emulator() as emulator:
        env = environment(emulator) | {"LAOZHANG_API_KEY": secret}
        # The third names the same folder as a file:// URL: the same output, the same batch.
        runs = [
            subprocess.run(worker(source, output, redis.url, "--block", "5"), env=env,
                           capture_output=True, text=True, timeout=120)
            for source, output in ((first, folder), (second, folder), (first, f"file://{folder}"))
        ]  # fmt: skip
        ledger = Counter(entry.prompt for entry in emulator.billed())
    a, b, a_again = (summary(run.stdout) for run in runs)
    # No secret in Redis: not in any key of the batches, nor in any value.
    client: Any = redis.client()
    for key in client.scan_iter(match=b"flux:batch:*"):
        assert secret.encode() not in key
        kind = client.type(key)
        values = (
            client.hgetall(key).items() if kind == b"hash" else [(client.get(key), b"")]
            if kind == b"string" else client.zrange(key, 0, -1)
        )  # fmt: skip
        assert secret.encode() not in repr(list(values)).encode()
    client.close()
    assert a["batch"] != b["batch"]
    assert a["batch"] == a_again["batch"]
    assert (a["total"], a["saved"], a["round"]) == (12, 12, 1)
    assert (b["total"], b["saved"], b["round"]) == (7, 7, 1)  # nothing of the first batch mixed in
    assert (a_again["already_saved"], a_again["saved"], a_again["round"]) == (12, 0, 2)
    assert len(ledger) == 19
    assert max(ledger.values()) == 1


# --- Redis failing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_redis_failing_mid_batch_stops_every_worker_with_a_clear_error_and_sends_nothing_more(
    tmp_path: Path, how: str
) -> None:
    """Killed (connections refused) or frozen (SIGSTOP: connected, answering nothing)."""
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 300), tmp_path / "out"
    with redis_server() as server, run_emulator() as emulator:
        emulator.inject("laozhang", Fault(delay=0.05))
        env = environment(emulator)
        workers = two_workers_under_way(source, folder, server.url, env, emulator)
        if how == "killed":
            server.kill()
        else:
            server.freeze()
        at_kill = len(emulator.calls())
        done = [process.communicate(timeout=60) for process in workers]
        after = len(emulator.calls())
        ledger = Counter(entry.prompt for entry in emulator.billed())

    for process, (stdout, stderr) in zip(workers, done, strict=True):
        assert process.returncode == 4, stderr  # no hang: each worker ended, with an error
        assert "Traceback" not in stderr
        assert "shared state (Redis) did not answer" in stderr
        assert json.loads(stdout)["error"]["type"] == "StateUnavailable"
    # At most the requests already on their way when Redis died (their `sent` acknowledged,
    # 4 in flight per worker) reached the provider after it: no new job was sent.
    assert after - at_kill <= 8, (at_kill, after)
    assert after < 300
    assert max(ledger.values()) == 1


def test_redis_unreachable_at_the_start_is_a_clear_error_and_nothing_is_sent(
    tmp_path: Path,
) -> None:
    source = write_jobs(tmp_path / "jobs.jsonl", 3)
    with run_emulator() as emulator:
        run = subprocess.run(
            worker(source, str(tmp_path / "out"), f"unix://{tmp_path}/no-redis.sock"),
            env=environment(emulator),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert emulator.calls() == []
    assert run.returncode == 4, run.stderr
    assert "shared state (Redis) did not answer" in run.stderr
    assert "Traceback" not in run.stderr


# --- the journal's verdicts, across workers --------------------------------------------------------


def test_a_killed_workers_accepted_jobs_are_polled_by_the_next_not_sent_again(
    tmp_path: Path, redis: RedisServer
) -> None:
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 6), tmp_path / "out"
    lines = Lines(source)
    batch = batch_id(lines.digest, str(folder))
    lines.close()
    journal = redis.client()

    def accepted_jobs() -> int:
        records = journal.hvals(f"flux:batch:{{{batch}}}:jobs")  # type: ignore[attr-defined]
        return sum(b'"k":"job"' in raw for raw in records)

    with run_emulator(pending_polls=1) as emulator:
        env = environment(emulator, "bfl")
        args = ("--block", "3", "--lease", "1", "--concurrency", "3")
        first = subprocess.Popen(
            worker(source, str(folder), redis.url, *args, provider="bfl"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        # Killed once three jobs are accepted (their ids in the journal): none of them done yet
        # (a BFL job here answers its first poll as pending and is done at the second, 1.25 s
        # after its submit at the CLI's pace: one pending poll, not the emulator's default two,
        # which cost each worker another 1.1 s a job).
        wait_for(lambda: accepted_jobs() >= 3, first)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        submitted = Counter(call.path for call in emulator.calls(kind="submit"))
        second = finish(
            dumped(worker(source, str(folder), redis.url, *args, provider="bfl")),
            env=env,
            seconds=120,
            evidence=lambda: shared_state(journal, batch) + emulator_calls(emulator),
        )
        ledger = Counter(entry.prompt for entry in emulator.billed())
        submits = len(emulator.calls(kind="submit"))
    assert sum(submitted.values()) >= 3
    journal.close()  # type: ignore[attr-defined]
    done = summary(second.stdout)
    assert second.returncode == 0, second.stderr
    assert done["saved"] == 6
    assert done["unconfirmed"] == 0
    assert submits == 6  # each job submitted once: the accepted ones were polled, not re-sent
    assert max(ledger.values()) == 1
    assert len(ledger) == 6
    assert sum(images(folder).values()) == 6


def test_a_sent_unconfirmed_job_is_reported_and_sent_again_only_when_asked(
    tmp_path: Path, redis: RedisServer
) -> None:
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 4), tmp_path / "out"
    lines = Lines(source)
    batch = batch_id(lines.digest, str(folder))
    lines.close()

    async def dead_worker_sent_job_2() -> None:
        # What a worker leaves when it dies just after sending job 2 to laozhang.
        store = Store(RedisState(redis.url), batch, worker="dead", keep_s=600)
        await store.begin(
            total=4, block=4, lease_ms=1000, file_digest=lines.digest,
            output=output_location(str(folder)),
        )  # fmt: skip
        claim = await store.claim()
        assert isinstance(claim, Claim)
        from flux_adapters._batch_files import requests
        from flux_adapters._journal import request_digest

        digest = request_digest(next(r for n, r in requests(source, print) if n == "job-002"))
        accepted = json.dumps({"k": "accepted", "d": digest})
        sent = json.dumps({"k": "sent", "p": "laozhang"})
        assert (
            await store.journal([["2", accepted, "", 0, ""], ["2", sent, "", 0, ""]]) == [True] * 2
        )
        await store._state.aclose()

    asyncio.run(dead_worker_sent_job_2())
    with run_emulator() as emulator:
        env = environment(emulator)
        reported = subprocess.run(
            worker(source, str(folder), redis.url), env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        not_sent = Counter(entry.prompt for entry in emulator.billed())
        resent = subprocess.run(
            worker(source, str(folder), redis.url, "--resend-unconfirmed"), env=env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        ledger = Counter(entry.prompt for entry in emulator.billed())
    first = summary(reported.stdout)
    assert reported.returncode == 8
    assert (first["saved"], first["unconfirmed"]) == (3, 1)
    assert "job-002: unconfirmed: may have been billed" in reported.stderr
    assert "job 2" not in not_sent
    assert len(not_sent) == 3
    again = summary(resent.stdout)
    assert resent.returncode == 0, resent.stderr
    assert (again["saved"], again["already_saved"], again["round"]) == (1, 3, 2)
    assert ledger["job 2"] == 1
    assert max(ledger.values()) == 1


@pytest.mark.parametrize(
    ("given_by", "fetched"), [("", False), ("aimlapi", False), ("laozhang", True)]
)
def test_a_dead_workers_answered_job_is_downloaded_again_only_as_its_provider_may(
    tmp_path: Path, redis: RedisServer, given_by: str, fetched: bool
) -> None:
    """A worker died after job 1 was answered, before its image was saved: the next downloads
    it again from the URL in the journal, a loopback one. The emulator's laozhang (at 127.0.0.1)
    may lead there; a provider this worker does not have, or none recorded, may not (the URL
    came from a provider all the same), and the job is reported, not fetched nor sent again."""
    from tests.test_private_urls import Recorder

    source, folder = write_jobs(tmp_path / "jobs.jsonl", 2), tmp_path / "out"
    lines = Lines(source)
    batch = batch_id(lines.digest, str(folder))
    lines.close()
    with serving(Recorder()) as internal:
        url = f"http://127.0.0.1:{internal.port}/latest/meta-data/"

        async def dead_worker_answered_job_1() -> None:
            store = Store(RedisState(redis.url), batch, worker="dead", keep_s=600)
            await store.begin(
                total=2, block=2, lease_ms=1000, file_digest=lines.digest,
                output=output_location(str(folder)),
            )  # fmt: skip
            claim = await store.claim()
            assert isinstance(claim, Claim)
            from flux_adapters._batch_files import requests
            from flux_adapters._journal import request_digest

            digest = request_digest(next(r for n, r in requests(source, print) if n == "job-001"))
            answered: dict[str, object] = {"k": "answered", "urls": [url]}
            if given_by:
                answered["p"] = given_by
            records = [json.dumps({"k": "accepted", "d": digest}), json.dumps(answered)]
            assert await store.journal([["1", r, "", 0, ""] for r in records]) == [True] * 2
            await store._state.aclose()

        asyncio.run(dead_worker_answered_job_1())
        with run_emulator() as emulator:
            done = subprocess.run(
                worker(source, str(folder), redis.url), env=environment(emulator),
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            ledger = Counter(entry.prompt for entry in emulator.billed())
        asked = list(internal.paths)
    assert "job 1" not in ledger  # answered already: never sent again
    if fetched:
        assert done.returncode == 0, done.stderr
        assert asked == ["/latest/meta-data/"]
    else:
        assert done.returncode == 8, done.stderr
        assert "job-001: unconfirmed: may have been billed" in done.stderr
        assert asked == []


# --- outputs at an fsspec URL ----------------------------------------------------------------------


def test_outputs_go_to_an_fsspec_url_whole(
    tmp_path: Path, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec  # type: ignore[import-untyped]

    from flux_adapters._shared_batch import SharedOptions, run_shared
    from flux_adapters.client import AsyncFluxClient

    source = write_jobs(tmp_path / "jobs.jsonl", 5)
    with run_emulator() as emulator:
        monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
        monkeypatch.setenv("LAOZHANG_BASE_URL", emulator.base_url("laozhang"))

        async def run() -> Any:
            lines = Lines(source)
            try:
                async with AsyncFluxClient(providers=["laozhang"]) as client:
                    return await run_shared(
                        client,
                        lines,
                        SharedOptions(state_url=redis.url, output="memory://shared-out/run"),
                        stop=asyncio.Event(),
                        on_end=lambda ended: None,
                        on_progress=lambda counts: None,
                    )
            finally:
                lines.close()

        done = asyncio.run(run())
    assert done.totals["ok"] == 5
    assert done.finished
    fs = fsspec.filesystem("memory")
    names = sorted(path.rsplit("/", 1)[1] for path in fs.ls("/shared-out/run", detail=False))
    assert names == [f"job-{n:03d}.jpeg" for n in range(5)]  # no temporary left, nothing else
    for name in names:
        assert image_format(fs.cat_file(f"/shared-out/run/{name}")[:16]) == "jpeg"


@pytest.mark.parametrize("failing", ["pipe_file", "mv"])
def test_an_fsspec_write_that_fails_leaves_no_temporary_object(
    failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    import fsspec

    from flux_adapters._shared_batch import FsspecOutput
    from flux_adapters.errors import OutputError
    from flux_adapters.result import ResultImage
    from tests.conftest import image_bytes

    output = FsspecOutput("memory://failing-out/run")
    fs = output.fs
    real = getattr(fs, failing)

    def broken(path: str, *args: Any, **kwargs: Any) -> None:
        if failing == "pipe_file":  # part of the object is written, then the store fails
            real(path, b"\x89PNG half of it")
        raise ConnectionResetError("the store went away")

    monkeypatch.setattr(fs, failing, broken)
    image = ResultImage(b64_json=base64.b64encode(image_bytes(8, 8)).decode())
    with pytest.raises(OutputError, match=r"cannot write it \(ConnectionResetError\)"):
        asyncio.run(output.save([image], "job-1"))
    assert fsspec.filesystem("memory").ls("/failing-out/run", detail=False) == []


def test_an_fsspec_move_that_copied_but_could_not_delete_reports_the_image_saved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On an object store a move is a copy, then a delete of the source; a bucket that lets a
    # worker write but not delete fails the delete after the image is under its name. The job
    # was reported "could not be saved ... it is lost" with the paid image in its place.
    import base64

    import fsspec

    from flux_adapters._shared_batch import FsspecOutput
    from flux_adapters.result import ResultImage
    from tests.conftest import image_bytes

    output = FsspecOutput("memory://no-delete-out/run")
    fs = output.fs

    def copy_then_refused(source: str, target: str, **kwargs: Any) -> None:
        fs.copy(source, target)
        raise PermissionError("s3:DeleteObject denied")

    def refused(path: str, **kwargs: Any) -> None:
        raise PermissionError("s3:DeleteObject denied")

    monkeypatch.setattr(fs, "mv", copy_then_refused)
    monkeypatch.setattr(fs, "rm_file", refused)
    data = image_bytes(8, 8)
    image = ResultImage(b64_json=base64.b64encode(data).decode())
    assert asyncio.run(output.save([image], "job-1")) == ["job-1.png"]
    assert fsspec.filesystem("memory").cat_file("/no-delete-out/run/job-1.png") == data


def test_a_worker_stopped_by_ctrl_c_gives_its_blocks_back_at_once(
    tmp_path: Path, redis: RedisServer
) -> None:
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 60), tmp_path / "out"
    # A lease far longer than the test: the blocks come back because they are given back.
    args = ("--block", "10", "--lease", "600", "--concurrency", "4", "--grace", "0")
    with run_emulator() as emulator:
        emulator.inject("laozhang", Fault(delay=0.2))
        env = environment(emulator)
        first = started(source, folder, redis.url, env, *args)
        wait_for(lambda: len(emulator.calls()) >= 6, first)
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=60)
        emulator.clear_faults()  # the delay was for the stop to land with jobs in flight
        second = subprocess.run(
            worker(source, str(folder), redis.url, *args),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        ledger = Counter(entry.prompt for entry in emulator.billed())
    stopped = summary(stdout)
    assert first.returncode == 130, stderr
    assert stopped["interrupted"]
    assert not stopped["finished"]
    done = summary(second.stdout)
    assert done["finished"]
    assert done["round"] == stopped["round"]  # the same round, continued
    assert done["saved"] + done["unconfirmed"] == 60
    assert sum(images(folder).values()) == done["saved"]
    assert max(ledger.values()) == 1
