"""The emulator's job providers, BFL and fal, driven with plain httpx: submit, poll until done,
fetch, cancel; what each refuses; every job outcome and exchange fault; what each bills."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from flux_adapters.emulator import Billed, Emulator, Fault, run_emulator
from tests.conftest import image_bytes

HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
"""The module's own requests to the emulator: `httpx.get()` builds a client, certificates
and all, for every call (about 25 ms of CPU). Each request still has a connection of its own,
closed with its answer, as with `httpx.get()`: none is left open when the tests end."""

BFL_KEY = {"x-key": "any-key"}
FAL_KEY = {"Authorization": "Key any-key"}


@pytest.fixture(scope="module")
def running() -> Iterator[Emulator]:
    with run_emulator(bad_keys={"revoked-key"}) as emulator:
        yield emulator


@pytest.fixture
def emulator(running: Emulator) -> Iterator[Emulator]:
    yield running
    running.clear_faults()


def raw_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{raw_b64(data)}"


def decoded(url: str) -> Image.Image:
    """The image at *url* (a signed URL or a data URI), fully read."""
    if url.startswith("data:"):
        content = base64.b64decode(url.partition(",")[2])
    else:
        answer = HTTP.get(url, timeout=10)
        assert answer.status_code == 200, answer.text
        content = answer.content
    image = Image.open(io.BytesIO(content))
    image.load()
    return image


def colours(image: Image.Image) -> int:
    return len(image.convert("RGB").getcolors(1 << 24) or [])


def billed(emulator: Emulator, job_id: str) -> list[Billed]:
    return [entry for entry in emulator.billed() if entry.job_id == job_id]


# --- BFL ------------------------------------------------------------------------------------


def bfl_submit(
    emulator: Emulator,
    model: str = "flux-2-pro",
    *,
    headers: dict[str, str] | None = None,
    body: dict[str, object] | None = None,
    **fields: object,
) -> httpx.Response:
    body = {"prompt": "a robot in a garden"} | (body or {}) | fields
    return HTTP.post(
        f"{emulator.base_url('bfl')}/v1/{model}",
        json=body,
        headers=BFL_KEY if headers is None else headers,
        timeout=30,
    )


def bfl_poll(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return HTTP.get(url, headers=BFL_KEY if headers is None else headers, timeout=10)


def bfl_until_done(url: str, limit: int = 20) -> list[dict[str, object]]:
    """Every poll's answer, up to and including the first that is not Pending."""
    seen: list[dict[str, object]] = []
    for _ in range(limit):
        answer = bfl_poll(url)
        assert answer.status_code == 200, answer.text
        seen.append(answer.json())
        if seen[-1]["status"] != "Pending":
            return seen
    raise AssertionError(f"still pending after {limit} polls")


def sample(poll: dict[str, object]) -> str:
    result = poll["result"]
    assert isinstance(result, dict)
    url = result["sample"]
    assert isinstance(url, str)
    return url


def test_bfl_text_to_image_end_to_end(emulator: Emulator) -> None:
    before = len(emulator.calls("bfl", "poll"))
    submitted = bfl_submit(emulator, width=512, height=384, output_format="png", seed=7)
    assert submitted.status_code == 200, submitted.text
    answer = submitted.json()
    job_id = answer["id"]
    assert answer["polling_url"] == f"{emulator.url}/bfl/v1/get_result?id={job_id}"
    # 512x384 is under a megapixel: the first megapixel of flux-2-pro, 3 cents.
    assert (answer["cost"], answer["input_mp"], answer["output_mp"]) == (3.0, 0.0, 1.0)
    polls = bfl_until_done(answer["polling_url"])
    assert [poll["status"] for poll in polls] == ["Pending", "Pending", "Ready"]
    assert all(0 <= poll["progress"] < 1 for poll in polls[:-1])  # type: ignore[operator]
    result = polls[-1]["result"]
    assert isinstance(result, dict)
    assert (result["seed"], result["prompt"]) == (7, "a robot in a garden")
    with decoded(sample(polls[-1])) as image:
        assert (image.format, image.size) == ("PNG", (512, 384))
    assert len(emulator.calls("bfl", "poll")) - before == 3
    [entry] = billed(emulator, job_id)
    assert (entry.provider, entry.model, entry.seed) == ("bfl", "flux-2-pro", 7)


def test_bfl_three_reference_edit_end_to_end(emulator: Emulator) -> None:
    submitted = bfl_submit(
        emulator,
        input_image=raw_b64(image_bytes(320, 240, color="red")),
        input_image_2="https://example.com/scene.png",
        input_image_3=raw_b64(image_bytes(64, 64, "JPEG", color="blue")),
    )
    assert submitted.status_code == 200, submitted.text
    answer = submitted.json()
    # "(firstMP + (outputMP-1)*mpPrice) + (inputMP*mpPrice)": 3 + 0 + 3 x 1.5 cents.
    assert (answer["cost"], answer["input_mp"], answer["output_mp"]) == (7.5, 3.0, 1.0)
    polls = bfl_until_done(answer["polling_url"])
    assert [poll["status"] for poll in polls] == ["Pending", "Pending", "Ready"]
    # No size asked: the model picks the first image's, in BFL's default format.
    with decoded(sample(polls[-1])) as image:
        assert (image.format, image.size) == ("JPEG", (320, 240))
        assert colours(image) > 100  # a picture, not a blank


def test_bfl_kontext_takes_an_aspect_ratio_and_is_priced_per_image(emulator: Emulator) -> None:
    submitted = bfl_submit(emulator, "flux-kontext-pro", aspect_ratio="16:9", output_format="png")
    assert submitted.status_code == 200, submitted.text
    assert submitted.json()["cost"] == 4.0
    polls = bfl_until_done(submitted.json()["polling_url"])
    with decoded(sample(polls[-1])) as image:
        assert image.size == (1360, 768)  # about one megapixel at 16:9


def test_bfl_accepts_every_documented_field(emulator: Emulator) -> None:
    flex = bfl_submit(
        emulator,
        "flux-2-flex",
        width=256,
        height=256,
        seed=1,
        safety_tolerance=5,
        output_format="webp",
        prompt_upsampling=True,
        steps=20,
        guidance=4.5,
        webhook_url="https://example.com/hook",
        webhook_secret="s3cret",
    )
    assert flex.status_code == 200, flex.text
    polls = bfl_until_done(flex.json()["polling_url"])
    with decoded(sample(polls[-1])) as image:
        assert (image.format, image.size) == ("WEBP", (256, 256))


def test_bfl_reads_the_key_from_x_key(emulator: Emulator) -> None:
    prompt = "jobs: refused keys"
    missing = bfl_submit(emulator, headers={}, prompt=prompt)
    assert missing.status_code == 401
    assert isinstance(missing.json()["detail"], str)
    bearer = bfl_submit(emulator, headers={"Authorization": "Bearer any-key"}, prompt=prompt)
    assert bearer.status_code == 401
    revoked = bfl_submit(emulator, headers={"x-key": "revoked-key"}, prompt=prompt)
    assert revoked.status_code == 403
    assert revoked.json() == {"detail": "Invalid API key"}
    assert [entry for entry in emulator.billed() if entry.prompt == prompt] == []


def test_bfl_polls_need_the_key_too_and_a_refused_poll_does_not_count(
    emulator: Emulator,
) -> None:
    url = bfl_submit(emulator, width=64, height=64).json()["polling_url"]
    assert bfl_poll(url, headers={}).status_code == 401
    assert bfl_poll(url, headers={"x-key": "revoked-key"}).status_code == 403
    assert [poll["status"] for poll in bfl_until_done(url)] == ["Pending", "Pending", "Ready"]


def test_bfl_unknown_ids_are_task_not_found_with_200(emulator: Emulator) -> None:
    answer = bfl_poll(f"{emulator.base_url('bfl')}/v1/get_result?id=no-such-task")
    assert answer.status_code == 200
    assert answer.json()["status"] == "Task not found"
    assert answer.json()["id"] == "no-such-task"
    missing_id = bfl_poll(f"{emulator.base_url('bfl')}/v1/get_result")
    assert missing_id.status_code == 422


EIGHT = {"input_image": "https://a.example/1.png"} | {
    f"input_image_{n}": f"https://a.example/{n}.png" for n in range(2, 9)
}
BFL_REFUSED = [
    ("flux-2-pro", {"style": "vivid"}, ["body", "style"], "extra_forbidden"),
    ("flux-2-pro", {"prompt": 5}, ["body", "prompt"], "string_type"),
    ("flux-2-pro", {"width": 1000, "height": 1024}, ["body", "width"], "value_error"),
    ("flux-2-pro", {"width": 1024}, ["body", "height"], "value_error"),
    ("flux-2-pro", {"width": 2048, "height": 2560}, ["body", "width"], "value_error"),
    ("flux-2-pro", {"width": 48, "height": 64}, ["body", "width"], "value_error"),
    ("flux-2-pro", {"input_image": data_uri(image_bytes())}, ["body", "input_image"], "value_error"),
    ("flux-2-pro", {"input_image": "@@not base64@@"}, ["body", "input_image"], "value_error"),
    ("flux-2-pro", {"input_image_2": "https://a.example/2.png"}, ["body", "input_image_2"], "value_error"),
    ("flux-2-pro", {"steps": 20}, ["body", "steps"], "extra_forbidden"),
    ("flux-2-pro", {"aspect_ratio": "16:9"}, ["body", "aspect_ratio"], "extra_forbidden"),
    ("flux-2-pro", {"safety_tolerance": 6}, ["body", "safety_tolerance"], "less_than_equal"),
    ("flux-2-pro", {"seed": "42"}, ["body", "seed"], "int_type"),
    ("flux-2-pro", {"output_format": "gif"}, ["body", "output_format"], "literal_error"),
    ("flux-2-pro", EIGHT | {"input_image_9": "https://a.example/9.png"}, ["body", "input_image_9"], "extra_forbidden"),
    ("flux-2-klein-4b", dict(list(EIGHT.items())[:5]), ["body", "input_image_5"], "value_error"),
    ("flux-2-klein-9b", {"prompt_upsampling": True}, ["body", "prompt_upsampling"], "extra_forbidden"),
    ("flux-2-flex", {"guidance": 11}, ["body", "guidance"], "value_error"),
    ("flux-2-flex", {"steps": 51}, ["body", "steps"], "less_than_equal"),
    ("flux-kontext-pro", {"width": 1024, "height": 1024}, ["body", "width"], "extra_forbidden"),
    ("flux-kontext-max", {"aspect_ratio": "4:1"}, ["body", "aspect_ratio"], "value_error"),
    ("flux-kontext-max", {"input_image": "https://a.example/1.png", "input_image_2": "https://a.example/2.png"}, ["body", "input_image_2"], "value_error"),
    ("flux-2-pro", {"webhook_url": "ftp://example.com/hook"}, ["body", "webhook_url"], "value_error"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "extra", "loc", "kind"), BFL_REFUSED, ids=[str(v[1])[:40] for v in BFL_REFUSED]
)
def test_bfl_refuses_what_its_api_refuses_with_a_422(
    model: str, extra: dict[str, object], loc: list[str], kind: str, emulator: Emulator
) -> None:
    prompt = f"refused: {extra}"
    answer = bfl_submit(emulator, model, body={"prompt": prompt} | extra)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert {"loc": loc, "type": kind} in [{"loc": d["loc"], "type": d["type"]} for d in detail]
    assert all(isinstance(entry["msg"], str) for entry in detail)
    assert [entry for entry in emulator.billed() if entry.prompt == prompt] == []


def test_bfl_tells_a_data_url_from_the_base64_it_wants(emulator: Emulator) -> None:
    answer = bfl_submit(emulator, input_image=data_uri(image_bytes()))
    assert "without a data: prefix" in answer.json()["detail"][0]["msg"]
    assert bfl_submit(emulator, input_image=raw_b64(image_bytes())).status_code == 200


def test_bfl_unknown_models_and_broken_bodies(emulator: Emulator) -> None:
    assert bfl_submit(emulator, "flux-9").status_code == 404
    broken = HTTP.post(
        f"{emulator.base_url('bfl')}/v1/flux-2-pro",
        content=b"{not json",
        headers=BFL_KEY | {"content-type": "application/json"},
    )
    assert broken.status_code == 422
    assert broken.json()["detail"][0]["type"] == "json_invalid"


# --- fal ------------------------------------------------------------------------------------


def fal_submit(
    emulator: Emulator,
    app: str = "fal-ai/flux-2-pro",
    *,
    headers: dict[str, str] | None = None,
    body: dict[str, object] | None = None,
    **fields: object,
) -> httpx.Response:
    body = {"prompt": "a robot in a garden"} | (body or {}) | fields
    return HTTP.post(
        f"{emulator.base_url('fal')}/{app}",
        json=body,
        headers=FAL_KEY if headers is None else headers,
        timeout=30,
    )


def fal_get(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return HTTP.get(url, headers=FAL_KEY if headers is None else headers, timeout=10)


def fal_cancel(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return HTTP.put(url, headers=FAL_KEY if headers is None else headers, timeout=10)


def fal_until_done(status_url: str, limit: int = 20) -> list[dict[str, object]]:
    seen: list[dict[str, object]] = []
    for _ in range(limit):
        answer = fal_get(status_url)
        assert answer.status_code == 200, answer.text
        seen.append(answer.json())
        if seen[-1]["status"] == "COMPLETED":
            return seen
    raise AssertionError(f"not completed after {limit} polls")


def accepted(answer: httpx.Response) -> dict[str, str]:
    assert answer.status_code == 200, answer.text
    urls: dict[str, str] = answer.json()
    return urls


def test_fal_text_to_image_end_to_end(emulator: Emulator) -> None:
    answer = fal_submit(
        emulator,
        image_size={"width": 512, "height": 384},
        output_format="png",
        safety_tolerance="5",
        seed=3,
    )
    job = accepted(answer)
    base = f"{emulator.url}/fal/fal-ai/flux-2-pro/requests/{job['request_id']}"
    assert (job["response_url"], job["status_url"], job["cancel_url"]) == (
        base,
        f"{base}/status",
        f"{base}/cancel",
    )
    assert answer.json()["queue_position"] == 0
    statuses = fal_until_done(job["status_url"])
    assert [status["status"] for status in statuses] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert statuses[0]["queue_position"] == 0
    result = fal_get(job["response_url"])
    assert result.status_code == 200
    output = result.json()
    assert output["seed"] == 3
    [picture] = output["images"]
    assert (picture["width"], picture["height"], picture["content_type"]) == (
        512,
        384,
        "image/png",
    )
    with decoded(picture["url"]) as image:
        assert (image.format, image.size) == ("PNG", (512, 384))
    [entry] = billed(emulator, job["request_id"])
    assert (entry.provider, entry.model) == ("fal", "flux-2-pro")


def test_fal_three_reference_edit_end_to_end(emulator: Emulator) -> None:
    job = accepted(
        fal_submit(
            emulator,
            "fal-ai/flux-2-pro/edit",
            image_urls=[
                data_uri(image_bytes(320, 240, color="red")),
                "https://example.com/scene.png",
                data_uri(image_bytes(64, 64, "JPEG", color="blue"), "image/jpeg"),
            ],
        )
    )
    # The request URLs leave the app's sub-path out: the model id is namespace/name.
    assert "/fal/fal-ai/flux-2-pro/requests/" in job["status_url"]
    assert "/edit" not in job["status_url"] + job["response_url"] + job["cancel_url"]
    early = fal_get(job["response_url"])
    assert early.status_code == 400
    assert isinstance(early.json()["detail"], str)
    statuses = fal_until_done(job["status_url"])
    assert [status["status"] for status in statuses] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    [picture] = fal_get(job["response_url"]).json()["images"]
    # image_size "auto" (the edit apps' default): the first image's size; jpeg by default.
    with decoded(picture["url"]) as image:
        assert (image.format, image.size) == ("JPEG", (320, 240))
        assert colours(image) > 100


def test_fal_klein_renders_num_images_in_its_formats(emulator: Emulator) -> None:
    job = accepted(
        fal_submit(
            emulator,
            "fal-ai/flux-2/klein/4b/edit",
            image_urls=["https://example.com/a.png"],
            image_size="square",
            num_images=2,
            output_format="webp",
            num_inference_steps=4,
        )
    )
    assert "/fal/fal-ai/flux-2/requests/" in job["status_url"]
    fal_until_done(job["status_url"])
    output = fal_get(job["response_url"]).json()
    assert output["has_nsfw_concepts"] == [False, False]
    first, second = (decoded(picture["url"]) for picture in output["images"])
    assert (first.format, first.size) == ("WEBP", (512, 512))
    assert first.tobytes() != second.tobytes()


def test_fal_kontext_takes_one_image_url_and_an_aspect_ratio(emulator: Emulator) -> None:
    job = accepted(
        fal_submit(
            emulator,
            "fal-ai/flux-pro/kontext/max",
            image_url="https://example.com/a.png",
            aspect_ratio="16:9",
            safety_tolerance="6",
            guidance_scale=3.5,
        )
    )
    assert "/fal/fal-ai/flux-pro/requests/" in job["status_url"]
    fal_until_done(job["status_url"])
    [picture] = fal_get(job["response_url"]).json()["images"]
    assert (picture["width"], picture["height"]) == (1360, 768)


def test_fal_sync_mode_answers_data_uris(emulator: Emulator) -> None:
    job = accepted(fal_submit(emulator, image_size="square", sync_mode=True))
    fal_until_done(job["status_url"])
    [picture] = fal_get(job["response_url"]).json()["images"]
    assert picture["url"].startswith("data:image/jpeg;base64,")
    with decoded(picture["url"]) as image:
        assert image.size == (512, 512)


def test_fal_reads_the_key_from_authorization_key(emulator: Emulator) -> None:
    for headers, status in [
        ({}, 401),
        ({"Authorization": "Bearer any-key"}, 401),
        ({"Authorization": "Key"}, 401),
        ({"Authorization": "Key revoked-key"}, 401),
    ]:
        answer = fal_submit(emulator, headers=headers)
        assert answer.status_code == status, headers
        assert isinstance(answer.json()["detail"], str)
    job = accepted(fal_submit(emulator, image_size="square"))
    for url in (job["status_url"], job["response_url"]):
        assert fal_get(url, headers={}).status_code == 401
        assert fal_get(url, headers={"Authorization": "Bearer any-key"}).status_code == 401
    assert fal_cancel(job["cancel_url"], headers={}).status_code == 401
    # The refused exchanges did nothing: the job is still where it was.
    statuses = fal_until_done(job["status_url"])
    assert [status["status"] for status in statuses] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]


FAL_REFUSED = [
    ("fal-ai/flux-2-pro", {"safety_tolerance": 2}, ["body", "safety_tolerance"], "literal_error"),
    ("fal-ai/flux-2-pro", {"safety_tolerance": "6"}, ["body", "safety_tolerance"], "literal_error"),
    ("fal-ai/flux-2-pro", {"style": "vivid"}, ["body", "style"], "extra_forbidden"),
    ("fal-ai/flux-2-pro", {"image_urls": ["https://a.example/1.png"]}, ["body", "image_urls"], "extra_forbidden"),
    ("fal-ai/flux-2-pro", {"image_size": "auto"}, ["body", "image_size"], "literal_error"),
    ("fal-ai/flux-2-pro", {"image_size": {"width": 1000, "height": 512}}, ["body", "image_size"], "value_error"),
    ("fal-ai/flux-2-pro", {"image_size": {"width": "512", "height": 512}}, ["body", "image_size", "width"], "int_type"),
    ("fal-ai/flux-2-pro", {"image_size": "huge"}, ["body", "image_size"], "value_error"),
    ("fal-ai/flux-2-pro", {"num_images": 2}, ["body", "num_images"], "extra_forbidden"),
    ("fal-ai/flux-2-pro", {"guidance_scale": 3.5}, ["body", "guidance_scale"], "extra_forbidden"),
    ("fal-ai/flux-2-pro", {"output_format": "webp"}, ["body", "output_format"], "literal_error"),
    ("fal-ai/flux-2-pro", {"enable_safety_checker": "yes"}, ["body", "enable_safety_checker"], "bool_type"),
    ("fal-ai/flux-2-pro", {"seed": -1}, ["body", "seed"], "greater_than_equal"),
    ("fal-ai/flux-2-pro/edit", {}, ["body", "image_urls"], "missing"),
    ("fal-ai/flux-2-pro/edit", {"image_urls": []}, ["body", "image_urls"], "value_error"),
    ("fal-ai/flux-2-pro/edit", {"image_urls": ["https://a.example/x.png"] * 9}, ["body", "image_urls"], "value_error"),
    ("fal-ai/flux-2-pro/edit", {"image_urls": ["ftp://a.example/x.png"]}, ["body", "image_urls", 0], "value_error"),
    ("fal-ai/flux-2-flex/edit", {"image_urls": ["https://a.example/x.png"], "num_inference_steps": 51}, ["body", "num_inference_steps"], "less_than_equal"),
    ("fal-ai/flux-2/klein/9b/edit", {"image_urls": ["https://a.example/x.png"] * 5}, ["body", "image_urls"], "value_error"),
    ("fal-ai/flux-2/klein/9b/edit", {"image_urls": ["https://a.example/x.png"], "safety_tolerance": "2"}, ["body", "safety_tolerance"], "extra_forbidden"),
    ("fal-ai/flux-pro/kontext", {}, ["body", "image_url"], "missing"),
    ("fal-ai/flux-pro/kontext", {"image_url": "https://a.example/x.png", "aspect_ratio": "5:4"}, ["body", "aspect_ratio"], "literal_error"),
    ("fal-ai/flux-pro/kontext", {"image_url": "https://a.example/x.png", "enable_safety_checker": True}, ["body", "enable_safety_checker"], "extra_forbidden"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("app", "extra", "loc", "kind"), FAL_REFUSED, ids=[f"{v[0]} {v[1]}"[:60] for v in FAL_REFUSED]
)
def test_fal_refuses_what_its_types_refuse_with_a_422(
    app: str, extra: dict[str, object], loc: list[object], kind: str, emulator: Emulator
) -> None:
    prompt = f"refused: {app} {extra}"
    answer = fal_submit(emulator, app, body={"prompt": prompt} | extra)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert {"loc": loc, "type": kind} in [{"loc": d["loc"], "type": d["type"]} for d in detail]
    assert [entry for entry in emulator.billed() if entry.prompt == prompt] == []


def test_fal_unknown_apps_and_requests_are_404(emulator: Emulator) -> None:
    assert fal_submit(emulator, "fal-ai/flux-9").status_code == 404
    base = f"{emulator.base_url('fal')}/fal-ai/flux-2-pro/requests/no-such-request"
    assert fal_get(f"{base}/status").status_code == 404
    assert fal_get(base).status_code == 404
    missing = fal_cancel(f"{base}/cancel")
    assert (missing.status_code, missing.json()) == (404, {"status": "NOT_FOUND"})
    # A request is found under its own model only.
    job = accepted(fal_submit(emulator, image_size="square"))
    elsewhere = job["status_url"].replace("fal-ai/flux-2-pro", "fal-ai/flux-2-max")
    assert fal_get(elsewhere).status_code == 404


# --- how jobs end ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "status", "charged"),
    [
        ("request-moderated", "Request Moderated", False),
        ("content-moderated", "Content Moderated", False),
        ("failed", "Error", True),
    ],
)
def test_bfl_outcomes_end_after_the_pending_polls_and_bill_as_bfl_does(
    outcome: str, status: str, charged: bool, emulator: Emulator
) -> None:
    emulator.inject("bfl", Fault(outcome=outcome, first=1))
    answer = bfl_submit(emulator, width=64, height=64)
    assert answer.status_code == 200  # accepted: it ends badly later
    polls = bfl_until_done(answer.json()["polling_url"])
    assert [poll["status"] for poll in polls] == ["Pending", "Pending", status]
    assert polls[-1]["result"] is None
    # "Request Moderated" and "Content Moderated" are "not charged".
    assert len(billed(emulator, answer.json()["id"])) == (1 if charged else 0)


def test_bfl_a_job_that_is_not_found_after_its_pending_polls(emulator: Emulator) -> None:
    emulator.inject("bfl", Fault(outcome="not-found", first=1))
    answer = bfl_submit(emulator, width=64, height=64)
    polls = bfl_until_done(answer.json()["polling_url"])
    assert [poll["status"] for poll in polls] == ["Pending", "Pending", "Task not found"]
    assert len(billed(emulator, answer.json()["id"])) == 1  # accepted, so charged


@pytest.mark.parametrize(
    ("outcome", "status", "kind", "charged"),
    [
        ("failed", 500, "runner_server_error", False),
        ("invalid", 422, "value_error", True),
        ("content-moderated", 422, "content_policy_violation", True),
        ("request-moderated", 422, "content_policy_violation", True),
    ],
)
def test_fal_outcomes_answer_the_result_fetch_and_bill_as_fal_does(
    outcome: str, status: int, kind: str, charged: bool, emulator: Emulator
) -> None:
    emulator.inject("fal", Fault(outcome=outcome, first=1))
    job = accepted(fal_submit(emulator, image_size="square"))
    statuses = fal_until_done(job["status_url"])
    assert [entry["status"] for entry in statuses] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert statuses[-1]["error_type"] == kind
    result = fal_get(job["response_url"])
    assert result.status_code == status
    if status == 500:
        assert result.json()["error_type"] == result.headers["x-fal-error-type"] == kind
    else:
        assert [entry["type"] for entry in result.json()["detail"]] == [kind]
    # "Server errors (HTTP 500+) are never charged ... invalid inputs (HTTP 422) may still be".
    assert len(billed(emulator, job["request_id"])) == (1 if charged else 0)


def test_fal_a_request_that_is_not_found_after_its_pending_polls(emulator: Emulator) -> None:
    emulator.inject("fal", Fault(outcome="not-found", first=1))
    job = accepted(fal_submit(emulator, image_size="square"))
    assert [fal_get(job["status_url"]).status_code for _ in range(3)] == [200, 200, 404]
    assert fal_get(job["response_url"]).status_code == 404
    assert fal_cancel(job["cancel_url"]).json() == {"status": "NOT_FOUND"}


def test_pending_sets_the_polls_before_the_end(emulator: Emulator) -> None:
    emulator.inject("bfl", Fault(pending=5, first=1))
    emulator.inject("bfl", Fault(pending=0, first=1))
    slow = bfl_submit(emulator, width=64, height=64).json()["polling_url"]
    quick = bfl_submit(emulator, width=64, height=64).json()["polling_url"]
    assert [poll["status"] for poll in bfl_until_done(slow)] == ["Pending"] * 5 + ["Ready"]
    assert [poll["status"] for poll in bfl_until_done(quick)] == ["Ready"]


def test_a_huge_pending_never_finishes(emulator: Emulator) -> None:
    emulator.inject("fal", Fault(pending=10**9, first=1))
    job = accepted(fal_submit(emulator, image_size="square"))
    for _ in range(30):
        assert fal_get(job["status_url"]).json()["status"] == "IN_QUEUE"
    assert fal_get(job["response_url"]).status_code == 400


def test_queued_splits_the_pending_polls_between_queue_and_progress(emulator: Emulator) -> None:
    emulator.inject("fal", Fault(pending=3, queued=3, first=1))
    emulator.inject("fal", Fault(pending=2, queued=0, first=1))
    waiting = accepted(fal_submit(emulator, image_size="square"))
    started = accepted(fal_submit(emulator, image_size="square"))
    statuses = fal_until_done(waiting["status_url"])
    assert [(s["status"], s.get("queue_position")) for s in statuses] == [
        ("IN_QUEUE", 2),
        ("IN_QUEUE", 1),
        ("IN_QUEUE", 0),
        ("COMPLETED", None),
    ]
    statuses = fal_until_done(started["status_url"])
    assert [s["status"] for s in statuses] == ["IN_PROGRESS", "IN_PROGRESS", "COMPLETED"]


def test_the_emulator_wide_pending_polls() -> None:
    with run_emulator(pending_polls=0) as emulator:
        answer = bfl_submit(emulator, width=64, height=64)
        assert [poll["status"] for poll in bfl_until_done(answer.json()["polling_url"])] == [
            "Ready"
        ]
    with (
        pytest.raises(ValueError, match="pending_polls must be at least 0"),
        run_emulator(pending_polls=-1),
    ):
        pass


# --- faults on polls, fetches and cancels ---------------------------------------------------


def test_a_poll_fault_with_first_counts_only_polls(emulator: Emulator) -> None:
    emulator.inject("bfl", Fault(status=503, on="poll", first=2))
    answer = bfl_submit(emulator, width=64, height=64)
    assert answer.status_code == 200  # the submit is not a poll
    url = answer.json()["polling_url"]
    failed = [bfl_poll(url) for _ in range(2)]
    assert [poll.status_code for poll in failed] == [503, 503]
    assert isinstance(failed[0].json()["detail"], str)
    # Answered before the work: the failed polls did not move the job on.
    assert [poll["status"] for poll in bfl_until_done(url)] == ["Pending", "Pending", "Ready"]


def test_a_poll_fault_after_the_work_still_moves_the_job_on(emulator: Emulator) -> None:
    emulator.inject("bfl", Fault(status=500, on="poll", after_work=True, first=3))
    url = bfl_submit(emulator, width=64, height=64).json()["polling_url"]
    assert [bfl_poll(url).status_code for _ in range(3)] == [500, 500, 500]
    assert [poll["status"] for poll in bfl_until_done(url)] == ["Ready"]


def test_fal_poll_faults_speak_fals_error_shape(emulator: Emulator) -> None:
    emulator.inject("fal", Fault(status=503, on="poll", first=1))
    job = accepted(fal_submit(emulator, image_size="square"))
    failed = fal_get(job["status_url"])
    assert failed.status_code == 503
    assert failed.json()["error_type"] == failed.headers["x-fal-error-type"]
    assert len(fal_until_done(job["status_url"])) == 3


@pytest.mark.parametrize(
    "fault",
    [Fault(drop=True, on="poll"), Fault(body="malformed", on="poll"), Fault(status=502, on="poll")],
    ids=["drop", "malformed", "502"],
)
def test_polls_can_be_dropped_or_garbled(fault: Fault, emulator: Emulator) -> None:
    emulator.inject("bfl", fault)
    url = bfl_submit(emulator, width=64, height=64).json()["polling_url"]
    if fault.drop:
        with pytest.raises(httpx.RemoteProtocolError):
            bfl_poll(url)
        return
    answer = bfl_poll(url)
    assert answer.status_code == (fault.status or 200)
    with pytest.raises(json.JSONDecodeError):  # no JSON a client could read
        answer.json()


def test_a_delayed_poll(emulator: Emulator) -> None:
    emulator.inject("bfl", Fault(delay=0.3, on="poll", first=1))
    url = bfl_submit(emulator, width=64, height=64).json()["polling_url"]
    started = time.perf_counter()
    assert bfl_poll(url).json()["status"] == "Pending"
    assert time.perf_counter() - started >= 0.3


def test_a_fetch_fault_hits_the_result_only(emulator: Emulator) -> None:
    emulator.inject("fal", Fault(status=503, on="fetch", first=1))
    job = accepted(fal_submit(emulator, image_size="square"))
    fal_until_done(job["status_url"])  # polls are not fetches: no fault here
    assert fal_get(job["response_url"]).status_code == 503
    assert fal_get(job["response_url"]).status_code == 200


def test_a_cancel_fault_after_the_work_took_effect_anyway(emulator: Emulator) -> None:
    emulator.inject("fal", Fault(status=500, on="cancel", after_work=True, first=1))
    job = accepted(fal_submit(emulator, image_size="square"))
    assert fal_cancel(job["cancel_url"]).status_code == 500
    status = fal_get(job["status_url"]).json()
    assert (status["status"], status["error_type"]) == ("COMPLETED", "client_cancelled")
    assert billed(emulator, job["request_id"]) == []  # it was still in the queue
    assert fal_cancel(job["cancel_url"]).json() == {"status": "ALREADY_COMPLETED"}


def test_a_cancel_fault_before_the_work_leaves_the_request_running(emulator: Emulator) -> None:
    emulator.inject("fal", Fault(status=503, on="cancel", first=1))
    job = accepted(fal_submit(emulator, image_size="square"))
    assert fal_cancel(job["cancel_url"]).status_code == 503
    assert fal_until_done(job["status_url"])[-1].get("error") is None
    assert len(billed(emulator, job["request_id"])) == 1


# --- submits that fail ----------------------------------------------------------------------


def test_a_submit_fault_before_the_work_bills_nothing(emulator: Emulator) -> None:
    emulator.inject("bfl", Fault(status=429, retry_after=2, first=1))
    answer = bfl_submit(emulator, prompt="jobs: 429 before work")
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "2"
    assert answer.json() == {"detail": "Rate limit reached for requests; retry later"}
    assert [entry for entry in emulator.billed() if entry.prompt == "jobs: 429 before work"] == []


@pytest.mark.parametrize("provider", ["bfl", "fal"])
def test_a_submit_accepted_and_billed_then_answered_with_a_failure(
    provider: str, emulator: Emulator
) -> None:
    prompt = f"jobs: after work at {provider}"
    emulator.inject(provider, Fault(status=502, after_work=True, first=1))
    emulator.inject(provider, Fault(drop=True, after_work=True, first=1))
    submit = bfl_submit if provider == "bfl" else fal_submit
    answer = submit(emulator, prompt=prompt)
    assert answer.status_code == 502
    assert "<h1>502 Bad Gateway</h1>" in answer.text
    with pytest.raises(httpx.RemoteProtocolError):
        submit(emulator, prompt=prompt)
    paid = [entry for entry in emulator.billed(provider) if entry.prompt == prompt]
    assert len(paid) == 2
    assert all(entry.job_id for entry in paid)


def test_a_submit_body_over_the_limit_is_a_413() -> None:
    with run_emulator(max_body_bytes=2000) as emulator:
        answer = bfl_submit(emulator, input_image=raw_b64(bytes(4000)))
        assert answer.status_code == 413
        assert "detail" in answer.json()
        assert fal_submit(emulator, prompt="p" * 3000).status_code == 413
        assert emulator.billed() == []


# --- the other host -------------------------------------------------------------------------


def test_bfl_polling_urls_on_another_host_of_the_same_server(emulator: Emulator) -> None:
    emulator.inject("bfl", Fault(other_host=True, first=1))
    port = emulator.url.rsplit(":", 1)[1]
    url = bfl_submit(emulator, width=64, height=64).json()["polling_url"]
    assert url.startswith(f"http://localhost:{port}/bfl/v1/get_result?id=")
    before = len(emulator.calls("bfl", "poll"))
    assert bfl_poll(url, headers={}).status_code == 401  # the key is needed there too
    polls = bfl_until_done(url)
    assert polls[-1]["status"] == "Ready"
    assert sample(polls[-1]).startswith(f"http://localhost:{port}/files/")
    calls = emulator.calls("bfl", "poll")[before:]
    assert {call.host for call in calls} == {f"localhost:{port}"}
    assert [call.keyed for call in calls] == [False, True, True, True]
    # The next job's polling URL is back on the submit's host.
    assert (
        bfl_submit(emulator, width=64, height=64)
        .json()["polling_url"]
        .startswith(f"{emulator.url}/bfl/")
    )


def test_fal_request_urls_on_another_host(emulator: Emulator) -> None:
    emulator.inject("fal", Fault(other_host=True, first=1))
    port = emulator.url.rsplit(":", 1)[1]
    job = accepted(fal_submit(emulator, image_size="square"))
    for name in ("status_url", "response_url", "cancel_url"):
        assert job[name].startswith(f"http://localhost:{port}/fal/fal-ai/flux-2-pro/requests/")
    fal_until_done(job["status_url"])
    assert fal_get(job["response_url"]).status_code == 200


# --- cancel ---------------------------------------------------------------------------------


def test_fal_cancel_in_the_queue_is_free(emulator: Emulator) -> None:
    job = accepted(fal_submit(emulator, image_size="square"))
    assert len(billed(emulator, job["request_id"])) == 1  # charged once accepted ...
    cancelled = fal_cancel(job["cancel_url"])
    assert (cancelled.status_code, cancelled.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert billed(emulator, job["request_id"]) == []  # ... and not once removed from the queue
    status = fal_get(job["status_url"]).json()
    assert (status["status"], status["error_type"]) == ("COMPLETED", "client_cancelled")
    result = fal_get(job["response_url"])
    assert (result.status_code, result.json()["error_type"]) == (499, "client_cancelled")
    again = fal_cancel(job["cancel_url"])
    assert (again.status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})


def test_fal_cancel_in_progress_stops_the_request_but_it_is_charged(emulator: Emulator) -> None:
    job = accepted(fal_submit(emulator, image_size="square"))
    statuses = [fal_get(job["status_url"]).json()["status"] for _ in range(2)]
    assert statuses == ["IN_QUEUE", "IN_PROGRESS"]
    assert fal_cancel(job["cancel_url"]).status_code == 202
    assert fal_get(job["response_url"]).status_code == 499
    assert len(billed(emulator, job["request_id"])) == 1


def test_fal_cancel_after_completion(emulator: Emulator) -> None:
    job = accepted(fal_submit(emulator, image_size="square"))
    fal_until_done(job["status_url"])
    late = fal_cancel(job["cancel_url"])
    assert (late.status_code, late.json()) == (400, {"status": "ALREADY_COMPLETED"})
    assert fal_get(job["response_url"]).status_code == 200
    assert len(billed(emulator, job["request_id"])) == 1


# --- result URLs, calls, the ledger ---------------------------------------------------------


def test_result_urls_expire() -> None:
    with run_emulator(pending_polls=0) as emulator:
        polls = bfl_until_done(bfl_submit(emulator, width=64, height=64).json()["polling_url"])
        job = accepted(fal_submit(emulator, image_size="square"))
        fal_until_done(job["status_url"])
        [picture] = fal_get(job["response_url"]).json()["images"]
        urls = [sample(polls[-1]), picture["url"]]
        assert [HTTP.get(url).status_code for url in urls] == [200, 200]
        emulator.advance_clock(601)  # BFL: "Result URLs expire after 10 minutes"
        for url in urls:
            expired = HTTP.get(url)
            assert expired.status_code == 403
            assert "Request has expired" in expired.text


def test_calls_count_each_kind_of_exchange(emulator: Emulator) -> None:
    before = {kind: len(emulator.calls("fal", kind)) for kind in ("submit", "poll", "fetch", "cancel")}  # fmt: skip
    job = accepted(fal_submit(emulator, image_size="square"))
    fal_until_done(job["status_url"])
    fal_get(job["response_url"])
    fal_cancel(job["cancel_url"])
    after = {kind: len(emulator.calls("fal", kind)) - before[kind] for kind in before}
    assert after == {"submit": 1, "poll": 3, "fetch": 1, "cancel": 1}
    [cancel] = emulator.calls("fal", "cancel")[-1:]
    assert (cancel.method, cancel.path) == ("PUT", job["cancel_url"].removeprefix(emulator.url))


def test_synchronous_providers_keep_their_faults_and_calls_apart(emulator: Emulator) -> None:
    emulator.inject("laozhang", Fault(status=503))
    assert bfl_submit(emulator, width=64, height=64).status_code == 200
    answer = HTTP.post(
        f"{emulator.base_url('laozhang')}/v1/images/generations",
        json={"model": "flux-2-pro", "prompt": "p"},
        headers={"Authorization": "Bearer k"},
    )
    assert answer.status_code == 503
    assert emulator.calls("laozhang")[-1].kind == "submit"
    assert emulator.calls("laozhang")[-1].keyed is True


# --- the fault values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fault"),
    [
        ("503,on=poll,first=1", Fault(status=503, on="poll", first=1)),
        ("content-moderated,pending=3", Fault(outcome="content-moderated", pending=3)),
        ("outcome=failed", Fault(outcome="failed")),
        ("invalid", Fault(outcome="invalid")),
        ("not-found,pending=0", Fault(outcome="not-found", pending=0)),
        ("pending=1000000000,queued=0", Fault(pending=10**9, queued=0)),
        ("other-host", Fault(other_host=True)),
        ("drop,on=cancel,after-work", Fault(drop=True, on="cancel", after_work=True)),
        ("500,after-work,failed", Fault(status=500, after_work=True, outcome="failed")),
    ],
)
def test_job_faults_parse_from_the_command_line_form(spec: str, fault: Fault) -> None:
    assert Fault.parse(spec) == fault


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("on=download", "on 'download' is not one of"),
        ("outcome=exploded", "outcome 'exploded' is not one of"),
        ("pending=2,on=poll", "decided at the job's submit"),
        ("other-host,on=fetch", "decided at the job's submit"),
        ("download=html,on=poll", "decided at the job's submit"),
        ("503,failed", "needs the submit accepted"),
        ("queued=3,pending=2", "queued (3) cannot be more than pending (2)"),
        ("pending=-1", "unknown fault part"),
    ],
)
def test_job_faults_that_cannot_take_effect_are_refused(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        Fault.parse(spec)


@pytest.mark.parametrize(
    ("provider", "fault", "problem"),
    [
        ("laozhang", Fault(on="poll"), "laozhang answers with the image"),
        ("apiyi", Fault(pending=3), "apiyi answers with the image"),
        ("bfl", Fault(moderation=True), "use outcome='request-moderated'"),
        ("fal", Fault(body="b64"), "no inline"),
        ("bfl", Fault(on="cancel"), "bfl has no cancel"),
        ("bfl", Fault(outcome="invalid"), "'invalid' is fal's"),
    ],
)
def test_faults_a_provider_cannot_take_are_refused_when_injected(
    provider: str, fault: Fault, problem: str, emulator: Emulator
) -> None:
    with pytest.raises(ValueError, match=problem):
        emulator.inject(provider, fault)
    with pytest.raises(ValueError, match=problem), run_emulator(faults={provider: [fault]}):
        pass


def test_a_download_fault_makes_a_jobs_image_urls_misbehave(emulator: Emulator) -> None:
    emulator.inject("bfl", Fault(download="html", first=1))
    url = bfl_submit(emulator, width=64, height=64).json()["polling_url"]
    page = HTTP.get(sample(bfl_until_done(url)[-1]))
    assert (page.status_code, page.headers["content-type"].split(";")[0]) == (200, "text/html")


def test_a_dripping_poll_sends_its_body_a_byte_at_a_time(emulator: Emulator) -> None:
    emulator.inject("fal", Fault(drip=0.002, on="poll", first=1))
    job = accepted(fal_submit(emulator, image_size="square"))
    started = time.perf_counter()
    answer = fal_get(job["status_url"])
    # At 2 ms a byte, the ~400-byte status takes most of a second.
    assert time.perf_counter() - started > 0.4
    assert answer.json()["status"] == "IN_QUEUE"


# --- the documents --------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "emulator.md"


def job_fault_section() -> str:
    text = DOCS.read_text()
    return text[text.index("### Faults for jobs") : text.index("### Decided where")]


def test_every_job_fault_row_of_the_documents_is_what_its_spec_parses_to() -> None:
    rows = re.findall(r"^\| `([^`|]+)` \| `([^`|]+)` \|", job_fault_section(), re.MULTILINE)
    checked = 0
    for python, spec in rows:
        if re.search(r"=[A-Z]\b", spec):
            continue  # a placeholder such as pending=N
        assert Fault.parse(spec) == eval(f"Fault({python})", {"Fault": Fault}), spec
        checked += 1
    assert checked >= 15


def test_every_job_fault_example_of_the_documents_matches_its_spec() -> None:
    pairs = re.findall(
        r"# --fault (\w+):(\S+).*\n\s*emulator\.inject\(\"(\w+)\", (Fault\(.*\))\)",
        job_fault_section(),
    )
    assert len(pairs) == 5
    for provider, spec, injected_at, python in pairs:
        fault = eval(python, {"Fault": Fault})
        assert (provider, Fault.parse(spec)) == (injected_at, fault)
        fault.check_for(provider)


@pytest.mark.parametrize(
    ("outcome", "loc"),
    [("request-moderated", ["body", "prompt"]), ("content-moderated", ["body"])],
)
def test_fal_a_moderated_job_names_the_input_only_when_the_input_was_flagged(
    outcome: str, loc: list[str], emulator: Emulator
) -> None:
    # fal: loc is ["body", "<field>"] for an input, ["body"] for a general error; a client tells
    # a flagged prompt from a flagged output by it (https://docs.fal.ai/errors).
    emulator.inject("fal", Fault(outcome=outcome, first=1))
    job = accepted(fal_submit(emulator, image_size="square"))
    fal_until_done(job["status_url"])
    result = fal_get(job["response_url"])
    assert result.status_code == 422
    assert [entry["loc"] for entry in result.json()["detail"]] == [loc]
