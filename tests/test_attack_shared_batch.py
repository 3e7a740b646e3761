"""A batch shared through Redis, attacked as a hostile host and a careless operator would.

Real parts only, as in tests/test_shared_batch.py: a redis-server, the loopback emulator (whose
ledger says what was billed) and the batch's own code; a stall is the process not running
(as under SIGSTOP) for longer than its lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flux_adapters._journal import JobState
from flux_adapters._shared_batch import Ended, Lines, LocalOutput, SharedOptions, _Run, batch_id
from flux_adapters._shared_batch_store import Claim
from flux_adapters.client import AsyncFluxClient
from flux_adapters.emulator import run_emulator
from tests.redis_server import RedisServer, redis_server
from tests.test_shared_batch import _close, _store, write_jobs


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def test_a_worker_stalled_after_its_sent_record_never_sends_a_job_another_took_over(
    tmp_path: Path, redis: RedisServer
) -> None:
    # The `sent` record was acknowledged (the worker held the block when Redis wrote it), then
    # the worker stopped running (SIGSTOP) past its lease; another worker took the block over
    # and decided by the journal (reported the job, or sent it with --resend-unconfirmed).
    # Resumed (SIGCONT), the first worker sent the request all the same: a job the other had
    # taken over, sent by a worker that no longer held it, maybe billed twice.
    source, folder = write_jobs(tmp_path / "jobs.jsonl", 1), tmp_path / "out"
    lines = Lines(source)
    batch = batch_id(lines.digest, str(folder))

    async def scenario(base_url: str) -> tuple[Ended, tuple[dict[str, Any], ...]]:
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
                taken = await other.claim()
                assert isinstance(taken, Claim)
                taken_over.append(taken)

        run.writer.durable = durable_then_stopped  # type: ignore[method-assign]
        claim = await stalled.claim()
        assert isinstance(claim, Claim)
        run._take(claim, time.monotonic())
        async with client:
            ended = await run.run_job(0, False, ())
        await run.writer.close()
        [taken] = taken_over
        assert taken.taken_over
        await _close(stalled, other)
        return ended, taken.jobs[0][3]

    with run_emulator() as emulator:
        ended, records = asyncio.run(scenario(emulator.base_url("laozhang")))
        calls = emulator.calls()
    lines.close()
    assert calls == []  # the stalled worker sent nothing
    assert ended.status != "ok"
    assert "lease" in str(ended.error)
    # What the other worker found: a `sent` record, so it reports the job (or sends it when
    # asked to): it is never sent by both.
    state = JobState()
    for record in records:
        state.fold(record)
    assert state.may_be_billed
