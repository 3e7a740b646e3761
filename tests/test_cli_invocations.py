"""Bad invocations of the command.

Every row must end within seconds with its documented exit status and a short message on
standard error that names the problem, never a traceback. Nothing leaves the machine: every
provider's base URL points at a loopback port that refuses connections, and rows that would
otherwise reach a provider say so by their exit status (4) instead.

A row runs as a real process (``python -m flux_adapters``) where it needs one: it closes or
redirects a standard stream, writes to a reader that went away or to a full disk, or sets what
the interpreter reads as it starts; and at least one row per exit status does (`Row.process`),
so that the entry point itself is met. The others call `main` in this process as that entry
point would, with its own standard streams (stdin empty, as from /dev/null), environment and
working folder: an interpreter start costs about 0.3 s of CPU, the row itself milliseconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from flux_adapters.cli import main
from flux_adapters.providers import PROVIDERS, get_adapter
from tests.conftest import image_bytes

PREFIXES = sorted({get_adapter(name).env_prefix for name in PROVIDERS})
SECONDS = 10.0
GOOD_LINE = {"id": "robot", "prompt": "a robot", "size": "512x512"}


@dataclass(frozen=True)
class Row:
    """One invocation and what it must end with."""

    name: str
    argv: tuple[str, ...]
    code: int
    says: str = ""
    """Text standard error must contain (case-insensitive), naming the problem."""
    env: Mapping[str, str | None] = field(default_factory=dict)
    """Changes to the environment; None removes a variable."""
    redirect: str = ""
    """Shell redirections applied to the command, e.g. ">&-" (close stdout)."""
    stdout: Literal["pipe", "closed-pipe", "full"] = "pipe"
    cwd: str = "work"
    quiet: bool = False
    """Standard error must be empty."""
    not_in_stdout: str = ""
    not_in_stderr: str = ""
    process: bool = False
    """Run as a real process even though the row needs none (see `needs_process`)."""

    @property
    def needs_process(self) -> bool:
        """Whether this row runs as a real process: what it checks, or its choice."""
        return (
            self.process
            or bool(self.redirect)
            or self.stdout != "pipe"
            or any(name in INTERPRETER_VARIABLES for name in self.env)
        )


INTERPRETER_VARIABLES = frozenset({"PYTHONUNBUFFERED"})
"""Variables the interpreter reads as it starts: no use setting them for a row run in-process."""


def bad_lines(*lines: object) -> list[object]:
    return [GOOD_LINE, *lines]


BATCH_FILES: dict[str, list[object]] = {
    "good.jsonl": [GOOD_LINE],
    "not-json.jsonl": bad_lines('{"id": "b", "prompt": '),
    "not-object.jsonl": bad_lines(["b", "a robot"]),
    "duplicate.jsonl": bad_lines({"id": "robot", "prompt": "again"}),
    "slash.jsonl": bad_lines({"id": "sub/b", "prompt": "p"}),
    "dotdot.jsonl": bad_lines({"id": "..", "prompt": "p"}),
    "unknown-field.jsonl": bad_lines({"id": "b", "prompt": "p", "colour": "red"}),
    "many-bad.jsonl": bad_lines(*["nope"] * 6),
    "case.jsonl": bad_lines({"id": "ROBOT", "prompt": "again"}),
}

ROWS = [
    # The command line itself.
    Row("no command prints the help", (), 0, quiet=True, process=True),
    Row("unknown command", ("frobnicate",), 2, "invalid choice: 'frobnicate'", process=True),
    Row("unknown flag", ("models", "--bogus"), 2, "unrecognized arguments: --bogus"),
    Row("missing prompt", ("edit",), 2, "required: prompt"),
    Row("unknown model", ("edit", "p", "-m", "flux-9"), 2, "invalid choice: 'flux-9'"),
    Row("unknown provider flag", ("edit", "p", "-p", "mars"), 2, "unknown provider 'mars'"),
    Row("provider typo", ("edit", "p", "-p", "laozang"), 2, "did you mean 'laozhang'"),
    Row("conformance unknown provider", ("conformance", "-p", "mars"), 2, "unknown provider"),
    Row("conformance without cassettes for it", ("conformance", "-p", "nimbus"), 2, "no cassettes for nimbus: ./cassettes does not exist"),
    Row("width not an int", ("edit", "p", "--width", "1e3", "--height", "64"), 2, "invalid int"),
    Row("width zero", ("edit", "p", "-p", "laozhang", "--width", "0", "--height", "64"), 2, "width"),
    Row("height NaN", ("edit", "p", "--width", "64", "--height", "nan"), 2, "argument --height"),
    Row("seed NaN", ("edit", "p", "--seed", "nan"), 2, "argument --seed"),
    Row("steps inf", ("edit", "p", "-m", "flux-2-flex", "--steps", "inf"), 2, "argument --steps"),
    Row("safety inf", ("edit", "p", "--safety-tolerance", "inf"), 2, "argument --safety-tolerance"),
    Row("width negative", ("edit", "p", "--width", "-64", "--height", "64"), 2, "width"),
    Row("seed negative", ("edit", "p", "-p", "laozhang", "--seed", "-1"), 2, "seed"),
    Row("steps zero", ("edit", "p", "-m", "flux-2-flex", "--steps", "0"), 2, "steps"),
    Row("safety negative", ("edit", "p", "--safety-tolerance", "-1"), 2, "--safety-tolerance: is out of range"),
    Row("guidance NaN", ("edit", "p", "--guidance", "nan"), 2, "argument --guidance"),
    Row("guidance inf", ("explain", "p", "--guidance", "inf"), 2, "argument --guidance"),
    Row("timeout zero", ("edit", "p", "-p", "laozhang", "--timeout", "0"), 2, "--timeout"),
    Row("timeout negative", ("edit", "p", "-p", "laozhang", "--timeout=-5"), 2, "--timeout"),
    Row("timeout NaN", ("edit", "p", "-p", "laozhang", "--timeout", "NaN"), 2, "--timeout"),
    Row("timeout inf", ("edit", "p", "-p", "laozhang", "--timeout", "inf"), 2, "--timeout"),
    Row("timeout without provider", ("edit", "p", "--timeout", "5"), 2, "go with --provider"),
    Row("base URL not http", ("edit", "p", "-p", "laozhang", "--base-url", "ftp://x"), 2, "http"),
    Row("concurrency zero", ("batch", "good.jsonl", "--concurrency", "0"), 2, "--concurrency"),
    Row("concurrency negative", ("batch", "good.jsonl", "--concurrency=-3"), 2, "--concurrency"),
    Row("concurrency NaN", ("batch", "good.jsonl", "--concurrency", "nan"), 2, "--concurrency"),
    Row("per-provider zero", ("batch", "good.jsonl", "--per-provider", "0"), 2, "--per-provider"),
    Row("lease without state", ("batch", "good.jsonl", "--lease", "10", "--state-expiry", "60"), 2, "--lease, --state-expiry: only with --state"),
    Row("concurrency inf", ("batch", "good.jsonl", "--concurrency", "inf"), 2, "--concurrency"),
    Row("per-provider negative", ("batch", "good.jsonl", "--per-provider=-1"), 2, "--per-provider"),
    Row("per-provider NaN", ("batch", "good.jsonl", "--per-provider", "NaN"), 2, "--per-provider"),
    Row("per-provider huge", ("batch", "good.jsonl", "--per-provider", "1000000"), 2, "from 1 to 1000"),
    Row("port too large", ("emulate", "--port", "70000"), 2, "--port"),
    Row("port negative", ("emulate", "--port=-1"), 2, "--port"),
    Row("port not a number", ("emulate", "--port", "http"), 2, "--port"),
    Row("port NaN", ("emulate", "--port", "nan"), 2, "--port"),
    Row("ttl inf", ("emulate", "--ttl", "inf"), 2, "--ttl"),
    Row("ttl zero", ("emulate", "--ttl", "0"), 2, "--ttl"),
    Row("ttl NaN", ("emulate", "--ttl", "nan"), 2, "--ttl"),
    Row("ttl negative inf", ("emulate", "--ttl=-inf"), 2, "--ttl"),
    Row("fault unknown part", ("emulate", "--fault", "laozhang:teapot"), 2, "teapot"),
    Row("fault unknown provider", ("emulate", "--fault", "mars:503"), 2, "'mars' (one of aimlapi, "),
    Row("fault without provider", ("emulate", "--fault", "503"), 2, "written PROVIDER:SPEC"),
    Row("fault NaN delay", ("emulate", "--fault", "apiyi:delay=nan"), 2, "delay must be from 0 to 86400"),
    Row("record flag without record", ("conformance", "--emulator"), 2, "go with --record"),
    # Input files: never opened unless they are regular files.
    Row("image missing", ("edit", "p", "-i", "missing.png"), 2, "missing.png: no such file"),
    Row("image directory", ("edit", "p", "-i", "folder"), 2, "folder: is a directory"),
    Row("image FIFO", ("edit", "p", "-i", "fifo"), 2, "fifo: is a FIFO", process=True),
    Row("image FIFO explain", ("explain", "p", "-i", "fifo"), 2, "fifo: is a FIFO"),
    Row("image device", ("edit", "p", "-i", "/dev/zero"), 2, "/dev/zero: is a device"),
    Row("image under a file", ("edit", "p", "-i", "regular/x.png"), 2, "part of the path"),
    Row("batch missing", ("batch", "missing.jsonl"), 2, "missing.jsonl: no such file"),
    Row("batch directory", ("batch", "folder"), 2, "folder: is a directory"),
    Row("batch FIFO", ("batch", "fifo"), 2, "fifo: is a FIFO"),
    Row("batch device", ("batch", "/dev/zero"), 2, "/dev/zero: is a device"),
    Row("batch under a file", ("batch", "regular/x.jsonl"), 2, "part of the path"),
    # Batch files with a malformed line are refused whole, naming the line.
    Row("batch not JSON", ("batch", "not-json.jsonl"), 2, "not-json.jsonl:2: not JSON"),
    Row("batch not object", ("batch", "not-object.jsonl"), 2, "not-object.jsonl:2: must be a JSON object"),
    Row("batch duplicate id", ("batch", "duplicate.jsonl"), 2, "duplicate.jsonl:2: id is used twice"),
    Row("batch id with slash", ("batch", "slash.jsonl"), 2, "slash.jsonl:2: id must be a plain file name"),
    Row("batch id dotdot", ("batch", "dotdot.jsonl"), 2, "dotdot.jsonl:2: id must not start with a dot"),
    Row("batch unknown field", ("batch", "unknown-field.jsonl"), 2, "unknown-field.jsonl:2: unknown fields"),
    Row("batch many bad lines", ("batch", "many-bad.jsonl"), 2, "6 problems with the request"),
    Row("batch ids differing in case", ("batch", "case.jsonl"), 2, "id is used twice"),
    Row("batch not UTF-8", ("batch", "latin1.jsonl"), 2, "latin1.jsonl:1: not JSON"),
    Row("batch grace negative", ("batch", "good.jsonl", "--grace=-1"), 2, "--grace"),
    Row("batch grace inf", ("batch", "good.jsonl", "--grace", "inf"), 2, "--grace"),
    Row("batch grace NaN", ("batch", "good.jsonl", "--grace", "nan"), 2, "--grace"),
    # Output paths: checked before anything is sent (a send would end with 4, not 7).
    Row("output directory", ("edit", "p", "-p", "laozhang", "-o", "folder"), 7, "cannot write folder: is a directory", process=True),
    Row("output FIFO", ("edit", "p", "-p", "laozhang", "-o", "fifo"), 7, "not a regular file"),
    # "-" is standard output to most tools: a file named "-" would surprise (nothing is sent)
    Row("output dash", ("edit", "p", "-p", "laozhang", "-o", "-"), 2, "--output: the image cannot go to standard output"),
    Row("output device", ("edit", "p", "-p", "laozhang", "-o", "/dev/null"), 7, "not a regular file"),
    Row("output under a file", ("edit", "p", "-p", "laozhang", "-o", "regular/x.png"), 7, "regular is not a directory"),
    Row("output two levels under a file", ("edit", "p", "-p", "laozhang", "-o", "regular/sub/x.png"), 7, "a part of the path is a file"),
    Row("default output blocked", ("edit", "p", "-p", "laozhang"), 7, "out is not a directory", cwd="blocked"),
    Row("batch output a file", ("batch", "good.jsonl", "-o", "regular"), 7, "regular is not a directory"),
    Row("batch report FIFO", ("batch", "good.jsonl", "--report", "fifo"), 7, "not a regular file"),
    Row("conformance report under a file", ("conformance", "--report-dir", "regular/r"), 7, "part of the path"),
    # Configuration and the network (loopback ports that refuse).
    Row("missing key", ("edit", "p", "-p", "laozhang"), 5, "LAOZHANG_API_KEY", env={"LAOZHANG_API_KEY": None}, process=True),
    Row("unknown provider configured", ("edit", "p"), 5, "mars", env={"FLUX_PROVIDERS": "mars"}),
    Row("no provider configured", ("edit", "p"), 5, "or name one: flux-adapters edit -p laozhang"),
    Row("adapter not importable", ("conformance", "--adapter", "no_such_module:Adapter"), 5, "no_such_module"),
    Row("adapter not an adapter", ("conformance", "--adapter", "json:JSONDecoder"), 5, "JSONDecoder has no name"),
    Row("adapter that cannot be made", ("conformance", "--adapter", "pathlib:PurePath.__new__"), 2, "module:Class"),
    Row("adapter whose constructor fails", ("conformance", "--adapter", "zipfile:ZipFile"), 5, "could not be created"),
    Row("base URL with a password", ("edit", "p", "-p", "laozhang", "--base-url", "http://u:secret@127.0.0.1:9"), 2, "argument --base-url: the URL must not hold a user", not_in_stderr="secret"),
    Row("timeout beyond a day", ("edit", "p"), 5, "FLUX_TIMEOUT", env={"FLUX_PROVIDERS": "laozhang", "FLUX_TIMEOUT": "1e10"}),
    Row("routing misspelled", ("edit", "p"), 5, "$FLUX_ROUTING: routing must be", env={"FLUX_PROVIDERS": "laozhang", "FLUX_ROUTING": "cheap"}),
    Row("budget not a number", ("edit", "p"), 5, "$FLUX_MAX_COST_USD must be a number", env={"FLUX_PROVIDERS": "laozhang", "FLUX_MAX_COST_USD": "$5"}),
    Row("connection refused", ("edit", "p", "-p", "laozhang"), 4, "Connection refused", process=True),
    Row("every provider refused", ("edit", "p"), 4, "no provider produced", env={"FLUX_PROVIDERS": "laozhang,aimlapi"}),
    Row("busy port", ("emulate", "--port", "{busy}"), 5, "Address already in use", not_in_stdout="emulator on", process=True),
    Row("record with stdin closed", ("conformance", "--record", "-p", "laozhang", "--base-url", "{closed}"), 5, "not recorded", redirect="<&-"),
    # Standard streams: a reader that went away, closed descriptors, a full disk.
    Row("models into a closed pipe", ("models",), 141, quiet=True, stdout="closed-pipe"),
    Row("help into a closed pipe", ("--help",), 141, quiet=True, stdout="closed-pipe"),
    Row("models unbuffered into a closed pipe", ("models",), 141, quiet=True, env={"PYTHONUNBUFFERED": "1"}, stdout="closed-pipe"),
    Row("help unbuffered into a closed pipe", ("--help",), 141, quiet=True, env={"PYTHONUNBUFFERED": "1"}, stdout="closed-pipe"),
    Row("models with stdout closed", ("models",), 0, quiet=True, redirect=">&-"),
    Row("edit with every stream closed", ("edit", "p", "-p", "laozhang"), 4, redirect="<&- >&- 2>&-"),
    *(
        [Row("models to a full disk", ("models",), 1, "No space left on device", stdout="full")]
        if Path("/dev/full").exists()
        else []
    ),
]  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    seconds: float


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The files the rows name, a listening port, and a port that refuses connections."""
    root = tmp_path_factory.mktemp("invocations")
    work, blocked = root / "work", root / "blocked"
    work.mkdir()
    blocked.mkdir()
    (blocked / "out").write_text("a file where the output folder would go")
    (work / "image.png").write_bytes(image_bytes())
    (work / "regular").write_text("a regular file")
    (work / "folder").mkdir()
    os.mkfifo(work / "fifo")
    for name, lines in BATCH_FILES.items():
        text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
        (work / name).write_text("\n".join(text) + "\n")
    (work / "latin1.jsonl").write_bytes(b'{"id": "caf\xe9", "prompt": "p"}\n')
    with socket.socket() as busy, socket.socket() as closed:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        yield {
            "root": str(root),
            "busy": str(busy.getsockname()[1]),
            "closed": f"http://127.0.0.1:{closed.getsockname()[1]}",
        }


def environment(row: Row, closed: str, base: Mapping[str, str]) -> dict[str, str]:
    """The row's environment, from *base* (this process's, taken before any row ran)."""
    env = {
        name: value
        for name, value in base.items()
        if not name.startswith("FLUX_")
        and not name.endswith(("_API_KEY", "_BASE_URL"))
        and name not in ("PYTHONUNBUFFERED", "PYTHONDEBUG")
    }
    for prefix in PREFIXES:
        env[f"{prefix}_API_KEY"] = "sk-test-key"
        env[f"{prefix}_BASE_URL"] = closed
    for name, value in row.env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def invoke(row: Row, places: Mapping[str, str], base: Mapping[str, str]) -> Outcome:
    """Run *row* as a real process."""
    argv = [part.format(**places) for part in row.argv]
    command = [sys.executable, "-m", "flux_adapters", *argv]
    if row.redirect:
        command = ["/bin/sh", "-c", f'exec "$@" {row.redirect}', "sh", *command]
    stdout: int | None = subprocess.PIPE
    if row.stdout == "closed-pipe":
        reader, stdout = os.pipe()
        os.close(reader)  # the reader is gone before the first byte is written
    elif row.stdout == "full":
        stdout = os.open("/dev/full", os.O_WRONLY)
    started = time.monotonic()
    with subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        cwd=Path(places["root"]) / row.cwd,
        env=environment(row, places["closed"], base),
    ) as process:
        if stdout is not None and stdout != subprocess.PIPE:
            os.close(stdout)
        try:
            out, err = process.communicate(timeout=SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            return Outcome(None, (out or b"").decode(), err.decode(), time.monotonic() - started)
    return Outcome(
        process.returncode, (out or b"").decode(), err.decode(), time.monotonic() - started
    )


class _StillRunning(BaseException):
    """Raised into a row run in-process that has not ended within `SECONDS` (not an Exception,
    which `main` would report as a failure of its own)."""


def _still_running(signum: int, frame: object) -> None:
    raise _StillRunning


@contextmanager
def _as_a_process_would_be(env: Mapping[str, str], cwd: Path) -> Iterator[None]:
    """This process's environment, working folder and stdin set as the row's process's."""
    saved_env, saved_cwd, saved_stdin = dict(os.environ), os.getcwd(), sys.stdin
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with open(os.devnull) as sys.stdin:
            yield
    finally:
        sys.stdin = saved_stdin
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def invoke_here(row: Row, places: Mapping[str, str], base: Mapping[str, str]) -> Outcome:
    """Run *row* as ``python -m flux_adapters`` would, in this process (its main thread)."""
    argv = [part.format(**places) for part in row.argv]
    out, err = io.StringIO(), io.StringIO()
    env = environment(row, places["closed"], base)
    code: int | None
    previous = signal.signal(signal.SIGALRM, _still_running)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    try:
        with (
            _as_a_process_would_be(env, Path(places["root"]) / row.cwd),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                code = main(argv)
            except SystemExit as done:  # what `sys.exit(main())` would end with
                code = done.code if isinstance(done.code, int) else 1
            except _StillRunning:
                code = None
            except BaseException:  # what the interpreter would print, and its status
                traceback.print_exc(file=err)
                code = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return Outcome(code, out.getvalue(), err.getvalue(), time.monotonic() - started)


@pytest.fixture(scope="module")
def outcomes(places: dict[str, str]) -> dict[str, Outcome]:
    """Every row: the real processes in parallel (most of each one's time is an interpreter
    starting), the others meanwhile in this process, one after the other."""
    base = dict(os.environ)
    processes = [row for row in ROWS if row.needs_process]
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 2)) as pool:
        ran = pool.map(lambda row: invoke(row, places, base), processes)
        here = {row.name: invoke_here(row, places, base) for row in ROWS if not row.needs_process}
        return here | dict(zip((row.name for row in processes), ran, strict=True))


def test_the_table_covers_enough_bad_invocations() -> None:
    assert len(ROWS) >= 35
    assert len({row.name for row in ROWS}) == len(ROWS)


def test_every_exit_status_of_the_table_is_met_by_a_real_process_too() -> None:
    assert {row.code for row in ROWS if row.needs_process} == {row.code for row in ROWS}


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_a_bad_invocation_ends_with_one_short_line_and_its_exit_status(
    row: Row, outcomes: dict[str, Outcome]
) -> None:
    outcome = outcomes[row.name]
    assert outcome.code is not None, f"still running after {SECONDS} s: {outcome.stderr}"
    assert outcome.code == row.code, outcome.stderr
    assert "Traceback" not in outcome.stderr + outcome.stdout
    assert "Exception ignored" not in outcome.stderr
    assert len(outcome.stderr.strip().splitlines()) <= 3, outcome.stderr
    assert row.says.lower() in outcome.stderr.lower(), outcome.stderr
    if row.quiet:
        assert outcome.stderr == ""
    if row.not_in_stdout:
        assert row.not_in_stdout not in outcome.stdout
    if row.not_in_stderr:
        assert row.not_in_stderr not in outcome.stderr
