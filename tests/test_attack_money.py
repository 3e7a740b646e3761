"""The money rules attacked: a provider that may have billed and then a second one that fails
in a final way, budgets under odd prices, and what errors and answers say was billed.

The rule under test (docs/routing.md): a failure is judged per job by what it proves; every
answer that sums up a call says ``may be billed`` when any of its tries may have been billed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient, errors
from flux_adapters.emulator import Fault, run_emulator
from flux_adapters.gateway import run_gateway
from flux_adapters.gateway._errors import error_answer
from flux_adapters.prices import PerCall
from flux_adapters.result import Attempt

KEY = "sk-live-7Qw2Zr9XbT4mKp1VfH8sLd3NcY6gJa0E"
REQUEST = EditRequest(prompt="a robot", model="flux-2-pro")
OK = {"created": 1, "data": [{"url": "https://cdn.example/results/a.png"}]}


def failed_over(second: httpx.Response, monkeypatch: pytest.MonkeyPatch) -> errors.FluxError:
    """The error of a call whose first provider answered 500 and whose second answered *second*,
    failing over on ambiguous failures (the first may have made, and billed, the image)."""
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    monkeypatch.setenv("APIYI_API_KEY", KEY)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.laozhang.ai":
            return httpx.Response(500, json={"error": {"message": "upstream failed"}})
        return second

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = FluxClient(
            providers=["laozhang", "apiyi"], http_client=http, failover_on_ambiguous=True
        )
        with pytest.raises(errors.FluxError) as caught:
            client.edit(REQUEST)
    return caught.value


SECOND: dict[str, Callable[[], httpx.Response]] = {
    "invalid": lambda: httpx.Response(400, json={"error": {"message": "bad size"}}),
    "moderated": lambda: httpx.Response(
        400,
        json={"error": {"message": "blocked", "code": "content_policy_violation"}},
    ),
}


@pytest.mark.parametrize("second", sorted(SECOND))
def test_a_gateway_answer_after_an_ambiguous_failover_says_it_may_be_billed(
    second: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: with failover_on_ambiguous, a first provider's 500 (may be billed) followed by a
    # second provider's final refusal (400 invalid, moderation) was answered by the gateway as
    # the refusal alone: "may_be_billed": false, though the first provider may have billed the
    # image (docs/gateway.md: an answer is marked may_be_billed if any attempt was ambiguous;
    # only AllProvidersFailed and StateUnavailable were).
    error = failed_over(SECOND[second](), monkeypatch)
    assert error.attempts[0].billing == "server-error"
    answer = error_answer(error)
    inner = answer.body["error"]
    assert isinstance(inner, dict)
    assert inner["may_be_billed"] is True
    assert "may have done, and billed" in str(inner["message"])
    assert "not retried elsewhere" not in str(inner["message"])  # it was: that is the point
    assert answer.headers["x-should-retry"] == "false"
    assert [a["billing"] for a in inner["attempts"]] == ["server-error", second]


def test_a_gateway_keys_budget_counts_a_try_that_may_have_been_billed_before_a_failover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: the gateway reserved one estimate per call and settled a served call at the cost of
    # its result alone. With failover_on_ambiguous, apiyi's 500 (it may have made, and billed,
    # the image) followed by laozhang's image was counted as one call: a key with a budget of two
    # calls made a second call, and paid up to three. The library's own budget counts both tries
    # (docs/gateway.md: "as the library's budgets count them").
    prices = {("apiyi", "flux-2-pro"): PerCall(usd=0.03)}  # laozhang: $0.03 a call, built in
    with run_emulator() as emulator:
        emulator.inject("apiyi", Fault(status=500, first=1))
        for name in ("apiyi", "laozhang"):
            monkeypatch.setenv(f"{name.upper()}_API_KEY", KEY)
            monkeypatch.setenv(f"{name.upper()}_BASE_URL", emulator.base_url(name))

        def make(only: tuple[str, ...] | None) -> AsyncFluxClient:
            names = [name for name in ("apiyi", "laozhang") if only is None or name in only]
            return AsyncFluxClient(
                providers=names,  # type: ignore[arg-type]
                failover_on_ambiguous=True,
                prices=prices,
            )

        with run_gateway(files_dir=tmp_path, clients=make) as gateway:
            key, _ = gateway.add_key(budget_usd=0.06)  # two calls' worth
            client = openai.OpenAI(base_url=gateway.url, api_key=key, max_retries=0)
            try:
                raw = client.images.with_raw_response.generate(model="flux-2-pro", prompt="one")
                raw.parse()
                assert raw.headers["x-flux-attempt-log"] == (
                    "apiyi=failed:server-error; laozhang=ok"
                )
                with pytest.raises(openai.RateLimitError) as caught:
                    client.images.generate(model="flux-2-pro", prompt="two")
            finally:
                client.close()
        body: Any = caught.value.body
        assert body["code"] == "budget_exceeded"
        assert len(emulator.calls("apiyi")) + len(emulator.calls("laozhang")) == 2


def test_a_batch_says_which_try_may_have_been_billed_not_the_last_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: the journal kept the last failure's words as the reason a job "may have been
    # billed": after laozhang's 500 (may be billed) and, failing over, apiyi's 400 (refused,
    # nothing done), a rerun reported "may have been billed, no image saved: ProviderRejected:
    # apiyi: ... (HTTP 400)", naming the one provider that certainly did not bill it.
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    monkeypatch.setenv("APIYI_API_KEY", KEY)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.laozhang.ai":
            return httpx.Response(500, json={"error": {"message": "upstream failed"}})
        return httpx.Response(400, json={"error": {"message": "bad size"}})

    async def run() -> list[tuple[str, str]]:
        seen: list[tuple[str, str]] = []
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            client = AsyncFluxClient(
                providers=["laozhang", "apiyi"], http_client=http, failover_on_ambiguous=True
            )
            for _ in range(2):  # the run, then a rerun that reads the journal
                async for item in client.edit_many([REQUEST], names=["job"], output_dir=tmp_path):
                    seen.append((item.status, item.reason or ""))
        return seen

    (first, _), (status, reason) = asyncio.run(run())
    assert (first, status) == ("unconfirmed", "unconfirmed")
    assert "laozhang" in reason
    assert "HTTP 500" in reason
    assert "apiyi" not in reason


@pytest.mark.parametrize("asked", [float("inf"), 10**400, 1e300])
def test_a_provider_packages_endless_retry_after_pauses_its_key_no_longer_than_a_day(
    asked: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: with a shared state (a budget, state="local" or Redis), a 429 whose retry_after a
    # provider package set to infinity (or an int too large for a float) paused the provider
    # key for every worker for ever: its Retry-After went to the state uncapped, as "inf". Every
    # later call skipped it with available_in_s=inf, and the gateway's answer for such a call
    # raised OverflowError (math.ceil(inf)) instead of a typed answer. The built-in adapters
    # cap a Retry-After at a day; so does the router now.
    from flux_adapters.state import LocalState
    from tests.test_attack_client import Fibbing

    monkeypatch.setenv("FIBBING_API_KEY", KEY)
    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    report = errors.RateLimited("slow down", provider="fibbing", status_code=429)
    report.retry_after = asked

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "fibbing.example":
            return httpx.Response(429)
        return httpx.Response(200, json=OK)

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = FluxClient(
            providers=[Fibbing(report), "laozhang"],
            http_client=http,
            state=LocalState(),
            max_retries=0,
        )
        assert client.edit(REQUEST).provider == "laozhang"
        later = client.edit(REQUEST)
    skipped = later.attempts[0]
    assert (skipped.provider, skipped.outcome) == ("fibbing", "skipped")
    assert skipped.available_in_s is not None
    assert 0 < skipped.available_in_s <= 86_400
    # What the gateway answers when such a skip is all there is: a typed answer, with a wait.
    answer = error_answer(errors.AllProvidersFailed("none", attempts=(skipped,)))
    assert answer.status == 503
    assert int(answer.headers["retry-after"]) <= 86_400


def test_a_call_priced_above_what_a_budget_can_hold_is_refused_by_the_key_budget(
    tmp_path: Path,
) -> None:
    # Was: a price may be any finite amount, but the state takes no reservation above $1e9: a
    # key with a budget asking for a call estimated at $2e9 (a mistyped price, a per-megapixel
    # figure times a large image) got the gateway's 500 "internal error" (the state's
    # ConfigurationError), not the 429 budget_exceeded its budget gives every call that
    # does not fit. Nothing was sent either way.
    prices = {("laozhang", "flux-2-pro"): PerCall(usd=2e9)}
    with run_emulator() as emulator:

        def make(only: tuple[str, ...] | None) -> AsyncFluxClient:
            return AsyncFluxClient(
                "laozhang", api_key=KEY, base_url=emulator.base_url("laozhang"), prices=prices
            )

        with run_gateway(files_dir=tmp_path, clients=make) as gateway:
            key, _ = gateway.add_key(budget_usd=10.0)
            answer = httpx.post(
                gateway.url + "/images/generations",
                headers={"authorization": f"Bearer {key}"},
                json={"model": "flux-2-pro", "prompt": "a robot"},
                timeout=30,
            )
        assert answer.status_code == 429
        assert answer.json()["error"]["code"] == "budget_exceeded"
        assert emulator.calls("laozhang") == []


def test_a_provider_cooling_down_that_fits_the_budget_is_no_budget_exceeded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Was: with laozhang ($0.03) cooling down after a 503 and apiyi ($0.10) over the $0.05 left,
    # the call raised BudgetExceeded: "has $0.0500 left, not enough for this call". But the
    # budget refused one candidate only: laozhang fits it, in 30 s. The command line said
    # "refused" (exit 2), and the gateway a 429 never to retry, with no Retry-After.
    from flux_adapters.state import LocalState

    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    monkeypatch.setenv("APIYI_API_KEY", KEY)
    prices = {("apiyi", "flux-2-pro"): PerCall(usd=0.10)}  # laozhang: $0.03, built in
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(503))) as http:
        client = FluxClient(
            providers=["laozhang", "apiyi"],
            http_client=http,
            state=LocalState(),
            budget_usd=0.05,
            prices=prices,
        )
        with pytest.raises(errors.AllProvidersFailed):
            client.edit(REQUEST)  # laozhang's 503 starts its cooldown
        with pytest.raises(errors.FluxError) as caught:
            client.edit(REQUEST)
    error = caught.value
    assert not isinstance(error, errors.BudgetExceeded)
    assert isinstance(error, errors.AllProvidersFailed)
    cooling = error.attempts[0]
    assert cooling.provider == "laozhang"
    assert cooling.available_in_s is not None
    assert cooling.available_in_s > 0
    answer = error_answer(error)
    assert (answer.status, answer.headers["x-should-retry"]) == (503, "true")
    assert "retry-after" in answer.headers


def test_a_budget_that_refuses_every_candidate_is_still_budget_exceeded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flux_adapters.state import LocalState

    monkeypatch.setenv("LAOZHANG_API_KEY", KEY)
    monkeypatch.setenv("APIYI_API_KEY", KEY)
    prices = {("apiyi", "flux-2-pro"): PerCall(usd=0.10)}
    with httpx.Client(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json=OK))
    ) as http:
        client = FluxClient(
            providers=["laozhang", "apiyi"],
            http_client=http,
            state=LocalState(),
            budget_usd=0.02,
            prices=prices,
        )
        with pytest.raises(errors.BudgetExceeded):
            client.edit(REQUEST)


def test_a_job_failed_unbilled_is_answered_with_its_provider_status_and_attempts() -> None:
    # Was: the 502 job_failed body alone lacked provider, provider_status and attempts, which
    # docs/gateway.md says every provider error carries where they apply.
    failed = errors.JobFailed("the job failed", provider="fal", job_id="j-1", billed=False)
    attempt = Attempt(
        provider="fal",
        model="flux-2-pro",
        outcome="failed",
        elapsed_s=1.0,
        error=failed,
        billing="job-failed-unbilled",
    )
    failed.attempts = (attempt,)
    answer = error_answer(failed)
    inner = answer.body["error"]
    assert isinstance(inner, dict)
    assert (answer.status, inner["code"], inner["may_be_billed"]) == (502, "job_failed", False)
    assert inner["provider"] == "fal"
    assert [a["provider"] for a in inner["attempts"]] == ["fal"]
