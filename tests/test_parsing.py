"""Answers and error bodies of every shape, mapped to results and typed errors."""

import json

import pytest

from flux_adapters import errors, get_adapter
from flux_adapters.wire import HttpResponse


def response(status: int, body: object, headers: dict[str, str] | None = None) -> HttpResponse:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpResponse(status_code=status, headers=headers or {}, content=content)


@pytest.mark.parametrize("provider", ["laozhang", "apiyi", "apiyi-multipart", "aimlapi"])
def test_url_answers(provider: str) -> None:
    # apiyi's documented answer (003), the same shape at every provider here.
    answer = get_adapter(provider).parse_response(
        response(
            200,
            {
                "created": 1776832476,
                "data": [
                    {"url": "https://delivery-eu.bfl.ai/results/xxx/sample.jpeg?signature=abc"}
                ],
            },
        )
    )
    assert [image.url for image in answer.images] == [
        "https://delivery-eu.bfl.ai/results/xxx/sample.jpeg?signature=abc"
    ]
    assert answer.usage is None


def test_aimlapi_answer_with_usage_in_either_unit() -> None:
    adapter = get_adapter("aimlapi")
    documented = {
        "data": [
            {
                "url": "https://cdn.aimlapi.com/generations/hedgehog/1749730923700.png",
                "b64_json": None,
            }
        ],
        "meta": {"usage": {"tokens_used": 120000}},
    }
    answer = adapter.parse_response(response(200, documented))
    assert answer.usage is not None
    assert answer.usage.tokens_used == 120000
    schema_form = {
        "data": [{"url": None, "b64_json": "aGVsbG8="}],
        "meta": {"usage": {"credits_used": 2.5}},
    }
    answer = adapter.parse_response(response(200, schema_form))
    assert answer.usage is not None
    assert answer.usage.credits_used == 2.5
    assert answer.images[0].read() == b"hello"


def test_unknown_extra_fields_are_ignored() -> None:
    body = {
        "data": [{"url": "https://x.example/a.png", "revised_prompt": "p"}],
        "id": "1",
        "usage": {"total": 3},
    }
    assert len(get_adapter("apiyi").parse_response(response(200, body)).images) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html><body>OK</body></html>",
        b"{}",
        b'{"data": []}',
        b'{"data": [{"url": null}]}',
        b'{"data": "x"}',
    ],
    ids=["empty", "html", "no-data", "empty-data", "null-url", "wrong-type"],
)
def test_malformed_success_answers(body: bytes) -> None:
    with pytest.raises(errors.ResponseFormatError) as caught:
        get_adapter("laozhang").parse_response(response(200, body))
    assert caught.value.status_code == 200
    assert caught.value.provider == "laozhang"


def test_an_error_report_inside_a_200_is_an_error() -> None:
    body = {"error": {"message": "Request Moderated", "code": "content_policy_violation"}}
    with pytest.raises(errors.ContentModerated) as caught:
        get_adapter("apiyi").parse_response(response(200, body))
    assert caught.value.status_code == 200


OPENAI_STYLE = {
    "error": {
        "message": "Invalid token",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    }
}


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "detail"),
    [
        (401, OPENAI_STYLE, {}, errors.AuthenticationFailed, "Invalid token"),
        (403, {"message": "key has no access to flux"}, {}, errors.AuthenticationFailed, "key has no access to flux"),
        (402, {"error": {"message": "Insufficient balance"}}, {}, errors.InsufficientBalance, "Insufficient balance"),
        (403, {"error": {"message": "用户额度不足", "code": "insufficient_user_quota"}}, {}, errors.InsufficientBalance, "用户额度不足"),
        (429, {"error": {"message": "Too many requests"}}, {"retry-after": "7"}, errors.RateLimited, "Too many requests"),
        (400, {"error": {"message": "Request Moderated"}}, {}, errors.ContentModerated, "Request Moderated"),
        (503, {"error": {"message": "no available channel for model flux-2-max", "code": "model_not_found"}}, {},
         errors.ModelUnavailable, "no available channel for model flux-2-max"),
        (400, {"detail": "width must be a multiple of 16"}, {}, errors.ProviderRejected, "width must be a multiple of 16"),
        (422, b"prompt is required", {}, errors.ProviderRejected, "prompt is required"),
        (500, b"Internal Server Error", {}, errors.ProviderUnavailable, "Internal Server Error"),
        (502, b"<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>", {},
         errors.ProviderUnavailable, "502 Bad Gateway"),
        (504, b"<!DOCTYPE html><html><body><h1>Gateway   Timeout</h1></body></html>", {},
         errors.ProviderUnavailable, "Gateway Timeout"),
    ],
)  # fmt: skip
def test_error_bodies_map_to_typed_errors_with_the_real_status(
    status: int,
    body: object,
    headers: dict[str, str],
    kind: type[errors.ProviderError],
    detail: str,
) -> None:
    error = get_adapter("laozhang").parse_error(response(status, body, headers))
    assert type(error) is kind
    assert error.status_code == status
    assert error.detail == detail


def test_retry_after_in_seconds_and_as_a_date() -> None:
    adapter = get_adapter("aimlapi")
    seconds = adapter.parse_error(response(429, b"slow down", {"retry-after": "2.5"}))
    assert isinstance(seconds, errors.RateLimited)
    assert seconds.retry_after == 2.5
    dated = adapter.parse_error(
        response(429, b"slow down", {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
    )
    assert isinstance(dated, errors.RateLimited)
    assert dated.retry_after == 0.0
    absent = adapter.parse_error(response(429, b"slow down"))
    assert isinstance(absent, errors.RateLimited)
    assert absent.retry_after is None


def test_details_are_clipped_and_scrubbed_of_keys_and_signatures() -> None:
    body = {
        "error": {
            "message": "bad key sk-abcdefghijklmnop for Bearer abc.def, see https://x/y?signature=s3cr3t "
            + "x" * 900
        }
    }
    error = get_adapter("apiyi").parse_error(response(401, body))
    assert error.detail is not None
    assert len(error.detail) <= 500
    for secret in ("sk-abcdefghijklmnop", "abc.def", "s3cr3t"):
        assert secret not in error.detail
