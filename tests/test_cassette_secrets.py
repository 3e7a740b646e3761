"""Cassettes can never hold a secret, and a failed recording never replaces good cassettes.

A hostile loopback server echoes the key it is sent everywhere it can (JSON error and success
bodies, HTML, XML and plain-text bodies, response headers, cookies, a result URL carrying it in
its query and userinfo, base64 ``user:key``); cassettes are recorded from it through the real
`record()` and must hold no form of the key, nor any 8-character fragment of one, yet replay.
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import re
import shutil
import string
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from flux_adapters import errors
from flux_adapters._redact import secret_forms
from flux_adapters.conformance import RecordingFailed, record, run_scenario, scan_for_secrets
from flux_adapters.conformance.cassettes import (
    UNDECODABLE,
    Scrubber,
    scrub_request,
    scrub_response,
)
from flux_adapters.conformance.runner import paid_calls
from flux_adapters.conformance.scenarios import Completes, ProviderFails, Scenario, by_id
from flux_adapters.providers.laozhang import LaozhangAdapter
from flux_adapters.request import EditRequest
from tests.conftest import image_bytes, serving

CASSETTES = Path(__file__).resolve().parent.parent / "cassettes"
REVOKED = by_id("error-401").api_key or ""


def _realistic_key(seed: int, extra: str = "") -> str:
    rng = random.Random(seed)
    body = "".join(rng.choices(string.ascii_letters + string.digits, k=40))
    for index, char in enumerate(extra):  # spread characters that encode differently
        position = 6 + index * 11
        body = body[:position] + char + body[position:]
    return "sk-live-" + body


PLAIN_KEY = _realistic_key(1)
ODD_KEY = _realistic_key(2, "+/=")  # changes under URL-encoding, and is base64's own alphabet
KEYS = [PLAIN_KEY, ODD_KEY]

PNG = image_bytes(32, 32)


def _pieces(secret: str) -> set[str]:
    """Every form of *secret* and every 8-character fragment of one, computed here as well as by
    `secret_forms`: as is, %-encoded, +-encoded, JSON-escaped, and Basic ``user:<key>``."""
    forms = set(secret_forms(secret)) | {
        secret,
        quote(secret, safe=""),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        base64.b64encode(f"user:{secret}".encode()).decode(),
    }
    return {form[i : i + 8] for form in forms for i in range(max(1, len(form) - 7))}


def _haystacks(path: Path) -> list[str]:
    """The file as written, and every string and byte string in it as parsed."""
    found = [path.read_text()]

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, bytes):
            found.append(value.decode("latin-1"))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(key)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(yaml.safe_load(found[0]))
    return found


def _leaks(folder: Path, secrets: list[str]) -> list[str]:
    pieces = set().union(*(_pieces(secret) for secret in secrets))
    return [
        f"{path.name}: {piece!r}"
        for path in sorted(folder.glob("*.yaml"))
        for text in _haystacks(path)
        for piece in pieces
        if piece in text
    ]


class Hostile:
    """A laozhang-shaped server on loopback that echoes the key it is sent, everywhere.

    Modes: ``"echo"`` answers like the provider (with the key echoed); ``"wrong"`` answers 404
    to everything, as a server that is not the provider would; ``"leaky-image"`` also puts the
    key, raw, inside the result image's bytes.
    """

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._serving = serving(self.server)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Hostile:
        self._serving.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._serving.__exit__(None, None, None)

    def result_url(self, key: str) -> str:
        encoded = quote(key, safe="")
        return (
            f"http://user:{encoded}@127.0.0.1:{self.server.server_address[1]}/files/result.png"
            f"?key={key}&api_key={encoded}&expires=1"
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(
                self, status: int, media: str, body: bytes, headers: list[tuple[str, str]]
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                # httpx sends the result URL's userinfo as Basic user:key.
                basic = self.headers.get("Authorization", "").removeprefix("Basic ")
                key = base64.b64decode(basic).decode().partition(":")[2]
                body = PNG + (key.encode() if hostile.mode == "leaky-image" else b"")
                self._send(200, "image/png", body, [("Set-Cookie", f"download={key}; Path=/")])

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                basic = base64.b64encode(f"user:{key}".encode()).decode()
                encoded = quote(key, safe="")
                echoed = [
                    ("X-Echo-Key", key),
                    ("X-Api-Key", key),
                    ("Set-Cookie", f"session={key}; Path=/; HttpOnly"),
                    ("Set-Cookie", "theme=dark; Path=/"),
                    ("Link", f'<{hostile.result_url(key)}>; rel="alternate"'),
                ]
                if hostile.mode == "wrong":
                    page = f"<html><body>No route here for {key}</body></html>"
                    self._send(404, "text/html", page.encode(), echoed)
                    return
                prompt = str(json.loads(body).get("prompt", ""))
                if key == REVOKED:
                    error = {
                        "error": {
                            "message": f"Incorrect API key provided: {key}. Find yours at "
                            f"https://example.invalid/keys?key={encoded}",
                            "type": "invalid_request_error",
                            "code": "invalid_api_key",
                            "param": key[:14] + "****" + key[-4:],
                        }
                    }
                    self._send(401, "application/json", json.dumps(error).encode(), echoed)
                elif "html" in prompt:
                    page = (
                        f"<html><body><h1>401</h1><p>The key {key} was refused.</p>"
                        f'<a href="{hostile.result_url(key)}">retry</a><!-- Basic {basic} -->'
                        "</body></html>"
                    )
                    self._send(401, "text/html; charset=utf-8", page.encode(), echoed)
                elif "xml" in prompt:
                    page = (
                        '<?xml version="1.0"?><Error><Code>AccessDenied</Code>'
                        f"<Key>{key}</Key><Encoded>{encoded}</Encoded>"
                        f"<Auth>Basic {basic}</Auth></Error>"
                    )
                    self._send(403, "application/xml", page.encode(), echoed)
                elif "plain" in prompt:
                    text = f"refused: {key}\naccess_token={quote_plus(key)}\n{key[:20]}\n"
                    self._send(401, "text/plain", text.encode(), echoed)
                else:
                    answer = {
                        "created": 1,
                        "data": [{"url": hostile.result_url(key)}],
                        "usage": {
                            "billed_to": f"Bearer {key}",
                            "api_key": key,
                            "apiKey": {"nested": [key]},
                            "note": f"key={encoded}&sig={encoded}",
                            "hint": f"Authorization: Basic {basic}",
                            "cut": key[:20] + "...",
                            "blob": base64.b64encode(b"prefix-" + key.encode()).decode(),
                        },
                    }
                    self._send(200, "application/json", json.dumps(answer).encode(), echoed)

        return Handler


def _refused(scenario_id: str, prompt: str, status: int) -> Scenario:
    return Scenario(
        id=scenario_id,
        title=f"a {status} with a {scenario_id} body",
        build=lambda adapter: EditRequest(prompt=prompt, model="flux-2-pro"),
        expect=ProviderFails(errors.AuthenticationFailed, status),
    )


SCENARIOS = [
    by_id("text-to-image"),
    by_id("result-by-url-downloaded"),
    by_id("error-401"),
    _refused("html-401", "an html page, please", 401),
    _refused("xml-403", "an xml page, please", 403),
    _refused("plain-401", "a plain page, please", 401),
]


@pytest.fixture(params=KEYS, ids=["alphanumeric-key", "key-with-plus-slash-equals"])
def recorded(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, list[str]]:
    """The hostile server's cassettes, recorded with each key."""
    key: str = request.param
    folder = tmp_path / "laozhang"
    lines: list[str] = []
    with Hostile() as server:
        verdicts = record(
            LaozhangAdapter(),
            folder,
            api_key=key,
            base_url=server.url,
            scenarios=SCENARIOS,
            log=lines.append,
        )
    assert [v.outcome for v in verdicts] == ["pass"] * len(SCENARIOS)
    return key, folder, lines


def test_no_cassette_holds_any_form_or_fragment_of_a_key(
    recorded: tuple[str, Path, list[str]],
) -> None:
    key, folder, lines = recorded
    assert sorted(path.stem for path in folder.iterdir()) == sorted(s.id for s in SCENARIOS)
    assert _leaks(folder, [key, REVOKED]) == []
    assert scan_for_secrets(folder, [key, REVOKED]) == []
    assert not any(piece in line for line in lines for piece in _pieces(key))


def test_credential_headers_keep_their_name_and_scheme(
    recorded: tuple[str, Path, list[str]],
) -> None:
    _, folder, _ = recorded
    # The edit, then its image downloaded: completing means an image.
    edit, _ = yaml.safe_load((folder / "text-to-image.yaml").read_text())["interactions"]
    assert edit["request"]["headers"]["authorization"] == ["Bearer <redacted>"]
    headers = edit["response"]["headers"]
    assert headers["x-api-key"] == ["<redacted>"]
    assert headers["set-cookie"] == ["session=<redacted>; Path=/; HttpOnly", "theme=<redacted>; Path=/"]  # fmt: skip
    assert headers["x-echo-key"] == ["[redacted]"]  # not a credential name: the key is found
    assert "key=REDACTED&api_key=REDACTED&expires=1" in headers["link"][0]
    usage = json.loads(edit["response"]["body"]["string"])["usage"]
    assert usage["api_key"] == usage["apiKey"] == "<redacted>"
    assert usage["note"] == "key=REDACTED&sig=REDACTED"
    assert usage["billed_to"] == "Bearer [redacted]"

    _, download = yaml.safe_load((folder / "result-by-url-downloaded.yaml").read_text())[
        "interactions"
    ]
    assert download["request"]["headers"]["authorization"] == ["Basic <redacted>"]
    assert re.fullmatch(
        r"http://user:REDACTED@127\.0\.0\.1:\d+/files/result\.png"
        r"\?key=REDACTED&api_key=REDACTED&expires=1",
        download["request"]["uri"],
    )
    assert download["response"]["body"]["string"] == PNG  # binary bodies are stored untouched


def test_the_scrubbed_cassettes_replay(recorded: tuple[str, Path, list[str]]) -> None:
    _, folder, _ = recorded
    for scenario in SCENARIOS:
        verdict = run_scenario(LaozhangAdapter(), scenario, folder)
        assert verdict.outcome == "pass", verdict.detail


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_run_against_the_wrong_server_leaves_the_good_cassettes_in_place(
    tmp_path: Path,
) -> None:
    good = tmp_path / "laozhang"
    shutil.copytree(CASSETTES / "laozhang", good)
    before = _snapshot(good)
    with Hostile(mode="wrong") as server, pytest.raises(RecordingFailed) as caught:
        record(
            LaozhangAdapter(),
            good,
            api_key=PLAIN_KEY,
            base_url=server.url,
            log=lambda _: None,
        )
    assert _snapshot(good) == before
    assert [path.name for path in tmp_path.iterdir()] == ["laozhang"]  # no temporary folder left
    failure = caught.value
    assert isinstance(failure, errors.FluxError)
    assert len(failure.failures) == paid_calls(LaozhangAdapter(), emulator=False)[0] == 19
    assert all("ProviderRejected" in verdict.detail for verdict in failure.failures)
    message = str(failure)
    assert f"{good} is unchanged" in message
    assert "- text-to-image: raised ProviderRejected" in message
    assert not any(piece in message for piece in _pieces(PLAIN_KEY))


def test_a_key_inside_a_binary_body_fails_the_run_naming_file_line_and_kind(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "laozhang"
    folder.mkdir()
    (folder / "result-by-url-downloaded.yaml").write_text("old and good\n")
    with Hostile(mode="leaky-image") as server, pytest.raises(RecordingFailed) as caught:
        record(
            LaozhangAdapter(),
            folder,
            api_key=ODD_KEY,
            base_url=server.url,
            scenarios=[by_id("result-by-url-downloaded")],
            log=lambda _: None,
        )
    assert _snapshot(folder) == {"result-by-url-downloaded.yaml": b"old and good\n"}
    assert [path.name for path in tmp_path.iterdir()] == ["laozhang"]
    assert caught.value.failures == ()
    findings = caught.value.findings
    where = re.escape(f"{folder}/result-by-url-downloaded.yaml:")
    assert all(re.match(rf"{where}\d+: ", finding) for finding in findings)
    assert any(re.fullmatch(rf"{where}\d+: a recording key", finding) for finding in findings)
    assert not any(piece in str(caught.value) for piece in _pieces(ODD_KEY))


def test_an_exception_in_one_scenario_is_its_failure_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "laozhang"
    shutil.copytree(CASSETTES / "laozhang", folder)
    before = _snapshot(folder)

    def explode(adapter: object) -> EditRequest:
        raise RuntimeError(f"the request builder broke, holding {PLAIN_KEY}")

    broken = Scenario(id="broken", title="broken", build=explode, expect=Completes())
    lines: list[str] = []
    with Hostile() as server, pytest.raises(RecordingFailed) as caught:
        record(
            LaozhangAdapter(),
            folder,
            api_key=PLAIN_KEY,
            base_url=server.url,
            scenarios=[broken, by_id("text-to-image")],
            log=lines.append,
        )
    assert _snapshot(folder) == before
    assert [path.name for path in tmp_path.iterdir()] == ["laozhang"]
    # The scenario after the broken one was still recorded, and passed.
    assert "  recorded text-to-image: pass" in lines
    [failure] = caught.value.failures
    assert failure.scenario == "broken"
    assert failure.detail == "RuntimeError: the request builder broke, holding [redacted]"
    assert "- broken: RuntimeError: the request builder broke" in str(caught.value)
    assert not any(piece in str(caught.value) for piece in _pieces(PLAIN_KEY))
    assert not any(piece in line for line in lines for piece in _pieces(PLAIN_KEY))


class FakeRequest:
    def __init__(self, uri: str, body: bytes, headers: dict[str, str]) -> None:
        self.uri, self.body, self.headers = uri, body, headers


@pytest.mark.parametrize(
    ("name", "value", "stored"),
    [
        ("Authorization", f"Bearer {PLAIN_KEY}", "Bearer <redacted>"),
        ("Authorization", f"Key {PLAIN_KEY}", "Key <redacted>"),
        ("Authorization", f"Token {PLAIN_KEY}", "Token <redacted>"),
        ("Authorization", "Token someone-elses-token", "Token <redacted>"),
        ("Proxy-Authorization", "Basic " + base64.b64encode(b"u:p").decode(), "Basic <redacted>"),
        ("x-key", PLAIN_KEY, "<redacted>"),
        ("X-Api-Key", "not-the-recording-key", "<redacted>"),
        ("api-key", f"{PLAIN_KEY} trailing", "<redacted>"),  # the key is no scheme
        ("Cookie", f"sid={PLAIN_KEY}; theme=dark", "sid=<redacted>; theme=<redacted>"),
        ("X-Trace", f"trace {PLAIN_KEY}", "trace [redacted]"),
    ],
)
def test_each_credential_header_keeps_its_name_and_scheme(name: str, value: str, stored: str) -> None:  # fmt: skip
    request = FakeRequest("https://api.example/v1/x", b"", {name: value})
    once = scrub_request(request, secrets=[PLAIN_KEY])
    assert once.headers == {name: stored}
    assert scrub_request(once, secrets=[PLAIN_KEY]).headers == {name: stored}


def test_urls_and_json_bodies_lose_credentials_at_any_depth_idempotently() -> None:
    key = ODD_KEY
    body = {
        "prompt": f"use {key} please",
        "auth": {"Token": "abc", "nested": [{"client_secret": 1, "keep": "me"}]},
        "callback": f"https://cb.example/hook?sig=s3cr3t&key={quote_plus(key)}&page=2",
        key: "a key as a field name",
    }
    request = FakeRequest(
        f"https://user:{quote(key, safe='')}@api.example/v1/{key}/x"
        "?Api_Key=abc&page=2&X-Amz-Signature=def#access_token=ghi",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    once = scrub_request(request, secrets=[key])
    assert once.uri == (
        "https://user:REDACTED@api.example/v1/REDACTED/x"
        "?Api_Key=REDACTED&page=2&X-Amz-Signature=REDACTED#access_token=REDACTED"
    )
    assert json.loads(once.body) == {
        "prompt": "use [redacted] please",
        "auth": {"Token": "<redacted>", "nested": [{"client_secret": "<redacted>", "keep": "me"}]},
        "callback": "https://cb.example/hook?sig=REDACTED&key=REDACTED&page=2",
        "[redacted]": "a key as a field name",
    }
    snapshot = (once.uri, once.body, dict(once.headers))
    twice = scrub_request(once, secrets=[key])
    assert (twice.uri, twice.body, dict(twice.headers)) == snapshot


def test_multipart_and_form_bodies_lose_credential_fields() -> None:
    key = PLAIN_KEY
    multipart = (
        b"--b\r\nContent-Disposition: form-data; name=\"api_key\"\r\n\r\nabc\r\n"
        b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhello " + key.encode() +
        b"\r\n--b\r\nContent-Disposition: form-data; name=\"image[]\"; filename=\"a.png\"\r\n"
        b"Content-Type: image/png\r\n\r\n" + PNG + b"\r\n--b--\r\n"
    )  # fmt: skip
    request = FakeRequest(
        "https://api.example/v1/edit",
        multipart,
        {"Content-Type": "multipart/form-data; boundary=b"},
    )
    once = scrub_request(request, secrets=[key])
    text = once.body.decode()
    assert 'name="api_key"\r\n\r\n<redacted>\r\n' in text
    assert 'name="prompt"\r\n\r\nhello [redacted]\r\n' in text
    assert "sha256=" in text
    assert scrub_request(once, secrets=[key]).body == once.body

    form = FakeRequest(
        "https://api.example/v1/token",
        f"grant=x&client_secret=abc&note={quote_plus(key)}".encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert (
        scrub_request(form, secrets=[key]).body == b"grant=x&client_secret=REDACTED&note=REDACTED"
    )


def test_a_binary_response_body_is_kept_whole_and_a_text_one_scrubbed() -> None:
    image = {
        "status": {"code": 200, "message": "OK"},
        "headers": {"Content-Type": ["image/png"]},
        "body": {"string": PNG + PLAIN_KEY.encode()},
    }
    assert scrub_response(image, secrets=[PLAIN_KEY])["body"]["string"] == PNG + PLAIN_KEY.encode()
    page = {
        "status": {"code": 500, "message": "Internal Server Error"},
        "headers": {"Content-Type": ["text/html"], "Date": ["today"]},
        "body": {"string": f"<p>{PLAIN_KEY[:30]}</p>".encode()},
    }
    scrubbed = scrub_response(page, secrets=[PLAIN_KEY])
    assert scrubbed["body"]["string"] == b"<p>[redacted]</p>"
    assert scrubbed["headers"] == {"Content-Type": ["text/html"], "content-length": ["17"]}


def _inflations(data: bytes) -> list[bytes]:
    """*data* and every layer of gzip or deflate it inflates to."""
    found = [data]
    for _ in range(3):
        for wbits in (16 + zlib.MAX_WBITS, zlib.MAX_WBITS, -zlib.MAX_WBITS):
            try:
                found.append(zlib.decompress(found[-1], wbits))
                break
            except zlib.error:
                continue
        else:
            break
    return found


@pytest.mark.parametrize("coding", ["GZIP", "x-gzip", "Deflate", "gzip, gzip", "br", "gzip"])
def test_a_compressed_answer_is_stored_as_the_library_read_it_never_compressed(
    coding: str,
) -> None:
    # vcrpy inflates "gzip" and "deflate" spelt so, alone; the library reads any case and
    # x-gzip too. A body left compressed was stored as binary: the key a sandbox echoed in it
    # reached the cassette, out of sight of the scrubber and the scan.
    plain = json.dumps({"data": [{"url": "https://cdn.example/a.png"}], "seen": PLAIN_KEY})
    data = plain.encode()
    for layer in reversed(coding.split(",")):
        data = gzip.compress(data) if "gzip" in layer.lower() else zlib.compress(data)
    answer = {
        "status": {"code": 200, "message": "OK"},
        "headers": {"Content-Type": ["application/json"], "Content-Encoding": [coding]},
        "body": {"string": data},
    }
    stored = scrub_response(answer, secrets=[PLAIN_KEY])
    body = stored["body"]["string"]
    assert not any(PLAIN_KEY[:12].encode() in layer for layer in _inflations(body))
    if coding in ("gzip, gzip", "br"):  # refused by the library: refused again on replay
        assert stored["headers"]["Content-Encoding"] == [coding]
        assert body == UNDECODABLE
    else:
        assert "Content-Encoding" not in stored["headers"]
        assert json.loads(body)["seen"] == "[redacted]"
        assert stored["headers"]["content-length"] == [str(len(body))]


def test_the_scan_names_each_kind_and_never_the_secret(tmp_path: Path) -> None:
    key = ODD_KEY
    basic = base64.b64encode(f"user:{key}".encode()).decode()
    (tmp_path / "leak.yaml").write_text(
        yaml.safe_dump(
            {
                "interactions": [
                    {
                        "request": {
                            "headers": {"x-key": [key[10:30]]},
                            "uri": f"https://h.example/x?api_key={quote(key, safe='')}",
                        },
                        "response": {"body": {"string": b"\x89PNG" + key.encode()}},
                    }
                ],
                "note": f"Authorization: Basic {basic}",
            }
        )
    )
    found = scan_for_secrets(tmp_path, [key])
    kinds = {line.split(": ", 1)[1] for line in found}
    assert {
        "a recording key",  # in the binary body
        "a recording key (URL-encoded)",
        "a recording key (base64)",
        "an 8-character fragment of a recording key",
        "an unredacted 'x-key' value",
        "an unredacted api_key= value",
        "a Basic credential",
    } <= kinds
    assert all(re.match(rf"{re.escape(str(tmp_path))}/leak\.yaml:\d+: ", line) for line in found)
    assert not any(piece in line for line in found for piece in _pieces(key))


def test_the_repository_cassettes_pass_the_scan_with_the_keys_they_were_recorded_with() -> None:
    assert scan_for_secrets(CASSETTES, [REVOKED]) == []
    pixelforge = CASSETTES.parent / "examples" / "pixelforge" / "tests" / "cassettes"
    assert scan_for_secrets(pixelforge, [REVOKED, "sandbox-key"]) == []


SCRUBBER = Scrubber([ODD_KEY])


@given(before=st.text(max_size=40), after=st.text(max_size=40), form=st.sampled_from(sorted(secret_forms(ODD_KEY))))  # fmt: skip
def test_free_text_scrubbing_removes_every_form_and_is_idempotent(
    before: str, after: str, form: str
) -> None:
    once = SCRUBBER.text(before + form + after)
    assert not any(piece in once for piece in _pieces(ODD_KEY))
    assert SCRUBBER.text(once) == once
