"""Asynchronous providers attacked: a hostile provider, a careless caller, a crash.

Each test here failed before the fix it names: the money rule (an accepted job is never
submitted again, anywhere), typed errors only, bounded loops, and no key where it must not go.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from flux_adapters import AsyncFluxClient, errors
from flux_adapters.jobs import Polling
from tests.test_jobs import KEY, T2I, Both, FakeBfl, both, run

QUICK = Polling(first=0.001, factor=1.5, longest=0.005, jitter=0.0, deadline=2.0)


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BFL_API_KEY", KEY)
    monkeypatch.setenv("LAOZHANG_API_KEY", "lz-key-0123456789abcdef")


# --- an error the client raises itself after the submit was accepted still carries the job --

UNSENDABLE_POLLING_URL = "https://xn--zz.bfl.ai/v1/get_result?id=job-1"
"""A URL that passes as http(s) but that httpx refuses to build (an invalid IDNA label)."""


def oversized_poll(request: httpx.Request) -> httpx.Response:
    """A poll answer declaring more than any answer may be (the client refuses to read it)."""
    return httpx.Response(200, headers={"content-length": str(10**12)}, content=b"{}")


@both
@pytest.mark.parametrize("trouble", ["oversized poll answer", "unsendable polling URL"])
def test_an_error_of_the_client_after_acceptance_keeps_the_job_and_never_fails_over(
    kind: str, trouble: str, keys: None
) -> None:
    # The client (not the flow) refused the poll's answer, or could not build the poll: before
    # the fix, that error had no job, so the router judged it alone (a 2xx it could not read
    # "may be billed", failed over with failover_on_ambiguous; or "refused locally").
    if trouble == "oversized poll answer":
        bfl = FakeBfl(poll_faults=[oversized_poll] * 10)
    else:
        bfl = FakeBfl(poll_host="xn--zz.bfl.ai")
    both_ = Both(bfl)
    with pytest.raises(errors.FluxError) as caught:
        run(
            kind,
            both_,
            T2I,
            provider=["bfl", "laozhang"],
            polling=QUICK,
            failover_on_ambiguous=True,
        )
    assert both_.laozhang == []  # never paid twice
    assert bfl.count("POST") == 1
    assert caught.value.job is not None
    assert caught.value.job.id == "job-1"
    assert [a.billing for a in caught.value.attempts] == ["job-accepted"]


def test_a_batch_rerun_never_resubmits_a_job_whose_poll_could_not_be_built(
    tmp_path: Path,
) -> None:
    bfl = FakeBfl(poll_host="xn--zz.bfl.ai")

    async def batch() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(bfl)) as http:
            client = AsyncFluxClient("bfl", api_key=KEY, http_client=http, polling=QUICK)
            items = client.edit_many([T2I], output_dir=tmp_path, names=["a"])
            return [item.status async for item in items]

    for _ in range(3):
        asyncio.run(batch())
    assert bfl.count("POST") == 1  # before the fix: one submit per run
    lines = (tmp_path / ".flux-journal.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert {r.get("proves") for r in records if r["k"] == "attempt"} == {"may be billed"}


def test_a_journal_that_cannot_record_the_job_fails_with_the_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flux_adapters._flows import job_flow
    from flux_adapters.jobs import Accepted
    from flux_adapters.providers.bfl import BflAdapter
    from flux_adapters.wire import HttpResponse

    flow = job_flow(BflAdapter(), T2I, "https://api.bfl.ai", polling=QUICK)
    next(flow)  # the submit
    accepted = flow.send(
        HttpResponse(
            status_code=200,
            headers={"content-type": "application/json"},
            content=b'{"id": "j", "polling_url": "https://api.bfl.ai/v1/get_result?id=j"}',
        )
    )
    assert isinstance(accepted, Accepted)
    with pytest.raises(errors.OutputError) as caught:
        flow.throw(errors.OutputError("the disk is full", path="journal"))
    assert caught.value.job is not None
    assert caught.value.job.id == "j"
