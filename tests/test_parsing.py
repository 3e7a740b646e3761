"""Answers and error bodies of every shape, mapped to results and typed errors."""

import base64
import json

import pytest

from flux_adapters import errors
from flux_adapters.providers._images_api import MAX_RETRY_AFTER
from flux_adapters.result import MAX_IMAGE_BYTES
from flux_adapters.wire import ERROR_BODY_BYTES, HttpResponse
from tests.conftest import call_adapter, image_bytes


def response(status: int, body: object, headers: dict[str, str] | None = None) -> HttpResponse:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpResponse(status_code=status, headers=headers or {}, content=content)


@pytest.mark.parametrize("provider", ["laozhang", "apiyi", "apiyi-multipart", "aimlapi"])
def test_url_answers(provider: str) -> None:
    # apiyi's documented answer (003), the same shape at every provider here.
    answer = call_adapter(provider).parse_response(
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
    adapter = call_adapter("aimlapi")
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
    picture = image_bytes(8, 8)
    schema_form = {
        "data": [{"url": None, "b64_json": base64.b64encode(picture).decode()}],
        "meta": {"usage": {"credits_used": 2.5}},
    }
    answer = adapter.parse_response(response(200, schema_form))
    assert answer.usage is not None
    assert answer.usage.credits_used == 2.5
    assert answer.images[0].read() == picture


def test_unknown_extra_fields_are_ignored() -> None:
    body = {
        "data": [{"url": "https://x.example/a.png", "revised_prompt": "p"}],
        "id": "1",
        "usage": {"total": 3},
    }
    assert len(call_adapter("apiyi").parse_response(response(200, body)).images) == 1


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
        call_adapter("laozhang").parse_response(response(200, body))
    assert caught.value.status_code == 200
    assert caught.value.provider == "laozhang"


def test_an_error_report_inside_a_200_is_an_error() -> None:
    body = {"error": {"message": "Request Moderated", "code": "content_policy_violation"}}
    with pytest.raises(errors.ContentModerated) as caught:
        call_adapter("apiyi").parse_response(response(200, body))
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
    error = call_adapter("laozhang").parse_error(response(status, body, headers))
    assert type(error) is kind
    assert error.status_code == status
    assert error.detail == detail


def test_retry_after_in_seconds_and_as_a_date() -> None:
    adapter = call_adapter("aimlapi")
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
    error = call_adapter("apiyi").parse_error(response(401, body))
    assert error.detail is not None
    assert len(error.detail) <= 500
    for secret in ("sk-abcdefghijklmnop", "abc.def", "s3cr3t"):
        assert secret not in error.detail


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        # The status decides: text never turns an ambiguous status into "not taken".
        (500, {"error": {"message": "insufficient quota", "code": "insufficient_quota"}}, errors.ProviderUnavailable),
        (500, {"error": {"message": "model flux-2-max is unavailable"}}, errors.ProviderUnavailable),
        (502, {"error": {"message": "no available channel for model flux-2-pro"}}, errors.ProviderUnavailable),
        (503, {"error": {"message": "no available channel for model flux-2-pro"}}, errors.ModelUnavailable),
        (404, {"error": {"message": "model flux-2-max not found", "code": "model_not_found"}}, errors.ModelUnavailable),
        (400, {"error": {"message": "insufficient balance"}}, errors.InsufficientBalance),
        (500, {"error": {"message": "Request Moderated"}}, errors.ContentModerated),
    ],
)  # fmt: skip
def test_the_status_decides_the_kind_of_error(
    status: int, body: object, kind: type[errors.ProviderError]
) -> None:
    error = call_adapter("laozhang").parse_error(response(status, body))
    assert type(error) is kind
    assert error.status_code == status


def test_an_error_report_inside_a_200_is_a_format_error_not_a_refusal() -> None:
    body = {"error": {"message": "insufficient quota", "code": "insufficient_quota"}}
    with pytest.raises(errors.ResponseFormatError) as caught:
        call_adapter("laozhang").parse_response(response(200, body))
    assert caught.value.status_code == 200  # ambiguous: the job may have been done


def inline(b64: str) -> dict[str, object]:
    return {"data": [{"b64_json": b64}]}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (inline("!!!not base64!!!"), "not valid base64"),
        (inline("aGVsbG8="), "not a png, jpeg or webp image"),
        (inline("A" * (4 * (MAX_IMAGE_BYTES // 3 + 2))), "larger than 32 MB"),
        ({"data": [{"url": "file:///etc/passwd"}]}, r"not an http\(s\) URL"),
        ({"data": [{"url": "https://x.example/a.png"}] * 17}, "lists 17 images"),
    ],
    ids=["bad-base64", "not-an-image", "too-large", "file-url", "too-many"],
)
def test_every_image_of_an_answer_is_checked_before_it_is_accepted(
    body: dict[str, object], problem: str
) -> None:
    with pytest.raises(errors.ResponseFormatError, match=problem):
        call_adapter("aimlapi").parse_response(response(200, body))


def test_an_inline_image_cut_short_is_refused() -> None:
    whole = base64.b64encode(image_bytes(64, 64)).decode()
    assert call_adapter("aimlapi").parse_response(response(200, inline(whole))).images
    cut = whole[: len(whole) // 2 // 4 * 4]  # whole base64 quanta: valid base64, half an image
    with pytest.raises(errors.ResponseFormatError, match="cut short"):
        call_adapter("aimlapi").parse_response(response(200, inline(cut)))


def test_json_nested_deeper_than_python_goes_is_a_typed_error() -> None:
    deep = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(errors.ResponseFormatError, match="not readable JSON"):
        call_adapter("laozhang").parse_response(response(200, deep))
    error = call_adapter("laozhang").parse_error(response(500, deep))
    assert isinstance(error, errors.ProviderUnavailable)
    nested_message = {"error": {"message": json.loads("[" * 900 + "]" * 900)}}
    error = call_adapter("laozhang").parse_error(response(400, nested_message))
    assert isinstance(error, errors.ProviderRejected)


def test_a_huge_html_error_page_is_reduced_to_its_title_from_a_bounded_prefix() -> None:
    page = (
        b"<!DOCTYPE html><html><head><title>504 Gateway Time-out</title></head><body>"
        + b"<div class='x'>" * 100_000
        + b"</body></html>"
    )
    assert len(page) > 1_000_000
    error = call_adapter("apiyi").parse_error(response(504, page))
    assert isinstance(error, errors.ProviderUnavailable)
    assert error.detail == "504 Gateway Time-out"
    untitled = b"<html><body>" + b"<p>down " * 200_000 + b"</body></html>"
    error = call_adapter("apiyi").parse_error(response(502, untitled))
    assert error.detail is not None
    assert error.detail.startswith("down down")
    assert len(error.detail) <= 500
    assert len(untitled) > ERROR_BODY_BYTES


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("²", None),
        ("١٢", None),
        ("1e400", None),
        ("nan", None),
        ("-5", None),
        ("inf", None),
        ("99999999999", None),
        ("9999999999", MAX_RETRY_AFTER),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
        ("Mon, 99 Foo 99999 99:99:99 GMT", None),
        ("3", 3.0),
    ],
)
def test_retry_after_values_of_any_shape_are_bounded_or_ignored(
    value: str, expected: float | None
) -> None:
    error = call_adapter("laozhang").parse_error(response(429, b"slow", {"retry-after": value}))
    assert isinstance(error, errors.RateLimited)
    assert error.retry_after == expected
