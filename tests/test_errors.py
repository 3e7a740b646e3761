import pickle
from typing import Any

import pytest

from flux_adapters import errors
from flux_adapters.errors import Violation
from flux_adapters.result import Attempt

VIOLATION = Violation("images", "too many reference images", "0..3 images", "5", "https://doc")
PROVIDER: dict[str, Any] = {
    "provider": "apiyi",
    "status_code": 400,
    "detail": "bad",
    "code": "invalid",
}

INSTANCES = [
    errors.ConfigurationError("no key"),
    errors.RequestError([VIOLATION, VIOLATION], provider="aimlapi", model="flux-2-pro"),
    errors.ProviderError("refused", **PROVIDER),
    errors.AuthenticationFailed("key", **PROVIDER),
    errors.InsufficientBalance("money", **PROVIDER),
    errors.RateLimited("slow", retry_after=2.5, **PROVIDER),
    errors.ContentModerated("blocked", **PROVIDER),
    errors.ModelUnavailable("gone", **PROVIDER),
    errors.ProviderRejected("invalid", **PROVIDER),
    errors.ProviderUnavailable("down", **PROVIDER),
    errors.ResponseFormatError("garbled", provider="apiyi", status_code=200, excerpt="<html>"),
    errors.TransportError("refused", provider="laozhang", sent=False),
    errors.Timeout("slow", provider="laozhang", sent=True),
    errors.ResultExpired("gone", status_code=403, location="cdn.example/x.png"),
    errors.AddressRefused(
        "the result URL leads to a loopback address",
        provider="laozhang",
        host="x:80",
        reason="loopback",
    ),
    errors.OutputError("is a directory", path="out/robot.png"),
    errors.MissingExtraError(
        "the emulator needs starlette", name="starlette", distribution="starlette", extra="emulator"
    ),
    errors.ExtensionMismatch(
        "the image is JPEG",
        path="scene.png",
        image_format="jpeg",
        extension_format="png",
        suggested="scene.jpeg",
    ),
    errors.ClientClosedError("this FluxClient is closed"),
    errors.JobError("ended", provider="bfl", job_id="j-1", detail="why"),
    errors.Moderated("blocked", provider="bfl", job_id="j-1", stage="content", detail="flagged"),
    errors.JobFailed("failed", provider="fal", job_id="j-2", billed=False),
    errors.JobNotFound("gone", provider="bfl", job_id="j-3"),
    errors.JobTimeout("late", provider="fal", job_id="j-4", waited=600.0, cancelled=True),
    errors.AllProvidersFailed(
        "none",
        attempts=[Attempt(provider="apiyi", model="flux-2-pro", outcome="failed", elapsed_s=0.1)],
    ),
    errors.BudgetExceeded(
        "no room", scope="client:default", limit_usd=1.0, spent_usd=0.98, period="day"
    ),
    errors.StateUnavailable("redis did not answer within 1 s"),
]


@pytest.mark.parametrize("error", INSTANCES, ids=lambda error: type(error).__name__)
def test_every_error_pickles_with_its_fields(error: errors.FluxError) -> None:
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error)
    assert str(clone) == str(error)
    assert vars(clone) == vars(error)


def answered(error: errors.FluxError) -> errors.FluxError:
    errors.attach_response(error, {"x-request-id": "req-42", "server": "edge"}, "req-42")
    return error


@pytest.mark.parametrize(
    "error",
    [
        answered(errors.ProviderUnavailable("down", **PROVIDER)),
        answered(errors.JobFailed("failed", provider="fal", job_id="j-2")),
        answered(errors.ResultExpired("gone", status_code=403, location="cdn.example/x.png")),
    ],
    ids=lambda error: type(error).__name__,
)
def test_an_error_with_an_answer_pickles_with_its_headers_and_request_id(
    error: errors.FluxError,
) -> None:
    clone = pickle.loads(pickle.dumps(error))
    assert clone.request_id == "req-42"
    assert dict(clone.response_headers) == {"x-request-id": "req-42", "server": "edge"}
    assert "request id req-42" in str(clone)
    assert str(clone) == str(error)


def test_every_error_class_is_covered_above() -> None:
    covered = {type(error).__name__ for error in INSTANCES}
    assert covered == {name for name in errors.__all__ if name not in {"FluxError", "Violation"}}


def test_request_error_lists_every_violation_with_limit_and_value() -> None:
    error = errors.RequestError(
        [VIOLATION, Violation("seed", "is out of range", ">= 1", "0")],
        provider="aimlapi",
        model="flux-2-pro",
    )
    text = str(error)
    assert "2 problems with the request for flux-2-pro at aimlapi" in text
    assert "images: too many reference images (limit: 0..3 images; got: 5)" in text
    assert "seed: is out of range (limit: >= 1; got: 0)" in text
    assert isinstance(error, ValueError)


def test_provider_error_keeps_the_real_status_and_detail() -> None:
    error = errors.RateLimited(
        "slow down", provider="apiyi", status_code=429, detail="busy", retry_after=3.0
    )
    assert error.status_code == 429
    assert error.retry_after == 3.0
    assert str(error) == "apiyi: slow down (HTTP 429): busy"


def test_transport_error_says_whether_the_request_may_have_arrived() -> None:
    assert "was not sent" in str(errors.TransportError("refused", provider="x", sent=False))
    assert "may have reached" in str(errors.Timeout("read timeout", provider="x", sent=True))


def test_an_error_that_holds_itself_in_its_attempts_pickles_whole() -> None:
    # The router files an error under its own attempt; pickle could lose every field of it
    # when the state went with the constructor's arguments (a cycle it cannot close there).
    error = errors.ProviderUnavailable("down", **PROVIDER)
    error.attempts = (
        Attempt(provider="apiyi", model="flux-2-pro", outcome="failed", elapsed_s=0.1, error=error),
    )
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.provider, clone.status_code, clone.detail) == ("apiyi", 400, "bad")
    assert clone.attempts[0].error is clone
