"""What the per-edit shortcuts keep: each gives what the full path gives, and falls back to it.

The library remembers what depends only on unchanged inputs (a file's header while the file is
the same, a plan per request shape, the verdict on a result URL's origin) and makes the objects
of every edit without attrs' generic ``__init__``; none of that may change a result or an error.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import flux_adapters.request as request_module
from flux_adapters import EditRequest, get_adapter
from flux_adapters._flows import resolve
from flux_adapters.errors import RequestError, ResponseFormatError
from flux_adapters.providers._images_api import parse_images, url_problem
from flux_adapters.request import (
    MAX_GUIDANCE,
    MAX_SAFETY_TOLERANCE,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MODELS,
)
from flux_adapters.wire import HttpResponse
from tests.conftest import image_bytes

HOUR_AGO = time.time() - 3600
_PNG64: Final = base64.b64encode(image_bytes(8, 8)).decode()


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


def test_the_plan_key_tells_apart_requests_that_differ_in_any_field_but_prompt_and_seed() -> None:
    """A field added to EditRequest later must be in the key of a shared plan, or two requests
    that differ in it would share one."""
    from flux_adapters.limits import _plan_key

    limits = get_adapter("laozhang").limits["flux-2-pro"]
    base = EditRequest(prompt="a", model="flux-2-pro")
    changes: list[dict[str, object]] = [
        {"model": "flux-2-max"},
        {"images": ("https://cdn.example/a.png",)},
        {"width": 512, "height": 512},
        {"width": 512, "height": 768},
        {"size": "512x512"},
        {"aspect_ratio": "1:1"},
        {"output_format": "png"},
        {"safety_tolerance": 2},
        {"prompt_upsampling": True},
        {"steps": 20},
        {"guidance": 3.5},
        {"allow_conversions": True},
    ]
    names = {field.name for field in attrs.fields(EditRequest)}
    covered = {name for change in changes for name in change}
    assert names - {"prompt", "seed"} == covered  # a new field: add it here and to the key
    keys = [_plan_key(attrs.evolve(base, **change), limits) for change in changes]  # type: ignore[arg-type]
    assert len({_plan_key(base, limits), *keys}) == len(changes) + 1
    assert _plan_key(attrs.evolve(base, prompt="b", seed=3), limits) == _plan_key(base, limits)


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
        # Go gateways write every field: an empty one beside the other is no field, and the
        # paid image is kept (it was refused as empty inline data).
        (b'{"data": [{"url": "https://h/x", "b64_json": ""}]}', ["https://h/x"]),
        (b'{"data": [{"url": "", "b64_json": "' + _PNG64.encode() + b'"}]}', [None]),
    ],
)
def test_answers_read_as_before(answer: bytes, images: list[str] | None) -> None:
    response = HttpResponse(status_code=200, headers={}, content=answer)
    if images is None:
        with pytest.raises(ResponseFormatError):
            parse_images("laozhang", response)
    else:
        assert [image.url for image in parse_images("laozhang", response).images] == images
        assert all(image.b64_json != "" for image in parse_images("laozhang", response).images)


def test_a_result_url_is_judged_the_same_the_second_time() -> None:
    for url in ("https://h:1/x", "https://h:70000/x", "ftp://h/x", "https:///x"):
        assert url_problem(url, "a result URL") == url_problem(url, "a result URL")
    assert url_problem("https://h:70000/x", "u") == "u is not a valid URL"
    assert url_problem("ftp://h/x", "u") == "u is not an http(s) URL"


_BOUNDS: Final = sorted(
    {b + d for b in (0, 1, MAX_GUIDANCE, MAX_SAFETY_TOLERANCE, MAX_STEPS) for d in (-1, 0, 1)}
    | {MAX_SIDE, MAX_SIDE + 1, MAX_SEED, MAX_SEED + 1}
)
_NEAR_BOUNDS: Final = [*_BOUNDS, None, True, False, 0.5, -0.0, float(MAX_GUIDANCE) + 0.1]
_ODD: Final = st.one_of(
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["1024x768", "1024X768", " 64x64", "0x0", "16:9", "21:9 ", "png", "jpg"]),
    st.binary(max_size=4),
)
"""Any value, in range or not, of any type: what a careless caller may put in any field."""
_FITTING: Final = {
    "prompt": st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=9),
    "model": st.sampled_from(MODELS),
    "width": st.integers(min_value=1, max_value=MAX_SIDE),
    "height": st.integers(min_value=1, max_value=MAX_SIDE),
    "size": st.sampled_from(["1024x768", "64x64", "1x1"]),
    "aspect_ratio": st.sampled_from(["16:9", "1:1"]),
    "seed": st.integers(min_value=0, max_value=MAX_SEED),
    "output_format": st.sampled_from(["png", "jpeg", "webp"]),
    "safety_tolerance": st.integers(min_value=0, max_value=6),
    "prompt_upsampling": st.booleans(),
    "steps": st.integers(min_value=1, max_value=50),
    "guidance": st.one_of(st.integers(min_value=0, max_value=5), st.floats(0, 5)),
    "allow_conversions": st.booleans(),
}
"""A value that fits, for each field (or None, for the optional ones)."""


@pytest.mark.parametrize("odd", sorted(_FITTING))
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_the_quick_acceptance_of_a_request_never_accepts_what_the_rules_refuse(
    odd: str, data: st.DataObject
) -> None:
    """`_plainly_valid` is a shortcut: whatever it accepts, the field-by-field rules accept too,
    and leave as it is (no value replaced by a plain copy). The other fields fit (or are
    unset); *odd* gets any value at all, most often one at or next to a bound."""
    fields: dict[str, object] = {}
    for name, fitting in _FITTING.items():
        required = name in ("prompt", "model")
        fields[name] = data.draw(fitting if required else st.one_of(st.none(), fitting), name)
    if data.draw(st.integers(0, 3), "one way to size (or several, 0)"):
        keep = data.draw(st.sampled_from([("width", "height"), ("size",), ("aspect_ratio",)]))
        for name in ("width", "height", "size", "aspect_ratio"):
            if name not in keep:
                fields[name] = None
    fields[odd] = data.draw(st.one_of(st.sampled_from(_NEAR_BOUNDS), _ODD), odd)
    made = object.__new__(EditRequest)
    for name, value in {**fields, "images": ()}.items():
        object.__setattr__(made, name, value)
    if not request_module._plainly_valid(made):
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(request_module, "_plainly_valid", lambda request: False)
        assert request_module._universal_violations(made) == []
    assert all(getattr(made, name) is value for name, value in fields.items())


_URLS: Final = [
    *["https://cdn.example/a.png", "http://h:8/x", "https://h/x?sig=abc#f", "http://u:p@h/x"],
    *["http://h:99999/x", "https:///x", "ftp://h/x", "javascript:alert(1)", "https://h/x\x01"],
    *[
        "",
        "http://[::1/x",
        "http://h:-1/x",
        "https://h:\uff18\uff10/x",
        "//h/x",
        "https://h/\ud800",
    ],
    "https://" + "a" * 400 + "/x",  # a netloc too long to be remembered
]
_INLINE: Final = [_PNG64, "", "!!!!", _PNG64[:40], base64.b64encode(b"<html>").decode()]
_ANY_JSON: Final = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**30),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_GOOD_URL: Final = st.sampled_from(_URLS[:4])
_PLAIN_ITEM: Final = st.fixed_dictionaries(
    {},
    optional={
        "url": st.one_of(_GOOD_URL, _GOOD_URL, st.sampled_from(_URLS), st.none()),
        "b64_json": st.one_of(st.none(), st.none(), st.just(_PNG64), st.sampled_from(_INLINE)),
        "revised_prompt": _ANY_JSON,
    },
)
_ANY_ITEM: Final = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "url": st.one_of(st.sampled_from(_URLS), _ANY_JSON),
            "b64_json": st.one_of(st.sampled_from(_INLINE), _ANY_JSON),
        },
    ),
    _ANY_JSON,
)
_USAGE: Final = st.fixed_dictionaries(
    {},
    optional={
        "usage": st.fixed_dictionaries(
            {}, optional=dict.fromkeys(("credits_used", "tokens_used"), _ANY_JSON)
        )
    },
)
_PLAIN_ANSWER: Final = st.fixed_dictionaries(
    {"data": st.lists(_PLAIN_ITEM, max_size=3)}, optional={"meta": _USAGE, "created": _ANY_JSON}
)
_ODD_ANSWER: Final = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "data": st.one_of(
                st.lists(_ANY_ITEM, max_size=4),
                st.lists(_PLAIN_ITEM, min_size=15, max_size=18),  # past MAX_IMAGES
                _ANY_JSON,
            ),
            "meta": _USAGE,
            "error": _ANY_JSON,
        },
    ),
    _ANY_JSON,
)


def _outcome(content: bytes) -> tuple[object, ...]:
    response = HttpResponse(status_code=200, headers={}, content=content)
    try:
        answer = parse_images("laozhang", response)
    except Exception as error:
        return type(error), str(error), repr(error), getattr(error, "excerpt", None)
    shown = [(image.url, image.b64_json, image.declared_format) for image in answer.images]
    return answer, shown, [repr(image) for image in answer.images]


@settings(max_examples=300, deadline=None)
@given(
    answer=st.integers(0, 9).flatmap(lambda i: _PLAIN_ANSWER if i < 6 else _ODD_ANSWER),
    ascii_only=st.booleans(),
)
def test_a_plain_answer_read_without_cattrs_gives_what_cattrs_gives(
    answer: object, ascii_only: bool
) -> None:
    """The quick reading of a plain answer (`_plain_items`) against cattrs' reading of the same
    answer: the same images, or the same error with the same words. Most answers drawn are
    plain (about 8 in 10 take the quick reading, a third of those with their images accepted);
    the others have any value in any field, hostile URLs and inline data, too many images."""
    import flux_adapters.providers._images_api as images_api

    content = json.dumps(answer, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    quick = _outcome(content)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images_api, "_plain_items", lambda body: None)
        assert _outcome(content) == quick


_JSON_VALUE: Final = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
_AROUND: Final = st.sampled_from(
    [
        " ",
        "\n",
        "\t",
        "\r",
        "\ufeff",
        "x",
        "{}",
        "]",
        ",",
        "\x00",
        "\u2028",
        '"\ud800"',
        "NaN",
        "9" * 4400,
    ]
)


@st.composite
def _json_bytes(draw: st.DrawFn) -> bytes:
    """JSON text, mostly an object or array (what the quick decoding takes), with whitespace or
    anything else before or after, in UTF-8 or another encoding json.loads detects, sometimes
    with a few bytes of any kind put in."""
    text = json.dumps(draw(_JSON_VALUE), ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()) and text[:1] not in "{[":
        text = '{"a": ' + text + "}"
    if draw(st.integers(0, 3)) == 0:
        text = "".join(draw(st.lists(_AROUND, max_size=2))) + text
    if draw(st.booleans()):
        text += "".join(draw(st.lists(_AROUND, max_size=3)))
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"]))
    content = text.encode(encoding, "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(content)))
        noise: bytes = draw(st.binary(max_size=3))
        content = content[:at] + noise + content[at:]
    return content


def _decoded(decode: Callable[[bytes], object], content: bytes) -> tuple[object, ...]:
    try:
        value = decode(content)
    except (ValueError, RecursionError) as error:
        return type(error), str(error), getattr(error, "pos", None), getattr(error, "doc", None)
    return "value", repr(value)


@settings(max_examples=400, deadline=None)
@given(content=_json_bytes())
def test_an_answer_is_decoded_as_json_loads_decodes_it(content: bytes) -> None:
    """`HttpResponse.json` decodes an object or array in UTF-8 without json.loads' search for
    the encoding or its second scan: the same value, or the same error at the same place
    (about 6 in 10 texts drawn take that way, 8 in 10 of those valid)."""
    answer = HttpResponse(status_code=200, headers={}, content=content)
    assert _decoded(lambda raw: answer.json(), content) == _decoded(json.loads, content)


_SETTINGS: Final[dict[str, list[object]]] = {
    "safety_tolerance": [0, 1, 2, 5, 6],
    "steps": [1, 20, 50, 51],
    # Equal numbers of other types (3 and 3.0, 0 and -0.0) make equal keys: the plan must not
    # depend on the difference.
    "guidance": [1, 1.0, 1.5, 3, 3.0, 10, 10.0, 20, 0, -0.0],
    "prompt_upsampling": [True, False],
}
"""Settings most rows do not offer: unset 9 times in 10 in a first request, but seldom in the
field drawn again."""


def _sometimes(values: list[object]) -> st.SearchStrategy[object]:
    return st.integers(0, 9).flatmap(lambda i: st.none() if i else st.sampled_from(values))


_SHAPES: Final[dict[str, st.SearchStrategy[object]]] = {
    "way": st.sampled_from(["width/height", "size", "aspect_ratio", None, None]),
    "width": st.sampled_from([512, 1024, 1360, 1, 2048]),
    "height": st.sampled_from([512, 768, 1024, 1, 2048]),
    "size": st.sampled_from(["1024x768", "1024X768", "512x512", "1360x768"]),
    "aspect_ratio": st.sampled_from(["16:9", "1:1", "21:9", "4:3", "32:9"]),
    "output_format": st.sampled_from([None, None, None, "png", "jpeg", "webp"]),
    **{name: _sometimes(values) for name, values in _SETTINGS.items()},
    "allow_conversions": st.sampled_from([None, True, False]),
    "seed": st.sampled_from([None, 0, 7, 2**32 - 1, 2**63]),
    "prompt": st.sampled_from(["a", "b" * 3000, "c" * 40_000]),
    # Indexes into the images of the test: the same picture as bytes, a data URL, a file.
    "images": st.one_of(
        st.just([]), st.lists(st.sampled_from([0, 0, 1, 2, 3, 4, 5, 6]), max_size=2)
    ),
}


_PICTURES: Final = (image_bytes(64, 48), image_bytes(64, 48, "JPEG"), image_bytes(3000, 2000))


@settings(max_examples=1000, deadline=None)
@given(data=st.data())
def test_a_remembered_plan_is_what_the_request_would_be_resolved_to(
    data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`plan` against `_evaluate` for two requests alike but for one or two fields, on every
    row of every provider (and rows that refuse some kinds of local image), in either order
    from an empty table: the plan, or the same violations. In about one example in seven the
    second shares the key of a first that fit (``--hypothesis-show-statistics``): a field left
    out of `_plan_key` fails this within a run or two (each field, tried by removing it)."""
    import flux_adapters.limits as plans
    from flux_adapters.providers import PROVIDERS

    png, jpeg, large = _PICTURES
    path = tmp_path_factory.getbasetemp() / "plan.png"
    if not path.exists():
        path.write_bytes(png)
    pictures: list[object] = [
        png,
        jpeg,
        large,
        "data:image/png;base64," + base64.b64encode(png).decode(),
        path,
        "https://cdn.example/a.png",
        png[:30],
    ]
    rows = [row for name in sorted(PROVIDERS) for row in get_adapter(name).limits.values()]
    # No row refuses a kind of local image today; one that did must not share a plan across kinds.
    rows += [
        attrs.evolve(row, image=attrs.evolve(row.image, kinds=frozenset({"file", "url"})))
        for row in rows[::4]
    ]
    limits = data.draw(st.sampled_from(rows), "row")

    def made(values: dict[str, object]) -> EditRequest | None:
        way = values["way"]
        fields = {name: value for name, value in values.items() if name != "way"}
        for name in ("width", "height", "size", "aspect_ratio"):
            if way != name and not (way == "width/height" and name in ("width", "height")):
                fields[name] = None
        fields["images"] = [pictures[index] for index in values["images"]]  # type: ignore[attr-defined]
        try:
            return EditRequest(model=limits.model, **fields)  # type: ignore[arg-type]
        except RequestError:
            return None

    first = {name: data.draw(strategy, name) for name, strategy in _SHAPES.items()}
    again = data.draw(st.sets(st.sampled_from(sorted(_SHAPES)), min_size=1, max_size=2))
    second = dict(first)
    for name in again:
        values = _SETTINGS.get(name)
        second[name] = data.draw(
            _SHAPES[name] if values is None else st.sampled_from([None, *values]), name
        )
    made_first, made_second = made(first), made(second)
    if made_first is None or made_second is None:
        return
    pair = (made_first, made_second)
    plans._PLANS.clear()
    one, other = pair if data.draw(st.booleans(), "in order") else pair[::-1]
    # A list, not a dict keyed by request: requests alike but for 3 and 3.0 are equal keys.
    judged = [(request, plans._evaluate(request, limits)) for request in (one, other)]
    shares = plans._plan_key(one, limits) == plans._plan_key(other, limits)
    event("shares a plan" if shares and not judged[0][1][0] else "is resolved")
    for request, (violations, resolved) in judged:  # the first leaves its plan, if it fits
        if violations:
            with pytest.raises(RequestError) as refused:
                plans.plan(request, limits)
            assert refused.value.violations == violations
        else:
            assert plans.plan(request, limits) == resolved


def test_a_remembered_file_header_is_never_one_of_a_file_since_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After each change of what a path names (replaced by rename, truncated, rewritten at the
    same size with its times put back, removed and made again, a symbolic link pointed
    elsewhere), the header a request holds is the one read afresh. Every header is kept here
    (no settling time), so each request after the first could be answered from memory."""
    monkeypatch.setattr(request_module, "_SETTLED_NS", 0)
    pictures = [image_bytes(64, 48), image_bytes(48, 64), image_bytes(33, 17, "JPEG")]
    size = max(map(len, pictures))
    padded = [picture.ljust(size, b"\0") for picture in pictures]
    path, other, link = tmp_path / "ref.png", tmp_path / "other.png", tmp_path / "link.png"

    def replaced(data: bytes) -> None:
        spare = tmp_path / "spare"
        _settled(spare, data)
        spare.replace(path)

    def rewritten(data: bytes) -> None:
        times = path.stat()
        with path.open("r+b") as stream:
            stream.write(data)
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))

    def truncated(data: bytes) -> None:
        os.truncate(path, len(data) // 2)

    def made_again(data: bytes) -> None:
        path.unlink()
        _settled(path, data)

    def pointed_elsewhere(data: bytes) -> None:
        _settled(other, data)
        link.unlink()
        link.symlink_to(other)

    _settled(path, padded[0])
    link.symlink_to(path)
    changes = [replaced, rewritten, truncated, made_again, pointed_elsewhere, rewritten]
    for step, change in enumerate(changes):
        for name in (path, link):
            EditRequest(prompt="p", model="flux-2-pro", images=[name])  # remembered
        time.sleep(0.01)  # a change time the file system can tell apart
        change(padded[(step + 1) % len(padded)])
        for name in (path, link):
            held = EditRequest(prompt="p", model="flux-2-pro", images=[name]).images[0]
            with name.open("rb") as stream:
                fresh = request_module._inspect(stream, name.stat().st_size)
            assert held.info == fresh, (change.__name__, name.name)  # type: ignore[union-attr]
