"""What the per-edit shortcuts keep: each gives what the full path gives, and falls back to it.

The library remembers what depends only on unchanged inputs (a file's header while the file is
the same, a plan per request shape, the verdict on a result URL's origin) and makes the objects
of every edit without attrs' generic ``__init__``; none of that may change a result or an error.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import flux_adapters.request as request_module
from flux_adapters import EditRequest, get_adapter
from flux_adapters._flows import resolve
from flux_adapters.errors import RequestError, ResponseFormatError
from flux_adapters.providers._images_api import parse_images, url_problem
from flux_adapters.wire import HttpResponse
from tests.conftest import image_bytes

HOUR_AGO = time.time() - 3600


def _settled(path: Path, data: bytes) -> None:
    """Write *data* to *path* and date it an hour back (as an image kept on disk would be)."""
    path.write_bytes(data)
    os.utime(path, (HOUR_AGO, HOUR_AGO))


def test_an_image_file_rewritten_in_place_is_inspected_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Same name, same size, same modification time put back: only the file's change time
    # tells, and the header read for the first request must not answer for the second. (The
    # header of a file changed in the last 2 s is never kept: here, every one is.)
    monkeypatch.setattr(request_module, "_SETTLED_NS", 0)
    path = tmp_path / "ref.png"
    small, large = image_bytes(64, 48), image_bytes(2000, 1500)
    size = max(len(small), len(large))
    _settled(path, small.ljust(size, b"\0"))
    first = EditRequest(prompt="p", model="flux-2-pro", images=[path]).images[0]
    time.sleep(0.01)  # a change time the file system can tell apart
    _settled(path, large.ljust(size, b"\0"))
    second = EditRequest(prompt="p", model="flux-2-pro", images=[path]).images[0]
    assert (first.info.width, first.info.height) == (64, 48)  # type: ignore[union-attr]
    assert (second.info.width, second.info.height) == (2000, 1500)  # type: ignore[union-attr]


def test_a_remembered_image_file_that_became_a_fifo_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(request_module, "_SETTLED_NS", 0)
    path = tmp_path / "ref.png"
    _settled(path, image_bytes())
    EditRequest(prompt="p", model="flux-2-pro", images=[path])
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(RequestError, match="FIFO"):
        EditRequest(prompt="p", model="flux-2-pro", images=[path])


def test_a_plan_is_shared_only_by_requests_of_the_same_shape() -> None:
    adapter = get_adapter("laozhang")
    first = resolve(adapter, EditRequest(prompt="a", model="flux-2-pro", size="1024x768"))
    again = resolve(adapter, EditRequest(prompt="b", model="flux-2-pro", size="1024x768", seed=7))
    other = resolve(adapter, EditRequest(prompt="a", model="flux-2-pro", size="768x1024"))
    assert again == first
    assert other.dimensions == (768, 1024)
    # What does not fit is refused every time, with its reasons, after a request that fit.
    for _ in range(2):
        with pytest.raises(RequestError) as refused:
            resolve(adapter, EditRequest(prompt="a", model="flux-2-pro", seed=-1 + 2**70))
        assert refused.value.violations


@pytest.mark.parametrize(
    ("answer", "images"),
    [
        (b'{"data": [{"url": "https://cdn.example/a.png"}]}', ["https://cdn.example/a.png"]),
        (b'{"data": [{"url": 5}, {"url": null}]}', None),  # cattrs' reading: "5", not http(s)
        (b'{"data": [{"url": ""}, {"url": "http://h:8/x"}]}', ["http://h:8/x"]),
        (b'{"data": [{"url": "http://h:99999/x"}]}', None),  # no port that big
        (b'{"data": [{"url": "https://h/x\\u0001"}]}', None),  # a control character
        (b'{"data": {"url": "https://h/x"}}', None),  # not a list
        (b'{"data": [{"url": "https://h/x"}]} \n', ["https://h/x"]),  # whitespace after it
    ],
)
def test_answers_read_as_before(answer: bytes, images: list[str] | None) -> None:
    response = HttpResponse(status_code=200, headers={}, content=answer)
    if images is None:
        with pytest.raises(ResponseFormatError):
            parse_images("laozhang", response)
    else:
        assert [image.url for image in parse_images("laozhang", response).images] == images


def test_a_result_url_is_judged_the_same_the_second_time() -> None:
    for url in ("https://h:1/x", "https://h:70000/x", "ftp://h/x", "https:///x"):
        assert url_problem(url, "a result URL") == url_problem(url, "a result URL")
    assert url_problem("https://h:70000/x", "u") == "u is not a valid URL"
    assert url_problem("ftp://h/x", "u") == "u is not an http(s) URL"
