"""Client behaviour through httpx.MockTransport, run for FluxClient and AsyncFluxClient alike."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from email import policy
from email.parser import BytesParser
from pathlib import Path

import httpx
import pytest

from flux_adapters import AsyncFluxClient, EditRequest, EditResult, FluxClient, errors
from tests.conftest import image_bytes

KEY = "sk-test-0123456789abcdef"
Handler = Callable[[httpx.Request], httpx.Response]
OK = {"created": 1, "data": [{"url": "https://cdn.example/results/a.png?signature=s3cr3t"}]}


class Recorder:
    """A MockTransport handler that keeps every request (body read) and plays canned answers."""

    def __init__(self, *answers: httpx.Response | Handler) -> None:
        self.answers = list(answers) or [httpx.Response(200, json=OK)]
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(request.content)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request) if callable(answer) else answer


def edit(
    kind: str, handler: Handler, request: EditRequest, provider: str = "laozhang", **options: object
) -> EditResult:
    transport = httpx.MockTransport(handler)
    if kind == "sync":
        with httpx.Client(transport=transport) as http:
            return FluxClient(provider, api_key=KEY, http_client=http, **options).edit(request)  # type: ignore[arg-type]

    async def run() -> EditResult:
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient(provider, api_key=KEY, http_client=http, **options)  # type: ignore[arg-type]
            return await client.edit(request)

    return asyncio.run(run())


both = pytest.mark.parametrize("kind", ["sync", "async"])


def multipart(request: httpx.Request, body: bytes) -> list[tuple[str, str | None, bytes, str]]:
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    return [
        (
            str(part.get_param("name", header="content-disposition")),
            part.get_filename(),
            bytes(part.get_payload(decode=True)),
            part.get_content_type(),
        )
        for part in message.iter_parts()
    ]


@both
def test_json_edit_with_local_images_is_streamed_with_an_exact_length(
    kind: str, tmp_path: Path
) -> None:
    first = tmp_path / "robot.png"
    first.write_bytes(image_bytes(64, 64))
    second = image_bytes(32, 32, "JPEG")
    recorder = Recorder()
    request = EditRequest(
        prompt="image 1 rides image 2",
        model="flux-2-pro",
        images=[first, second, "https://ex.com/c.png"],
        size="1024x1024",
    )
    result = edit(kind, recorder, request)

    [sent] = recorder.requests
    body = recorder.bodies[0]
    assert (sent.method, str(sent.url)) == ("POST", "https://api.laozhang.ai/v1/images/generations")
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["content-type"] == "application/json"
    assert int(sent.headers["content-length"]) == len(body)
    assert "transfer-encoding" not in sent.headers
    assert json.loads(body) == {
        "model": "flux-2-pro",
        "prompt": "image 1 rides image 2",
        "input_image": "data:image/png;base64," + base64.b64encode(first.read_bytes()).decode(),
        "input_image_2": "data:image/jpeg;base64," + base64.b64encode(second).decode(),
        "input_image_3": "https://ex.com/c.png",
        "size": "1024x1024",
    }
    assert result.provider == "laozhang"
    assert result.model == "flux-2-pro"
    assert result.images[0].url == OK["data"][0]["url"]  # type: ignore[index]
    assert [a.outcome for a in result.attempts] == ["ok"]


@both
def test_multipart_uploads_every_image_in_order(kind: str, tmp_path: Path) -> None:
    person = tmp_path / "person.png"
    person.write_bytes(image_bytes(64, 64))
    scene = image_bytes(80, 48, "WEBP")
    style = "data:image/jpeg;base64," + base64.b64encode(image_bytes(16, 16, "JPEG")).decode()
    recorder = Recorder()
    request = EditRequest(
        prompt="fuse",
        model="flux-2-pro",
        images=[person, scene, style],
        width=1024,
        height=768,
        seed=7,
    )
    edit(kind, recorder, request, provider="apiyi-multipart")

    [sent] = recorder.requests
    assert str(sent.url) == "https://api.apiyi.com/v1/images/edits"
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert int(sent.headers["content-length"]) == len(recorder.bodies[0])
    parts = multipart(sent, recorder.bodies[0])
    assert [(name, value.decode()) for name, filename, value, _ in parts if filename is None] == [
        ("model", "flux-2-pro"), ("prompt", "fuse"), ("width", "1024"), ("height", "768"), ("seed", "7"),
    ]  # fmt: skip
    files = [
        (name, filename, value, media)
        for name, filename, value, media in parts
        if filename is not None
    ]
    assert [(name, filename, media) for name, filename, _, media in files] == [
        ("image[]", "person.png", "image/png"),
        ("image[]", "image-2.webp", "image/webp"),
        ("image[]", "image-3.jpeg", "image/jpeg"),
    ]
    assert files[0][2] == person.read_bytes()
    assert files[1][2] == scene


@both
def test_limits_are_enforced_before_any_byte_is_sent(kind: str) -> None:
    recorder = Recorder()
    request = EditRequest(
        prompt="x", model="flux-2-pro", images=["https://ex.com/a.png"] * 4, seed=0
    )
    with pytest.raises(errors.RequestError) as caught:
        edit(kind, recorder, request, provider="aimlapi")
    assert recorder.requests == []
    assert [v.field for v in caught.value.violations] == ["images", "seed"]


@both
def test_provider_errors_keep_status_and_never_show_the_key(kind: str) -> None:
    echo = httpx.Response(
        401, json={"error": {"message": f"invalid key {KEY}", "code": "invalid_api_key"}}
    )
    with pytest.raises(errors.AuthenticationFailed) as caught:
        edit(kind, Recorder(echo), EditRequest(prompt="x", model="flux-2-pro"))
    assert caught.value.status_code == 401
    assert caught.value.detail == "invalid key [redacted]"
    assert KEY not in str(caught.value)
    assert KEY not in repr(caught.value)


@both
def test_rate_limits_carry_retry_after(kind: str) -> None:
    answer = httpx.Response(429, headers={"Retry-After": "3"}, text="slow down")
    with pytest.raises(errors.RateLimited) as caught:
        edit(kind, Recorder(answer), EditRequest(prompt="x", model="flux-2-pro"))
    assert caught.value.retry_after == 3.0


def raising(exc: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("boom", request=request)

    return handler


@both
@pytest.mark.parametrize(
    ("failure", "kind_of_error", "sent"),
    [
        (httpx.ConnectError, errors.TransportError, False),
        (httpx.ConnectTimeout, errors.Timeout, False),
        (httpx.WriteTimeout, errors.Timeout, False),
        (httpx.ReadTimeout, errors.Timeout, True),
        (httpx.RemoteProtocolError, errors.TransportError, True),
    ],
)
def test_transport_failures_say_whether_the_provider_may_have_the_job(
    kind: str,
    failure: type[httpx.TransportError],
    kind_of_error: type[errors.TransportError],
    sent: bool,
) -> None:
    with pytest.raises(kind_of_error) as caught:
        edit(kind, raising(failure), EditRequest(prompt="x", model="flux-2-pro"))
    assert caught.value.sent is sent
    assert isinstance(caught.value.__cause__, failure)


@both
def test_conversions_are_reported_as_warnings(kind: str) -> None:
    recorder = Recorder()
    request = EditRequest(
        prompt="x", model="flux-2-pro", width=1792, height=1024, allow_conversions=True
    )
    result = edit(kind, recorder, request, provider="apiyi")
    assert json.loads(recorder.bodies[0])["aspect_ratio"] == "7:4"
    assert [str(w) for w in result.warnings] == [
        "width/height 1792x1024 sent as aspect_ratio 7:4: apiyi takes only an aspect ratio for flux-2-pro; "
        "it picks the pixel size"
    ]


def cdn(image: bytes, expired: bool = False) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "cdn.example":
            assert "authorization" not in request.headers  # the key never goes to the CDN
            return (
                httpx.Response(403, text="Request has expired")
                if expired
                else httpx.Response(200, content=image)
            )
        return httpx.Response(200, json=OK)

    return handler


@both
def test_result_images_download_at_once_and_stream_to_disk(kind: str, tmp_path: Path) -> None:
    png = image_bytes(40, 30)
    transport = httpx.MockTransport(cdn(png))
    target = tmp_path / "out.png"
    if kind == "sync":
        with httpx.Client(transport=transport) as http:
            result = FluxClient("laozhang", api_key=KEY, http_client=http).edit(
                EditRequest(prompt="x", model="flux-2-pro")
            )
            assert result.images[0].save(target) == target
            assert result.images[0].read() == png
    else:

        async def run() -> None:
            async with httpx.AsyncClient(transport=transport) as http:
                client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
                result = await client.edit(EditRequest(prompt="x", model="flux-2-pro"))
                await result.images[0].save_async(target)
                assert await result.images[0].read_async() == png

        asyncio.run(run())
    assert target.read_bytes() == png
    assert not (tmp_path / "out.png.part").exists()


@both
def test_an_expired_result_url_raises_result_expired_and_leaves_no_file(
    kind: str, tmp_path: Path
) -> None:
    transport = httpx.MockTransport(cdn(b"", expired=True))
    target = tmp_path / "out.png"

    def save_sync() -> None:
        with httpx.Client(transport=transport) as http:
            client = FluxClient("laozhang", api_key=KEY, http_client=http)
            client.edit(EditRequest(prompt="x", model="flux-2-pro")).images[0].save(target)

    async def save_async() -> None:
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient("laozhang", api_key=KEY, http_client=http)
            result = await client.edit(EditRequest(prompt="x", model="flux-2-pro"))
            await result.images[0].save_async(target)

    with pytest.raises(errors.ResultExpired) as caught:
        save_sync() if kind == "sync" else asyncio.run(save_async())
    assert caught.value.status_code == 403
    assert caught.value.location == "cdn.example/results/a.png"
    assert "s3cr3t" not in str(caught.value)
    assert not target.exists()


def test_inline_base64_results_are_written_without_a_download(tmp_path: Path) -> None:
    png = image_bytes(8, 8)
    answer = httpx.Response(200, json={"data": [{"b64_json": base64.b64encode(png).decode()}]})
    result = edit(
        "sync", Recorder(answer), EditRequest(prompt="x", model="flux-2-pro"), provider="aimlapi"
    )
    assert result.images[0].save(tmp_path / "a.png").read_bytes() == png
    assert "base64 characters" in repr(result.images[0])


def test_result_repr_hides_url_signatures() -> None:
    result = edit("sync", Recorder(), EditRequest(prompt="x", model="flux-2-pro"))
    assert "s3cr3t" not in repr(result)
    assert "https://cdn.example/results/a.png?…" in repr(result)


def test_key_and_base_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIYI_API_KEY", KEY)
    monkeypatch.setenv("APIYI_BASE_URL", "http://127.0.0.1:9/apiyi/v1/")
    recorder = Recorder()
    with httpx.Client(transport=httpx.MockTransport(recorder)) as http:
        client = FluxClient("apiyi", http_client=http)
        client.edit(EditRequest(prompt="x", model="flux-2-pro"))
    assert str(recorder.requests[0].url) == "http://127.0.0.1:9/apiyi/v1/images/generations"
    assert recorder.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(client)


def test_missing_key_and_unknown_provider_are_configuration_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AIMLAPI_API_KEY", raising=False)
    with pytest.raises(errors.ConfigurationError, match="AIMLAPI_API_KEY"):
        FluxClient("aimlapi")
    with pytest.raises(errors.ConfigurationError, match="unknown provider 'mars'"):
        FluxClient("mars", api_key=KEY)  # type: ignore[arg-type]
    with pytest.raises(errors.ConfigurationError, match="did you mean 'laozhang'"):
        FluxClient("laozang", api_key=KEY)  # type: ignore[arg-type]


def test_generation_timeouts_are_applied_and_callers_client_is_left_open() -> None:
    recorder = Recorder()
    with httpx.Client(transport=httpx.MockTransport(recorder)) as http:
        client = FluxClient("laozhang", api_key=KEY, http_client=http)
        client.edit(EditRequest(prompt="x", model="flux-2-pro"))
        client.close()
        assert not http.is_closed
    timeout = recorder.requests[0].extensions["timeout"]
    assert timeout["read"] == 300.0
    assert timeout["connect"] == 10.0


def test_credentials_only_go_to_the_providers_own_origin() -> None:
    recorder = Recorder()
    with httpx.Client(transport=httpx.MockTransport(recorder)) as http:
        FluxClient(
            "laozhang", api_key=KEY, http_client=http, base_url="https://proxy.example"
        ).edit(EditRequest(prompt="x", model="flux-2-pro"))
    assert recorder.requests[0].url.host == "proxy.example"
    assert recorder.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_parsed_urls_are_the_same_urls_and_stay_few() -> None:
    """A client parses each URL it sends to once; one that polls job after job, each at a URL
    of its own, keeps no more than `ParsedUrls.MOST` of them (a URL may also carry a key)."""
    from flux_adapters._transport import ParsedUrls

    urls = ParsedUrls()
    endpoint = "https://api.laozhang.ai/v1/images/generations?key=k&q=a%20b"
    assert urls(endpoint) == httpx.URL(endpoint)
    assert urls(endpoint) is urls(endpoint)
    for n in range(3 * ParsedUrls.MOST):
        polling = f"https://api.us1.bfl.ai/v1/get_result?id={n}"
        assert urls(polling) == httpx.URL(polling)
    assert len(urls._urls) <= ParsedUrls.MOST
    with pytest.raises(httpx.InvalidURL):
        urls("https://[::1")
