"""The ``flux-adapters`` command: edit, batch, models, explain, emulate, conformance.

Every failure ends with one line on standard error and one of these exit statuses, never a
traceback (with FLUX_DEBUG=1 set, an unexpected failure also prints its traceback):

    0    success (batch: every request saved or already saved)
    1    unexpected failure (a bug, or standard output cannot be written, e.g. a full disk)
    2    bad arguments, an unusable input file, or a request the limits refuse (nothing sent)
    3    the provider answered with an error (batch: at least one request failed)
    4    no usable answer: connection failed or timed out
    5    configuration: unknown provider, no API key, missing optional dependency, busy port
    6    the result URL expired before it was downloaded
    7    an output path cannot be written (checked before anything is sent; when saving
         fails after a paid call, the image is saved elsewhere and the message says where)
    8    batch: some requests are unconfirmed (they may have been billed) and were not sent
         again; rerun with --resend-unconfirmed to send them
    130  interrupted (Ctrl-C)
    141  standard output was closed by its reader before everything was written, as in
         "flux-adapters models | head -1" (the shell's status for a broken pipe)

When every provider of a failover list failed, the status is that of the last failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn, TextIO

from flux_adapters import errors
from flux_adapters._display import escape_controls
from flux_adapters._version import __version__

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

    from flux_adapters.emulator import Fault
    from flux_adapters.jobs import Polling
    from flux_adapters.providers import AnyAdapter
    from flux_adapters.request import EditRequest
    from flux_adapters.result import BatchItem, ResultImage

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_REQUEST, EXIT_PROVIDER, EXIT_TRANSPORT, EXIT_CONFIG, EXIT_EXPIRED = (
    range(7)
)
EXIT_OUTPUT, EXIT_UNCONFIRMED, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 7, 8, 130, 141

MAX_CONCURRENCY = 1000
MAX_SECONDS = 86400.0
"""The most seconds any option takes: a day (a socket timeout of 1e12 s overflows time_t)."""
DEFAULT_OUTPUT = Path("out")


class _UsageError(Exception):
    """Bad arguments or an unusable input file: one line, exit status 2, nothing sent."""


class _Parser(argparse.ArgumentParser):
    """argparse, with each error as one line (no usage block) that `main` writes and maps to 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        # argparse's own ignores a failed write: `--help | head -1` must end like `models | head -1`.
        (file or sys.stdout).write(self.format_help())


# Argument types: argparse shows an ArgumentTypeError's text as "argument --flag: <text>".


def _whole(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _seconds(*, zero: bool = False) -> Callable[[str], float]:
    lowest = "from 0" if zero else "above 0"

    def parse(text: str) -> float:
        value = _number(text)
        if value < 0 or (value == 0 and not zero) or value > MAX_SECONDS:
            raise argparse.ArgumentTypeError(
                f"must be seconds {lowest} to {MAX_SECONDS:.0f}, got {text!r}"
            )
        return value

    return parse


def _provider_id(text: str) -> str:
    """A provider id, built in or registered (any case), with a suggestion for a typo."""
    from flux_adapters.providers import canonical_name

    try:
        return canonical_name(text)
    except errors.ConfigurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _http_url(text: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    return text


def _input_file(text: str) -> Path:
    """An existing regular file, checked with ``stat`` so a FIFO or a device is never opened."""
    try:
        mode = os.stat(text).st_mode
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{text}: no such file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise argparse.ArgumentTypeError(f"{text}: {_reason(exc)}") from None
    if not stat.S_ISREG(mode):
        from flux_adapters._files import _kind

        raise argparse.ArgumentTypeError(f"{text}: {_kind(mode)}")
    return Path(text)


_URL_PREFIXES = ("http://", "https://", "data:")


def _image(text: str) -> str | Path:
    return text if text.startswith(_URL_PREFIXES) else _input_file(text)


def _folder(text: str) -> Path:
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return Path(text)


def _adapter_name(text: str) -> str:
    module, _, name = text.partition(":")
    if not module or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"not module:Class: {text!r}")
    return text


def _fault(text: str) -> tuple[str, Fault]:
    from flux_adapters.emulator import PROVIDER_PREFIXES, Fault  # light: no server imports

    provider, _, spec = text.partition(":")
    if provider not in PROVIDER_PREFIXES:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown provider {provider!r}")
    try:
        fault = Fault.parse(spec)  # which also checks each value
        fault.check_for(provider)  # and that it can happen there (a poll fault at laozhang...)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return provider, fault


def _add_request_arguments(parser: argparse.ArgumentParser) -> None:
    from flux_adapters.request import MODELS

    parser.add_argument("prompt", help="what to generate, or how to edit the images")
    parser.add_argument(
        "-i", "--image", action="append", default=[], metavar="PATH_OR_URL", type=_image,
        help="a reference image (repeat, in order: image 1, image 2, ...); a path, http(s) URL or data URL",
    )  # fmt: skip
    parser.add_argument(
        "-m", "--model", default="flux-2-pro", choices=MODELS, help="default: flux-2-pro"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--size", metavar="WxH", help='output size, e.g. "1792x1024"')
    size.add_argument("--aspect-ratio", metavar="W:H", help='output aspect ratio, e.g. "16:9"')
    parser.add_argument("--width", type=int, help="output width (with --height)")
    parser.add_argument("--height", type=int, help="output height (with --width)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--format", dest="output_format", choices=("jpeg", "png", "webp"))
    parser.add_argument("--safety-tolerance", type=int)
    parser.add_argument("--steps", type=int, help="inference steps (flux-2-flex)")
    parser.add_argument("--guidance", type=_number, help="guidance (flux-2-flex)")
    parser.add_argument("--prompt-upsampling", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--allow-conversions", action="store_true",
        help="let the adapter send a setting the provider cannot take exactly in its nearest form, with a warning",
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flux-adapters",
        description="Edit and generate images with FLUX models through API resellers.",
        epilog=(__doc__ or "").partition("\n\n")[2] or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    edit = commands.add_parser("edit", help="generate or edit an image and save it")
    _add_request_arguments(edit)
    edit.add_argument(
        "-p", "--provider", type=_provider_id, help="default: first of $FLUX_PROVIDERS"
    )
    edit.add_argument(
        "--base-url",
        type=_http_url,
        help="with --provider: its base URL (default: $<PROVIDER>_BASE_URL or the real one)",
    )
    edit.add_argument(
        "-o", "--output", type=Path, help="where to save (default: out/<provider>-<time>.<format>)"
    )
    edit.add_argument(
        "--timeout",
        type=_seconds(),
        help="with --provider: seconds to wait for the image: for each request (default 300) "
        "and, at a provider that runs jobs (bfl, fal), for the whole job (default "
        "$FLUX_JOB_DEADLINE or 600)",
    )

    commands.add_parser("models", help="the providers x models table, with limits and prices")

    conformance = commands.add_parser(
        "conformance",
        help="replay (or record) the conformance scenarios and report provider x scenario",
        description="Replays every scenario from its cassette with the network blocked and writes "
        "conformance.md and conformance.json. With --record, records again: against the live "
        "provider with its key from the environment, against --base-url (a reseller that claims "
        "to speak a known dialect), or against the bundled --emulator.",
    )
    conformance.add_argument(
        "-p",
        "--provider",
        action="append",
        type=_provider_id,
        help="a provider id, built in or registered (repeat; default: the built-in ones, whose "
        "cassettes ship in cassettes/)",
    )
    conformance.add_argument(
        "--adapter", type=_adapter_name, help="an adapter of another package, as module:Class"
    )
    conformance.add_argument(
        "--cassettes",
        type=_folder,
        help="folder with <provider>/<scenario>.yaml (default: ./cassettes; when replaying and "
        "there is none, the built-in providers' cassettes shipped with flux-adapters)",
    )
    conformance.add_argument(
        "--report-dir",
        type=Path,
        default=Path("out"),
        help="where to write the report (default: out)",
    )
    conformance.add_argument(
        "--record",
        action="store_true",
        help="record the cassettes again (may cost money; asks first)",
    )
    target = conformance.add_mutually_exclusive_group()
    target.add_argument(
        "--base-url",
        type=_http_url,
        help="with --record: record against this base URL (default: $<PROVIDER>_BASE_URL, else the real one)",
    )
    target.add_argument(
        "--emulator", action="store_true", help="with --record: record against the bundled emulator"
    )
    conformance.add_argument(
        "--key-env",
        help="with --record: the variable holding the key (default: <PROVIDER>_API_KEY)",
    )
    conformance.add_argument(
        "-y", "--yes", action="store_true", help="with --record: do not ask before paid calls"
    )
    conformance.add_argument(
        "--mutate",
        action="store_true",
        help="score the suite instead: replay it against wire mutants of each adapter, print how "
        "many it kills and every survivor, write mutation.md (docs/conformance.md)",
    )

    batch = commands.add_parser(
        "batch",
        help="run every request of a JSONL file, saving each image as it is ready",
        description="Each line is a JSON object: id (the file name), prompt, model, images (paths or "
        "URLs), and any of width, height, size, aspect_ratio, seed, output_format, safety_tolerance, "
        "prompt_upsampling, steps, guidance, allow_conversions. Providers come from --provider, or "
        "from flux-adapters.toml and $FLUX_PROVIDERS. A journal in the output folder records every "
        "request before it is sent, so a batch stopped at any point (Ctrl-C, a kill, a power loss) "
        "can be run again: saved jobs are skipped, and jobs that may have been billed are reported "
        "'unconfirmed' and not sent again unless --resend-unconfirmed.",
    )
    batch.add_argument("file", type=_input_file, help="the JSONL file of requests")
    batch.add_argument(
        "-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="output folder (default: out)"
    )
    batch.add_argument(
        "--report", type=Path, help="JSONL report to append to (default: <output>/report.jsonl)"
    )
    batch.add_argument(
        "-p",
        "--provider",
        action="append",
        type=_provider_id,
        help="provider(s), in failover order",
    )
    batch.add_argument(
        "--concurrency",
        type=_whole(1, MAX_CONCURRENCY),
        default=8,
        help=f"requests in flight, 1 to {MAX_CONCURRENCY} (default 8)",
    )
    batch.add_argument(
        "--per-provider",
        type=_whole(1, MAX_CONCURRENCY),
        default=4,
        help=f"requests in flight per provider, 1 to {MAX_CONCURRENCY} (default 4)",
    )
    batch.add_argument(
        "--resend-unconfirmed",
        action="store_true",
        help="send again jobs that may have been billed already (sent, no image saved)",
    )
    batch.add_argument(
        "--force",
        action="store_true",
        help="run again jobs already saved, and jobs whose request changed since it was sent",
    )
    batch.add_argument(
        "--grace",
        type=_seconds(zero=True),
        default=30.0,
        help="after Ctrl-C, seconds to let jobs in flight finish and save (default 30)",
    )

    explain = commands.add_parser(
        "explain", help="print the HTTP request each provider would receive; sends nothing"
    )
    _add_request_arguments(explain)
    explain.add_argument(
        "-p", "--provider", action="append", type=_provider_id, help="default: all"
    )

    emulate = commands.add_parser(
        "emulate", help="run the provider emulator on 127.0.0.1 in the foreground"
    )
    emulate.add_argument(
        "--port", type=_whole(0, 65535), default=8000, help="default 8000; 0: any free port"
    )
    emulate.add_argument("--host", default="127.0.0.1")
    emulate.add_argument(
        "--ttl", type=_seconds(), default=600.0, help="seconds result URLs stay valid (default 600)"
    )
    emulate.add_argument(
        "--fault", action="append", default=[], metavar="PROVIDER:SPEC", type=_fault,
        help="inject a fault, e.g. laozhang:429,retry-after=2,first=1  apiyi:drop  bfl:pending=5  "
        "fal:on=poll,503 (see docs/emulator.md#faults for every part)",
    )  # fmt: skip
    emulate.add_argument(
        "--pending-polls", type=_whole(0, 10**6), default=2, metavar="N",
        help="polls a bfl or fal job answers as not done before it ends (default 2)",
    )  # fmt: skip
    emulate.add_argument(
        "--key", action="append", help="accept only these API keys (default: any non-empty key)"
    )
    emulate.add_argument(
        "--bad-key", action="append", default=[], help="refuse this API key with 401"
    )
    return parser


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NotADirectoryError):
        return "a part of the path is a file, not a directory"
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _check_folder(folder: Path, *, named: Path | None = None) -> None:
    """Refuse, before anything is sent, a folder that is not one or cannot be created in.

    Nothing is created. The error names *named* (the file to go in the folder), else *folder*.
    """
    shown = str(named or folder)
    existing = folder
    while True:
        try:
            mode = existing.stat().st_mode
        except FileNotFoundError:
            if existing.parent == existing:
                raise errors.OutputError(f"no folder {folder}", path=shown) from None
            existing = existing.parent
            continue
        except (OSError, ValueError) as exc:  # ENOTDIR: a part of the path is a file
            raise errors.OutputError(_reason(exc), path=shown) from None
        break
    if not stat.S_ISDIR(mode):
        raise errors.OutputError(f"{existing} is not a directory", path=shown)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise errors.OutputError(f"no permission to write in {existing}", path=shown)


def _check_output_file(path: Path) -> None:
    """Refuse, before anything is sent, a path that cannot become a regular file.

    Its folder may be missing (it is created when the image is saved) but must be creatable.
    """
    from flux_adapters._files import check_target

    _check_folder(path.parent, named=path)
    if path.parent.is_dir():
        check_target(path)


def _check_not_the_journal(report: Path, folder: Path) -> None:
    """Refuse a report that is the batch's own journal (its lines would go into it)."""
    from flux_adapters._journal import JOURNAL_NAME

    journal = folder / JOURNAL_NAME
    try:
        same = report.resolve() == journal.resolve() or os.path.samefile(report, journal)
    except (OSError, ValueError, RuntimeError):  # one of them does not exist yet, a loop ...
        same = False
    if same:
        raise errors.OutputError(
            "is the batch's journal; choose another file for the report", path=str(report)
        )


def _images(values: Sequence[str]) -> list[str | Path]:
    return [value if value.startswith(_URL_PREFIXES) else Path(value) for value in values]


def _request(arguments: argparse.Namespace) -> EditRequest:
    from flux_adapters.request import EditRequest

    return EditRequest(
        prompt=arguments.prompt,
        model=arguments.model,
        images=arguments.image,
        width=arguments.width,
        height=arguments.height,
        size=arguments.size,
        aspect_ratio=arguments.aspect_ratio,
        seed=arguments.seed,
        output_format=arguments.output_format,
        safety_tolerance=arguments.safety_tolerance,
        prompt_upsampling=arguments.prompt_upsampling,
        steps=arguments.steps,
        guidance=arguments.guidance,
        allow_conversions=arguments.allow_conversions,
    )


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):  # closed
        return False


@contextmanager
def _waiting(message: str, stream: TextIO) -> Iterator[None]:
    """Show that we are waiting (with elapsed time) while the provider generates."""
    if _is_terminal(stream):
        try:
            from rich.console import Console  # the `cli` extra: a live spinner
        except ImportError:
            pass
        else:
            with Console(file=stream).status(message):
                yield
            return
    stream.write(f"{message}\n")
    stream.flush()
    done = threading.Event()

    def tick() -> None:
        started = time.monotonic()
        while not done.wait(5.0):
            try:
                stream.write(f"  still waiting ({time.monotonic() - started:.0f} s)\n")
                stream.flush()
            except (OSError, ValueError):  # the reader of stderr is gone: keep waiting quietly
                return

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def _save_into(image: ResultImage, folder: Path, name: str | None, stem: str) -> Path:
    """Save *image* in *folder* (created if missing) as *name*, or as *stem* plus its format."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        raise errors.OutputError(_reason(exc), path=str(folder)) from None
    if name is not None:
        return image.save(folder / name)
    return image.save(folder / _unused_stem(folder, stem), add_suffix=True)


def _unused_stem(folder: Path, stem: str) -> str:
    """*stem*, or *stem*-2, -3 ...: the first no image in *folder* is named after yet."""
    for number in range(1, 10_000):
        candidate = stem if number == 1 else f"{stem}-{number}"
        if not any((folder / f"{candidate}.{kind}").exists() for kind in ("png", "jpeg", "webp")):
            return candidate
    return f"{stem}-{os.getpid()}"


def _save(image: ResultImage, target: Path | None, stem: str, err: TextIO) -> tuple[str, int]:
    """Save one paid-for image and never lose it quietly: its line for ``saved:``, and a status.

    *target* is the path asked for (None: ``out/<stem>.<format>``). If it cannot be written, the
    image goes to out/ or the temporary folder instead; if that fails too, or the download
    fails, the message gives the address it can still be downloaded from for a few minutes.
    """
    folder, name = (target.parent, target.name) if target else (DEFAULT_OUTPUT, None)
    try:
        return str(_save_into(image, folder, name, stem)), EXIT_OK
    except errors.OutputError as error:
        problem = f"flux-adapters: OutputError: {error}"
    except errors.FluxError as error:
        problem, where = f"flux-adapters: {type(error).__name__}: {_one_line(error)}", ""
        if image.url is not None and not isinstance(error, errors.ResultExpired):
            where = f"; download it within 10 minutes from {escape_controls(image.url)}"
        _say(err, problem + where)
        return "", _exit_code(error)
    for fallback in (DEFAULT_OUTPUT, Path(tempfile.gettempdir())):
        if os.path.abspath(fallback) == os.path.abspath(folder):
            continue
        try:
            saved = _save_into(image, fallback, None, stem)
        except errors.OutputError:
            continue
        except errors.FluxError:  # the download failed this time: only the address is left
            break
        _say(err, f"{problem}; saved in {saved} instead")
        return f"{saved} (instead of {target or folder})", EXIT_OUTPUT
    where = (
        f"download it within 10 minutes from {escape_controls(image.url)}"
        if image.url
        else "nowhere to save it"
    )
    _say(err, f"{problem}; {where}")
    return "", EXIT_OUTPUT


def _polling(timeout: float | None) -> Polling | None:
    """A job's deadline with --provider: *timeout*, else ``$FLUX_JOB_DEADLINE`` (as `from_env`)."""
    from flux_adapters.config import job_deadline_from_env
    from flux_adapters.jobs import Polling

    deadline = timeout if timeout is not None else job_deadline_from_env()
    return Polling(deadline=deadline) if deadline is not None else None


def _edit(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from flux_adapters.client import FluxClient

    if not arguments.provider and (arguments.base_url or arguments.timeout):
        raise _UsageError(
            "flux-adapters edit: error: --base-url and --timeout go with --provider "
            "(for a failover list, set them in flux-adapters.toml or the environment)"
        )
    request = _request(arguments)
    output: Path | None = arguments.output
    if output is not None:
        _check_output_file(output)
    else:
        _check_folder(DEFAULT_OUTPUT)
    started = time.perf_counter()
    if arguments.provider:
        client = FluxClient(
            arguments.provider,
            base_url=arguments.base_url,
            timeout=arguments.timeout,
            polling=_polling(arguments.timeout),
        )
    else:  # the configured provider or failover list: flux-adapters.toml and $FLUX_PROVIDERS
        client = FluxClient.from_env()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    saved: list[str] = []
    code = EXIT_OK
    with client:
        references = f" with {len(request.images)} reference image(s)" if request.images else ""
        with _waiting(
            f"{', '.join(client.providers)}: generating {request.model}{references} ...", err
        ):
            result = client.edit(request)
        for index, image in enumerate(result.images):
            suffix = f"-{index + 1}" if len(result.images) > 1 else ""
            target = output.with_name(f"{output.stem}{suffix}{output.suffix}") if output else None
            try:
                place, status = _save(image, target, f"{result.provider}-{stamp}{suffix}", err)
            except KeyboardInterrupt:  # the images are paid for: say where they still are
                urls = [later.url for later in result.images[index:] if later.url]
                if urls:
                    _say(
                        err,
                        "flux-adapters: not saved; download it within 10 minutes from "
                        + " ".join(escape_controls(url) for url in urls),
                    )
                raise
            saved += [place] if place else []
            code = code or status  # the first failure decides
    elapsed = time.perf_counter() - started
    if result.cost_usd is None:
        cost = "unknown (no price known for this provider and model)"
    elif result.cost_source == "provider":  # BFL's credits: what it charged, not an estimate
        cost = f"${result.cost_usd:.3f} (reported by {result.provider})"
    else:
        cost = f"${result.cost_usd:.3f} (estimate from the price table)"
    for attempt in result.attempts[:-1]:
        why = attempt.reason or (
            f"{type(attempt.error).__name__}: {attempt.error}" if attempt.error else ""
        )
        out.write(f"tried:    {attempt.provider}: {attempt.outcome} ({why})\n")
    out.write(
        f"provider: {result.provider}\nmodel:    {result.model}\ntime:     {elapsed:.2f} s\ncost:     {cost}\n"
    )
    for warning in result.warnings:
        out.write(f"warning:  {warning}\n")
    for place in saved:
        out.write(f"saved:    {place}\n")
    return code


_BATCH_FIELDS = {
    "prompt", "model", "images", "width", "height", "size", "aspect_ratio", "seed", "output_format",
    "safety_tolerance", "prompt_upsampling", "steps", "guidance", "allow_conversions",
}  # fmt: skip


def _batch_lines(path: Path) -> Iterator[tuple[int, dict[str, object] | str]]:
    """Each non-blank line of the JSONL file: its number and its object, or what is wrong.

    Raises:
        RequestError: It cannot be read, or is no longer a regular file (it was replaced since
            the command started: a FIFO in its place is not waited on).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        violation = errors.Violation("file", _reason(exc), "a readable JSONL file", str(path))
        raise errors.RequestError([violation]) from None
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            violation = errors.Violation("file", "is not a regular file", "a JSONL file", str(path))
            raise errors.RequestError([violation])
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                yield number, f"not JSON ({str(exc)[:80]})"
                continue
            yield number, item if isinstance(item, dict) else "must be a JSON object"


def _batch_id(number: int, item: dict[str, object]) -> str:
    value = item.get("id", number)
    return value if isinstance(value, str) else str(value) if isinstance(value, int) else ""


def _check_batch_file(path: Path) -> int:
    """Check the whole file before anything is sent; return how many requests it holds.

    Raises:
        RequestError: Lines that are not JSON objects, or whose id is missing, unsafe or
            repeated, or that have unknown fields (the first few, with their line numbers).
    """
    from flux_adapters._batch import _name_problem, file_key

    problems: list[errors.Violation] = []
    seen: set[str] = set()
    count = 0
    for number, item in _batch_lines(path):
        count += 1
        where = f"{path.name}:{number}"
        if isinstance(item, str):
            problems.append(errors.Violation(where, item, "a JSON object per line", "line"))
            continue
        name = _batch_id(number, item)
        # Two ids that differ only in case or normalisation are one file on macOS (file_key).
        trouble = _name_problem(name) or ("is used twice" if file_key(name) in seen else "")
        if trouble:
            problems.append(errors.Violation(where, f"id {trouble}", "a unique file name", name))
        seen.add(file_key(name))
        unknown = sorted(set(item) - _BATCH_FIELDS - {"id"})
        if unknown:
            problems.append(
                errors.Violation(
                    where, "unknown fields", ", ".join(sorted(_BATCH_FIELDS)), str(unknown)
                )
            )
    if problems:
        raise errors.RequestError(problems)  # printed as one line, cut to a bounded length
    return count


def _batch_jobs(
    path: Path, refused: Callable[[str, errors.RequestError], None]
) -> Iterator[tuple[str, EditRequest]]:
    """The requests of a checked file, read lazily; a request its line cannot build is refused."""
    from flux_adapters.request import EditRequest

    for number, item in _batch_lines(path):
        # Checked by _check_batch_file; but lines added or edited since then are checked here.
        where = f"{path.name}:{number}"
        if isinstance(item, str):
            line = errors.Violation(where, item, "a JSON object per line", "line")
            refused(str(number), errors.RequestError([line]))
            continue
        name = _batch_id(number, item)
        unknown = sorted(set(item) - _BATCH_FIELDS - {"id"})
        if unknown:
            allowed = ", ".join(sorted(_BATCH_FIELDS))
            line = errors.Violation(where, "unknown fields", allowed, str(unknown))
            refused(name, errors.RequestError([line]))
            continue
        fields = {key: value for key, value in item.items() if key != "id"}
        images = fields.get("images", [])
        fields["images"] = (
            _images([str(image) for image in images]) if isinstance(images, list) else images
        )
        fields.setdefault("model", "flux-2-pro")
        try:
            yield name, EditRequest(**fields)  # type: ignore[arg-type]
        except errors.RequestError as error:
            refused(name, error)


def _attempt_lines(item: BatchItem) -> list[dict[str, object]]:
    source = item.result or item.error
    return [
        {
            "provider": attempt.provider,
            "outcome": attempt.outcome,
            "seconds": round(attempt.elapsed_s, 3),
            "billing": attempt.billing,
            "reason": attempt.reason or (type(attempt.error).__name__ if attempt.error else ""),
        }
        for attempt in (source.attempts if source is not None else ())
    ]


def _report_line(item: BatchItem) -> dict[str, object]:
    line: dict[str, object] = {"id": item.name, "status": item.status}
    if item.result is not None:
        line["provider"] = item.result.provider
        line["cost_usd"] = item.result.cost_usd
    if item.saved:
        line["files"] = [str(path) for path in item.saved]
    if item.error is not None:
        line["error"] = f"{type(item.error).__name__}: {item.error}"
    if item.reason:
        line["reason"] = item.reason
    attempts = _attempt_lines(item)
    if attempts:
        line["attempts"] = attempts
    return line


def _batch(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import asyncio
    import itertools
    import signal

    from flux_adapters._journal import JOURNAL_NAME, JsonLines, load_states
    from flux_adapters.client import AsyncFluxClient

    path: Path = arguments.file
    total = _check_batch_file(path)
    folder: Path = arguments.output
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.OutputError(exc.strerror or str(exc), path=str(folder)) from None
    report = JsonLines(arguments.report or folder / "report.jsonl")
    counts = dict.fromkeys(("ok", "skipped", "changed", "failed", "unconfirmed"), 0)

    def refused(name: str, error: errors.RequestError) -> None:
        counts["failed"] += 1
        report.append({"id": name, "status": "failed", "error": f"RequestError: {error}"})

    interrupted = False
    at_once = False
    in_flight: set[str] = set()
    """Ids taken from the file whose report line is not written yet."""

    def taken(names: Iterator[str]) -> Iterator[str]:
        for name in names:
            in_flight.add(name)
            yield name

    async def run() -> None:
        nonlocal interrupted, at_once
        stop = asyncio.Event()
        main_task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            nonlocal interrupted
            if interrupted:
                assert main_task is not None
                main_task.cancel()  # a second signal: stop now; the journal knows what was sent
                return
            interrupted = True
            stop.set()
            err.write(
                f"flux-adapters: stopping: no new jobs; up to {arguments.grace:g} s for those in "
                "flight (Ctrl-C again to stop at once)\n"
            )
            err.flush()

        for number in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(number, on_signal)
        if arguments.provider:
            client = AsyncFluxClient(providers=arguments.provider, polling=_polling(None))
        else:
            client = AsyncFluxClient.from_env()
        first, second = itertools.tee(_batch_jobs(path, refused))
        async with client:
            items = client.edit_many(
                (request for _, request in second),
                names=taken(name for name, _ in first),
                concurrency=arguments.concurrency,
                per_provider=arguments.per_provider,
                output_dir=folder,
                resend_unconfirmed=arguments.resend_unconfirmed,
                force=arguments.force,
                stop=stop,
                grace=arguments.grace,
            )
            with _progress(total, err) as advance:
                try:
                    # Closed here even if writing the report fails: jobs stop before the client.
                    async with contextlib.aclosing(items):
                        async for item in items:
                            counts[item.status] += 1
                            report.append(_report_line(item))
                            in_flight.discard(item.name)
                            advance(f"{item.name}: {item.status}")
                except asyncio.CancelledError:
                    at_once = True

    try:
        with contextlib.suppress(asyncio.CancelledError):  # a second signal after the batch
            asyncio.run(run())
        if at_once and in_flight:
            # Stopped at once: the jobs in flight have no item. The journal (closed now) says
            # which of them may have been billed; they must not vanish from the report.
            states = load_states(folder / JOURNAL_NAME, in_flight)
            for name in sorted(in_flight):
                state = states.get(name)
                if state is not None and state.may_be_billed:
                    counts["unconfirmed"] += 1
                    reason = f"may have been billed, no image saved: stopped at once; {state.why_unconfirmed}"
                    report.append({"id": name, "status": "unconfirmed", "reason": reason})
    finally:
        report.close()
    done = sum(counts.values())
    summary = (
        f"{counts['ok']} saved, {counts['skipped']} already saved, {counts['failed']} failed, "
        f"{counts['unconfirmed']} unconfirmed, {counts['changed']} changed"
    )
    if done < total:
        summary += f", {total - done} not started"
    out.write(f"{summary}; report: {report.path}\n")
    if counts["unconfirmed"]:
        out.write(
            "unconfirmed jobs may have been billed and have no image: see the report; rerun with "
            "--resend-unconfirmed to send them again\n"
        )
    if interrupted:
        return EXIT_INTERRUPTED
    if counts["unconfirmed"]:
        return EXIT_UNCONFIRMED
    return EXIT_PROVIDER if counts["failed"] or counts["changed"] else EXIT_OK


@contextmanager
def _progress(total: int, stream: TextIO) -> Iterator[Callable[[str], None]]:
    """A progress bar (rich, with the `cli` extra, on a terminal), else one line per item."""
    if stream.isatty():
        try:
            from rich.progress import Progress
        except ImportError:
            pass
        else:
            with Progress(console=None, transient=False) as bar:
                task = bar.add_task("batch", total=total)
                yield lambda _: bar.advance(task)
            return
    finished = 0

    def advance(message: str) -> None:
        nonlocal finished
        finished += 1
        stream.write(f"[{finished}/{total}] {message}\n")
        stream.flush()

    yield advance


def _conformance(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import importlib

    from flux_adapters._display import describe_exception
    from flux_adapters._options import check_adapter, check_base_url
    from flux_adapters.conformance.runner import (
        bundled_cassettes,
        fault_control_problem,
        paid_calls,
        read_deviations,
        record,
        run_scenario,
        write_report,
    )
    from flux_adapters.conformance.scenarios import SCENARIOS
    from flux_adapters.providers import BUILT_IN, get_adapter

    if not arguments.record and (arguments.base_url or arguments.emulator or arguments.key_env):
        raise _UsageError(
            "flux-adapters conformance: error: --base-url, --emulator and --key-env go with --record"
        )
    if arguments.mutate and arguments.record:
        raise _UsageError("flux-adapters conformance: error: --mutate replays; not with --record")
    _check_folder(arguments.report_dir)
    if arguments.cassettes is None:
        arguments.cassettes = Path("cassettes")
        if not arguments.record and not arguments.cassettes.is_dir():
            arguments.cassettes = bundled_cassettes()
            out.write(
                f"replaying the cassettes shipped with flux-adapters ({arguments.cassettes})\n"
            )
    if arguments.record:
        _check_folder(arguments.cassettes)
    adapters: list[AnyAdapter] = [
        get_adapter(name) for name in arguments.provider or ([] if arguments.adapter else BUILT_IN)
    ]
    if arguments.adapter:
        module, _, name = arguments.adapter.partition(":")
        try:
            adapter_class = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise errors.ConfigurationError(f"--adapter {arguments.adapter}: {exc}") from None
        try:
            adapter = adapter_class()
        except Exception as exc:  # the other package's code: anything may go wrong
            raise errors.ConfigurationError(
                f"--adapter {arguments.adapter} could not be created ({describe_exception(exc)})"
            ) from None
        adapters.append(check_adapter(adapter))  # type: ignore[arg-type]
    if arguments.mutate:
        return _mutation(adapters, arguments.cassettes, arguments.report_dir, out)
    if arguments.record:
        for adapter in adapters:
            # Against the emulator, record() makes up a throwaway key of its own.
            variable = arguments.key_env or f"{adapter.env_prefix}_API_KEY"
            key = "" if arguments.emulator else os.environ.get(variable, "")
            if not key and not arguments.emulator:
                raise errors.ConfigurationError(
                    f"recording {adapter.name} needs its key in ${arguments.key_env or adapter.env_prefix + '_API_KEY'}"
                )
            # As a client would: --base-url, else $<PROVIDER>_BASE_URL, else the real one.
            variable = f"{adapter.env_prefix}_BASE_URL"
            base_url = arguments.base_url or (
                check_base_url(os.environ[variable], f"${variable}")
                if os.environ.get(variable) and not arguments.emulator
                else None
            )
            # Whether the fault scenarios can be recorded there: a free DELETE, without the key.
            unable = "" if arguments.emulator else fault_control_problem(adapter, base_url)
            requests, billed = paid_calls(adapter, arguments.emulator, faults=not unable)
            where = "the emulator" if arguments.emulator else base_url or adapter.default_base_url
            out.write(
                f"{adapter.name}: {requests} scenario(s) to record against {where}, {billed} of "
                "them with a request that may be billed (polls and downloads are free)\n"
            )
            if unable and paid_calls(adapter, True)[0] > requests:
                out.write(f"{adapter.name}: its fault scenarios will not be recorded: {unable}\n")
            if billed and not arguments.emulator and not arguments.yes:
                out.write("continue? [y/N] ")
                out.flush()
                # Only a person at a terminal can say yes: a closed or redirected stdin is a no.
                answer = sys.stdin.readline().strip().lower() if _is_terminal(sys.stdin) else ""
                if answer not in ("y", "yes"):
                    _say(err, "flux-adapters: not recorded (answer y at a terminal, or pass --yes)")
                    return EXIT_CONFIG
            record(
                adapter,
                arguments.cassettes / adapter.name,
                api_key=key,
                base_url=base_url,
                emulator=arguments.emulator,
                log=lambda line: print(line, file=out),
            )
    verdicts = []
    for adapter in adapters:
        folder = arguments.cassettes / adapter.name
        deviations = read_deviations(folder)
        verdicts += [run_scenario(adapter, scenario, folder, deviations) for scenario in SCENARIOS]
    markdown, data = write_report(verdicts, arguments.report_dir)
    out.write(markdown.read_text())
    out.write(f"\nwritten: {markdown} and {data}\n")
    return EXIT_OK if all(v.outcome != "fail" for v in verdicts) else EXIT_FAILED


def _mutation(
    adapters: Sequence[AnyAdapter], cassettes: Path, report_dir: Path, out: TextIO
) -> int:
    """The mutation score of each adapter; exit 0 only when each reached the target."""
    from flux_adapters.conformance.mutation import render, score_all

    started = time.perf_counter()
    scores = score_all([(adapter, cassettes / adapter.name) for adapter in adapters])
    text = render(scores, seconds=time.perf_counter() - started)
    report_dir.mkdir(parents=True, exist_ok=True)
    report = report_dir / "mutation.md"
    report.write_text(text)
    out.write(text + f"\nwritten: {report}\n")
    return EXIT_OK if all(score.reached for score in scores) else EXIT_FAILED


def _models(out: TextIO) -> int:
    from flux_adapters._tables import limits_table
    from flux_adapters.prices import price_for
    from flux_adapters.providers import PROVIDERS, get_adapter

    for provider, origin in PROVIDERS.items():
        adapter = get_adapter(provider)
        out.write(f"\n{provider} ({origin})\n\n{limits_table(provider)}\n\nprices: ")
        shipped = getattr(adapter, "prices", None)
        known = [
            f"{model} {price.describe()}"
            for model in adapter.limits
            if (price := price_for(provider, model, None, shipped)) is not None
        ]
        out.write("; ".join(known) if known else "not documented")
        out.write("\n")
    return EXIT_OK


def _explain(arguments: argparse.Namespace, out: TextIO) -> int:
    from flux_adapters._explain import render
    from flux_adapters._flows import first_request, resolve
    from flux_adapters.providers import BEARER, PROVIDERS, get_adapter

    request = _request(arguments)
    refused = 0
    for provider in arguments.provider or list(PROVIDERS):
        adapter = get_adapter(provider)
        out.write(f"=== {provider}\n")
        try:
            plan = resolve(adapter, request)
        except errors.RequestError as error:
            refused += 1
            out.write(
                "refused before sending:\n" + "".join(f"  - {v}\n" for v in error.violations) + "\n"
            )
            continue
        outgoing = first_request(adapter, request, plan, adapter.default_base_url)
        out.write(render(outgoing, getattr(adapter, "auth", None) or BEARER) + "\n")
        for warning in plan.warnings:
            out.write(f"warning: {warning}\n")
        out.write("\n")
    return EXIT_REQUEST if refused == len(arguments.provider or PROVIDERS) else EXIT_OK


def _emulate(arguments: argparse.Namespace, out: TextIO) -> int:
    from flux_adapters.emulator import PROVIDER_PREFIXES, serve

    faults: dict[str, list[Fault]] = {}
    for provider, fault in arguments.fault:
        faults.setdefault(provider, []).append(fault)
    listening = False

    def banner(root: str) -> None:
        nonlocal listening
        listening = True
        out.write(f"flux-adapters emulator on {root} (Ctrl-C to stop); base URLs:\n")
        for provider, prefix in PROVIDER_PREFIXES.items():
            out.write(f"  {provider:<16} {root}/{prefix}\n")
        out.write(
            "any non-empty API key is accepted\n"
            if not arguments.key
            else "only the given API keys are accepted\n"
        )
        out.flush()

    # uvicorn stops on Ctrl-C, then raises the signal again once its loop is done; asyncio.run's
    # own handler would then only cancel the finished task and the command would end with 0.
    # With a handler of our own installed, Ctrl-C ends as everywhere else: KeyboardInterrupt, 130.
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        serve(
            host=arguments.host,
            port=arguments.port,
            ttl=arguments.ttl,
            valid_keys=arguments.key,
            bad_keys=arguments.bad_key,
            faults=faults,
            on_ready=banner,
            pending_polls=arguments.pending_polls,
        )
    except OSError as exc:
        if listening:
            raise
        # Bound before the banner: a busy port, a privileged one, or an address not on this host.
        raise errors.ConfigurationError(
            f"cannot listen on {arguments.host}:{arguments.port}: {_reason(exc)}"
        ) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    return EXIT_OK


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


_EXIT_FOR: tuple[tuple[type[BaseException], int], ...] = (
    (errors.OutputError, EXIT_OUTPUT),
    (errors.MissingExtraError, EXIT_CONFIG),
    (errors.RequestError, EXIT_REQUEST),
    (errors.ConfigurationError, EXIT_CONFIG),
    (errors.ResultExpired, EXIT_EXPIRED),
    (errors.ProviderError, EXIT_PROVIDER),
    (errors.TransportError, EXIT_TRANSPORT),
    (errors.FluxError, EXIT_FAILED),
)


def _exit_code(error: errors.FluxError) -> int:
    if isinstance(error, errors.AllProvidersFailed):
        # Every provider failed: the last failure says best what to do (all skipped: refused).
        failures = [attempt.error for attempt in error.attempts if attempt.error is not None]
        return _exit_code(failures[-1]) if failures else EXIT_REQUEST
    return next(code for kind, code in _EXIT_FOR if isinstance(error, kind))


def _one_line(error: BaseException, limit: int = 2000) -> str:
    if isinstance(error, errors.RequestError):
        text = str(error).partition("\n")[0] + " " + "; ".join(map(str, error.violations))
    else:
        text = str(error)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _say(stream: TextIO, line: str) -> None:
    """Write *line*; a closed or broken stream must not turn a message into a traceback."""
    with contextlib.suppress(OSError, ValueError):
        stream.write(line + "\n")
        stream.flush()


def _reopen_closed_standard_streams() -> None:
    """Give a command started with stdin, stdout or stderr closed (``>&-``) /dev/null instead.

    Python leaves ``sys.stdout`` None then, and the first file the command opened would take
    descriptor 1 and receive whatever is printed.
    """
    for descriptor, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(descriptor)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != descriptor:
                os.dup2(null, descriptor)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(descriptor, mode, closefd=False))  # noqa: SIM115


def _quiet_failed_streams(*streams: TextIO) -> None:
    """Point a stream that cannot be flushed (reader gone, disk full) at /dev/null.

    Otherwise the interpreter's own flush at exit prints "Exception ignored ... BrokenPipeError".
    """
    for stream in {id(stream): stream for stream in streams}.values():
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, stream.fileno())
                os.close(null)


def _run(argv: Sequence[str] | None, out: TextIO, err: TextIO) -> int:
    try:
        arguments = _parser().parse_args(argv)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else EXIT_OK
    if arguments.command == "batch":  # then _batch checks every line, also before sending
        _check_folder(arguments.output)
        report = arguments.report or arguments.output / "report.jsonl"
        _check_output_file(report)
        _check_not_the_journal(report, arguments.output)
    commands: dict[str, Callable[[], int]] = {
        "edit": lambda: _edit(arguments, out, err),
        "conformance": lambda: _conformance(arguments, out, err),
        "batch": lambda: _batch(arguments, out, err),
        "models": lambda: _models(out),
        "explain": lambda: _explain(arguments, out),
        "emulate": lambda: _emulate(arguments, out),
    }
    return commands[arguments.command]()


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the command with *argv* (default: ``sys.argv[1:]``) and return its exit status.

    Every failure is one line on *err* and a documented status (see the module docstring).
    """
    _reopen_closed_standard_streams()
    out, err = out or sys.stdout, err or sys.stderr
    try:
        code = _run(argv, out, err)
        out.flush()
    except KeyboardInterrupt:
        _say(err, "flux-adapters: interrupted")
        code = EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of our output is gone (`| head`): nobody to tell
        code = EXIT_BROKEN_PIPE
    except _UsageError as error:
        _say(err, str(error))
        code = EXIT_REQUEST
    except errors.FluxError as error:
        _say(err, f"flux-adapters: {type(error).__name__}: {_one_line(error)}")
        code = _exit_code(error)
    except ModuleNotFoundError as exc:  # not raised inside `extra_imports`: say the same
        from flux_adapters._extras import missing_extra

        missing = missing_extra(exc)
        if missing is not None:
            _say(err, f"flux-adapters: {type(missing).__name__}: {_one_line(missing)}")
        else:
            _say(err, f"flux-adapters: {_one_line(exc, 300)}; reinstall flux-adapters")
        code = EXIT_CONFIG
    except Exception as exc:
        if os.environ.get("FLUX_DEBUG") == "1":
            import traceback

            traceback.print_exc(file=err)
        note = "" if isinstance(exc, OSError) else " (unexpected; FLUX_DEBUG=1 shows the traceback)"
        _say(err, f"flux-adapters: {type(exc).__name__}: {_one_line(exc, 300)}{note}")
        code = EXIT_FAILED
    _quiet_failed_streams(out, err, sys.stdout, sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
