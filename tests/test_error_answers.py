"""Errors carry the answer's headers (made safe) and the provider's request id, for support.

A provider's headers are hostile input: a cookie, an echoed key, a signed URL, control
characters, thousands of headers. None of it may leak into an error, its str, its repr or its
pickle; the request id is shown in ``str(error)``.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux_adapters import AsyncFluxClient, EditRequest, EditResult, FluxClient, errors
from flux_adapters._redact import MASK, answer_headers, redact, request_id
from flux_adapters.jobs import Job
from tests.conftest import image_bytes
from tests.test_jobs import FAST, T2I, FakeBfl, run

KEY = "sk-test-0123456789abcdef"
REQUEST = EditRequest(prompt="a lighthouse", model="flux-2-pro")
OK = {"created": 1, "data": [{"url": "https://cdn.example/results/a.png?signature=s3cr3t"}]}
PNG = image_bytes(16, 16)
Handler = Callable[[httpx.Request], httpx.Response]
both = pytest.mark.parametrize("kind", ["sync", "async"])


def call(kind: str, handler: Handler, *, read: bool = False, **options: Any) -> EditResult:
    transport = httpx.MockTransport(handler)
    if kind == "sync":
        with httpx.Client(transport=transport) as http:
            result = FluxClient("laozhang", api_key=KEY, http_client=http, **options).edit(REQUEST)
            if read:
                result.images[0].read()
            return result

    async def main() -> EditResult:
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http, **options)
            result = await client.edit(REQUEST)
            if read:
                await result.images[0].read_async()
            return result

    return asyncio.run(main())


HOSTILE_HEADERS = {
    "x-request-id": "req-7f3a",
    "set-cookie": "session=SESSION-SECRET; HttpOnly",
    "x-auth-token": "TOKEN-SECRET",
    "x-echo": f"you sent Bearer {KEY}",
    "location": "https://cdn.example/x.png?X-Amz-Signature=URL-SECRET&token=URL-SECRET",
    "x-trace": "line\r\x1b[31mred",
    "server": "gateway",
}


def leaks(error: BaseException) -> list[str]:
    shown = " ".join([str(error), repr(error), repr(vars(error)), str(pickle.dumps(error))])
    return [
        secret
        for secret in ("SESSION-SECRET", "TOKEN-SECRET", "URL-SECRET", KEY, "\x1b")
        if secret in shown
    ]


@both
def test_a_provider_error_carries_safe_headers_and_shows_the_request_id(kind: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "boom"}}, headers=HOSTILE_HEADERS)

    with pytest.raises(errors.ProviderUnavailable) as caught:
        call(kind, handler)
    error = caught.value
    assert error.request_id == "req-7f3a"
    assert "(HTTP 500, request id req-7f3a)" in str(error)
    headers = error.response_headers
    assert headers["set-cookie"] == MASK
    assert headers["x-auth-token"] == MASK
    assert headers["location"] == "https://cdn.example/x.png?[redacted]"
    assert headers["x-echo"] == f"you sent {MASK}"
    assert headers["x-trace"] == "line\\r\\x1b[31mred"
    assert headers["server"] == "gateway"
    with pytest.raises(TypeError):
        headers["server"] = "changed"  # type: ignore[index]
    assert leaks(error) == []
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.request_id, dict(clone.response_headers)) == (error.request_id, dict(headers))


@pytest.mark.parametrize(
    "name",
    ["x-request-id", "request-id", "x-fal-request-id", "x-oneapi-request-id", "X-Request-ID"],
)
def test_the_request_id_is_read_from_each_header_providers_use(name: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"error": {"message": "slow"}}, headers={name: "r-1"})

    with pytest.raises(errors.RateLimited) as caught:
        call("sync", handler)
    assert caught.value.request_id == "r-1"
    assert "request id r-1" in str(caught.value)


def test_no_request_id_header_means_none_and_an_unchanged_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "bad size"}})

    with pytest.raises(errors.ProviderRejected) as caught:
        call("sync", handler)
    assert caught.value.request_id is None
    assert "request id" not in str(caught.value)
    assert caught.value.response_headers["content-type"] == "application/json"


def test_hostile_header_values_and_counts_are_bounded() -> None:
    flood = {f"x-h-{number}": "v" for number in range(1000)}
    headers = {
        "x-request-id": f"{KEY}-" + "9" * 10_000,
        "X-LONG": "a" * 10_000,
        "n" * 500: "long name",
        **flood,
    }
    shaped = answer_headers(headers, lambda text: redact(text, (KEY,)))
    assert len(shaped) <= 64
    assert all(len(value) <= 256 for value in shaped.values())
    assert "n" * 500 not in shaped
    found = request_id(headers, lambda text: redact(text, (KEY,)))
    assert found is not None
    assert KEY not in found
    assert len(found) <= 128


@both
def test_a_header_named_after_the_key_is_not_kept(kind: str) -> None:
    # A gateway that echoes what it was sent into header names ("x-<token>: 1") must not put the
    # key into response_headers, where the value masking never looks.
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {f"x-{KEY}": "1", f"x-seen-{KEY[3:]}": "1", "x-request-id": "req-1"}
        return httpx.Response(502, json={"error": {"message": "boom"}}, headers=headers)

    with pytest.raises(errors.ProviderError) as caught:
        call(kind, handler)
    assert leaks(caught.value) == []
    assert KEY[3:11] not in " ".join(caught.value.response_headers)
    assert caught.value.request_id == "req-1"


def test_a_request_id_that_is_only_a_key_is_no_request_id() -> None:
    headers = {"x-request-id": "Bearer abcdefgh"}
    assert answer_headers(headers, redact)["x-request-id"] == MASK
    assert request_id(headers, redact) is None


def test_a_request_id_after_the_64_headers_kept_is_still_found() -> None:
    headers = {f"x-filler-{n}": "x" for n in range(20_000)} | {"x-request-id": "req-last"}
    assert "x-request-id" not in answer_headers(headers, redact)
    assert request_id(headers, redact) == "req-last"


@both
def test_a_success_carries_the_request_id_of_its_answer(kind: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "cdn.example":
            return httpx.Response(200, content=PNG)
        return httpx.Response(200, json=OK, headers={"x-oneapi-request-id": "2024-abc"})

    result = call(kind, handler)
    assert result.request_id == "2024-abc"
    assert result.to_dict()["request_id"] == "2024-abc"


@both
def test_an_unreadable_answer_carries_its_headers(kind: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"<html>oops</html>", headers={"request-id": "u-9"})

    with pytest.raises(errors.ResponseFormatError) as caught:
        call(kind, handler)
    assert caught.value.request_id == "u-9"
    assert "request id u-9" in str(caught.value)


@both
def test_an_answer_too_large_carries_its_headers(kind: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-length": str(2**40), "x-request-id": "big-1"}, content=b"{}"
        )

    with pytest.raises(errors.ResponseFormatError) as caught:
        call(kind, handler)
    assert caught.value.request_id == "big-1"


@both
@pytest.mark.parametrize(
    ("status", "kind_of_error"),
    [
        (404, errors.ResultExpired),
        (500, errors.ProviderUnavailable),
        (200, errors.ResponseFormatError),
    ],
)
def test_a_failed_download_carries_the_cdns_headers(
    kind: str, status: int, kind_of_error: type[errors.FluxError]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "cdn.example":
            body = b"<html>nope</html>"
            return httpx.Response(
                status, content=body, headers={"x-amz-request-id": "S3-1", "set-cookie": "c=S"}
            )
        return httpx.Response(200, json=OK)

    with pytest.raises(kind_of_error) as caught:
        call(kind, handler, read=True)
    assert caught.value.request_id == "S3-1"
    assert caught.value.response_headers["set-cookie"] == MASK
    assert "request id S3-1" in str(caught.value)


@both
def test_a_job_error_without_a_header_id_gives_the_job_id(kind: str) -> None:
    fake = FakeBfl(outcome={"status": "Error", "details": "it broke"})
    with pytest.raises(errors.JobFailed) as caught:
        run(kind, fake, T2I)
    assert caught.value.request_id == "job-1"
    assert str(caught.value).count("job-1") == 1  # "(job job-1)", not repeated as request id


def test_a_provider_error_after_a_job_was_accepted_names_the_job() -> None:
    fake = FakeBfl(poll_faults=[httpx.Response(401, json={"detail": "revoked"})])
    with pytest.raises(errors.AuthenticationFailed) as caught:
        run("sync", fake, T2I)
    assert caught.value.request_id == "job-1"
    assert "request id job-1" in str(caught.value)


def test_a_job_result_carries_the_job_id_as_its_request_id() -> None:
    result = run("sync", FakeBfl(), T2I, polling=FAST)
    assert result.request_id == "job-1"


def test_request_id_prefers_the_header_over_the_job() -> None:
    error = errors.ProviderUnavailable("down", provider="bfl", status_code=503)
    error.job = Job(provider="bfl", model="flux-2-pro", id="job-9", poll_url="https://api.bfl.ai/p")
    assert error.request_id == "job-9"
    errors.attach_response(error, {"x-request-id": "hdr-1"}, "hdr-1")
    assert error.request_id == "hdr-1"


def test_errors_that_met_no_answer_have_no_headers() -> None:
    error = errors.TransportError("refused", provider="laozhang", sent=False)
    assert dict(error.response_headers) == {}
    assert error.request_id is None
    assert str(error) == "laozhang: refused (the request was not sent)"


@given(
    st.dictionaries(
        st.one_of(st.text(max_size=20), st.builds(lambda t: f"x-{KEY}{t}", st.text(max_size=8))),
        st.one_of(st.text(max_size=60), st.just(KEY), st.builds(lambda t: f"x{KEY}{t}", st.text())),
        max_size=80,
    )
)
def test_any_headers_are_kept_bounded_printable_and_without_the_key(
    headers: dict[str, str],
) -> None:
    shaped = answer_headers(headers, lambda text: redact(text, (KEY,)))
    assert len(shaped) <= 64
    for name, value in shaped.items():
        assert name == name.lower()
        assert KEY[:8] not in name
        assert len(value) <= 256
        assert KEY[:8] not in value  # not even an 8-character fragment of it
        assert value.isprintable()
    found = request_id(
        {name.lower(): value for name, value in headers.items()}, lambda text: redact(text, (KEY,))
    )
    assert found is None or (len(found) <= 128 and KEY[:8] not in found)
