"""The command's habits: --version and help, --json everywhere it reports, check, tables that
fit the terminal, quiet output off a terminal, flags named in messages, checks before sending,
--format from -o, base URLs from the environment, keyless providers skipped, batch files read
relative to themselves.

Everything runs through ``main([...], out, err)`` against the loopback emulator.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from flux_adapters import __version__
from flux_adapters.cli import main
from flux_adapters.emulator import Emulator, run_emulator
from flux_adapters.providers import PROVIDERS
from tests.conftest import image_bytes

PREFIXES = ("LAOZHANG", "APIYI", "AIMLAPI", "BFL", "FAL")


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Emulator]:
    """A fresh emulator, every provider's key set and base URL pointing at it; cwd: a temp folder."""
    monkeypatch.chdir(tmp_path)
    for name in ("FLUX_PROVIDERS", "FLUX_CONFIG", "FLUX_LOG", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    for prefix in PREFIXES:
        monkeypatch.setenv(f"{prefix}_API_KEY", "sk-test-key-0123456789")
    with run_emulator() as running:
        for provider in ("laozhang", "apiyi", "aimlapi", "bfl", "fal"):
            monkeypatch.setenv(f"{provider.upper()}_BASE_URL", running.base_url(provider))
        yield running


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def one_document(out: str) -> object:
    """The JSON document standard output holds, and nothing else."""
    document = json.loads(out)  # raises on anything but exactly one JSON value
    assert out.endswith(("}\n", "]\n"))
    return document


# --- 1. --version, and the help without a command ---------------------------------------------


def test_version_and_a_bare_command_print_on_stdout_and_succeed() -> None:
    code, out, err = run("--version")
    assert (code, out, err) == (0, f"flux-adapters {__version__}\n", "")
    code, out, err = run()
    assert code == 0
    assert err == ""
    assert out.startswith("usage: flux-adapters")
    for command in ("edit", "check", "explain", "batch", "models", "emulate", "conformance"):
        assert command in out


def test_an_unknown_flux_log_is_one_warning_line_as_the_commands_others(tmp_path: Path) -> None:
    # It was Python's "/.../flux_adapters/_log.py:96: RuntimeWarning: FLUX_LOG=..." with the
    # source line "  configure_from_env()" under it. (A process of its own: FLUX_LOG is read
    # when the client module is first imported.)
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "FLUX_CONFIG")}
    finished = subprocess.run(
        [sys.executable, "-m", "flux_adapters", "models", "--json"],
        env=env | {"FLUX_LOG": "verbose"}, cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert finished.stderr == (
        "flux-adapters: warning: FLUX_LOG='verbose' is neither 'info' nor 'debug'; "
        "flux_adapters logs nothing\n"
    )
    json.loads(finished.stdout)


# --- 2. --json ----------------------------------------------------------------------------------


def test_edit_json_is_one_document_with_the_result_and_status_stays_on_stderr(
    emulator: Emulator, tmp_path: Path
) -> None:
    picture = tmp_path / "robot.png"
    picture.write_bytes(image_bytes(64, 48))
    target = tmp_path / "out" / "robot.webp"
    code, out, err = run(
        "edit", "image 1 on a beach", "-i", str(picture), "-p", "aimlapi",
        "--size", "512x512", "-o", str(target), "--json",
    )  # fmt: skip
    assert code == 0, err
    document = one_document(out)
    assert isinstance(document, dict)
    assert (document["provider"], document["model"], document["exit_status"]) == (
        "aimlapi",
        "flux-2-pro",
        0,
    )
    [image] = document["images"]
    assert image == {
        "path": str(target),
        "format": "webp",  # from -o's extension
        "width": 512,
        "height": 512,
        "bytes": target.stat().st_size,
    }
    assert document["cost_usd"] is None or isinstance(document["cost_usd"], float)
    assert [attempt["provider"] for attempt in document["attempts"]] == ["aimlapi"]
    assert document["attempts"][0]["outcome"] == "ok"
    assert document["warnings"] == []
    assert "aimlapi: generating flux-2-pro with 1 reference image(s)" in err


def test_a_failure_with_json_is_a_json_error_on_stdout_and_one_line_on_stderr(
    emulator: Emulator,
) -> None:
    code, out, err = run(
        "edit", "p", "-p", "laozhang", "--width", "1000", "--height", "1000", "--json"
    )
    assert code == 2
    document = one_document(out)
    assert isinstance(document, dict)
    error = document["error"]
    assert (error["type"], error["exit_status"]) == ("RequestError", 2)
    assert [v["flag"] for v in error["violations"]] == ["--width/--height", "--width/--height"]
    assert error["violations"][-1]["message"].endswith("nearest valid: 992x992 or 1008x1008")
    assert len(err.splitlines()) == 1
    assert emulator.calls() == []
    # A usage error found after the arguments were read is one too.
    code, out, _ = run("edit", "p", "-p", "laozhang", "--format", "png", "-o", "x.jpg", "--json")
    assert code == 2
    assert one_document(out) == {
        "error": {
            "type": "UsageError",
            "message": "flux-adapters edit: error: --format png and -o x.jpg (a jpeg file name) "
            "disagree; drop one, or make them name one format",
            "exit_status": 2,
        }
    }


def test_models_json_holds_every_limit_and_price() -> None:
    code, out, _ = run("models", "--json")
    assert code == 0
    document = one_document(out)
    assert isinstance(document, list)
    assert [entry["provider"] for entry in document] == list(PROVIDERS)
    aimlapi = next(entry for entry in document if entry["provider"] == "aimlapi")
    [pro] = aimlapi["models"]
    assert pro["edit_wire_model"] == "blackforestlabs/flux-2-pro-edit"
    assert pro["sizes"] == {"multiple": 32, "min_side": 512, "max_side": 2048, "max_pixels": None}
    assert pro["images"] == {"low": 0, "high": 3}
    assert pro["image"]["formats"] == ["jpeg", "png", "webp"]
    laozhang = next(entry for entry in document if entry["provider"] == "laozhang")
    price = laozhang["models"][0]["price"]
    assert price["usd"] == 0.03
    assert price["describe"] == "$0.03 per call (as of 2026-09-24)"
    assert aimlapi["key_variable"] == "AIMLAPI_API_KEY"


def test_explain_json_uses_the_base_url_variable(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAOZHANG_BASE_URL", "http://127.0.0.1:9/proxy/v1/")
    code, out, _ = run(
        "explain", "p", "--size", "512x512", "-p", "laozhang", "-p", "aimlapi", "--json"
    )
    assert code == 0
    document = one_document(out)
    assert isinstance(document, dict)
    laozhang, aimlapi = document["providers"]
    assert laozhang["base_url"] == "http://127.0.0.1:9/proxy"
    assert laozhang["request"]["url"] == "http://127.0.0.1:9/proxy/v1/images/generations"
    assert ["Authorization", "Bearer [redacted]"] in laozhang["request"]["headers"]
    assert laozhang["request"]["body"]["size"] == "512x512"
    assert aimlapi["request"]["body"]["image_size"] == {"width": 512, "height": 512}
    assert "sk-test-key" not in out
    # And as text: the URL a client would use.
    code, out, _ = run("explain", "p", "-p", "laozhang")
    assert "POST http://127.0.0.1:9/proxy/v1/images/generations" in out


def test_batch_json_is_the_summary(emulator: Emulator, tmp_path: Path) -> None:
    source = tmp_path / "jobs.jsonl"
    source.write_text('{"id": "a", "prompt": "p", "size": "64x64"}\n')
    code, out, err = run(
        "batch", str(source), "-o", str(tmp_path / "o"), "-p", "laozhang", "--json"
    )
    assert code == 0, err
    assert one_document(out) == {
        "total": 1,
        "saved": 1,
        "already_saved": 0,
        "failed": 0,
        "unconfirmed": 0,
        "changed": 0,
        "not_started": 0,
        "interrupted": False,
        "report": str(tmp_path / "o" / "report.jsonl"),
    }


# --- check ----------------------------------------------------------------------------------------


def test_check_lists_every_violation_per_provider_and_sends_nothing(emulator: Emulator) -> None:
    argv = ["check", "p", "--size", "1000x1000", "--seed", "0", "-p", "laozhang", "-p", "aimlapi"]
    code, out, _ = run(*argv)
    assert code == 2  # one of them refuses it
    assert out.splitlines()[0] == "laozhang: refused (2 problems)"
    assert "  - --size: height is not a multiple of 16; nearest valid: 992x992 or 1008x1008" in out
    assert "aimlapi: refused (3 problems)" in out
    assert "  - --seed: is out of range (limit: >= 1; got: 0)" in out
    code, out, _ = run(*argv, "--json")
    document = one_document(out)
    assert isinstance(document, dict)
    assert document["accepted"] is False
    assert [len(entry["violations"]) for entry in document["providers"]] == [2, 3]
    code, out, _ = run("check", "p", "--size", "1024x1024", "-p", "laozhang", "-p", "aimlapi")
    assert (code, out) == (0, "laozhang: accepted\naimlapi: accepted\n")
    assert emulator.calls() == []


def test_check_says_what_an_allowed_conversion_would_send(emulator: Emulator) -> None:
    code, out, _ = run("check", "p", "--size", "1000x1000", "--allow-conversions", "-p", "laozhang")
    assert code == 0
    assert out == (
        "laozhang: accepted\n  warning: size 1000x1000 sent as 992x992: laozhang takes sizes in "
        "multiples of 16 from 64 to 2048 px, at most 4 MP for flux-2-pro; sent the nearest valid "
        "size\n"
    )


def test_check_takes_the_configured_providers_by_default(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUX_PROVIDERS", "apiyi")
    code, out, _ = run("check", "p")
    assert (code, out) == (0, "apiyi: accepted\n")
    monkeypatch.delenv("FLUX_PROVIDERS")
    code, out, _ = run("check", "p")  # none configured: every provider
    assert [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")] == list(
        PROVIDERS
    )


# --- 3. models as a table that fits -------------------------------------------------------------


@pytest.mark.parametrize("columns", [80, 120])
def test_models_fits_the_terminal_width(columns: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    code, out, _ = run("models")
    assert code == 0
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert "|---" not in out  # a table drawn for the terminal, not Markdown
    for provider in PROVIDERS:
        assert any(line.startswith(f"{provider} (") for line in lines), provider
    assert "$0.03 per call" in " ".join(out.split())


def test_models_markdown_is_the_documentation_tables_and_the_fallback_without_rich(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flux_adapters._tables import limits_table

    code, markdown, _ = run("models", "--markdown")
    assert code == 0
    assert limits_table("aimlapi") in markdown
    monkeypatch.setitem(sys.modules, "rich.console", None)  # as if the cli extra were missing
    code, out, _ = run("models")
    assert (code, out) == (0, markdown)


# --- 4. progress: rich on a terminal, one quiet line elsewhere ----------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_waiting_is_one_line_off_a_terminal_and_a_rich_spinner_on_one() -> None:
    from flux_adapters._terminal import waiting

    threads = threading.active_count()
    plain = io.StringIO()
    with waiting("laozhang: generating flux-2-pro ...", plain):
        assert threading.active_count() == threads  # no thread of ours ticking
    assert plain.getvalue() == "laozhang: generating flux-2-pro ...\n"
    terminal = Terminal()
    with waiting("laozhang: generating [flux-2-pro] ...", terminal):
        time.sleep(0.3)  # rich redraws ten times a second
    drawn = terminal.getvalue()
    assert "laozhang: generating [flux-2-pro] ..." in drawn  # shown as it is, not as markup
    assert "\x1b[" in drawn  # drawn and cleared by rich
    deadline = time.monotonic() + 2
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.01)  # rich's own redraw thread ends a moment after the display
    assert threading.active_count() == threads


def test_a_batch_on_a_terminal_draws_a_bar_and_prints_failures_above_it() -> None:
    from flux_adapters._terminal import batch_progress

    terminal, plain = Terminal(), io.StringIO()
    for stream in (terminal, plain):
        with batch_progress(2, stream) as shown:
            shown.advance()
            shown.say("flux-adapters: b: failed: [RequestError] ...")
            shown.advance()
    assert "flux-adapters: b: failed: [RequestError] ..." in terminal.getvalue()  # not markup
    assert "2/2" in terminal.getvalue()
    assert plain.getvalue() == "flux-adapters: b: failed: [RequestError] ...\n"  # nothing else


def test_a_batch_off_a_terminal_prints_only_the_jobs_that_did_not_succeed(
    emulator: Emulator, tmp_path: Path
) -> None:
    source = tmp_path / "jobs.jsonl"
    source.write_text(
        '{"id": "good", "prompt": "p", "size": "64x64"}\n'
        '{"id": "bad", "prompt": "p", "size": "1000x1000"}\n'
    )
    code, out, err = run("batch", str(source), "-o", str(tmp_path / "o"), "-p", "laozhang")
    assert code == 3
    # The batch file's own field names ("size"): its lines are written with them.
    assert err.splitlines() == [
        "flux-adapters: bad: failed: RequestError: 2 problems with the request for flux-2-pro at "
        "laozhang: size: width is not a multiple of 16 (limit: multiples of 16 from 64 to 2048 "
        "px, at most 4 MP; got: width 1000); size: height is not a multiple of 16; nearest valid: "
        "992x992 or 1008x1008 (limit: multiples of 16 from 64 to 2048 px, at most 4 MP; got: "
        "height 1000)"
    ]
    assert out.startswith("1 saved, 0 already saved, 1 failed")


# --- 5. flags, not Python arguments, in messages --------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["-p", "aimlapi", "--aspect-ratio", "21:9"],
            "--aspect-ratio: is not one of aimlapi's aspect-ratio presets for flux-2-pro (1:1, "
            "4:3, 3:4, 16:9, 9:16); pass one of them, --width/--height (e.g. 1568x672 for 21:9) "
            "or --allow-conversions",
        ),
        (
            ["-p", "apiyi", "--size", "1792x1024"],
            "--size: apiyi takes only an aspect ratio for flux-2-pro; pass --aspect-ratio 7:4 or "
            "--allow-conversions",
        ),
        (["-p", "laozhang", "-o", "x.webp"], "--format (from -o x.webp): is not offered by laozhang"),
        (["-p", "laozhang", "--width", "64"], "--width and --height go together"),
        (["-p", "laozhang", "--width", "64", "--height", "64", "--size", "64x64"], "give the output size one way"),
    ],
)  # fmt: skip
def test_messages_name_the_flags(argv: list[str], said: str, emulator: Emulator) -> None:
    code, _, err = run("edit", "p", *argv)
    assert code == 2
    assert said in err
    assert "=True" not in err
    assert "aspect_ratio=" not in err
    assert emulator.calls() == []


def test_a_missing_key_names_the_variable_not_a_python_argument(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LAOZHANG_API_KEY")
    code, _, err = run("edit", "p", "-p", "laozhang")
    assert code == 5
    assert (
        err == "flux-adapters: ConfigurationError: no API key for laozhang: set LAOZHANG_API_KEY\n"
    )


@pytest.mark.parametrize(
    ("outcome", "error", "code"),
    [
        ("failed", "JobFailed", 3),
        ("content-moderated", "Moderated", 3),
        ("not-found", "JobNotFound", 3),
    ],
)
def test_a_job_that_ends_without_an_image_exits_as_a_provider_error(
    outcome: str, error: str, code: int, emulator: Emulator
) -> None:
    from flux_adapters.emulator import Fault

    emulator.inject("bfl", Fault(outcome=outcome, pending=0))  # it ends at the first poll
    status, _, err = run("edit", "a cat", "-p", "bfl", "--size", "64x64", "-o", "cat.png")
    assert (status, err.splitlines()[-1].split(":")[1].strip()) == (code, error)
    assert not Path("cat.png").exists()


def test_a_job_past_its_deadline_exits_as_no_usable_answer(emulator: Emulator) -> None:
    from flux_adapters.emulator import Fault

    emulator.inject("bfl", Fault(pending=10**9))
    status, _, err = run("edit", "a cat", "-p", "bfl", "--size", "64x64", "--timeout", "0.5")
    assert status == 4
    assert "JobTimeout" in err


# --- 6. every local check before the status line ---------------------------------------------


def test_nothing_is_announced_or_sent_when_every_provider_refuses(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUX_PROVIDERS", "laozhang,aimlapi")
    code, _, err = run("edit", "p", "--size", "1000x1000")
    assert code == 2
    assert "generating" not in err
    assert err.startswith(
        "flux-adapters: RequestError: 4 problems with the request for flux-2-pro at every provider: laozhang: --size: width is not a multiple of 16"
    )
    assert (
        "aimlapi: --size: height is not a multiple of 32; nearest valid: 992x992 or 1024x1024"
        in err
    )
    assert emulator.calls() == []


def test_the_status_line_names_the_providers_that_accept(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLUX_PROVIDERS", "aimlapi,laozhang")
    code, out, err = run("edit", "p", "--size", "512x528", "-o", str(tmp_path / "x.png"))
    assert code == 0, err
    assert err.splitlines()[0] == "laozhang: generating flux-2-pro ..."  # aimlapi: not 32-grid
    assert "tried:    aimlapi: skipped (its limits refuse the request)" in out


def test_a_bad_output_path_is_found_before_the_status_line(
    emulator: Emulator, tmp_path: Path
) -> None:
    code, _, err = run("edit", "p", "-p", "laozhang", "-o", str(tmp_path))
    assert code == 7
    assert "generating" not in err


# --- 7. --format from -o --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"), [("x.PNG", "PNG"), ("x.jpg", "JPEG"), ("x.jpeg", "JPEG"), ("x.webp", "WEBP")]
)
def test_the_format_follows_the_output_extension(
    name: str, kind: str, emulator: Emulator, tmp_path: Path
) -> None:
    target = tmp_path / name
    code, _, err = run("edit", "p", "-p", "aimlapi", "--size", "512x512", "-o", str(target))
    assert code == 0, err
    with Image.open(target) as picture:
        assert picture.format == kind


def test_a_format_that_disagrees_with_the_extension_is_a_usage_error(emulator: Emulator) -> None:
    code, _, err = run("edit", "p", "-p", "aimlapi", "--format", "webp", "-o", "x.png")
    assert code == 2
    assert err == (
        "flux-adapters edit: error: --format webp and -o x.png (a png file name) disagree; drop "
        "one, or make them name one format\n"
    )
    assert (
        run("edit", "p", "-p", "aimlapi", "--size", "512x512", "--format", "jpeg", "-o", "x.jpg")[0]
        == 0
    )
    assert emulator.calls("aimlapi")  # sent


@pytest.mark.parametrize("name", ["x.gif", "x.TIFF", "x.bmp", "x.heic", "x.jpe"])
def test_an_output_name_no_result_can_have_is_refused_before_sending(
    name: str, emulator: Emulator
) -> None:
    # No provider returns GIF, TIFF, BMP or HEIC: the image would be paid for and then refused
    # by save() (ExtensionMismatch). A .jpe name is a JPEG name: it sets --format like .jpg.
    code, _, err = run("edit", "p", "-p", "aimlapi", "--size", "512x512", "-o", name)
    if name == "x.jpe":
        assert code == 0, err
        with Image.open(name) as picture:
            assert picture.format == "JPEG"
        return
    assert code == 2
    assert "is not a format a provider returns" in err
    assert "generating" not in err
    assert not emulator.calls("aimlapi")  # nothing sent, nothing paid


@pytest.mark.parametrize(("name", "expected"), [(".png", "PNG"), (".JPG", "JPEG")])
def test_an_output_name_that_is_only_an_extension_sets_the_format_too(
    name: str, expected: str, emulator: Emulator
) -> None:
    # pathlib sees ".png" as a hidden file with no extension; a reader sees a PNG file. Without
    # the format set from it, laozhang's default JPEG would be saved under that name.
    code, _, err = run("edit", "p", "-p", "laozhang", "--size", "64x64", "-o", name)
    assert code == 0, err
    with Image.open(name) as picture:
        assert picture.format == expected


# --- 8. <PROVIDER>_BASE_URL everywhere ---------------------------------------------------------------


def test_edit_and_batch_send_to_the_base_url_variable(emulator: Emulator, tmp_path: Path) -> None:
    code, _, err = run(
        "edit", "p", "-p", "laozhang", "--size", "64x64", "-o", str(tmp_path / "a.png")
    )
    assert code == 0, err
    source = tmp_path / "jobs.jsonl"
    source.write_text('{"id": "b", "prompt": "batch", "size": "64x64"}\n')
    code, _, err = run("batch", str(source), "-o", str(tmp_path / "o"), "-p", "laozhang")
    assert code == 0, err
    assert [entry.prompt for entry in emulator.billed("laozhang")][-2:] == ["p", "batch"]


def test_explain_shows_the_configuration_files_base_url_where_edit_sends(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # explain read $LAOZHANG_BASE_URL only: with base_url in the file, it showed the real host
    # while edit sent to the file's.
    monkeypatch.delenv("LAOZHANG_BASE_URL")
    url = emulator.base_url("laozhang")
    (tmp_path / "flux-adapters.toml").write_text(
        f'providers = ["laozhang"]\n[provider.laozhang]\nbase_url = "{url}"\n'
    )
    code, _, err = run("edit", "p", "--size", "64x64", "-o", str(tmp_path / "a.png"))
    assert code == 0, err
    assert [entry.prompt for entry in emulator.billed("laozhang")] == ["p"]
    code, out, _ = run("explain", "p", "--size", "64x64", "--json")
    assert code == 0
    document = one_document(out)
    assert isinstance(document, dict)
    laozhang = next(entry for entry in document["providers"] if entry["provider"] == "laozhang")
    assert laozhang["base_url"] == url.rstrip("/")
    assert laozhang["request"]["url"] == f"{url.rstrip('/')}/v1/images/generations"
    # -p leaves the configuration aside, in explain as in edit: the provider's own URL.
    code, out, _ = run("explain", "p", "-p", "laozhang")
    assert "POST https://api.laozhang.ai/v1/images/generations" in out


# --- 9. providers without a key are skipped ---------------------------------------------------------


def test_a_configured_provider_without_a_key_is_skipped_with_a_warning(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLUX_PROVIDERS", "laozhang,aimlapi")
    monkeypatch.delenv("LAOZHANG_API_KEY")
    code, out, err = run("edit", "p", "--size", "512x512", "-o", str(tmp_path / "a.png"), "--json")
    assert code == 0, err
    assert err.splitlines()[0] == (
        "flux-adapters: warning: laozhang skipped: no API key (set LAOZHANG_API_KEY)"
    )
    document = one_document(out)
    assert isinstance(document, dict)
    assert document["provider"] == "aimlapi"
    monkeypatch.delenv("AIMLAPI_API_KEY")
    code, _, err = run("edit", "p")
    assert code == 5
    assert err == (
        "flux-adapters: ConfigurationError: no API key for any of the providers: set "
        "LAOZHANG_API_KEY (laozhang), AIMLAPI_API_KEY (aimlapi)\n"
    )


def test_batch_providers_named_without_a_key_are_skipped_too(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("APIYI_API_KEY")
    source = tmp_path / "jobs.jsonl"
    source.write_text('{"id": "a", "prompt": "p", "size": "64x64"}\n')
    code, _, err = run(
        "batch", str(source), "-o", str(tmp_path / "o"), "-p", "apiyi", "-p", "laozhang"
    )
    assert code == 0, err
    assert err == "flux-adapters: warning: apiyi skipped: no API key (set APIYI_API_KEY)\n"
    assert [entry.provider for entry in emulator.billed()][-1:] == ["laozhang"]


# --- 10. the nearest valid size -----------------------------------------------------------------------


def test_an_off_grid_size_is_sent_as_the_nearest_valid_one_when_allowed(
    emulator: Emulator, tmp_path: Path
) -> None:
    target = tmp_path / "a.png"
    code, out, err = run(
        "edit",
        "p",
        "-p",
        "laozhang",
        "--width",
        "1000",
        "--height",
        "1000",
        "--allow-conversions",
        "-o",
        str(target),
    )
    assert code == 0, err
    assert "warning:  width/height 1000x1000 sent as 992x992" in out
    with Image.open(target) as picture:
        assert picture.size == (992, 992)


# --- 11. batch: paths relative to the file, a report of one line per job ------------------------------


def test_batch_image_paths_are_relative_to_the_file(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    (data / "refs").mkdir(parents=True)
    (data / "refs" / "robot.png").write_bytes(image_bytes(64, 64))
    absolute = tmp_path / "elsewhere.png"
    absolute.write_bytes(image_bytes(32, 32))
    source = data / "jobs.jsonl"
    source.write_text(
        json.dumps({"id": "rel", "prompt": "p", "images": ["refs/robot.png"], "size": "64x64"}) + "\n"
        + json.dumps({"id": "abs", "prompt": "p", "images": [str(absolute)], "size": "64x64"}) + "\n"
    )  # fmt: skip
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the file's folder
    code, out, err = run("batch", str(source), "-o", str(tmp_path / "o"), "-p", "laozhang")
    assert code == 0, err
    assert out.startswith("2 saved")


def test_urls_with_an_upper_case_scheme_are_urls_in_a_batch_line_and_in_edit(
    emulator: Emulator, tmp_path: Path
) -> None:
    # EditRequest takes HTTPS://... as a URL (schemes are case-insensitive, RFC 3986 3.1); the
    # command line and a batch line took it for a file path ("file not found").
    from flux_adapters._batch_files import requests

    source = tmp_path / "jobs.jsonl"
    source.write_text(json.dumps({"id": "u", "prompt": "p", "images": ["HTTPS://a.example/x.png"]}))
    [(_, request)] = list(requests(source, lambda *_: None))
    assert [type(image).__name__ for image in request.images] == ["UrlImage"]
    code, out, err = run("check", "p", "-p", "laozhang", "-i", "HTTPS://a.example/x.png", "--json")
    assert code == 0, err
    assert json.loads(out)["accepted"] is True


def test_a_batch_line_with_a_key_given_twice_is_refused(emulator: Emulator, tmp_path: Path) -> None:
    # json.loads keeps the last of two equal keys: which prompt (or id) was meant is a guess.
    source = tmp_path / "jobs.jsonl"
    source.write_text(
        '{"id": "a", "prompt": "a red door", "prompt": "a blue door"}\n'
        '{"id": "b", "prompt": "p", "size": "64x64"}\n'
    )
    code, _, err = run("batch", str(source), "-o", str(tmp_path / "o"), "-p", "laozhang")
    assert code == 2
    assert "jobs.jsonl:1" in err
    assert "'prompt' given twice" in err
    assert not emulator.calls("laozhang")  # the whole file is refused before anything is sent


def test_the_report_keeps_one_line_per_job(tmp_path: Path) -> None:
    from flux_adapters._batch_files import compact_report

    report = tmp_path / "report.jsonl"
    lines = [
        {"id": "a", "status": "ok", "provider": "laozhang"},
        {"id": "b", "status": "failed"},
        {"note": "a line without an id is kept"},
        {"id": "a", "status": "skipped"},
        {"id": "b", "status": "ok"},
        {"id": "c", "status": "skipped"},
    ]
    report.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report.chmod(0o600)
    assert compact_report(report)
    assert [json.loads(line) for line in report.read_text().splitlines()] == [
        {"id": "a", "status": "ok", "provider": "laozhang"},  # not replaced by "skipped"
        {"id": "b", "status": "ok"},  # the latest, at the place of the first
        {"note": "a line without an id is kept"},
        {"id": "c", "status": "skipped"},
    ]
    assert report.stat().st_mode & 0o777 == 0o600
    assert list(tmp_path.iterdir()) == [report]  # no temporary file left
    assert not compact_report(report)  # nothing repeated: left as it is


def test_a_first_runs_report_is_not_read_back_and_a_reruns_is_compacted(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flux_adapters import _batch_files

    compactions: list[Path] = []
    compact = _batch_files.compact_report

    def counted(path: Path) -> bool:
        compactions.append(path)
        return compact(path)

    monkeypatch.setattr(_batch_files, "compact_report", counted)
    source = tmp_path / "jobs.jsonl"
    source.write_text("".join(json.dumps({"id": f"j{n}", "prompt": "p", "size": "64x64"}) + "\n"
                              for n in range(5)))  # fmt: skip
    report = tmp_path / "o" / "report.jsonl"
    assert run("batch", str(source), "-o", str(tmp_path / "o"), "-p", "laozhang")[0] == 0
    assert compactions == []  # one line per job already, each this run's
    first = report.read_text()
    assert run("batch", str(source), "-o", str(tmp_path / "o"), "-p", "laozhang")[0] == 0
    assert compactions == [report]  # a rerun's "skipped" lines follow the first run's
    assert report.read_text() == first


_IDS = st.sampled_from(["a", "b", "A", "c"])  # "a" and "A" are one file name (file_key)
_LINES = st.one_of(
    st.builds(lambda job: {"id": job, "prompt": "p", "size": "64x64"}, _IDS),
    st.builds(lambda job: {"id": job, "prompt": "p", "size": "0x0"}, _IDS),  # no request
    st.builds(lambda job: {"id": job, "prompt": 5}, _IDS),  # not the shape of a line
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=st.lists(_LINES, min_size=1, max_size=6), earlier=st.lists(_IDS, max_size=2))
def test_a_report_left_uncompacted_has_nothing_to_compact(
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    lines: list[dict[str, object]],
    earlier: list[str],
) -> None:
    """The command compacts the report unless it holds one line per id already: what it leaves
    is what compacting it always would (repeated ids reach the batch, as in a file edited after
    its check; a report of an earlier run is there or not)."""
    import tempfile

    from flux_adapters import _batch_files
    from flux_adapters._batch_files import compact_report

    monkeypatch.setattr(_batch_files, "check_file", lambda path: len(lines))
    with tempfile.TemporaryDirectory() as scratch:
        source, folder = Path(scratch) / "jobs.jsonl", Path(scratch) / "o"
        source.write_text("".join(json.dumps(line) + "\n" for line in lines))
        folder.mkdir()
        report = folder / "report.jsonl"
        report.write_text("".join(json.dumps({"id": job, "status": "failed"}) + "\n"
                                  for job in earlier))  # fmt: skip
        run("batch", str(source), "-o", str(folder), "-p", "laozhang")
        written = report.read_text()
        ids = [json.loads(line)["id"] for line in written.splitlines()]
        assert len(ids) == len(set(ids)), written
        assert compact_report(report) is False
        assert set(ids) == {str(line["id"]) for line in lines} | set(earlier)


def test_the_temporary_file_of_a_compaction_killed_midway_is_removed_by_the_next_one(
    tmp_path: Path,
) -> None:
    from flux_adapters._batch_files import compact_report

    report = tmp_path / "report.jsonl"
    line = json.dumps({"id": "a", "status": "ok"}) + "\n"
    report.write_text(line + line)
    stale = tmp_path / ".report.jsonl.0badf00d.tmp"  # SIGKILL while it was being written
    stale.write_text(line)
    kept = tmp_path / ".report.jsonl.notmine.tmp"  # not a name compact_report gives
    kept.write_text("x")
    assert compact_report(report)
    assert sorted(path.name for path in tmp_path.iterdir()) == [kept.name, report.name]
    assert report.read_text() == line
    stale.write_text(line)
    assert not compact_report(report)  # nothing to compact, and still no leftover
    assert not stale.exists()


def test_a_report_replaced_while_its_lock_was_awaited_is_opened_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flux_adapters import _journal

    report = tmp_path / "report.jsonl"
    report.write_text('{"id": "a", "status": "failed"}\n')
    share = _journal._share
    replaced: list[int] = []

    def rewritten_meanwhile(fd: int) -> None:
        if not replaced:  # a finished batch compacts the report just then
            compacted = tmp_path / "new"
            compacted.write_text('{"id": "a", "status": "ok"}\n')
            compacted.replace(report)
            replaced.append(fd)
        share(fd)

    monkeypatch.setattr(_journal, "_share", rewritten_meanwhile)
    lines = _journal.JsonLines(report)
    lines.append({"id": "b", "status": "ok"})
    lines.close()
    assert report.read_text() == '{"id": "a", "status": "ok"}\n{"id":"b","status":"ok"}\n'


def test_a_report_another_process_holds_is_not_rewritten(tmp_path: Path) -> None:
    import fcntl

    report = tmp_path / "report.jsonl"
    text = '{"id": "a", "status": "failed"}\n{"id": "a", "status": "ok"}\n'
    report.write_text(text)
    with report.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_SH)
        from flux_adapters._batch_files import compact_report

        assert not compact_report(report)
    assert report.read_text() == text


# --- 12. the batch file's shape, checked whole before anything is sent -----------------------------


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ({"id": "x", "prompt": "p", "width": "512", "height": 512}, "jobs.jsonl:1: width must be a whole number (limit: a whole number; got: str '512')"),
        ({"id": "x", "prompt": "p", "seed": 1.5}, "jobs.jsonl:1: seed must be a whole number"),
        ({"id": "x", "prompt": "p", "allow_conversions": "yes"}, "jobs.jsonl:1: allow_conversions must be true or false"),
        ({"id": "x"}, "jobs.jsonl:1: prompt is missing (limit: required (text); got: nothing)"),
        ({"id": "x", "prompt": "p", "images": "robot.png"}, "jobs.jsonl:1: images must be a list of paths or URLs (strings)"),
        ({"id": "x", "prompt": "p", "images": ["a.png", 3]}, "jobs.jsonl:1: images[1] must be text (limit: text; got: int 3)"),
        ({"id": True, "prompt": "p"}, "jobs.jsonl:1: id must be a file name (text) or a whole number"),
        ({"id": "x", "prompt": "p", "colour": "red", "sizes": 1}, "jobs.jsonl:1: unknown fields (limit: allow_conversions, aspect_ratio, guidance, height, id, images, model, output_format, prompt, prompt_upsampling, safety_tolerance, seed, size, steps, width; got: ['colour', 'sizes'])"),
    ],
)  # fmt: skip
def test_a_line_of_the_wrong_shape_refuses_the_file_before_anything_is_sent(
    line: dict[str, object], said: str, emulator: Emulator, tmp_path: Path
) -> None:
    source = tmp_path / "jobs.jsonl"
    source.write_text(json.dumps(line) + "\n")
    code, _, err = run("batch", str(source), "-o", str(tmp_path / "o"), "-p", "laozhang")
    assert code == 2
    assert said in err
    assert emulator.calls() == []
