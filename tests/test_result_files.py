"""What a result image is (`format`, `media_type`), saving it under an honest name, and a result
as JSON data (`EditResult.to_dict`, ``attrs.asdict``).

A hostile provider may declare one format and serve another, label garbage ``image/png`` or
answer with bytes of no format: the bytes decide, and any failure is a `FluxError`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux_adapters import AsyncFluxClient, EditRequest, EditResult, FluxClient, errors
from flux_adapters._files import extension_format, image_format
from flux_adapters.jobs import Job
from flux_adapters.result import Attempt, ConversionWarning, ResultImage, Usage
from tests.conftest import image_bytes
from tests.test_jobs import FAST, FakeBfl

KEY = "sk-test-0123456789abcdef"
PNG = image_bytes(16, 12)
JPEG = image_bytes(16, 12, "JPEG")
WEBP = image_bytes(16, 12, "WEBP")
CDN = "https://cdn.example/results/a?signature=s3cr3t"
both = pytest.mark.parametrize("kind", ["sync", "async"])


def inline(data: bytes) -> ResultImage:
    return ResultImage(b64_json=base64.b64encode(data).decode())


def served(
    body: bytes,
    *,
    output_format: str | None = None,
    content_type: str = "image/png",
    kind: str = "sync",
    then: Any = None,
) -> Any:
    """Edit at laozhang (on MockTransport) whose result URL serves *body*; run *then(result)*."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "cdn.example":
            return httpx.Response(200, content=body, headers={"content-type": content_type})
        return httpx.Response(200, json={"created": 1, "data": [{"url": CDN}]})

    request = EditRequest(prompt="x", model="flux-2-pro", output_format=output_format)  # type: ignore[arg-type]
    transport = httpx.MockTransport(handler)
    if kind == "sync":
        with httpx.Client(transport=transport) as http:
            result = FluxClient("laozhang", api_key=KEY, http_client=http).edit(request)
            return then(result)

    async def main() -> Any:
        async with httpx.AsyncClient(transport=transport) as http:
            result = await AsyncFluxClient("laozhang", api_key=KEY, http_client=http).edit(request)
            return await then(result)

    return asyncio.run(main())


# --- format and media type -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fmt", "media"),
    [(PNG, "png", "image/png"), (JPEG, "jpeg", "image/jpeg"), (WEBP, "webp", "image/webp")],
)
def test_inline_images_know_their_format_from_the_bytes(data: bytes, fmt: str, media: str) -> None:
    image = inline(data)
    assert (image.format, image.media_type, image.byte_size) == (fmt, media, len(data))


def test_a_url_image_is_what_was_declared_until_its_bytes_are_known() -> None:
    def then(result: EditResult) -> tuple[object, ...]:
        image = result.images[0]
        before = (image.declared_format, image.format, image.media_type, image.byte_size)
        data = image.read()
        return before, (image.format, image.media_type, image.byte_size, data)

    before, after = served(JPEG, output_format="png", content_type="image/png", then=then)
    assert before == ("png", "png", "image/png", None)  # what the request asked for
    assert after == ("jpeg", "image/jpeg", len(JPEG), JPEG)  # the provider lied; the bytes tell


def test_nothing_declared_means_unknown_until_read() -> None:
    image = ResultImage(url=CDN)
    assert (image.format, image.media_type, image.byte_size) == (None, None, None)


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ("image/jpeg", "jpeg"),
        ("image/PNG; charset=binary", "png"),
        ("JPG", "jpeg"),
        ("webp", "webp"),
        ("image/gif", None),
        ("text/html", None),
        (42, None),
        ("", None),
    ],
)
def test_a_declared_format_is_read_leniently_and_only_as_a_format_we_return(
    declared: object, expected: str | None
) -> None:
    image = ResultImage(url=CDN, declared_format=declared)  # type: ignore[arg-type]
    assert image.declared_format == expected


def test_fal_declares_its_images_content_type() -> None:
    from flux_adapters.providers.fal import FalAdapter
    from flux_adapters.wire import HttpResponse

    body = {"images": [{"url": "https://v3.fal.media/a.jpg", "content_type": "image/jpeg"}]}
    job = Job(provider="fal", model="flux-2-pro", id="r-1", poll_url="https://queue.fal.run/s")
    answer = FalAdapter().parse_fetch(
        HttpResponse(status_code=200, headers={}, content=json.dumps(body).encode()), job
    )
    assert answer.images[0].declared_format == "jpeg"
    assert answer.images[0].format == "jpeg"  # until its bytes say otherwise


def test_garbage_labelled_as_an_image_is_a_typed_error() -> None:
    with pytest.raises(errors.ResponseFormatError, match="not an image"):
        served(b"\x00garbage bytes, no format at all", then=lambda result: result.images[0].read())


def test_a_gif_served_for_a_result_is_named_and_refused() -> None:
    gif = image_bytes(8, 8, "GIF")
    with pytest.raises(errors.ResponseFormatError, match="is a GIF image, not png, jpeg or webp"):
        served(gif, content_type="image/png", then=lambda result: result.images[0].read())


UNUSABLE: list[dict[str, Any]] = [
    {"b64_json": "!!!!"},  # not base64
    {"b64_json": ""},  # nothing
    {"b64_json": base64.b64encode(b"<html>sorry</html>").decode()},  # not an image
    {"b64_json": base64.b64encode(PNG[:20]).decode()},  # cut short
    {"b64_json": 123},  # not text
    {"url": 123},
    {"url": ""},
    {},  # neither a URL nor data
]


@pytest.mark.parametrize("fields", UNUSABLE, ids=repr)
def test_a_result_image_with_unusable_data_cannot_be_made(fields: dict[str, Any]) -> None:
    # Built by hand, it read as b"" and saved an empty scene.png, or raised TypeError.
    with pytest.raises(errors.ConfigurationError, match=r"^ResultImage: "):
        ResultImage(**fields)


@pytest.mark.parametrize("fields", UNUSABLE, ids=repr)
def test_an_outside_adapters_unusable_inline_image_is_a_typed_error_not_a_file(
    fields: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The built-in adapters check inline data when they read an answer; an adapter from another
    # package may not, and its garbage was saved as scene.png without a word.
    from flux_adapters.providers import _REGISTRY, Answer, register_provider
    from flux_adapters.providers.laozhang import LaozhangAdapter

    monkeypatch.setattr(_REGISTRY, "_targets", dict(_REGISTRY._targets))
    monkeypatch.setattr(_REGISTRY, "_loaded", dict(_REGISTRY._loaded))
    monkeypatch.setattr(_REGISTRY, "_scanned", _REGISTRY._scanned)  # a scan fills the copy

    class Careless(LaozhangAdapter):
        name = "careless"

        def parse_response(self, response: Any) -> Answer:
            return Answer(images=(ResultImage(**fields),))

    careless = register_provider("careless", Careless())

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"created": 1, "data": [{"b64_json": "x"}]})

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = FluxClient(careless, api_key=KEY, http_client=http)
        with pytest.raises(errors.ResponseFormatError) as caught:
            client.edit(EditRequest(prompt="p", model="flux-2-pro"))
    assert caught.value.status_code == 200
    assert caught.value.provider == "careless"
    assert list(tmp_path.iterdir()) == []


# --- save: the name must not lie ---------------------------------------------------------------


def test_saving_a_jpeg_as_png_is_refused_naming_both_and_nothing_is_written(tmp_path: Path) -> None:
    target = tmp_path / "scene.png"
    with pytest.raises(errors.ExtensionMismatch) as caught:
        inline(JPEG).save(target)
    error = caught.value
    assert (error.image_format, error.extension_format) == ("jpeg", "png")
    assert error.suggested == str(tmp_path / "scene.jpeg")
    assert str(error) == (
        f"cannot write {target}: the image is JPEG, but the name says PNG; "
        "save it as scene.jpeg (nothing was written)"
    )
    assert isinstance(error, errors.OutputError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [".png", ".PNG"])
def test_a_name_that_is_only_an_extension_is_refused_with_one_that_is_only_the_right_one(
    tmp_path: Path, name: str
) -> None:
    # pathlib sees ".png" as a stem with no suffix: with_suffix made ".png.jpeg" of it, a name
    # still starting with the wrong format's, and hidden; the user asked for a bare extension.
    with pytest.raises(errors.ExtensionMismatch) as caught:
        inline(JPEG).save(tmp_path / name)
    assert caught.value.suggested == str(tmp_path / ".jpeg")
    assert str(caught.value).endswith("save it as .jpeg (nothing was written)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("scene.jpg", JPEG),
        ("scene.JPEG", JPEG),
        ("scene.jfif", JPEG),
        ("scene.png", PNG),
        ("scene.webp", WEBP),
        ("scene", PNG),
        ("scene.bin", JPEG),
        ("scene.out.tmp", WEBP),
    ],
)
def test_a_matching_or_non_image_extension_is_written_as_it_is(
    tmp_path: Path, name: str, data: bytes
) -> None:
    saved = inline(data).save(tmp_path / name)
    assert saved == tmp_path / name
    assert saved.read_bytes() == data


@pytest.mark.parametrize("name", ["scene.gif", "scene.tiff", "scene.heic", "scene.webp"])
def test_an_extension_of_another_image_format_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(errors.ExtensionMismatch):
        inline(PNG).save(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_add_suffix_names_the_file_by_its_bytes(tmp_path: Path) -> None:
    assert inline(JPEG).save(tmp_path / "scene", add_suffix=True) == tmp_path / "scene.jpeg"


@both
def test_a_downloaded_jpeg_saved_as_png_is_refused_and_leaves_nothing(
    kind: str, tmp_path: Path
) -> None:
    target = tmp_path / "scene.png"

    def sync_then(result: EditResult) -> Path:
        return result.images[0].save(target)

    async def async_then(result: EditResult) -> Path:
        return await result.images[0].save_async(target)

    with pytest.raises(errors.ExtensionMismatch) as caught:
        served(
            JPEG,
            output_format="png",  # declared png: the bytes still decide
            kind=kind,
            then=sync_then if kind == "sync" else async_then,
        )
    assert caught.value.suggested == str(tmp_path / "scene.jpeg")
    assert list(tmp_path.iterdir()) == []  # no image, no partial file


@both
def test_a_download_saved_under_a_fitting_name_knows_its_format(kind: str, tmp_path: Path) -> None:
    def sync_then(result: EditResult) -> tuple[Path, str | None, int | None]:
        image = result.images[0]
        return image.save(tmp_path / "scene.jpg"), image.format, image.byte_size

    async def async_then(result: EditResult) -> tuple[Path, str | None, int | None]:
        image = result.images[0]
        return await image.save_async(tmp_path / "scene.jpg"), image.format, image.byte_size

    saved, fmt, size = served(JPEG, kind=kind, then=sync_then if kind == "sync" else async_then)
    assert (saved.read_bytes(), fmt, size) == (JPEG, "jpeg", len(JPEG))


class MislabellingDownloader:
    """A downloader of another make that writes whatever name it was given."""

    def read(self, url: str) -> bytes:
        return JPEG

    def save(self, url: str, path: Path, *, add_suffix: bool = False) -> Path:
        path.write_bytes(JPEG)
        return path

    async def read_async(self, url: str) -> bytes:
        return JPEG

    async def save_async(self, url: str, path: Path, *, add_suffix: bool = False) -> Path:
        return self.save(url, path)


def test_a_downloader_of_another_make_is_held_to_the_same_rule(tmp_path: Path) -> None:
    image = ResultImage(url=CDN, downloader=MislabellingDownloader())
    with pytest.raises(errors.ExtensionMismatch):
        image.save(tmp_path / "scene.png")
    assert list(tmp_path.iterdir()) == []
    assert image.save(tmp_path / "scene.jpg").read_bytes() == JPEG


# --- a result as JSON data ---------------------------------------------------------------------


def full_result() -> EditResult:
    failed = errors.RateLimited("slow down", provider="apiyi", status_code=429, retry_after=2.0)
    errors.attach_response(failed, {"x-request-id": "r-1"}, "r-1")
    return EditResult(
        provider="laozhang",
        model="flux-2-pro",
        images=(
            inline(PNG),
            ResultImage(url=CDN, declared_format="jpeg", downloader=MislabellingDownloader()),
        ),
        usage=Usage(credits_used=math.nan, tokens_used=3, input_mp=1.0),
        cost_usd=0.03,
        cost_source="price table",
        warnings=(ConversionWarning(field="size", requested="1x1", sent="64x64", message="m"),),
        attempts=(
            Attempt(
                provider="apiyi",
                model="flux-2-pro",
                outcome="failed",
                elapsed_s=0.2,
                error=failed,
                billing="rate-limited",
            ),
            Attempt(provider="laozhang", model="flux-2-pro", outcome="ok", elapsed_s=math.inf),
        ),
        elapsed_s=1.5,
        request_id="req-9",
    )


def test_to_dict_round_trips_through_json() -> None:
    data = full_result().to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["request_id"] == "req-9"
    assert data["images"] == [
        {
            "url": None,
            "inline": True,
            "format": "png",
            "media_type": "image/png",
            "byte_size": len(PNG),
        },
        {
            "url": CDN,
            "inline": False,
            "format": "jpeg",
            "media_type": "image/jpeg",
            "byte_size": None,
        },
    ]
    assert data["usage"] == {
        "credits_used": None,
        "tokens_used": 3,
        "input_mp": 1.0,
        "output_mp": None,
    }
    attempts = data["attempts"]
    assert isinstance(attempts, list)
    first, second = attempts
    assert first["error"] == {
        "type": "RateLimited",
        "message": "apiyi: slow down (HTTP 429, request id r-1)",
        "status_code": 429,
        "request_id": "r-1",
    }
    assert second["elapsed_s"] is None  # infinity: JSON cannot hold it
    assert data["warnings"] == [
        {"field": "size", "requested": "1x1", "sent": "64x64", "message": "m"}
    ]


def test_to_dict_leaves_inline_data_out_unless_asked() -> None:
    result = full_result()
    assert "b64_json" not in result.images[0].to_dict()
    with_data = result.to_dict(include_data=True)
    assert with_data["images"][0]["b64_json"] == base64.b64encode(PNG).decode()  # type: ignore[index]


def test_a_jobs_result_dict_gives_back_the_job() -> None:
    from tests.test_jobs import T2I, run

    result = run("sync", FakeBfl(), T2I, polling=FAST)
    data = json.loads(json.dumps(result.to_dict()))
    assert Job.from_dict(data["job"]) == result.job
    assert data["request_id"] == "job-1"


def test_asdict_of_a_result_with_a_downloader_is_json() -> None:
    def then(result: EditResult) -> str:
        assert result.images[0]._fetcher() is not None
        return json.dumps(attrs.asdict(result))

    data = json.loads(served(PNG, then=then))
    assert data["images"] == [{"url": CDN, "b64_json": None, "declared_format": None}]
    assert "downloader" not in json.dumps(data)


def test_a_result_pickles_without_its_downloader_and_still_works() -> None:
    result = full_result()
    clone = pickle.loads(pickle.dumps(result))
    assert clone.images == result.images
    assert clone.images[0].read() == PNG
    assert clone.attempts[0].error.request_id == "r-1"
    assert repr(clone.images[1]) == repr(result.images[1])
    assert "s3cr3t" not in repr(result)


# Names without a separator: each stays in its temporary folder (never "/etc/..." as root).
NAMES = st.text(st.characters(blacklist_characters="/\\"), max_size=30)


@given(NAMES, st.sampled_from([PNG, JPEG, WEBP]))
def test_saving_under_any_name_writes_a_true_name_or_raises_a_flux_error(
    name: str, data: bytes
) -> None:
    image = ResultImage(b64_json=base64.b64encode(data).decode())
    with tempfile.TemporaryDirectory() as folder:
        try:
            saved = image.save(Path(folder) / name)
        except errors.ExtensionMismatch as mismatch:
            assert mismatch.image_format == image_format(data)  # noqa: PT017
            suggested = Path(mismatch.suggested)
            assert extension_format(suggested) == image_format(data)
            assert suggested.parent == Path(folder)
            assert list(Path(folder).iterdir()) == []
        except errors.OutputError:
            pass  # "", ".", a NUL, a name the file system refuses
        else:
            named = extension_format(saved)
            assert named in (None, image_format(data))
            assert saved.read_bytes() == data


@given(
    st.one_of(
        st.text(min_size=1, max_size=300),
        st.text(alphabet=st.characters(max_codepoint=127), min_size=1, max_size=300),
        st.text(alphabet="é漢\U0001f600a", min_size=50, max_size=100),
        st.sampled_from(["a" * 240, "a" * 241, "é" * 120, "é" * 121, "x\udce9" * 10]),
    )
)
def test_a_temporary_files_stem_is_the_name_cut_to_its_bytes(name: str) -> None:
    """`partial_stem` keeps a short ASCII name without encoding it: the same stem as the cut of
    the name's bytes (the general way), for every name."""
    from flux_adapters._files import _STEM_BYTES, partial_stem

    cut = os.fsdecode(os.fsencode(name)[:_STEM_BYTES])
    assert partial_stem(name) == cut
    assert len(os.fsencode(partial_stem(name))) <= _STEM_BYTES
