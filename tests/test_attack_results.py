"""Attacks on results and their files: saving an image where it cannot or should not go, a
download from a hostile server, resuming a job that holds odd values, and the command line's
`edit` around them. Each ends in a typed `FluxError`, a clean exit, or the image saved."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import httpx
import pytest

from flux_adapters import AsyncFluxClient, FluxClient, errors
from flux_adapters._download import HttpDownloader
from flux_adapters.cli import main
from flux_adapters.emulator import Emulator, run_emulator
from flux_adapters.jobs import Job, Polling
from flux_adapters.result import EditResult, ResultImage, Usage
from tests.conftest import image_bytes
from tests.redis_server import redis_server

KEY = "sk-live-7Qw2Zr9XbT4mKp1VfH8sLd3NcY6gJa0E"
PNG = image_bytes(16, 12)
JPEG = image_bytes(16, 12, "JPEG")
CDN = "https://cdn.example/results/a?signature=s3cr3t"
both = pytest.mark.parametrize("kind", ["sync", "async"])


def save(kind: str, image: ResultImage, target: Path, *, add_suffix: bool = False) -> Path:
    """`ResultImage.save`, or `save_async` run to its end."""
    if kind == "sync":
        return image.save(target, add_suffix=add_suffix)
    return asyncio.run(image.save_async(target, add_suffix=add_suffix))


# --- a name that names another format: refused when the first bytes say so, not at the end ----


class Counted(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A JPEG's first bytes, then *padding* chunks of 1 KB, then its end; counts chunks sent."""

    def __init__(self, padding: int = 200) -> None:
        self.sent = 0
        self._chunks = [JPEG[:64], *([b"\0" * 1024] * padding), JPEG[64:]]

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.sent += 1
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            self.sent += 1
            yield chunk


@both
def test_a_download_under_a_name_of_another_format_stops_at_its_first_bytes(
    kind: str, tmp_path: Path
) -> None:
    # Before: the whole image (up to 32 MB, for up to the 120 s deadline) was downloaded into
    # the temporary file and only then refused by its name, though `save` says the download is
    # dropped once the first bytes arrive.
    body = Counted()
    handler = httpx.MockTransport(lambda request: httpx.Response(200, stream=body))
    downloader = HttpDownloader(
        sync_client=httpx.Client(transport=handler),
        async_client=httpx.AsyncClient(transport=handler),
    )
    image = ResultImage(url=CDN, downloader=downloader)
    target = tmp_path / "scene.png"
    with pytest.raises(errors.ExtensionMismatch) as caught:
        save(kind, image, target)
    assert caught.value.suggested == str(tmp_path / "scene.jpeg")
    assert body.sent < 10  # dropped at once, not read to its end
    assert list(tmp_path.iterdir()) == []  # nothing under the name, no partial file
    # The same download under a fitting name is whole.
    fitting = Counted()
    handler = httpx.MockTransport(lambda request: httpx.Response(200, stream=fitting))
    with httpx.Client(transport=handler) as http:
        saved = ResultImage(url=CDN, downloader=HttpDownloader(sync_client=http)).save(
            tmp_path / "scene.jpg"
        )
    assert saved.stat().st_size == len(JPEG) + 200 * 1024


# --- resume: a job made by hand or read back holds odd values besides its URLs ----------------

QUICK = Polling(first=0.001, factor=1.5, longest=0.005, jitter=0.0, deadline=2.0)
JOB = Job(
    provider="bfl", model="flux-2-pro", id="j", poll_url="https://api.bfl.ai/v1/get_result?id=j"
)
READY = {"status": "Ready", "result": {"sample": "https://delivery-eu1.bfl.ai/results/a.png"}}


def resume(kind: str, job: Job) -> EditResult:
    """``client.resume(job)`` at a BFL that answers the job done, and the image's bytes."""
    transport = httpx.MockTransport(
        lambda request: (
            httpx.Response(200, json=READY)
            if request.url.host == "api.bfl.ai"
            else httpx.Response(200, content=PNG)
        )
    )
    if kind == "sync":
        with httpx.Client(transport=transport) as http:
            return FluxClient("bfl", api_key=KEY, http_client=http, polling=QUICK).resume(job)

    async def main() -> EditResult:
        async with httpx.AsyncClient(transport=transport) as http:
            client = AsyncFluxClient("bfl", api_key=KEY, http_client=http, polling=QUICK)
            return await client.resume(job)

    return asyncio.run(main())


@both
@pytest.mark.parametrize(
    "usage",
    ["credits", 4.5, {"credits_used": 4.5}, Usage(credits_used="4.5"), Usage(tokens_used=1.5)],  # type: ignore[arg-type]
    ids=["text", "number", "dict", "text-credits", "fractional-tokens"],
)
def test_resuming_a_job_whose_usage_cannot_be_read_still_gives_the_paid_image(
    kind: str, usage: object
) -> None:
    # Before: an AttributeError or a TypeError ("must be real number, not str") once the job
    # had been polled to its end: the paid image was never returned. The submit's usage is only
    # a figure for the cost: what cannot be read of it is left out.
    job = attrs.evolve(JOB, usage=usage)  # type: ignore[arg-type]
    result = resume(kind, job)
    assert len(result.images) == 1
    assert result.cost_usd is None or math.isfinite(result.cost_usd)
    json.dumps(result.to_dict(), allow_nan=False)
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) is not None


@pytest.mark.parametrize("when", [math.nan, math.inf, -math.inf, "yesterday", None])
def test_a_jobs_dict_is_json_whatever_its_submit_time_holds(when: object) -> None:
    # Before: NaN or infinity went into the dict as it was: json.dumps wrote `NaN`, which no
    # JSON parser but Python's reads, though `EditResult.to_dict` promises that a number JSON
    # cannot hold is left out; a text or None went through as it was, not a time.
    job = attrs.evolve(JOB, submitted_at=when, usage=Usage(credits_used=math.nan, input_mp=1.0))  # type: ignore[arg-type]
    data = job.to_dict()
    assert data["submitted_at"] == 0.0  # the value of a job whose submit time is not known
    assert data["usage"] == {"input_mp": 1.0}
    assert Job.from_dict(json.loads(json.dumps(data, allow_nan=False))) == attrs.evolve(
        JOB, usage=Usage(input_mp=1.0)
    )


# --- the command line: an output folder that is a broken symbolic link ------------------------


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


def edit(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["edit", *argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("output", ["shots/a.png", "shots/deeper/a.png", None])
def test_an_output_folder_that_is_a_broken_link_is_refused_before_the_paid_call(
    output: str | None, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the check climbed past a symbolic link to nothing as if the folder were missing
    # and creatable; the provider was paid, then the folder could not be made ("File exists")
    # and the image went to out/ or the temporary folder instead of where it was asked to go.
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ("shots" if output else "out")).symlink_to(tmp_path / "gone")
    before = len(emulator.calls("laozhang"))
    base = ["--provider", "laozhang", "--base-url", emulator.base_url("laozhang"), "--json"]
    code, out, err = edit("p", *base, *(["-o", output] if output else []))
    assert code == 7, err
    assert "broken symbolic link" in err
    assert json.loads(out)["error"]["exit_status"] == 7
    assert len(emulator.calls("laozhang")) == before  # nothing was sent, nothing paid


def test_the_saved_line_shows_control_characters_of_the_path_escaped(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: `saved:` wrote the path as it was: a line break in it forged a second line, an
    # escape sequence repainted the terminal (every other line of ours escapes them).
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.chdir(tmp_path)
    name = "a\nsaved:    /etc/passwd\x1b[2J.png"
    base = ["--provider", "laozhang", "--base-url", emulator.base_url("laozhang")]
    code, out, err = edit("p", *base, "-o", name)
    assert code == 0, err
    assert (tmp_path / name).is_file()
    saved = [line for line in out.splitlines() if line.startswith("saved:")]
    assert len(saved) == 1
    assert "\x1b" not in out
    assert "\\n" in saved[0]  # shown escaped, one line


# --- the command line: --json stays UTF-8 for a file name that is not -------------------------


def utf8_json(text: str) -> object:
    """The document in *text*, as a program reading standard output as UTF-8 would parse it."""
    return json.loads(text.encode("utf-8"))  # UnicodeEncodeError: bytes that are not UTF-8


@pytest.mark.parametrize("paid", [False, True], ids=["refused", "saved"])
def test_json_output_naming_a_file_whose_name_is_not_utf8_is_still_utf8(
    paid: bool, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a name of bytes that are not UTF-8 (b"shot\xff.png", which Python decodes to a
    # lone surrogate) was written into the JSON document as those bytes: standard output was
    # no longer UTF-8, and a strict reader (Python's json, most languages' decoders) failed on
    # the document of a paid image. An escaped surrogate is JSON, and reads back to the name.
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.chdir(tmp_path)
    name = os.fsdecode(b"shot\xff.png")
    if not paid:
        (tmp_path / name).write_bytes(b"a file, not a folder")
    target = name if paid else f"{name}/a.png"
    base = ["--provider", "laozhang", "--base-url", emulator.base_url("laozhang"), "--json"]
    code, out, err = edit("p", *base, "-o", target)
    document = utf8_json(out)
    assert isinstance(document, dict)
    if paid:
        assert code == 0, err
        assert document["images"][0]["path"] == name
        assert (tmp_path / name).stat().st_size == document["images"][0]["bytes"]
    else:
        assert code == 7
        assert name in document["error"]["message"]


def test_a_batch_into_a_folder_whose_name_is_not_utf8_reports_each_saved_job(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the first report line (which names the saved image by its path) raised
    # UnicodeEncodeError: the batch stopped after one paid image with "unexpected" (exit 1),
    # the other jobs not run, and report.jsonl empty.
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.setenv("LAOZHANG_BASE_URL", emulator.base_url("laozhang"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.jsonl").write_text('{"id": "a", "prompt": "p"}\n{"id": "b", "prompt": "q"}\n')
    folder = os.fsdecode(b"shots\xff")
    out, err = io.StringIO(), io.StringIO()
    code = main(["batch", "jobs.jsonl", "-p", "laozhang", "-o", folder, "--json"], out=out, err=err)
    assert code == 0, err.getvalue()
    assert utf8_json(out.getvalue())["saved"] == 2  # type: ignore[index]
    report = (tmp_path / folder / "report.jsonl").read_bytes().decode("utf-8").splitlines()
    lines = [json.loads(line) for line in report]
    assert sorted(line["status"] for line in lines) == ["ok", "ok"]
    for line in lines:
        assert all((tmp_path / path).is_file() for path in line["files"])


@pytest.mark.parametrize("name", ["漢" * 84, "é" * 126, "😀" * 63], ids=["cjk", "accents", "emoji"])
def test_a_batch_id_too_long_for_a_file_name_is_refused_before_anything_is_sent(
    name: str, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: an id of at most 200 characters passed the file's check, but 84 CJK characters
    # are 252 bytes: the request was sent and billed, then "File name too long" when its image
    # was saved, reported unconfirmed, and no rerun could ever save it (--resend-unconfirmed
    # only paid again). A file system takes 255 bytes a name, the id's extension included.
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.setenv("LAOZHANG_BASE_URL", emulator.base_url("laozhang"))
    monkeypatch.chdir(tmp_path)
    lines = [{"id": name, "prompt": "p"}, {"id": "b", "prompt": "q"}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    before = len(emulator.calls("laozhang"))
    out, err = io.StringIO(), io.StringIO()
    code = main(["batch", "jobs.jsonl", "-p", "laozhang", "-o", "shots"], out=out, err=err)
    assert code == 2, err.getvalue()
    assert "jobs.jsonl:1" in err.getvalue()
    assert "bytes" in err.getvalue()
    assert len(emulator.calls("laozhang")) == before


def test_a_batch_id_of_the_longest_name_a_file_system_takes_is_saved(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.setenv("LAOZHANG_BASE_URL", emulator.base_url("laozhang"))
    monkeypatch.chdir(tmp_path)
    name = "漢" * 83  # 249 bytes: with ".jpeg", 254
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"id": name, "prompt": "p"}) + "\n")
    out, err = io.StringIO(), io.StringIO()
    code = main(["batch", "jobs.jsonl", "-p", "laozhang", "-o", "shots"], out=out, err=err)
    assert code == 0, err.getvalue()
    assert [path.stem for path in (tmp_path / "shots").glob("*.jpeg")] == [name]


# --- add_suffix: a name that fits, but not with the extension the bytes give it ---------------


@both
@pytest.mark.parametrize("name", ["x" * 251, "é" * 125 + "x"], ids=["ascii", "accents"])
def test_a_name_with_no_room_for_its_extension_is_refused_before_the_download(
    kind: str, name: str, tmp_path: Path
) -> None:
    # Before: a name of 251 to 255 bytes passed the check (the file system takes it), the image
    # was downloaded whole, and only renaming it to name + ".jpeg" failed: "File name too long".
    gets: list[httpx.Request] = []

    def cdn(request: httpx.Request) -> httpx.Response:
        gets.append(request)
        return httpx.Response(200, content=JPEG)

    transport = httpx.MockTransport(cdn)
    downloader = HttpDownloader(
        sync_client=httpx.Client(transport=transport),
        async_client=httpx.AsyncClient(transport=transport),
    )
    image = ResultImage(url=CDN, downloader=downloader)
    with pytest.raises(errors.OutputError, match="too long"):
        save(kind, image, tmp_path / name, add_suffix=True)
    assert gets == []
    assert list(tmp_path.iterdir()) == []
    fits = name[: -1 if name.isascii() else -2]  # 250 bytes: ".jpeg" makes 255
    assert save(kind, image, tmp_path / fits, add_suffix=True).name == f"{fits}.jpeg"


# --- models: a $COLUMNS of 0 ------------------------------------------------------------------


@pytest.mark.parametrize("columns", ["0", "00"])
def test_models_with_columns_of_zero_still_prints_the_table(
    columns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: with the cli extra, rich took COLUMNS=0 (what a shell in a container without a
    # terminal size may export) as a width of 0 and drew nothing: `models` printed nothing at
    # all and ended with 0. A width of 0 is no width: the default of 80 is used.
    pytest.importorskip("rich")
    monkeypatch.setenv("COLUMNS", columns)
    out, err = io.StringIO(), io.StringIO()
    assert main(["models"], out=out, err=err) == 0
    assert "laozhang" in out.getvalue()
    assert "flux-2-pro" in out.getvalue()
    assert max(len(line) for line in out.getvalue().splitlines()) <= 80


# --- a key pasted on the command line is not echoed by the argument parser --------------------

PLAIN_KEY = "7Qw2Zr9XbT4mKp1VfH8sLd3NcY6gJa0E"  # no prefix: not shaped like a key


@pytest.mark.parametrize(
    ("argv", "in_environment"),
    [
        (["edit", "p", "--api-key", PLAIN_KEY], False),
        (["check", "p", f"--api-key={PLAIN_KEY}"], False),
        (["explain", "p", "--token", PLAIN_KEY], False),
        (["edit", "p", PLAIN_KEY], True),  # the key itself, pasted where the prompt goes next
        (["models", "--key", KEY], False),
        (["check", "p", "-p", "laozhang", "--base-url", f"https://u:{PLAIN_KEY}@h/"], False),
    ],
    ids=["flag", "flag=", "token", "bare-in-env", "prefixed", "url-password"],
)
def test_a_key_given_as_an_argument_the_command_does_not_take_is_not_echoed(
    argv: list[str], in_environment: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: "flux-adapters: error: unrecognized arguments: --api-key 7Qw2..." showed the key
    # on standard error (and in every CI log that keeps it): there is no --api-key option, and
    # typing one is what a careless user does first.
    if in_environment:
        monkeypatch.setenv("BFL_API_KEY", PLAIN_KEY)
    out, err = io.StringIO(), io.StringIO()
    assert main(argv, out=out, err=err) == 2
    assert "unrecognized arguments" in err.getvalue()
    assert PLAIN_KEY[:12] not in err.getvalue()
    assert KEY[8:20] not in err.getvalue()
    assert "[redacted]" in err.getvalue()


@pytest.mark.parametrize(
    "argv",
    [["keys", "list", "--keys-file", "team-keys.json"], ["models", "--key-env", "TEAM_KEY"]],
)
def test_a_misplaced_flag_of_ours_that_holds_no_secret_is_shown(argv: list[str]) -> None:
    # `keys --keys-file F list` is right; after the action the flag is an unrecognized
    # argument, and the path the user typed was shown as [redacted], which told them nothing.
    err = io.StringIO()
    assert main(argv, out=io.StringIO(), err=err) == 2
    assert f"unrecognized arguments: {argv[-2]} {argv[-1]}" in err.getvalue()


# --- edit: a failure to save after the paid call is one line, whatever the path holds ---------


def test_a_path_with_a_line_break_that_fails_after_the_paid_call_is_one_line(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: every other failure is written by `main` as one line (`_one_line`), but the
    # message of an image saved elsewhere after the paid call printed the error as it was: a
    # line break in the folder's name split it over lines.
    from tests.test_cli import folder_replaced_by_a_file_once_sent

    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.chdir(tmp_path)
    wanted = tmp_path / "two\nlines"
    wanted.mkdir()
    with folder_replaced_by_a_file_once_sent(emulator, wanted):
        code, _, err = edit(
            "p", "-p", "laozhang", "--base-url", emulator.base_url("laozhang"), "-o",
            str(wanted / "robot.png"),
        )  # fmt: skip
    assert code == 7
    (message,) = [line for line in err.splitlines() if "OutputError" in line]
    assert message.startswith("flux-adapters: OutputError: cannot write ")
    assert "lines" in message
    assert message.endswith(" instead")


# --- a configured price whose estimate is too large for a float -------------------------------

HUGE_PRICE = """providers = ["laozhang"]
[provider.laozhang.prices]
flux-2-pro = { usd_first = 1e308, usd_extra = 1e308, usd_input = 1e308 }
"""


def _priced_too_high(emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work in *tmp_path*, with laozhang on *emulator* at `HUGE_PRICE` (the file there)."""
    monkeypatch.setenv("LAOZHANG_API_KEY", "test-key")
    monkeypatch.setenv("LAOZHANG_BASE_URL", emulator.base_url("laozhang"))
    monkeypatch.delenv("FLUX_PROVIDERS", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flux-adapters.toml").write_text(HUGE_PRICE)


def test_an_estimate_too_large_for_a_number_is_null_in_json_not_infinity(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: each figure is a finite price, as the configuration check asks, but their sum for
    # a 4 MP image overflows: edit --json wrote "cost_usd": Infinity, and batch's report the
    # same, which no JSON parser but Python's reads (EditResult.to_dict writes null).
    _priced_too_high(emulator, tmp_path, monkeypatch)
    code, out, err = edit("p", "--size", "2048x2048", "--json", "-o", "a.png")
    assert code == 0, err
    document = json.loads(out, parse_constant=lambda constant: pytest.fail(constant))
    assert document["cost_usd"] is None
    (tmp_path / "jobs.jsonl").write_text('{"id": "a", "prompt": "p", "size": "2048x2048"}\n')
    said = io.StringIO()
    assert main(["batch", "jobs.jsonl", "-o", "shots"], out=io.StringIO(), err=said) == 0, said
    (line,) = (tmp_path / "shots" / "report.jsonl").read_text().splitlines()
    report = json.loads(line, parse_constant=lambda constant: pytest.fail(constant))
    assert report["cost_usd"] is None


# --- a symbolic link as the target: written through, never replaced ---------------------------


@both
@pytest.mark.parametrize("existing", [True, False], ids=["to-a-file", "to-nothing-yet"])
def test_saving_to_a_symbolic_link_writes_where_it_points_and_keeps_the_link(
    kind: str, existing: bool, tmp_path: Path
) -> None:
    # Before: the image was renamed over the link itself: the file it pointed to kept its old
    # bytes and the link was gone. `-o /dev/stdout > image.png` (as -o - is refused) run as root
    # replaced the system's /dev/stdout link with a regular file.
    (tmp_path / "real").mkdir()
    pointed = tmp_path / "real" / "latest.png"
    if existing:
        pointed.write_bytes(b"yesterday's image")
    link = tmp_path / "latest.png"
    link.symlink_to(pointed)
    image = ResultImage(b64_json=base64.b64encode(PNG).decode())
    assert save(kind, image, link) == pointed
    assert link.is_symlink()
    assert pointed.read_bytes() == PNG
    assert sorted(path.name for path in (tmp_path / "real").iterdir()) == ["latest.png"]


def test_a_shared_batchs_report_writes_an_estimate_too_large_for_a_number_as_null(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a batch of one process wrote null (the test above), but a worker of a batch shared
    # through Redis wrote "cost_usd": Infinity in its --report, which no JSON parser but
    # Python's reads.
    _priced_too_high(emulator, tmp_path, monkeypatch)
    (tmp_path / "jobs.jsonl").write_text('{"id": "a", "prompt": "p", "size": "2048x2048"}\n')
    said = io.StringIO()
    with redis_server() as redis:
        arguments = ["batch", "jobs.jsonl", "-o", "shots", "--state", redis.url]
        status = main([*arguments, "--report", "mine.jsonl"], out=io.StringIO(), err=said)
    assert status == 0, said.getvalue()
    (line,) = (tmp_path / "mine.jsonl").read_text().splitlines()
    report = json.loads(line, parse_constant=lambda constant: pytest.fail(constant))
    assert report["cost_usd"] is None
