"""The ``flux-adapters`` command: edit, check, explain, batch, models, emulate, serve, keys, conformance.

Every failure ends with one line on standard error and one of these exit statuses, never a
traceback (with FLUX_DEBUG=1 set, an unexpected failure also prints its traceback):

    0    success (batch: every request saved or already saved)
    1    unexpected failure (a bug, or standard output cannot be written, e.g. a full disk)
    2    bad arguments, an unusable input file, or a request the limits or a cumulative budget
         refuse (nothing sent)
    3    the provider answered with an error, or its job ended without an image (failed,
         moderated, unknown) (batch: at least one request failed)
    4    no usable answer: connection failed or timed out, or a job passed its deadline, or
         the shared state (Redis) did not answer
    5    configuration: unknown provider, no API key, missing optional dependency, busy port
    6    the result URL expired before it was downloaded
    7    an output path cannot be written (checked before anything is sent; when saving
         fails after a paid call, the image is saved elsewhere and the message says where)
    8    batch: some requests are unconfirmed (they may have been billed) and were not sent
         again; rerun with --resend-unconfirmed to send them
    130  interrupted (Ctrl-C; for edit and batch, SIGTERM too)
    141  standard output was closed by its reader before everything was written, as in
         "flux-adapters models | head -1" (the shell's status for a broken pipe)

When every provider of a failover list failed, the status is that of the last failure.

With --json (edit, check, explain, models, batch, keys create, keys list), standard output is
one JSON document and nothing else; after the arguments are read, a failure is the JSON object
{"error": {...}} there (its type, message, exit status and any violations), besides its line on
standard error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, NoReturn, TextIO, TypeVar

from flux_adapters import errors
from flux_adapters._batch_files import is_url
from flux_adapters._display import escape_controls, escape_surrogates
from flux_adapters._options import MAX_CONCURRENCY as MAX_CONCURRENCY
from flux_adapters._options import MAX_KEEP_SECONDS, MAX_SECONDS
from flux_adapters._version import __version__

if TYPE_CHECKING:
    import asyncio

    from _typeshed import SupportsWrite

    from flux_adapters.client import AsyncFluxClient
    from flux_adapters.config import Config
    from flux_adapters.emulator import Fault
    from flux_adapters.gateway._keys import KeyStore
    from flux_adapters.jobs import Polling
    from flux_adapters.limits import Plan
    from flux_adapters.prices import Price
    from flux_adapters.providers import AnyAdapter
    from flux_adapters.request import EditRequest
    from flux_adapters.result import (
        Attempt,
        BatchItem,
        ConversionWarning,
        EditResult,
        ResultImage,
    )
    from flux_adapters.state import KeyRecord

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_REQUEST, EXIT_PROVIDER, EXIT_TRANSPORT, EXIT_CONFIG, EXIT_EXPIRED = (
    range(7)
)
EXIT_OUTPUT, EXIT_UNCONFIRMED, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 7, 8, 130, 141

DEFAULT_OUTPUT = Path("out")


class _UsageError(Exception):
    """Bad arguments or an unusable input file: one line, exit status 2, nothing sent."""


class _Parser(argparse.ArgumentParser):
    """argparse, with each error as one line (no usage block) that `main` writes and maps to 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {_unechoed(message)} (see {self.prog} --help)")

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        # argparse's own ignores a failed write: `--help | head -1` must end like `models | head -1`.
        (file or sys.stdout).write(self.format_help())


_SECRET_FLAG: Final = re.compile(
    r"(--?[\w-]*(?:key|token|secret|password|auth)[\w-]*)(=|\s+)(\S+)", re.IGNORECASE
)
_NOT_SECRET_FLAGS: Final = frozenset({"--keys-file", "--key-env"})
"""Our own flags whose names say key but whose values are a path and a variable's name: shown
when misplaced (``keys --keys-file F list`` is right, ``keys list --keys-file F`` is not)."""
_URL_USER: Final = re.compile(r"(://)[^/@\s]*@")


def _unechoed(message: str) -> str:
    """*message* of argparse's without a key the user typed where the command takes none.

    argparse echoes arguments it does not know (``unrecognized arguments: --api-key sk-...``):
    there is no ``--api-key``, and typing one is a careless user's first try. Removed: text
    shaped like a key, the values of the ``*_API_KEY`` variables set, what follows a flag that
    names a key or token, and the user name and password of a URL.
    """
    from flux_adapters._redact import redact

    keys = tuple(
        value for name, value in os.environ.items() if name.endswith("_API_KEY") and len(value) >= 8
    )
    message = redact(message, keys)
    if "unrecognized arguments" in message:  # our own flags' values are never secrets
        message = _SECRET_FLAG.sub(_hidden_value, message)
    return _URL_USER.sub(r"\1[redacted]@", message)


def _hidden_value(found: re.Match[str]) -> str:
    flag, between, _ = found.groups()
    return found.group() if flag in _NOT_SECRET_FLAGS else f"{flag}{between}[redacted]"


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


def _above_zero_to(most: float) -> Callable[[str], float]:
    """Above 0 and at most *most*: what the key store takes (`flux_adapters.state.KeyRecord`)."""

    def checked(text: str) -> float:
        value = _number(text)
        if not 0 < value <= most:
            raise argparse.ArgumentTypeError(f"must be above 0 and at most {most:g}, got {text!r}")
        return value

    return checked


def _key_rate(text: str) -> float:
    """``keys create --rate-per-minute``, checked as the key store checks it."""
    from flux_adapters._options import check_rate_per_minute
    from flux_adapters.state import MAX_TOKENS

    try:
        return check_rate_per_minute(_number(text), "the rate", MAX_TOKENS)
    except errors.ConfigurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _label(text: str) -> str:
    if len(text) > 200 or not text.isprintable():
        raise argparse.ArgumentTypeError("must be printable text of at most 200 characters")
    return text


def _image_file(text: str) -> Path:
    """``-o``'s file: ``-`` is standard output to most tools, never a file named "-" (``./-`` is)."""
    if text == "-":
        raise argparse.ArgumentTypeError(
            "the image cannot go to standard output; name a file (-o out.png)"
        )
    return Path(text)


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


def _expiry(text: str) -> float:
    """Seconds above 0, up to a year: a shared batch's state in Redis, a gateway's kept image."""
    value = _number(text)
    if not 0 < value <= MAX_KEEP_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be seconds above 0 to {MAX_KEEP_SECONDS:.0f} (a year), got {text!r}"
        )
    return value


def _lease(text: str) -> float:
    seconds = _seconds()(text)
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 second, not {text!r}")
    return seconds


def _provider_id(text: str) -> str:
    """A provider id, built in or registered (any case), with a suggestion for a typo."""
    from flux_adapters.providers import canonical_name

    try:
        return canonical_name(text)
    except errors.ConfigurationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _http_url(text: str) -> str:
    from flux_adapters._options import check_base_url

    try:
        return check_base_url(text, "the URL")  # as a client checks it: no user or password ...
    except errors.ConfigurationError as error:
        # Not the URL itself: it may hold a password.
        raise argparse.ArgumentTypeError(str(error)) from None


def _public_url(text: str) -> str:
    """The gateway's --public-url, checked as `GatewaySettings` checks it, before it starts."""
    from urllib.parse import urlsplit

    from flux_adapters._options import check_base_url

    try:
        usable = urlsplit(check_base_url(text, "--public-url")).port != 0
    except (errors.ConfigurationError, ValueError):
        usable = False
    if not usable:  # not the URL itself: a password in it would go to every caller's links
        raise argparse.ArgumentTypeError(
            "must be an http:// or https:// URL with a host, no user or password, no query and "
            "no port 0, such as https://images.example.com"
        )
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


def _image(text: str) -> str | Path:
    return text if is_url(text) else _input_file(text)


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

    provider, colon, spec = text.partition(":")
    if provider not in PROVIDER_PREFIXES:
        known = ", ".join(sorted(PROVIDER_PREFIXES))
        shape = "" if colon else ", written PROVIDER:SPEC such as laozhang:429"
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown provider {provider!r} (one of {known}){shape}"
        )
    try:
        fault = Fault.parse(spec)  # which also checks each value
        fault.check_for(provider)  # and that it can happen there (a poll fault at laozhang...)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return provider, fault


def _add_request_arguments(
    parser: argparse.ArgumentParser, format_default: str = "the provider's"
) -> None:
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
    parser.add_argument(
        "--format", dest="output_format", choices=_FORMATS, help=f"default: {format_default}"
    )
    parser.add_argument("--safety-tolerance", type=int)
    parser.add_argument("--steps", type=int, help="inference steps (flux-2-flex)")
    parser.add_argument(
        "--guidance", type=_number, help="guidance (flux-2-flex; also aimlapi's flux-2-pro)"
    )
    parser.add_argument("--prompt-upsampling", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--allow-conversions", action="store_true",
        help="send a setting the provider cannot take exactly in its nearest form (an off-grid "
        "size as the nearest valid one, a size as a ratio ...), with a warning",
    )  # fmt: skip


def _add_json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help=f"print {what} as one JSON document on standard output (messages stay on standard error)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flux-adapters",
        description="Edit and generate images with FLUX models through API resellers.",
        epilog=(__doc__ or "").partition("\n\n")[2] or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flux-adapters {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    edit = commands.add_parser(
        "edit",
        help="generate or edit an image and save it",
        description="Checks the request against each chosen provider's limits, the image files "
        "and the output path, then sends it and saves the image. Nothing is sent when a check "
        "fails.",
    )
    _add_request_arguments(edit, "from -o's extension, else the provider's")
    edit.add_argument(
        "-p",
        "--provider",
        type=_provider_id,
        help="default: the configured provider or failover list (flux-adapters.toml, "
        "$FLUX_PROVIDERS)",
    )
    edit.add_argument(
        "--base-url",
        type=_http_url,
        help="with --provider: its base URL (default: $<PROVIDER>_BASE_URL or the real one)",
    )
    edit.add_argument(
        "-o",
        "--output",
        type=_image_file,
        help="where to save (default: out/<provider>-<time>.<format>); its extension "
        "(.png; .jpg, .jpeg, .jpe, .jfif; .webp; any case) sets --format",
    )
    edit.add_argument(
        "--timeout",
        type=_seconds(),
        help="with --provider: seconds to wait for the image: for each request (default 300) "
        "and, at a provider that runs jobs (bfl, fal), for the whole job (default "
        "$FLUX_JOB_DEADLINE or 600)",
    )
    _add_json(edit, "the result (provider, model, files, cost, attempts, warnings)")

    check = commands.add_parser(
        "check",
        help="check a request against each provider's limits; sends nothing",
        description="Lists, for each provider, every way the request breaks its limits (or the "
        "conversions it would make). Providers: --provider, else the configured ones "
        "($FLUX_PROVIDERS, flux-adapters.toml), else every known one. Exit status 0 when every "
        "one of them accepts the request, 2 when any refuses it.",
    )
    _add_request_arguments(check)
    check.add_argument(
        "-p",
        "--provider",
        action="append",
        type=_provider_id,
        help="repeat; default: the configured providers, else all",
    )
    _add_json(check, "each provider's verdict")

    models = commands.add_parser(
        "models",
        help="the providers x models table, with limits and prices",
        description="A table per provider, fitted to the terminal's width (plain Markdown "
        "without the cli extra).",
    )
    shape = models.add_mutually_exclusive_group()
    shape.add_argument(
        "--markdown", action="store_true", help="Markdown tables, as in the documentation"
    )
    shape.add_argument(
        "--json", action="store_true", help="every limit and price as one JSON document"
    )

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
        description="Each line is a JSON object: id (the file name), prompt, model, images (paths, "
        "read relative to the JSONL file's folder, or URLs), and any of width, height, size, "
        "aspect_ratio, seed, output_format, safety_tolerance, prompt_upsampling, steps, "
        "guidance, allow_conversions. Every line is checked before anything is sent. Providers "
        "come from --provider, or from flux-adapters.toml and $FLUX_PROVIDERS. A journal in the "
        "output folder (with --state: in Redis) records every request before it is sent, so a "
        "batch stopped at any point "
        "(Ctrl-C, a kill, a power loss) can be run again: saved jobs are skipped, and jobs that "
        "may have been billed are reported 'unconfirmed' and not sent again unless "
        "--resend-unconfirmed. A job that fails is one line on standard error as it ends.",
    )
    batch.add_argument("file", type=_input_file, help="the JSONL file of requests")
    batch.add_argument(
        "-o",
        "--output",
        default=str(DEFAULT_OUTPUT),
        help="output folder (default: out); with --state, also any fsspec URL (s3://..., "
        "memory://...: the fsspec extra)",
    )
    batch.add_argument(
        "--report",
        type=Path,
        help="JSONL report, one line per job; a rerun replaces the lines of the jobs it ran "
        "(default: <output>/report.jsonl; with --state: none by default, and a given one "
        "holds this worker's jobs only)",
    )
    batch.add_argument(
        "--state",
        metavar="URL",
        help="share the batch with every worker started with the same file, output and Redis "
        "(redis://, rediss://, unix://): jobs are claimed in blocks with a lease, the journal "
        "and the counts live in Redis (docs/scaling.md)",
    )
    batch.add_argument(
        "--lease",
        type=_lease,
        help="with --state: seconds a worker's claim lasts unless renewed; a worker that dies "
        "loses its jobs to the others after this long (default 30; the first worker's counts)",
    )
    batch.add_argument(
        "--block",
        type=_whole(1, 10_000),
        help="with --state: jobs claimed at a time (default 50; the first worker's counts)",
    )
    batch.add_argument(
        "--state-expiry",
        type=_expiry,
        metavar="SECONDS",
        help="with --state: seconds the batch's state stays in Redis after its last step "
        "(default 604800, 7 days)",
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
    _add_json(batch, "the summary")

    explain = commands.add_parser(
        "explain",
        help="print the HTTP request each provider would receive; sends nothing",
        description="For each provider, the request it would receive where edit would send "
        "it ($<PROVIDER>_BASE_URL, else, without -p, the configuration file's base_url), the "
        "key redacted and images abbreviated, or the violations that "
        "stop it. Exit status 2 when every provider refuses the request.",
    )
    _add_request_arguments(explain)
    explain.add_argument(
        "-p", "--provider", action="append", type=_provider_id, help="default: all"
    )
    _add_json(explain, "each provider's request")

    emulate = commands.add_parser(
        "emulate",
        help="run the provider emulator on 127.0.0.1 in the foreground",
        description="Serves every built-in provider's API offline, each under its own path "
        "(http://HOST:PORT/laozhang, /apiyi, /aimlapi, /bfl, /fal): point <PROVIDER>_BASE_URL "
        "there. Faults can be injected at start (--fault) or while it runs (POST "
        "/<provider>/__flux/faults). See docs/emulator.md.",
    )
    emulate.add_argument(
        "--port", type=_whole(0, 65535), default=8000, help="default 8000; 0: any free port"
    )
    emulate.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
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
        "--bad-key",
        action="append",
        default=[],
        help="refuse this API key with 401 (bfl: 403, as BFL does)",
    )
    _add_serve(commands)
    _add_keys(commands)
    return parser


def _add_serve(commands: argparse._SubParsersAction[_Parser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible gateway (extra: gateway) in the foreground",
        description="Serve OpenAI's Images API (/v1/images/generations, /v1/images/edits, "
        "/v1/models) in front of the configured providers (flux-adapters.toml, "
        "$FLUX_PROVIDERS, <PROVIDER>_API_KEY ...). See docs/gateway.md.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    serve.add_argument(
        "--port", type=_whole(0, 65535), default=8080, help="default 8080; 0: any free port"
    )
    serve.add_argument(
        "--config",
        type=Path,
        help="the configuration file (default: $FLUX_CONFIG, else ./flux-adapters.toml)",
    )
    serve.add_argument(
        "--files-dir", type=Path, default=Path("flux-gateway-files"),
        help="where result images are kept and served from (default ./flux-gateway-files)",
    )  # fmt: skip
    serve.add_argument(
        "--retention", type=_expiry, default=86400.0,
        help="seconds a kept image is served, up to a year (default 86400: one day)",
    )  # fmt: skip
    serve.add_argument(
        "--public-url",
        type=_public_url,
        help="root URL for image links, http(s)://host[/path] (default: the URL each client called)",
    )
    serve.add_argument(
        "--keys-file",
        type=Path,
        help="the gateway key file (default: $FLUX_GATEWAY_KEYS, else ./flux-adapters-keys.json)",
    )
    serve.add_argument(
        "--state",
        metavar="URL",
        help="shared state, e.g. redis://host:6379/0 (default: $FLUX_STATE_URL, else state_url "
        "in the configuration file, else in-process)",
    )
    serve.add_argument(
        "--no-auth", action="store_true",
        help="accept calls without a gateway key (only for a gateway no one else can reach)",
    )  # fmt: skip
    serve.add_argument(
        "--max-body-mb",
        type=_whole(1, 4096),
        default=240,
        help="largest request body (default 240)",
    )
    serve.add_argument(
        "--max-bodies-mb",
        type=_whole(1, 1 << 20),
        default=1024,
        help="request bodies held at once, all calls together; past it a 503 (default 1024)",
    )
    serve.add_argument(
        "--body-timeout", type=_seconds(), default=300.0,
        help="seconds a request's whole body may take to arrive; slower is a 408 (default 300)",
    )  # fmt: skip
    serve.add_argument(
        "--send-timeout", type=_seconds(), default=60.0,
        help="seconds an answer may wait for its client to read more of it; then the "
        "connection is closed (default 60)",
    )  # fmt: skip
    serve.add_argument(
        "--shutdown-timeout", type=_seconds(zero=True), default=300.0,
        help="seconds to let paid calls under way finish on SIGTERM/Ctrl-C (default 300)",
    )  # fmt: skip


def _add_keys(commands: argparse._SubParsersAction[_Parser]) -> None:
    from flux_adapters.request import MODELS

    keys = commands.add_parser("keys", help="create, list or revoke gateway keys")
    keys.add_argument(
        "--keys-file",
        type=Path,
        help="the key file (default: $FLUX_GATEWAY_KEYS, else ./flux-adapters-keys.json)",
    )
    keys.add_argument(
        "--state",
        metavar="URL",
        help="shared state (default: $FLUX_STATE_URL, else state_url in the configuration file)",
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    actions.required = True
    create = actions.add_parser(
        "create", help="make a key; it is shown once, only its hash is kept"
    )
    create.add_argument("--name", default="", type=_label, help="a label")
    create.add_argument(
        "--budget-usd", type=_above_zero_to(1e9), help="dollars this key may spend (at most 1e9)"
    )
    period = create.add_mutually_exclusive_group()
    period.add_argument(
        "--per-day",
        dest="period",
        action="store_const",
        const="day",
        help="the budget is per UTC day",
    )
    period.add_argument(
        "--total",
        dest="period",
        action="store_const",
        const="total",
        help="the budget is for the key's life (default)",
    )
    create.add_argument(
        "--model",
        action="append",
        default=[],
        choices=MODELS,
        help="a model it may use (repeat; default all)",
    )
    create.add_argument(
        "--provider",
        action="append",
        default=[],
        type=_provider_id,
        help="a provider its calls may go to (repeat; default all)",
    )
    create.add_argument(
        "--rate-per-minute",
        type=_key_rate,
        help="calls per minute, from one a day (1/1440) to 1e6 (default: no limit)",
    )
    _add_json(create, "the key and its record")
    listing = actions.add_parser("list", help="the keys (ids, names, limits; never a key)")
    _add_json(listing, "the records")
    revoke = actions.add_parser("revoke", help="delete a key by its id")
    revoke.add_argument("key_id", help="the id `keys list` shows")


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
            if os.path.islink(existing):  # a link to nothing: mkdir fails there ("File exists")
                raise errors.OutputError(
                    f"{existing} is a broken symbolic link", path=shown
                ) from None
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


# --- Messages that name the command line's flags ----------------------------------------------

_FLAGS: Final = {
    "model": "--model",
    "images": "--image",
    "width": "--width",
    "height": "--height",
    "width/height": "--width/--height",
    "size": "--size",
    "aspect_ratio": "--aspect-ratio",
    "seed": "--seed",
    "output_format": "--format",
    "safety_tolerance": "--safety-tolerance",
    "prompt_upsampling": "--prompt-upsampling",
    "steps": "--steps",
    "guidance": "--guidance",
    "allow_conversions": "--allow-conversions",
    "base_url": "--base-url",
    "timeout": "--timeout",
}
"""Each request field or client argument the library's messages name, as the command names it."""

# How the library names an argument in its advice (flux_adapters.limits): name="value",
# name=True, name= (an argument on its own), and the width/height pair.
_SPELLED: Final = re.compile(r'(?<![\w-])(?:(width/height)\b|([a-z_]+)=(True|"[^"\s]*"|(?![\w"])))')


def _flag(name: str, flags: Mapping[str, str]) -> str:
    """How the command line names request field *name* (``images[1]``: image 2)."""
    prefix, colon, field = name.rpartition(": ")  # "laozhang: seed", several providers refusing
    indexed = re.fullmatch(r"images\[(\d+)\]", field)
    shown = f"image {int(indexed[1]) + 1} (--image)" if indexed else flags.get(field, field)
    return prefix + colon + shown


def _in_flags(text: str, flags: Mapping[str, str]) -> str:
    """*text* with each argument the library's advice names spelled as its flag."""

    def spelled(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        flag = flags.get(name)
        if flag is None:
            return match[0]
        value = match[3] or ""
        return flag if value in ("", "True") else f"{flag} {value.strip(chr(34))}"

    return _SPELLED.sub(spelled, text)


def _in_fields(text: str) -> str:
    """*text* with each argument the library's advice names spelled as a batch line's field."""

    def spelled(match: re.Match[str]) -> str:
        if match[1]:
            return '"width" and "height"'
        value = {"True": "true", "": ""}.get(match[3] or "", match[3])
        return f'"{match[2]}": {value}' if value else f'"{match[2]}"'

    return _SPELLED.sub(spelled, text)


def _violation_text(violation: errors.Violation, flags: Mapping[str, str]) -> str:
    """One violation, as the command line says it: flags, not the library's argument names."""
    return (
        f"{_flag(violation.field, flags)}: {_in_flags(violation.message, flags)} "
        f"(limit: {_in_flags(violation.limit, flags)}; got: {violation.value})"
    )


def _violation_data(violation: errors.Violation, flags: Mapping[str, str]) -> dict[str, object]:
    return {
        "field": violation.field,
        "flag": _flag(violation.field, flags),
        "message": _in_flags(violation.message, flags),
        "limit": _in_flags(violation.limit, flags),
        "value": violation.value,
        "source": violation.source,
    }


def _warning_data(warning: ConversionWarning) -> dict[str, object]:
    return {
        "field": warning.field,
        "requested": warning.requested,
        "sent": warning.sent,
        "message": warning.message,
    }


# --- The request, from the arguments ----------------------------------------------------------

_FORMATS: Final = ("jpeg", "png", "webp")


def _output_format(arguments: argparse.Namespace, flags: dict[str, str]) -> str | None:
    """``--format``, else the format ``-o``'s extension names; the two must agree.

    Raises:
        _UsageError: ``--format`` and the extension name different formats, or the extension
            names an image format no provider returns (``.gif``): the image would be paid for
            and then refused by the name (`flux_adapters.errors.ExtensionMismatch`).
    """
    from flux_adapters._files import IMAGE_FORMATS, extension_format, format_name

    output: Path | None = getattr(arguments, "output", None)
    chosen: str | None = arguments.output_format
    implied = extension_format(output) if output is not None else None
    if implied is None:
        return chosen
    if implied not in IMAGE_FORMATS:
        raise _UsageError(
            f"flux-adapters {arguments.command}: error: -o {output}: {format_name(implied)} is "
            "not a format a provider returns; name the file .png, .jpg or .webp"
        )
    if chosen is not None and chosen != implied:
        raise _UsageError(
            f"flux-adapters {arguments.command}: error: --format {chosen} and -o {output} "
            f"(a {implied} file name) disagree; drop one, or make them name one format"
        )
    if chosen is None:
        flags["output_format"] = f"--format (from -o {output})"
    return implied


def _request(arguments: argparse.Namespace, flags: dict[str, str]) -> EditRequest:
    """The request the arguments describe (*flags* learns a --format taken from -o).

    Raises:
        _UsageError: The size is given in two ways, or only one of --width and --height.
        RequestError: A rule that holds at every provider is broken.
    """
    from flux_adapters.request import EditRequest

    command = f"flux-adapters {arguments.command}: error:"
    sides = (arguments.width is not None) + (arguments.height is not None)
    if sides == 1:
        raise _UsageError(f"{command} --width and --height go together")
    if sides and (arguments.size or arguments.aspect_ratio):
        other = "--size" if arguments.size else "--aspect-ratio"
        raise _UsageError(f"{command} --width/--height and {other}: give the output size one way")
    return EditRequest(
        prompt=arguments.prompt,
        model=arguments.model,
        images=arguments.image,
        width=arguments.width,
        height=arguments.height,
        size=arguments.size,
        aspect_ratio=arguments.aspect_ratio,
        seed=arguments.seed,
        output_format=_output_format(arguments, flags),  # type: ignore[arg-type]
        safety_tolerance=arguments.safety_tolerance,
        prompt_upsampling=arguments.prompt_upsampling,
        steps=arguments.steps,
        guidance=arguments.guidance,
        allow_conversions=arguments.allow_conversions,
    )


def _verdicts(
    request: EditRequest, providers: Sequence[str]
) -> dict[str, Plan | errors.RequestError]:
    """Each provider's plan for *request*, or why it refuses it (`flux_adapters.check`'s check)."""
    from flux_adapters._flows import resolve
    from flux_adapters.providers import get_adapter

    found: dict[str, Plan | errors.RequestError] = {}
    for provider in providers:
        try:
            found[provider] = resolve(get_adapter(provider), request)
        except errors.RequestError as error:
            found[provider] = error
    return found


def _stop_if_refused(verdicts: Mapping[str, Plan | errors.RequestError], model: str) -> None:
    """Stop before anything is sent when every provider refuses the request.

    Raises:
        RequestError: Every violation, each named after its provider when there are several.
    """
    import attrs

    refusals = [v for v in verdicts.values() if isinstance(v, errors.RequestError)]
    if len(refusals) < len(verdicts):
        return
    if len(refusals) == 1:
        raise refusals[0]
    violations = [
        attrs.evolve(violation, field=f"{error.provider}: {violation.field}")
        for error in refusals
        for violation in error.violations
    ]
    raise errors.RequestError(violations, provider="every provider", model=model)


def _key_for(provider: str) -> None:
    """Refuse a provider named on the command line whose key is not set, before sending.

    Raises:
        ConfigurationError: Its variable is unset or empty (the message names it).
    """
    from flux_adapters.config import ProviderSettings, missing_keys, no_key_error

    missing = missing_keys([ProviderSettings(name=provider)])
    if missing:
        raise no_key_error(missing)


# --- edit ---------------------------------------------------------------------------------------


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
        if not any((folder / f"{candidate}.{kind}").exists() for kind in _FORMATS):
            return candidate
    return f"{stem}-{os.getpid()}"


def _saved_data(path: Path, instead_of: Path | None = None) -> dict[str, object]:
    """A saved image for ``--json``: where, its format and pixel size (read from its header)."""
    from flux_adapters._files import image_format

    data: dict[str, object] = {"path": str(path)}
    if instead_of is not None:
        data["instead_of"] = str(instead_of)
    try:
        with path.open("rb") as stream:
            data["format"] = image_format(stream.read(16))
            stream.seek(0)
            import imagesize

            width, height = imagesize.get(stream)
        data["width"], data["height"] = (width, height) if width > 0 else (None, None)
        data["bytes"] = path.stat().st_size
    except Exception:  # the image is saved; what cannot be read of it is left out
        pass
    return data


def _save(
    image: ResultImage, target: Path | None, stem: str, err: TextIO
) -> tuple[dict[str, object], int]:
    """Save one paid-for image and never lose it quietly: where it went, and a status.

    *target* is the path asked for (None: ``out/<stem>.<format>``). If it cannot be written, the
    image goes to out/ or the temporary folder instead; if that fails too, or the download
    fails, the message gives the address it can still be downloaded from for a few minutes.
    """
    folder, name = (target.parent, target.name) if target else (DEFAULT_OUTPUT, None)
    try:
        return _saved_data(_save_into(image, folder, name, stem)), EXIT_OK
    except errors.OutputError as error:
        problem = f"flux-adapters: OutputError: {_one_line(error)}"  # as `main` writes errors
        failure: errors.FluxError = error
    except errors.FluxError as error:
        problem, where = f"flux-adapters: {type(error).__name__}: {_one_line(error)}", ""
        # Neither a URL that is gone nor one refused as leading to a private address (to
        # fetch by hand from this machine: what the refusal was for) is offered.
        if image.url is not None and not isinstance(
            error, errors.ResultExpired | errors.AddressRefused
        ):
            where = f"; download it within 10 minutes from {escape_controls(image.url)}"
        _say(err, problem + where)
        return _unsaved(image, error), _exit_code(error)
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
        return _saved_data(saved, target or folder), EXIT_OUTPUT
    where = (
        f"download it within 10 minutes from {escape_controls(image.url)}"
        if image.url
        else "nowhere to save it"
    )
    _say(err, f"{problem}; {where}")
    return _unsaved(image, failure), EXIT_OUTPUT


def _unsaved(image: ResultImage, error: errors.FluxError) -> dict[str, object]:
    return {
        "path": None,
        "error": f"{type(error).__name__}: {_one_line(error)}",
        "url": None
        if isinstance(error, errors.ResultExpired | errors.AddressRefused)
        else image.url,
    }


def _polling(timeout: float | None) -> Polling | None:
    """A job's deadline with --provider: *timeout*, else ``$FLUX_JOB_DEADLINE`` (as `from_env`)."""
    from flux_adapters.config import job_deadline_from_env
    from flux_adapters.jobs import Polling

    deadline = timeout if timeout is not None else job_deadline_from_env()
    return Polling(deadline=deadline) if deadline is not None else None


def _attempt_data(attempt: Attempt, flags: Mapping[str, str]) -> dict[str, object]:
    """One attempt for ``edit --json``: its error's violations and advice name the flags."""
    return {
        "provider": attempt.provider,
        "outcome": attempt.outcome,
        "seconds": round(attempt.elapsed_s, 3),
        "billing": attempt.billing,
        "reason": attempt.reason,
        "error": f"{type(attempt.error).__name__}: {_one_line(attempt.error, flags=flags)}"
        if attempt.error
        else None,
    }


def _edit(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from flux_adapters._terminal import waiting
    from flux_adapters.client import FluxClient
    from flux_adapters.result import _finite  # None for what JSON cannot hold, as to_dict has it

    if not arguments.provider and (arguments.base_url or arguments.timeout):
        raise _UsageError(
            "flux-adapters edit: error: --base-url and --timeout go with --provider "
            "(for a failover list, set them in flux-adapters.toml or the environment)"
        )
    flags = arguments.flags
    request = _request(arguments, flags)
    output: Path | None = arguments.output
    if output is not None:
        _check_output_file(output)
    else:
        _check_folder(DEFAULT_OUTPUT)
    started = time.perf_counter()
    verdicts = None
    if arguments.provider:
        verdicts = _verdicts(request, [arguments.provider])
        _stop_if_refused(verdicts, request.model)  # before a missing key: the request is wrong
        _key_for(arguments.provider)
        client = FluxClient(
            arguments.provider,
            base_url=arguments.base_url,
            timeout=arguments.timeout,
            polling=_polling(arguments.timeout),
        )
    else:  # the configured provider or failover list: flux-adapters.toml and $FLUX_PROVIDERS
        client = _configured(FluxClient.from_env, "edit")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    saved: list[dict[str, object]] = []
    code = EXIT_OK
    with client, _terminated_as_interrupted():
        if verdicts is None:
            verdicts = _verdicts(request, client.providers)
            _stop_if_refused(verdicts, request.model)
        accepting = [
            name
            for name, verdict in verdicts.items()
            if not isinstance(verdict, errors.RequestError)
        ]
        references = f" with {len(request.images)} reference image(s)" if request.images else ""
        with waiting(f"{', '.join(accepting)}: generating {request.model}{references} ...", err):
            result = client.edit(request)
        for index, image in enumerate(result.images):
            suffix = f"-{index + 1}" if len(result.images) > 1 else ""
            target = output.with_name(f"{output.stem}{suffix}{output.suffix}") if output else None
            try:
                place, status = _save(image, target, f"{result.provider}-{stamp}{suffix}", err)
            except KeyboardInterrupt as interruption:
                # The images are paid for: where they still are, after "interrupted" on the
                # terminal and in --json's "notes" (`_failure_data`), as for a job cut short.
                urls = [later.url for later in result.images[index:] if later.url]
                if urls:
                    interruption.add_note(
                        "flux-adapters: not saved; download it within 10 minutes from "
                        + " ".join(escape_controls(url) for url in urls)
                    )
                raise
            saved.append(place)
            code = code or status  # the first failure decides
    elapsed = time.perf_counter() - started
    if arguments.json:
        document = {
            "provider": result.provider,
            "model": result.model,
            "images": saved,
            "cost_usd": _finite(result.cost_usd),  # finite prices can sum to infinity
            "cost_source": result.cost_source,
            "seconds": round(elapsed, 3),
            "attempts": [_attempt_data(attempt, flags) for attempt in result.attempts],
            "warnings": [_warning_data(warning) for warning in result.warnings],
            "exit_status": code,
        }
        _write_json(out, document)
        return code
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
        if place["path"] is not None:
            instead = (
                f" (instead of {escape_controls(str(place['instead_of']))})"
                if "instead_of" in place
                else ""
            )
            # The user's own path, but a line break or an escape sequence in it would forge
            # lines or repaint the terminal, as in every other line of ours.
            out.write(f"saved:    {escape_controls(str(place['path']))}{instead}\n")
    return code


def _write_json(out: TextIO, document: object) -> None:
    """Write *document* as JSON that is UTF-8 whatever its strings hold.

    A lone surrogate (a file name's bytes that are not UTF-8, as Python decodes them) is
    escaped: written as it is, standard output would carry those bytes, which no UTF-8 reader
    takes; escaped, it is JSON, and reads back to the same name.
    """
    text = json.dumps(document, indent=2, ensure_ascii=False)
    out.write((text if text.isascii() else escape_surrogates(text)) + "\n")


# --- check, explain -----------------------------------------------------------------------------


def _configuration() -> Config | None:
    """The configuration ``edit`` without ``-p`` would use, or ``None`` when there is none."""
    from flux_adapters.config import DEFAULT_PATH, load_config

    if os.environ.get("FLUX_PROVIDERS") or os.environ.get("FLUX_CONFIG") or DEFAULT_PATH.exists():
        return load_config()
    return None


def _chosen_providers(named: Sequence[str] | None) -> list[str]:
    """``-p`` providers, else the configured ones, else every known one."""
    from flux_adapters.providers import PROVIDERS

    if named:
        return list(dict.fromkeys(named))
    configured = _configuration()
    if configured is not None:
        return [settings.name for settings in configured.providers]
    return list(PROVIDERS)


def _check(arguments: argparse.Namespace, out: TextIO) -> int:
    flags = arguments.flags
    request = _request(arguments, flags)
    chosen = _chosen_providers(arguments.provider)
    adapters, broken = _loaded(chosen)
    verdicts = _verdicts(request, list(adapters))
    every = not broken and all(
        not isinstance(verdict, errors.RequestError) for verdict in verdicts.values()
    )
    if arguments.json:
        _write_json(
            out,
            {
                "model": request.model,
                "accepted": every,
                "providers": [
                    {"provider": provider, "accepted": False, "error": error}
                    for provider, error in broken.items()
                ]
                + [
                    {
                        "provider": provider,
                        "accepted": not isinstance(verdict, errors.RequestError),
                        "violations": [_violation_data(v, flags) for v in verdict.violations]
                        if isinstance(verdict, errors.RequestError)
                        else [],
                        "warnings": []
                        if isinstance(verdict, errors.RequestError)
                        else [_warning_data(warning) for warning in verdict.warnings],
                    }
                    for provider, verdict in verdicts.items()
                ],
            },
        )
    else:
        out.writelines(f"{provider}: {error}\n" for provider, error in broken.items())
        for provider, verdict in verdicts.items():
            if isinstance(verdict, errors.RequestError):
                count = len(verdict.violations)
                out.write(f"{provider}: refused ({count} problem{'s' if count != 1 else ''})\n")
                out.writelines(f"  - {_violation_text(v, flags)}\n" for v in verdict.violations)
            else:
                out.write(f"{provider}: accepted\n")
                out.writelines(f"  warning: {warning}\n" for warning in verdict.warnings)
    return EXIT_OK if every else EXIT_REQUEST


# --- batch --------------------------------------------------------------------------------------


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


def _in_command_words(item: BatchItem) -> BatchItem:
    """*item* with a reason that names an argument of `edit_many` naming the flag instead."""
    from flux_adapters._batch import COMMAND_REASONS

    said = COMMAND_REASONS.get(item.reason)
    if said is None:
        return item
    import attrs

    return attrs.evolve(item, reason=said)


def _job_report(
    name: str,
    status: str,
    result: EditResult | None,
    files: list[str],
    error: BaseException | None,
    reason: str,
) -> dict[str, object]:
    """A job's line of ``--report``, in a batch of one process or of many (`_shared_batch`)."""
    from flux_adapters.result import _finite  # loaded with the result

    line: dict[str, object] = {"id": name, "status": status}
    if result is not None:
        line["provider"] = result.provider
        line["cost_usd"] = _finite(result.cost_usd)  # finite prices can sum to infinity
    if files:
        line["files"] = files
    if error is not None:
        line["error"] = _report_error(error)
    if reason:
        line["reason"] = reason
    return line


def _report_line(item: BatchItem) -> dict[str, object]:
    saved = [str(path) for path in item.saved]
    line = _job_report(item.name, item.status, item.result, saved, item.error, item.reason)
    attempts = _attempt_lines(item)
    if attempts:
        line["attempts"] = attempts
    return line


def _job_line(name: str, status: str, why: str) -> str:
    """A job that did not succeed, as one line on standard error."""
    text = " ".join(escape_controls(why).split())
    if len(text) > 500:
        text = text[:499] + "…"
    return f"flux-adapters: {escape_controls(name)}: {status}: {text}"


_T = TypeVar("_T")


def _configured(from_env: Callable[[], _T], command: str) -> _T:
    """A client's ``from_env()``, a configuration naming no provider told that ``-p`` names one."""
    from flux_adapters.config import NO_PROVIDERS

    try:
        return from_env()
    except errors.ConfigurationError as error:
        if not str(error).startswith(NO_PROVIDERS):
            raise
        raise errors.ConfigurationError(
            f"{error}; or name one: flux-adapters {command} -p laozhang ..."
        ) from None


def _batch_client(arguments: argparse.Namespace, state: str | None = None) -> AsyncFluxClient:
    """The client for a batch: ``-p`` providers (those without a key left out), else configured.

    *state*: a shared batch's Redis, the configured client's state when its configuration names
    none and sets a budget or a key's rate limit: they are then the workers', not each worker's
    own (N workers spending a budget N times over). Without either, the client's cooldowns stay
    its own, as for any client with no state: no Redis call a job.
    """
    from flux_adapters.client import AsyncFluxClient, _configured_options

    if not arguments.provider:
        if state is None:
            return _configured(AsyncFluxClient.from_env, "batch")

        def configured() -> AsyncFluxClient:
            options = _configured_options(None, None, None)
            settings = options["settings"].values()
            limited = any(given.rate_per_minute is not None for given in settings)
            if options["state"] is None and (options["budget_usd"] is not None or limited):
                options["state"] = state
            return AsyncFluxClient(**options)

        return _configured(configured, "batch")
    from flux_adapters._ids import ProviderName
    from flux_adapters.config import ProviderSettings, with_keys

    named = [ProviderSettings(name=name) for name in dict.fromkeys(arguments.provider)]
    usable = [ProviderName(settings.name) for settings in with_keys(named)]
    return AsyncFluxClient(providers=usable, polling=_polling(None))


def _counted(counts: Mapping[str, int]) -> dict[str, int]:
    """A batch's counts as its ``--json`` summary names them."""
    return {
        "saved": counts["ok"],
        "already_saved": counts["skipped"],
        "failed": counts["failed"],
        "unconfirmed": counts["unconfirmed"],
        "changed": counts["changed"],
    }


def _said(counts: Mapping[str, int]) -> str:
    """A batch's counts in words."""
    return (
        f"{counts['ok']} saved, {counts['skipped']} already saved, {counts['failed']} failed, "
        f"{counts['unconfirmed']} unconfirmed, {counts['changed']} changed"
    )


def _report_error(error: BaseException) -> str:
    """A job's error for its report line: its type and message, advice in the line's fields."""
    shown = str(error)
    if isinstance(error, errors.RequestError):  # as its line on standard error spells it
        shown = _in_fields(shown)
    return f"{type(error).__name__}: {shown}"


def _why(error: BaseException | None, reason: str) -> str:
    """What a job's line says of why it did not end saved: its error, and the reason too."""
    if error is None:
        return reason
    shown = _one_line(error)
    if isinstance(error, errors.RequestError):  # advice as a line of the batch spells it
        shown = _in_fields(shown)
    why = f"{type(error).__name__}: {shown}"
    return f"{why} ({reason})" if reason else why


def _batch_status(counts: Mapping[str, int], interrupted: bool) -> int:
    """A batch's exit status: stopped, some may have been billed unsaved, some failed, or ok."""
    if interrupted:
        return EXIT_INTERRUPTED
    if counts["unconfirmed"]:
        return EXIT_UNCONFIRMED
    return EXIT_PROVIDER if counts["failed"] or counts["changed"] else EXIT_OK


class _Interrupts:
    """SIGINT and SIGTERM during a batch: the first stops taking jobs, a second stops at once.

    `watch` is called inside the batch's event loop; its ``stop`` event is set by the first
    signal, which *tell* announces with *message*; a second signal cancels the loop's main task.
    """

    def __init__(self, tell: Callable[[str], None], message: str) -> None:
        self.interrupted = False
        self._tell = tell
        self._message = message

    def watch(self) -> asyncio.Event:
        import asyncio
        import signal

        stop = asyncio.Event()
        main_task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if self.interrupted:
                assert main_task is not None
                main_task.cancel()  # a second signal: stop now; the journal knows what was sent
                return
            self.interrupted = True
            stop.set()
            self._tell(self._message)

        for number in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(number, on_signal)
        return stop


def _batch(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import asyncio
    import itertools
    import operator

    from flux_adapters._batch_files import check_file, compact_report, requests
    from flux_adapters._journal import JOURNAL_NAME, ReportLines, load_states
    from flux_adapters._terminal import BatchDisplay, batch_progress

    path: Path = arguments.file
    total = check_file(path)
    folder: Path = arguments.output
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.OutputError(exc.strerror or str(exc), path=str(folder)) from None
    report = ReportLines(arguments.report or folder / "report.jsonl")
    counts = dict.fromkeys(("ok", "skipped", "changed", "failed", "unconfirmed"), 0)
    display: list[BatchDisplay] = []
    """The progress display, once the batch runs (lines refused before it are said plainly)."""
    may_repeat = False
    """Whether this run may have written two report lines for one id. The jobs the batch ran
    have distinct names, but for those it refused as not a request or a name (used twice, say);
    a line refused here or a job cut short by a second signal may share another's id."""

    def tell(line: str) -> None:
        if display:
            display[0].say(line)
        else:
            _say(err, line)

    def refused(name: str, error: errors.RequestError) -> None:
        nonlocal may_repeat
        may_repeat = True
        counts["failed"] += 1
        report.append({"id": name, "status": "failed", "error": _report_error(error)})
        tell(_job_line(name, "failed", _why(error, "")))
        if display:
            display[0].advance()

    interrupts = _Interrupts(
        tell,
        f"flux-adapters: stopping: no new jobs; up to {arguments.grace:g} s for those in flight "
        "(Ctrl-C again to stop at once)",
    )
    at_once = False
    in_flight: set[str] = set()
    """Ids taken from the file whose report line is not written yet."""

    def taken(names: Iterator[str]) -> Iterator[str]:
        for name in names:
            in_flight.add(name)
            yield name

    async def run() -> None:
        nonlocal at_once, may_repeat
        stop = interrupts.watch()
        client = _batch_client(arguments)
        first, second = itertools.tee(requests(path, refused))
        async with client:
            items = client.edit_many(
                map(operator.itemgetter(1), second),
                names=taken(map(operator.itemgetter(0), first)),
                concurrency=arguments.concurrency,
                per_provider=arguments.per_provider,
                output_dir=folder,
                resend_unconfirmed=arguments.resend_unconfirmed,
                force=arguments.force,
                stop=stop,
                grace=arguments.grace,
            )
            with batch_progress(total, err) as shown:
                display.append(shown)
                try:
                    # Closed here even if writing the report fails: jobs stop before the client.
                    async with contextlib.aclosing(items):
                        async for item in items:
                            item = _in_command_words(item)
                            counts[item.status] += 1
                            report.append(_report_line(item))
                            in_flight.discard(item.name)
                            if item.status in ("failed", "unconfirmed", "changed"):
                                if isinstance(item.error, errors.RequestError):
                                    may_repeat = True
                                why = _why(item.error, item.reason)
                                shown.say(_job_line(item.name, item.status, why))
                            shown.advance()
                except asyncio.CancelledError:
                    at_once = True
                finally:
                    display.clear()

    try:
        with contextlib.suppress(asyncio.CancelledError):  # a second signal after the batch
            asyncio.run(run())
        if at_once and in_flight:
            # Stopped at once: the jobs in flight have no item. The journal (closed now) says
            # which of them may have been billed; they must not vanish from the report.
            states = load_states(folder / JOURNAL_NAME, in_flight)
            may_repeat = True
            for name in sorted(in_flight):
                state = states.get(name)
                if state is not None and state.may_be_billed:
                    counts["unconfirmed"] += 1
                    reason = f"may have been billed, no image saved: stopped at once; {state.why_unconfirmed}"
                    report.append({"id": name, "status": "unconfirmed", "reason": reason})
                    tell(_job_line(name, "unconfirmed", reason))
    finally:
        # One line per job; the lines of this run are all in. A report that held nothing but
        # this run's lines, no id twice, is one already: not read back to find that out.
        compacted = not may_repeat and report.holds_only_its_own_lines()
        report.close()
        if not compacted:
            compact_report(report.path)
    done = sum(counts.values())
    if arguments.json:
        _write_json(
            out,
            {
                "total": total,
                **_counted(counts),
                "not_started": max(total - done, 0),
                "interrupted": interrupts.interrupted,
                "report": str(report.path),
            },
        )
    else:
        summary = _said(counts)
        if done < total:
            summary += f", {total - done} not started"
        out.write(f"{summary}; report: {report.path}\n")
        if counts["unconfirmed"]:
            out.write(
                "unconfirmed jobs may have been billed and have no image: see the report; rerun "
                "with --resend-unconfirmed to send them again\n"
            )
    return _batch_status(counts, interrupts.interrupted)


def _shared_batch(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``batch --state``: this process is one of the workers of a batch shared through Redis."""
    import asyncio

    from flux_adapters._batch_files import check_file
    from flux_adapters._journal import ReportLines
    from flux_adapters._shared_batch import Ended, Lines, SharedOptions, Summary, run_shared
    from flux_adapters._terminal import BatchDisplay, batch_progress

    path: Path = arguments.file
    # Indexed first, then checked: a line edited in place between the two was checked as it is
    # on disk, or is refused when its job comes (its CRC-32 is not the index's). Checked first,
    # the index took lines no check had seen (a second job of one id).
    lines = Lines(path)
    try:  # until the run takes the lines, whatever is refused closes them
        check_file(path)
        total = len(lines)
        expiry = arguments.state_expiry
        given = {  # those not given: SharedOptions' defaults, which --help states
            "block": arguments.block,
            "lease_s": arguments.lease,
            "keep_s": None if expiry is None else max(int(expiry), 1),
        }
        options = SharedOptions(
            state_url=arguments.state,
            output=arguments.output,
            concurrency=arguments.concurrency,
            per_provider=arguments.per_provider,
            resend_unconfirmed=arguments.resend_unconfirmed,
            force=arguments.force,
            grace=arguments.grace,
            **{name: value for name, value in given.items() if value is not None},
        )
        report = ReportLines(arguments.report) if arguments.report is not None else None
    except BaseException:
        lines.close()
        raise
    shown_done = 0
    display: list[BatchDisplay] = []

    def ended(job: Ended) -> None:
        nonlocal shown_done
        if report is not None:
            line = _job_report(job.name, job.status, job.result, job.files, job.error, job.reason)
            if not job.counted:
                line["counted"] = False
            report.append(line)
        if job.status in ("failed", "unconfirmed", "changed") or not job.counted:
            tell(_job_line(job.name, job.status, _why(job.error, job.reason)))
        if display and job.counted:
            shown_done += 1
            display[0].advance()

    def progress(counts: Mapping[str, int]) -> None:
        nonlocal shown_done
        done = sum(counts.values())
        while display and shown_done < done:
            shown_done += 1
            display[0].advance()

    def tell(line: str) -> None:
        if display:
            display[0].say(line)
        else:
            _say(err, line)

    interrupts = _Interrupts(
        tell,
        f"flux-adapters: stopping: no new jobs; up to {arguments.grace:g} s for those in flight, "
        "then this worker's blocks go back to the others (Ctrl-C again to stop at once)",
    )

    async def run() -> Summary:
        stop = interrupts.watch()
        client = _batch_client(arguments, arguments.state)
        async with client:
            with batch_progress(total, err) as shown:
                display.append(shown)
                try:
                    return await run_shared(
                        client, lines, options, stop=stop, on_end=ended, on_progress=progress
                    )
                finally:
                    display.clear()

    try:
        summary = asyncio.run(run())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        lines.close()
        if report is not None:
            report.close()
    totals, mine = summary.totals, summary.mine
    done = sum(totals.values())
    if arguments.json:
        _write_json(
            out,
            {
                "batch": summary.batch,
                "round": summary.round,
                "total": total,
                **_counted(totals),
                "not_started": max(total - done, 0),
                "finished": summary.finished,
                "interrupted": interrupts.interrupted,
                "report": str(report.path) if report is not None else None,
                "worker": _counted(mine),
            },
        )
    else:
        line = f"batch {summary.batch} (round {summary.round}): {_said(totals)}"
        if done < total:
            line += f", {total - done} not done yet"
        out.write(f"{line}; this worker: {_said(mine)}\n")
        if totals["unconfirmed"]:
            out.write(
                "unconfirmed jobs may have been billed and have no image; run the batch again "
                "with --resend-unconfirmed to send them again\n"
            )
    return _batch_status(totals, interrupts.interrupted)


def _conformance(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import importlib

    from flux_adapters._display import describe_exception
    from flux_adapters._options import check_adapter, check_base_url
    from flux_adapters._terminal import is_terminal
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
    shipped = False
    if arguments.cassettes is None:
        arguments.cassettes = Path("cassettes")
        if not arguments.record and not arguments.cassettes.is_dir():
            arguments.cassettes, shipped = bundled_cassettes(), True
    if arguments.record:
        _check_folder(arguments.cassettes)
    adapters: list[AnyAdapter] = [
        get_adapter(name) for name in arguments.provider or ([] if arguments.adapter else BUILT_IN)
    ]
    if arguments.adapter:
        from flux_adapters._foreign import is_interruption

        module, _, name = arguments.adapter.partition(":")
        try:
            adapter_class = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise errors.ConfigurationError(f"--adapter {arguments.adapter}: {exc}") from None
        except BaseException as exc:  # the module's own failure, in any way but an interruption
            if is_interruption(exc):
                raise
            raise errors.ConfigurationError(
                f"--adapter {arguments.adapter} could not be loaded ({describe_exception(exc)})"
            ) from None
        try:
            adapter = adapter_class()
        except BaseException as exc:  # the other package's code: anything may go wrong
            if is_interruption(exc):
                raise
            raise errors.ConfigurationError(
                f"--adapter {arguments.adapter} could not be created ({describe_exception(exc)})"
            ) from None
        adapters.append(check_adapter(adapter))  # type: ignore[arg-type]
    if shipped:
        unrecorded = [a.name for a in adapters if not (arguments.cassettes / a.name).is_dir()]
        if unrecorded:  # its every scenario would fail, and advise recording into the package
            raise _UsageError(
                f"flux-adapters conformance: error: no cassettes for {', '.join(unrecorded)}: "
                "./cassettes does not exist and flux-adapters ships only its built-in "
                "providers' cassettes; pass --cassettes DIR (record them into one with --record)"
            )
        out.write(f"replaying the cassettes shipped with flux-adapters ({arguments.cassettes})\n")
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
            if arguments.emulator:  # before counting what it would record there
                from flux_adapters.conformance.runner import _check_emulated

                _check_emulated(adapter)
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
                answer = sys.stdin.readline().strip().lower() if is_terminal(sys.stdin) else ""
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


def _loaded(providers: Iterable[str]) -> tuple[dict[str, AnyAdapter], dict[str, str]]:
    """Each of *providers* loaded, and, apart, why each that could not be loaded was not.

    One provider package that fails (at import, or claiming an id another package claims too)
    must not hide every other provider from the commands that list or explain them all.

    Raises:
        ConfigurationError: An id is unknown, or none of them could be loaded (the first's
            error: there is nothing to show).
    """
    from flux_adapters.providers import canonical_name, get_adapter

    adapters: dict[str, AnyAdapter] = {}
    broken: dict[str, str] = {}
    first: errors.ConfigurationError | None = None
    for provider in providers:
        canonical_name(provider)  # an unknown id is the caller's mistake: raised, not listed
        try:
            adapters[provider] = get_adapter(provider)
        except errors.ConfigurationError as error:
            broken[provider] = str(error)
            first = first or error
    if first is not None and not adapters:
        raise first
    return adapters, broken


def _models(arguments: argparse.Namespace, out: TextIO) -> int:
    from flux_adapters.prices import price_for
    from flux_adapters.providers import PROVIDERS

    origins = dict(PROVIDERS.items())
    adapters, broken = _loaded(origins)
    prices: dict[str, dict[str, Price]] = {}
    for provider, adapter in adapters.items():
        shipped = getattr(adapter, "prices", None)
        prices[provider] = {
            model: price
            for model in adapter.limits
            if (price := price_for(provider, model, None, shipped)) is not None
        }
    if arguments.json:
        _write_json(
            out,
            [
                _provider_data(provider, origin, prices[provider])
                if provider in adapters
                else {
                    "provider": provider,
                    "origin": origin,
                    "error": broken[provider],
                    "models": [],
                }
                for provider, origin in origins.items()
            ],
        )
        return EXIT_OK
    from flux_adapters._terminal import models_table, rich_console

    console = None if arguments.markdown else rich_console(out, terminal_only=False)
    for provider, origin in origins.items():
        if provider in broken:
            out.write(f"\n{provider} ({origin})\n\n{broken[provider]}\n")
            continue
        described = {model: price.describe() for model, price in prices[provider].items()}
        if console is not None:
            models_table(console, provider, origin, described)
            continue
        from flux_adapters._tables import limits_table

        out.write(f"\n{provider} ({origin})\n\n{limits_table(provider)}\n\nprices: ")
        known = [f"{model} {text}" for model, text in described.items()]
        out.write("; ".join(known) if known else "not documented")
        out.write("\n")
    return EXIT_OK


def _provider_data(provider: str, origin: str, prices: Mapping[str, Price]) -> dict[str, object]:
    """One provider's limits and prices, for ``models --json``: the limits data as it is."""
    import attrs as attributes

    from flux_adapters.providers import get_adapter

    def plain(instance: object, field: object, value: object) -> object:
        if isinstance(value, frozenset):
            return sorted(value)
        return dict(value) if isinstance(value, Mapping) else value

    adapter = get_adapter(provider)
    models = []
    for model, limits in adapter.limits.items():
        data = attributes.asdict(limits, value_serializer=plain)
        price = prices.get(model)
        data["price"] = (
            None if price is None else {"describe": price.describe(), **attributes.asdict(price)}
        )
        models.append(data)
    return {
        "provider": provider,
        "origin": origin,
        "default_base_url": adapter.default_base_url,
        "key_variable": f"{adapter.env_prefix}_API_KEY",
        "models": models,
    }


def _explain(arguments: argparse.Namespace, out: TextIO) -> int:
    from flux_adapters._explain import as_data, render, sendable
    from flux_adapters.config import base_url_for
    from flux_adapters.providers import BEARER, PROVIDERS

    flags = arguments.flags
    request = _request(arguments, flags)
    providers = list(dict.fromkeys(arguments.provider or PROVIDERS))
    # Where edit sends: with -p, that provider with the configuration left aside; without,
    # the configured providers with their file's base_url too.
    configured = None if arguments.provider else _configuration()
    settings = {} if configured is None else {one.name: one for one in configured.providers}
    adapters, broken = _loaded(providers)
    verdicts = _verdicts(request, list(adapters))
    documents: list[dict[str, object]] = []
    for provider in providers:
        if provider in broken:
            documents.append({"provider": provider, "accepted": False, "error": broken[provider]})
            if not arguments.json:
                out.write(f"=== {provider}\n{broken[provider]}\n\n")
            continue
        verdict = verdicts[provider]
        adapter = adapters[provider]
        base_url = base_url_for(adapter, settings=settings.get(provider))
        entry: dict[str, object] = {"provider": provider, "base_url": base_url}
        if not isinstance(verdict, errors.RequestError):
            try:
                outgoing = sendable(adapter, request, verdict, base_url)
            except errors.RequestError as error:  # an outside adapter's mistake, not sent
                verdict = error
        if isinstance(verdict, errors.RequestError):
            entry |= {
                "accepted": False,
                "request": None,
                "violations": [_violation_data(v, flags) for v in verdict.violations],
                "warnings": [],
            }
            if not arguments.json:
                out.write(f"=== {provider}\nrefused before sending:\n")
                out.writelines(f"  - {_violation_text(v, flags)}\n" for v in verdict.violations)
                out.write("\n")
        else:
            auth = getattr(adapter, "auth", None) or BEARER
            entry |= {
                "accepted": True,
                "request": as_data(outgoing, auth),
                "violations": [],
                "warnings": [_warning_data(warning) for warning in verdict.warnings],
            }
            if not arguments.json:
                out.write(f"=== {provider}\n{render(outgoing, auth)}\n")
                out.writelines(f"warning: {warning}\n" for warning in verdict.warnings)
                out.write("\n")
        documents.append(entry)
    if arguments.json:
        _write_json(out, {"model": request.model, "providers": documents})
    refused = sum(not entry["accepted"] for entry in documents)
    return EXIT_REQUEST if refused == len(documents) else EXIT_OK


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
        accepted = "only the given API keys are" if arguments.key else "any non-empty API key is"
        refused = " (but those given with --bad-key)" if arguments.bad_key else ""
        out.write(f"{accepted} accepted{refused}\n")
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


def _serve(arguments: argparse.Namespace, out: TextIO) -> int:
    from flux_adapters.gateway import serve

    if arguments.max_bodies_mb < arguments.max_body_mb:  # else GatewaySettings names its fields
        raise _UsageError(
            f"flux-adapters serve: error: --max-bodies-mb {arguments.max_bodies_mb} is less than "
            f"--max-body-mb {arguments.max_body_mb}: the bodies held at once must leave room "
            "for the largest one"
        )

    listening = False

    def banner(root: str) -> None:
        nonlocal listening
        listening = True
        out.write(
            f"flux-adapters gateway on {root} (Ctrl-C to stop); OpenAI base URL: {root}/v1\n"
            + ("no gateway key needed (--no-auth)\n" if arguments.no_auth else "")
        )
        out.flush()

    # uvicorn raises the signal that stopped it again once it is done: Ctrl-C then ends as
    # everywhere else (KeyboardInterrupt, 130); SIGTERM, the way a service is stopped, after
    # the calls under way were let finish (or reported), ends with 0.
    previous = signal.signal(signal.SIGINT, _interrupt)
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        serve(
            host=arguments.host,
            port=arguments.port,
            config=arguments.config,
            files_dir=arguments.files_dir,
            retention=arguments.retention,
            public_url=arguments.public_url,
            keys_file=arguments.keys_file,
            state_url=arguments.state or os.environ.get("FLUX_STATE_URL") or None,
            require_keys=not arguments.no_auth,
            max_body_bytes=arguments.max_body_mb * 1024 * 1024,
            body_timeout=arguments.body_timeout,
            max_bodies_bytes=arguments.max_bodies_mb * 1024 * 1024,
            send_timeout=arguments.send_timeout,
            shutdown_timeout=arguments.shutdown_timeout,
            on_ready=banner,
        )
    except OSError as exc:
        if listening:
            raise
        raise errors.ConfigurationError(
            f"cannot listen on {arguments.host}:{arguments.port}: {_reason(exc)}"
        ) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    return EXIT_OK


def _keys(arguments: argparse.Namespace, out: TextIO) -> int:
    import asyncio

    from flux_adapters.gateway import configured_state_url, new_key, open_key_store
    from flux_adapters.gateway._keys import record_to_dict

    store = open_key_store(arguments.state or configured_state_url(), arguments.keys_file)
    if arguments.keys_command == "create":
        key, record = new_key(
            name=arguments.name,
            budget_usd=arguments.budget_usd,
            period=arguments.period or "total",
            allowed_models=arguments.model,
            allowed_providers=arguments.provider,
            rate_per_minute=arguments.rate_per_minute,
        )
        asyncio.run(_stored(store, record))
        if arguments.json:
            _write_json(out, {"key": key, "record": record_to_dict(record)})
        else:
            out.write(f"{key}\n")
            out.write(f"id {record.id}: the key above is shown once; only its hash is kept\n")
        return EXIT_OK
    if arguments.keys_command == "list":
        records = asyncio.run(_closing(store, store.list_keys()))
        if arguments.json:
            _write_json(out, {"keys": [record_to_dict(r) | {"key_hash": None} for r in records]})
            return EXIT_OK
        for r in records:
            budget = "no budget" if r.budget_usd is None else f"${r.budget_usd:g} per {r.period}"
            rate = "" if r.rate_per_minute is None else f", {r.rate_per_minute:g}/min"
            models = f", models {','.join(r.allowed_models)}" if r.allowed_models else ""
            providers = (
                f", providers {','.join(r.allowed_providers)}" if r.allowed_providers else ""
            )
            out.write(
                f"{r.id}  {escape_controls(r.name) or '-'}  {budget}{rate}{models}{providers}\n"
            )
        return EXIT_OK
    if not asyncio.run(_closing(store, store.delete_key(arguments.key_id))):
        raise errors.ConfigurationError(f"no gateway key with id {arguments.key_id!r}")
    out.write(f"revoked {arguments.key_id}\n")
    return EXIT_OK


async def _closing(store: KeyStore, step: Coroutine[Any, Any, _T]) -> _T:
    """*step*'s result, the store's connections (Redis) closed after it, in its event loop."""
    try:
        return await step
    finally:
        close = getattr(store, "aclose", None)
        if close is not None:
            await close()


async def _stored(store: KeyStore, record: KeyRecord) -> None:
    """Store *record*, and read it back: a key is shown only once the store has it.

    A key shown but not kept cannot be shown again (only its hash is stored): a Redis, or a
    proxy in front of it, that acknowledged the write and dropped it would leave the user
    with a key no gateway accepts.

    Raises:
        StateUnavailable: The store refused the write or does not hold the record after it.
    """

    async def written() -> KeyRecord | None:
        await store.put_key(record)
        return await store.get_key(record.key_hash)

    kept = await _closing(store, written())
    if kept != record:
        raise errors.StateUnavailable(
            f"the key store did not keep gateway key {record.id} (read back after writing it: "
            f"{'nothing' if kept is None else 'another record'}); the key is not shown"
        )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminated_as_interrupted() -> Iterator[None]:
    """SIGTERM ends the block as Ctrl-C does: what a paid call left is said, not lost.

    By default SIGTERM (``timeout``, a supervisor, ``kill``) ends Python at once: a paid image
    being downloaded was lost without a word and its ``.part`` file left behind. As `batch`
    takes it, it is an interruption instead (exit 130, the job's fate or the image's URL
    after ``interrupted``, nothing half-written kept). Outside the main thread (`main` called
    from another one) no handler can be set: SIGTERM keeps its own.
    """
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_EXIT_FOR: tuple[tuple[type[BaseException], int], ...] = (
    (errors.StateUnavailable, EXIT_TRANSPORT),
    (errors.OutputError, EXIT_OUTPUT),
    (errors.MissingExtraError, EXIT_CONFIG),
    (errors.RequestError, EXIT_REQUEST),
    (errors.BudgetExceeded, EXIT_REQUEST),  # refused before sending, as by a provider's limits
    (errors.ConfigurationError, EXIT_CONFIG),
    (errors.ResultExpired, EXIT_EXPIRED),
    (errors.ProviderError, EXIT_PROVIDER),
    (errors.JobTimeout, EXIT_TRANSPORT),
    (errors.JobError, EXIT_PROVIDER),
    (errors.TransportError, EXIT_TRANSPORT),
    (errors.FluxError, EXIT_FAILED),
)


def _exit_code(error: errors.FluxError) -> int:
    if isinstance(error, errors.AllProvidersFailed):
        # Every provider failed: the last failure says best what to do (all skipped: refused).
        failures = [attempt.error for attempt in error.attempts if attempt.error is not None]
        return _exit_code(failures[-1]) if failures else EXIT_REQUEST
    return next(code for kind, code in _EXIT_FOR if isinstance(error, kind))


def _one_line(
    error: BaseException, limit: int = 2000, flags: Mapping[str, str] | None = None
) -> str:
    """*error* as one line; with *flags*, its violations and advice name the command's flags."""
    if isinstance(error, errors.RequestError):
        shown = [
            str(violation) if flags is None else _violation_text(violation, flags)
            for violation in error.violations
        ]
        text = str(error).partition("\n")[0] + " " + "; ".join(shown)
    elif isinstance(error, errors.ConfigurationError):
        # It may echo a value set in the wrong place: a key pasted into $FLUX_PROVIDERS or
        # $FLUX_TIMEOUT ("unknown provider 'sk-...'"). Keys are scrubbed as from argparse's.
        text = _unechoed(str(error) if flags is None else _in_flags(str(error), flags))
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


def _parse(argv: Sequence[str] | None, out: TextIO) -> argparse.Namespace | int:
    """The arguments, or the exit status once ``--help`` or ``--version`` has been printed.

    Without a command, the help is printed (on *out*) and the status is 0.
    """
    parser = _parser()
    try:
        with contextlib.redirect_stdout(out):  # argparse prints --help and --version there
            arguments = parser.parse_args(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else EXIT_OK
    if arguments.command is None:
        parser.print_help(out)
        return EXIT_OK
    arguments.flags = dict(_FLAGS)
    return arguments


class _WarningLines(logging.Handler):
    """The library's warnings (a provider left out for want of a key) as lines on standard error."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(logging.WARNING)
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        _say(self._stream, f"flux-adapters: warning: {record.getMessage()}")


@contextmanager
def _python_warnings(err: TextIO) -> Iterator[None]:
    """The library's Python warnings (an unknown ``$FLUX_LOG``) as the command's other warnings.

    One ``flux-adapters: warning: ...`` line, not Python's ``file:line: RuntimeWarning:`` and
    the source line under it. Other packages' warnings are shown as Python shows them.
    """
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    with warnings.catch_warnings():  # restores showwarning after the command
        shown = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if os.path.abspath(filename).startswith(package):
                _say(err, f"flux-adapters: warning: {message}")
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


@contextmanager
def _library_warnings(err: TextIO) -> Iterator[None]:
    from flux_adapters._log import LOGGER
    from flux_adapters._log import _installed as flux_log_handlers

    if flux_log_handlers:  # $FLUX_LOG prints every line of the logger on stderr already
        yield
        return
    handler = _WarningLines(err)
    LOGGER.addHandler(handler)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)


_SHARED_ONLY: Final = {"--lease": "lease", "--block": "block", "--state-expiry": "state_expiry"}
"""``batch`` options of a batch shared through Redis: refused without ``--state``."""


def _run(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if getattr(arguments, "state", None) is not None:  # batch, serve, keys: say it was --state
        from flux_adapters.state import check_url

        check_url(arguments.state, "--state")
    if arguments.command == "batch" and arguments.state is not None:
        if arguments.report is not None:
            _check_output_file(arguments.report)
    elif arguments.command == "batch":  # then check_file checks every line, also before sending
        given = [
            flag for flag, name in _SHARED_ONLY.items() if getattr(arguments, name) is not None
        ]
        if given:
            raise _UsageError(
                f"flux-adapters batch: error: {', '.join(given)}: only with --state (a batch "
                "shared through Redis)"
            )
        if "://" in arguments.output and not arguments.output.startswith("file://"):
            raise errors.ConfigurationError(
                "an output URL is for a batch shared through Redis (--state); a batch of one "
                "process writes to a folder"
            )
        arguments.output = Path(arguments.output.removeprefix("file://"))
        _check_folder(arguments.output)
        report = arguments.report or arguments.output / "report.jsonl"
        _check_output_file(report)
        _check_not_the_journal(report, arguments.output)
    commands: dict[str, Callable[[], int]] = {
        "edit": lambda: _edit(arguments, out, err),
        "check": lambda: _check(arguments, out),
        "conformance": lambda: _conformance(arguments, out, err),
        "batch": lambda: (
            _shared_batch(arguments, out, err)
            if arguments.state is not None
            else _batch(arguments, out, err)
        ),
        "models": lambda: _models(arguments, out),
        "explain": lambda: _explain(arguments, out),
        "emulate": lambda: _emulate(arguments, out),
        "serve": lambda: _serve(arguments, out),
        "keys": lambda: _keys(arguments, out),
    }
    with _library_warnings(err):
        return commands[arguments.command]()


def _failure_data(error: BaseException, code: int, flags: Mapping[str, str]) -> dict[str, object]:
    """A failure, for ``--json``: ``{"error": {"type", "message", "exit_status", ...}}``.

    An interruption that cut a job short also gives ``notes``: what became of the job (the
    lines printed after ``interrupted``), which ``message`` repeats after ``interrupted; ``.
    """
    name = "UsageError" if isinstance(error, _UsageError) else type(error).__name__
    notes: list[str] = []
    if isinstance(error, KeyboardInterrupt):
        # What became of a job it cut short, from the client: a field of its own, to act on.
        notes = [said.removeprefix("flux-adapters: ") for said in getattr(error, "__notes__", ())]
        message = "; ".join(["interrupted", *notes])
    elif isinstance(error, errors.FluxError):
        message = _one_line(error, flags=flags)
    else:
        message = _one_line(error)
    detail: dict[str, object] = {"type": name, "message": message, "exit_status": code}
    if isinstance(error, errors.RequestError):
        detail["violations"] = [_violation_data(v, flags) for v in error.violations]
    if notes:
        detail["notes"] = notes
    return {"error": detail}


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the command with *argv* (default: ``sys.argv[1:]``) and return its exit status.

    Every failure is one line on *err* and a documented status (see the module docstring); with
    ``--json``, it is also a JSON object on *out*.
    """
    _reopen_closed_standard_streams()
    out, err = out or sys.stdout, err or sys.stderr
    flags: Mapping[str, str] = _FLAGS
    wants_json = False
    failure: BaseException | None = None
    try:
        with _python_warnings(err):
            parsed = _parse(argv, out)
            if isinstance(parsed, int):
                code = parsed
            else:
                flags, wants_json = parsed.flags, bool(getattr(parsed, "json", False))
                code = _run(parsed, out, err)
        out.flush()
    except KeyboardInterrupt as error:
        _say(err, "flux-adapters: interrupted")
        for said in getattr(error, "__notes__", ()):  # a job it cut short, from the client
            _say(err, said)
        code, failure = EXIT_INTERRUPTED, error
    except BrokenPipeError:  # the reader of our output is gone (`| head`): nobody to tell
        code = EXIT_BROKEN_PIPE
    except _UsageError as error:
        _say(err, str(error))
        code, failure = EXIT_REQUEST, error
    except errors.FluxError as error:
        _say(err, f"flux-adapters: {type(error).__name__}: {_one_line(error, flags=flags)}")
        code, failure = _exit_code(error), error
    except ModuleNotFoundError as exc:  # not raised inside `extra_imports`: say the same
        from flux_adapters._extras import missing_extra

        missing = missing_extra(exc)
        if missing is not None:
            _say(err, f"flux-adapters: {type(missing).__name__}: {_one_line(missing)}")
        else:
            _say(err, f"flux-adapters: {_one_line(exc, 300)}; reinstall flux-adapters")
        code, failure = EXIT_CONFIG, missing or exc
    except Exception as exc:
        if os.environ.get("FLUX_DEBUG") == "1":
            import traceback

            traceback.print_exc(file=err)
        note = "" if isinstance(exc, OSError) else " (unexpected; FLUX_DEBUG=1 shows the traceback)"
        _say(err, f"flux-adapters: {type(exc).__name__}: {_one_line(exc, 300)}{note}")
        code, failure = EXIT_FAILED, exc
    if wants_json and failure is not None:
        with contextlib.suppress(OSError, ValueError):
            _write_json(out, _failure_data(failure, code, flags))
            out.flush()
    _quiet_failed_streams(out, err, sys.stdout, sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
