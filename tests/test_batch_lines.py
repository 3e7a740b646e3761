"""A batch file's lines read the quick way give what the general way gives, line for line.

`parse_line` reads the usual line (a UTF-8 object) with the JSON scanner alone, and a line that
fits `BatchLine` at first sight is checked and built without making a `BatchLine`; each is
held here to the general path on the same lines, good and bad. The request digest, whose JSON
is no longer sorted as it is written, is held to the formula the journals on disk were written
with: a rerun must not see every job as changed.
"""

from __future__ import annotations

import hashlib
import json
from enum import IntEnum
from pathlib import Path

import attrs
import pytest

from flux_adapters import _schema
from flux_adapters._batch_files import _parse_line, build_request, check_file, parse_line
from flux_adapters._journal import (
    JsonLines,
    _encode_line,
    _record_line,
    _settings_fields,
    _settings_text,
    request_digest,
)
from flux_adapters.errors import RequestError
from flux_adapters.request import EditRequest

GOOD = {"id": "job-1", "prompt": "a robot", "size": "1024x1024"}

LINES = [
    json.dumps(GOOD).encode() + b"\n",
    json.dumps(GOOD).encode(),  # the last line, without its newline
    json.dumps(GOOD).encode() + b" \t\r\n",
    b'{"prompt": "caf\xc3\xa9 \xe2\x98\x95", "id": 7}\n',
    b'{"prompt": "\\ud800 lone", "id": "x"}\n',  # a lone surrogate, escaped
    b'{"prompt": "a", "prompt": "b"}\n',  # a key given twice
    b'{"prompt": "a", "nested": {"k": 1, "k": 2}}\n',  # twice, one level down
    b'{"prompt": "a"} {"prompt": "b"}\n',  # extra data
    b'{"prompt": "a"} x\n',
    b'{"prompt": "a"}\x0b\n',  # str.strip takes a vertical tab; JSON does not
    b'{"prompt": "a"}\xe3\x80\x80\n',  # nor an ideographic space
    b'{"prompt": "a",}\n',
    b'{"prompt": NaN, "seed": Infinity}\n',
    b'{"prompt": "a", "seed": 12345678901234567890123}\n',
    b'{"prompt": "\xff\xfe"}\n',  # not UTF-8
    b"{" * 100_000 + b"\n",  # too deep for Python
    b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"\n",
    b"{\n",
    b"{}\n",
    b"[1, 2]\n",
    b'"text"\n',
    b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n",  # a UTF-8 byte order mark
    json.dumps(GOOD).encode("utf-16-le") + b"\n",
    json.dumps(GOOD).encode("utf-16") + b"\n",
    b"{\x00}\n",
]


def same(first: object, second: object) -> bool:
    if isinstance(first, RequestError) and isinstance(second, RequestError):
        return str(first) == str(second)
    return type(first) is type(second) and first == second and repr(first) == repr(second)


@pytest.mark.parametrize("raw", LINES, ids=range(len(LINES)))
def test_a_line_reads_as_json_loads_reads_it(raw: bytes) -> None:
    assert parse_line(raw) == _parse_line(raw)


SHAPES = [
    GOOD,
    {"prompt": "a"},
    {"prompt": "a", "id": 12},
    {"prompt": "a", "id": None, "model": "flux-kontext-pro", "seed": 3, "guidance": 2},
    {"prompt": "a", "images": ["in.png", "https://example.com/x.png", "data:image/png;base64,AA"]},
    {"prompt": "a", "width": 512, "height": 768, "output_format": "png", "steps": 20},
    {"prompt": "a", "aspect_ratio": "16:9", "safety_tolerance": 2, "prompt_upsampling": True},
    {"prompt": "a", "guidance": 3.5, "allow_conversions": True},
    {"prompt": "a", "allow_conversions": None, "prompt_upsampling": None},
    {"prompt": "a", "size": "7x7"},  # fits the line; EditRequest refuses it
    {"prompt": "", "id": "x"},
    {"prompt": "a", "model": None},  # does not fit: the general path words it
    {"prompt": "a", "seed": "12"},
    {"prompt": "a", "seed": True},
    {"prompt": "a", "images": "in.png"},
    {"prompt": "a", "images": [1]},
    {"prompt": "a", "colour": "red"},
    {"id": "no-prompt"},
    {"prompt": 5, "id": 1.5},
    "not JSON (Expecting value)",
]


@pytest.mark.parametrize("item", SHAPES, ids=range(len(SHAPES)))
def test_a_line_that_fits_builds_the_request_the_general_path_builds(
    item: dict[str, object] | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path("/data/jobs")
    quick = build_request("jobs.jsonl", folder, 4, item)
    monkeypatch.setattr(_schema, "fits", lambda data, kind: False)
    general = build_request("jobs.jsonl", folder, 4, item)
    assert quick[0] == general[0]
    assert same(quick[1], general[1])


def test_a_file_checked_the_quick_way_is_checked_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.jsonl"
    plain = [item for item in SHAPES[:10] if isinstance(item, dict) and "id" not in item]
    good.write_text("".join(json.dumps(item) + "\n" for item in plain))
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(item) if isinstance(item, dict) else "{nope" for item in SHAPES]
    bad.write_text("\n".join([*lines, json.dumps({"prompt": "again", "id": "job-1"})]) + "\n")

    def outcome(path: Path) -> object:
        try:
            return check_file(path)
        except RequestError as error:
            return str(error)

    quick = [outcome(good), outcome(bad)]
    monkeypatch.setattr(_schema, "fits", lambda data, kind: False)
    assert quick == [outcome(good), outcome(bad)]
    assert quick[0] == len(plain)
    assert "id is used twice" in str(quick[1])


@pytest.mark.parametrize(
    "request_",
    [
        EditRequest(prompt="a robot", model="flux-2-pro"),
        EditRequest(prompt="caf\u00e9 \u2615", model="flux-kontext-pro", seed=7, guidance=2.5),
        EditRequest(
            prompt="a", model="flux-2-pro", width=512, height=768, output_format="png", steps=20
        ),
        EditRequest(
            prompt="a",
            model="flux-2-pro",
            aspect_ratio="16:9",
            allow_conversions=True,
            safety_tolerance=2,
        ),
        EditRequest(prompt="a", model="flux-2-pro", size="1024x1024", prompt_upsampling=True),
        EditRequest(prompt="a", model="flux-2-pro", seed=2**31, guidance=3.0, steps=50),
        EditRequest(prompt='"q" \\ \t', model="flux-2-pro", guidance=0.1),
    ],
)
def test_the_request_digest_is_the_one_journals_were_written_with(request_: EditRequest) -> None:
    settings = {
        field.name: getattr(request_, field.name)
        for field in attrs.fields(EditRequest)
        if field.name != "images"
    }
    text = json.dumps(settings, sort_keys=True, ensure_ascii=True)
    assert request_digest(request_) == hashlib.sha256(text.encode()).hexdigest()[:32]


TEXTS = [
    "",
    "job-1",
    'a "quoted" \\ back',
    "tab\tnew\nline\x00\x1f\x7f",
    "caf\u00e9 \u2615 \U0001f600",
]
VALUES: list[dict[str, object]] = [
    {},
    {"p": "laozhang"},
    {"d": "0123456789abcdef", "old": {"job.png": "12:34"}},
    {"p": "apiyi", "urls": ["https://x.example/a.png?sig=1&t=2", 'b"\\']},
    {"files": []},
    {"files": ["job-1.png", "job-1-2.png"]},
    {"p": "bfl", "job": {"id": "j", "polling_url": "https://x/y", "n": 2}},
    {"p": "fal", "b": "not-connected", "proves": "not taken", "e": "stopped"},
    {"over": True, "p": "bfl"},
    {"urls": ["a", 3]},
    {"n": 1, "f": 1.5, "none": None, "nan": float("nan")},
    {"\u00e9t\u00e9": "\u00e9", "t": "\t"},
    {"p": "a", "id": "other"},
    {"k": "other", "p": "a"},
]


@pytest.mark.parametrize("values", VALUES, ids=range(len(VALUES)))
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_a_journal_record_is_written_as_the_json_encoder_writes_it(
    values: dict[str, object], text: str
) -> None:
    shaped = {
        key: text + value
        if isinstance(value, str)
        else [text, *value]
        if isinstance(value, list)
        else value
        for key, value in values.items()
    }
    for job, kind in [("job-1", "sent"), (text or "x", "answered"), ("job", text)]:
        record = {"id": job, "k": kind, **shaped}
        expected = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        assert _record_line(job, kind, shaped, record) == expected
        assert _record_line(job, kind, shaped, record) == JsonLines.encode(record).decode()


def test_a_lone_surrogate_in_a_record_fails_as_it_did(tmp_path: Path) -> None:
    # Text the encoder passes through, which then cannot be UTF-8: the same error both ways.
    record: dict[str, object] = {"id": "job", "k": "attempt", "e": "\ud800"}
    assert _record_line("job", "attempt", {"e": "\ud800"}, record) == _encode_line(record) + "\n"
    with pytest.raises(UnicodeEncodeError):
        JsonLines.encode(record)


class _Number(IntEnum):
    ONE = 1


SETTINGS = [
    "a robot",
    'quote " back \\ tab \t nl \n nul \x00 del \x7f',
    "caf\u00e9 \u2615 \U0001f600",
    "",
    None,
    True,
    False,
    0,
    -7,
    2**80,
    2.5,
    -0.0,
    1e300,
    3.0,
    0.1,
]


@pytest.mark.parametrize("value", SETTINGS, ids=range(len(SETTINGS)))
def test_the_settings_text_is_the_json_the_digest_was_made_of(value: object) -> None:
    fields, _ = _settings_fields()
    for at in range(len(fields)):
        values = tuple(value if index == at else None for index in range(len(fields)))
        expected = json.dumps(
            dict(zip(fields, values, strict=True)), sort_keys=True, ensure_ascii=True
        )
        assert _settings_text(values) == expected


@pytest.mark.parametrize(
    "odd", [float("nan"), float("inf"), -float("inf"), [1], {"a": 1}, _Number.ONE]
)
def test_a_setting_of_another_kind_is_left_to_the_encoder(odd: object) -> None:
    fields, _ = _settings_fields()
    assert _settings_text((odd, *([None] * (len(fields) - 1)))) is None
