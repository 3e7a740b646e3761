"""The ``flux-adapters`` command: edit, models, explain, emulate.

Exit status, for scripts:

    0  success (for batch: every request saved or already saved)
    1  unexpected failure
    2  bad arguments or a request the provider's limits refuse (nothing was sent)
    3  the provider answered with an error (for batch: at least one request failed)
    4  no usable answer: connection failed or timed out
    5  configuration: unknown provider, no API key, a missing optional dependency
    6  the result URL expired before it was downloaded
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from flux_adapters import errors
from flux_adapters.providers import PROVIDERS
from flux_adapters.request import MODELS

if TYPE_CHECKING:
    from flux_adapters.request import EditRequest
    from flux_adapters.result import BatchItem

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_REQUEST, EXIT_PROVIDER, EXIT_TRANSPORT, EXIT_CONFIG, EXIT_EXPIRED = (
    range(7)
)
EXIT_OUTPUT, EXIT_UNCONFIRMED, EXIT_INTERRUPTED = 7, 8, 130


def _add_request_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to generate, or how to edit the images")
    parser.add_argument(
        "-i", "--image", action="append", default=[], metavar="PATH_OR_URL",
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
    parser.add_argument("--guidance", type=float, help="guidance (flux-2-flex)")
    parser.add_argument("--prompt-upsampling", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--allow-conversions", action="store_true",
        help="let the adapter send a setting the provider cannot take exactly in its nearest form, with a warning",
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux-adapters",
        description="Edit and generate images with FLUX models through API resellers.",
        epilog="Exit status: 0 ok, 2 request refused before sending, 3 provider error, "
        "4 network or timeout, 5 configuration, 6 result expired, 1 anything else.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    edit = commands.add_parser("edit", help="generate or edit an image and save it")
    _add_request_arguments(edit)
    edit.add_argument(
        "-p", "--provider", choices=list(PROVIDERS), help="default: first of $FLUX_PROVIDERS"
    )
    edit.add_argument(
        "--base-url", help="the provider's base URL (default: $<PROVIDER>_BASE_URL or the real one)"
    )
    edit.add_argument(
        "-o", "--output", type=Path, help="where to save (default: out/<provider>-<time>.<format>)"
    )
    edit.add_argument("--timeout", type=float, help="seconds to wait for the image (default 300)")

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
        "-p", "--provider", action="append", help="a provider id (repeat; default: all four)"
    )
    conformance.add_argument("--adapter", help="an adapter of another package, as module:Class")
    conformance.add_argument(
        "--cassettes",
        type=Path,
        default=Path("cassettes"),
        help="folder with <provider>/<scenario>.yaml (default: cassettes)",
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
    target.add_argument("--base-url", help="with --record: record against this base URL")
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
    batch.add_argument("file", type=Path, help="the JSONL file of requests")
    batch.add_argument(
        "-o", "--output", type=Path, default=Path("out"), help="output folder (default: out)"
    )
    batch.add_argument(
        "--report", type=Path, help="JSONL report to append to (default: <output>/report.jsonl)"
    )
    batch.add_argument(
        "-p",
        "--provider",
        action="append",
        choices=list(PROVIDERS),
        help="provider(s), in failover order",
    )
    batch.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    batch.add_argument(
        "--per-provider", type=int, default=4, help="requests in flight per provider (default 4)"
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
        type=float,
        default=30.0,
        help="after Ctrl-C, seconds to let jobs in flight finish and save (default 30)",
    )

    explain = commands.add_parser(
        "explain", help="print the HTTP request each provider would receive; sends nothing"
    )
    _add_request_arguments(explain)
    explain.add_argument(
        "-p", "--provider", action="append", choices=list(PROVIDERS), help="default: all"
    )

    emulate = commands.add_parser(
        "emulate", help="run the provider emulator on 127.0.0.1 in the foreground"
    )
    emulate.add_argument("--port", type=int, default=8000)
    emulate.add_argument("--host", default="127.0.0.1")
    emulate.add_argument(
        "--ttl", type=float, default=600.0, help="seconds result URLs stay valid (default 600)"
    )
    emulate.add_argument(
        "--fault", action="append", default=[], metavar="PROVIDER:SPEC",
        help="inject a fault, e.g. laozhang:429,retry-after=2,first=1  apiyi:drop  aimlapi:503,delay=2 "
        "(parts: a status, retry-after=S, delay=S, drop, malformed, empty, moderation, first=N)",
    )  # fmt: skip
    emulate.add_argument(
        "--key", action="append", help="accept only these API keys (default: any non-empty key)"
    )
    emulate.add_argument(
        "--bad-key", action="append", default=[], help="refuse this API key with 401"
    )
    return parser


def _images(values: Sequence[str]) -> list[str | Path]:
    return [
        value if value.startswith(("http://", "https://", "data:")) else Path(value)
        for value in values
    ]


def _request(arguments: argparse.Namespace) -> EditRequest:
    from flux_adapters.request import EditRequest

    return EditRequest(
        prompt=arguments.prompt,
        model=arguments.model,
        images=_images(arguments.image),
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


@contextmanager
def _waiting(message: str, stream: TextIO) -> Iterator[None]:
    """Show that we are waiting (with elapsed time) while the provider generates."""
    if stream.isatty():
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
            stream.write(f"  still waiting ({time.monotonic() - started:.0f} s)\n")
            stream.flush()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def _edit(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from flux_adapters.client import FluxClient, image_extension

    request = _request(arguments)
    started = time.perf_counter()
    if arguments.provider:
        client = FluxClient(
            arguments.provider, base_url=arguments.base_url, timeout=arguments.timeout
        )
    else:  # the configured provider or failover list: flux-adapters.toml and $FLUX_PROVIDERS
        client = FluxClient.from_env()
    with client:
        references = f" with {len(request.images)} reference image(s)" if request.images else ""
        with _waiting(
            f"{', '.join(client.providers)}: generating {request.model}{references} ...", err
        ):
            result = client.edit(request)
        saved = []
        for index, image in enumerate(result.images):
            if arguments.output is not None:
                target = arguments.output
                if len(result.images) > 1:
                    target = target.with_name(f"{target.stem}-{index + 1}{target.suffix}")
                target.parent.mkdir(parents=True, exist_ok=True)
                image.save(target)
            else:
                data = image.read()
                stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
                suffix = f"-{index + 1}" if len(result.images) > 1 else ""
                target = (
                    Path("out") / f"{result.provider}-{stamp}{suffix}.{image_extension(data[:16])}"
                )
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            saved.append(target)
    elapsed = time.perf_counter() - started
    cost = (
        f"${result.cost_usd:.3f} (estimate from the price table)"
        if result.cost_usd is not None
        else "unknown (no price known for this provider and model)"
    )
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
    for target in saved:
        out.write(f"saved:    {target}\n")
    return EXIT_OK


_BATCH_FIELDS = {
    "prompt", "model", "images", "width", "height", "size", "aspect_ratio", "seed", "output_format",
    "safety_tolerance", "prompt_upsampling", "steps", "guidance", "allow_conversions",
}  # fmt: skip
_SHOWN_PROBLEMS = 5


def _batch_lines(path: Path) -> Iterator[tuple[int, dict[str, object] | str]]:
    """Each non-blank line of the JSONL file: its number and its object, or what is wrong."""
    with path.open("rb") as stream:
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
    from flux_adapters._batch import _name_problem

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
        trouble = _name_problem(name) or ("is used twice" if name in seen else "")
        if trouble:
            problems.append(errors.Violation(where, f"id {trouble}", "a unique file name", name))
        seen.add(name)
        unknown = sorted(set(item) - _BATCH_FIELDS - {"id"})
        if unknown:
            problems.append(
                errors.Violation(
                    where, "unknown fields", ", ".join(sorted(_BATCH_FIELDS)), str(unknown)
                )
            )
    if problems:
        shown = problems[:_SHOWN_PROBLEMS]
        if len(problems) > len(shown):
            more = len(problems) - len(shown)
            shown.append(errors.Violation(path.name, f"and {more} more", "", "..."))
        raise errors.RequestError(shown)
    return count


def _batch_jobs(
    path: Path, refused: Callable[[str, errors.RequestError], None]
) -> Iterator[tuple[str, EditRequest]]:
    """The requests of a checked file, read lazily; a request its line cannot build is refused."""
    from flux_adapters.request import EditRequest

    for number, item in _batch_lines(path):
        assert isinstance(item, dict)  # checked by _check_batch_file
        name = _batch_id(number, item)
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

    from flux_adapters._journal import JsonLines
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

    async def run() -> None:
        nonlocal interrupted
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
            client = AsyncFluxClient(providers=arguments.provider)
        else:
            client = AsyncFluxClient.from_env()
        first, second = itertools.tee(_batch_jobs(path, refused))
        async with client:
            items = client.edit_many(
                (request for _, request in second),
                names=(name for name, _ in first),
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
                    async for item in items:
                        counts[item.status] += 1
                        report.append(_report_line(item))
                        advance(f"{item.name}: {item.status}")
                except asyncio.CancelledError:
                    pass

    try:
        asyncio.run(run())
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
    import os

    from flux_adapters.conformance.runner import paid_calls, record, run_scenario, write_report
    from flux_adapters.conformance.scenarios import SCENARIOS
    from flux_adapters.providers import Adapter, get_adapter

    adapters: list[Adapter] = [
        get_adapter(name) for name in arguments.provider or ([] if arguments.adapter else PROVIDERS)
    ]
    if arguments.adapter:
        module, _, name = arguments.adapter.partition(":")
        adapters.append(getattr(importlib.import_module(module), name)())
    if arguments.record:
        for adapter in adapters:
            key = (
                "emulator-key"
                if arguments.emulator
                else os.environ.get(arguments.key_env or f"{adapter.env_prefix}_API_KEY", "")
            )
            if not key:
                raise errors.ConfigurationError(
                    f"recording {adapter.name} needs its key in ${arguments.key_env or adapter.env_prefix + '_API_KEY'}"
                )
            requests, billed = paid_calls(adapter, arguments.emulator)
            where = (
                "the emulator"
                if arguments.emulator
                else arguments.base_url or adapter.default_base_url
            )
            out.write(
                f"{adapter.name}: {requests} request(s) to {where}, {billed} of which may be billed\n"
            )
            if billed and not arguments.emulator and not arguments.yes:
                out.write("continue? [y/N] ")
                out.flush()
                answer = sys.stdin.readline().strip().lower() if sys.stdin.isatty() else ""
                if answer not in ("y", "yes"):
                    err.write("flux-adapters: not recorded (answer y, or pass --yes)\n")
                    return EXIT_CONFIG
            record(
                adapter,
                arguments.cassettes / adapter.name,
                api_key=key,
                base_url=arguments.base_url,
                emulator=arguments.emulator,
                log=lambda line: print(line, file=out),
            )
    verdicts = [
        run_scenario(adapter, scenario, arguments.cassettes / adapter.name)
        for adapter in adapters
        for scenario in SCENARIOS
    ]
    markdown, data = write_report(verdicts, arguments.report_dir)
    out.write(markdown.read_text())
    out.write(f"\nwritten: {markdown} and {data}\n")
    return EXIT_OK if all(v.outcome != "fail" for v in verdicts) else EXIT_FAILED


def _models(out: TextIO) -> int:
    from flux_adapters._tables import limits_table
    from flux_adapters.prices import price_for
    from flux_adapters.providers import get_adapter

    for provider in PROVIDERS:
        out.write(f"\n{provider}\n\n{limits_table(provider)}\n\nprices: ")
        known = [
            f"{model} {price.describe()}"
            for model in get_adapter(provider).limits
            if (price := price_for(provider, model)) is not None
        ]
        out.write("; ".join(known) if known else "not documented")
        out.write("\n")
    return EXIT_OK


def _explain(arguments: argparse.Namespace, out: TextIO) -> int:
    from flux_adapters._explain import render
    from flux_adapters._flows import resolve
    from flux_adapters.providers import get_adapter

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
        out.write(render(adapter.build_request(request, plan, adapter.default_base_url)) + "\n")
        for warning in plan.warnings:
            out.write(f"warning: {warning}\n")
        out.write("\n")
    return EXIT_REQUEST if refused == len(arguments.provider or PROVIDERS) else EXIT_OK


def _emulate(arguments: argparse.Namespace, out: TextIO) -> int:
    from flux_adapters.emulator import PROVIDER_PREFIXES, Fault, serve

    faults: dict[str, list[Fault]] = {}
    for text in arguments.fault:
        provider, _, spec = text.partition(":")
        if provider not in PROVIDER_PREFIXES:
            raise errors.ConfigurationError(f"--fault {text!r}: unknown provider {provider!r}")
        try:
            faults.setdefault(provider, []).append(Fault.parse(spec))
        except ValueError as exc:
            raise errors.ConfigurationError(f"--fault {text!r}: {exc}") from None
    root = f"http://{arguments.host}:{arguments.port}"
    out.write(f"flux-adapters emulator on {root} (Ctrl-C to stop); base URLs:\n")
    for provider, prefix in PROVIDER_PREFIXES.items():
        out.write(f"  {provider:<16} {root}/{prefix}/v1\n")
    out.write(
        "any non-empty API key is accepted\n"
        if not arguments.key
        else "only the given API keys are accepted\n"
    )
    out.flush()
    serve(
        host=arguments.host,
        port=arguments.port,
        ttl=arguments.ttl,
        valid_keys=arguments.key,
        bad_keys=arguments.bad_key,
        faults=faults,
    )
    return EXIT_OK


_EXIT_FOR: tuple[tuple[type[BaseException], int], ...] = (
    (errors.OutputError, EXIT_OUTPUT),
    (errors.RequestError, EXIT_REQUEST),
    (errors.ConfigurationError, EXIT_CONFIG),
    (errors.ResultExpired, EXIT_EXPIRED),
    (errors.ProviderError, EXIT_PROVIDER),
    (errors.TransportError, EXIT_TRANSPORT),
    (errors.FluxError, EXIT_FAILED),
)


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the command with *argv* (default: ``sys.argv[1:]``) and return its exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    arguments = _parser().parse_args(argv)
    commands: dict[str, Callable[[], int]] = {
        "edit": lambda: _edit(arguments, out, err),
        "conformance": lambda: _conformance(arguments, out, err),
        "batch": lambda: _batch(arguments, out, err),
        "models": lambda: _models(out),
        "explain": lambda: _explain(arguments, out),
        "emulate": lambda: _emulate(arguments, out),
    }
    try:
        return commands[arguments.command]()
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        err.write(
            f"flux-adapters: {exc.name} is not installed; try: pip install 'flux-adapters[emulator,cli]'\n"
        )
        return EXIT_CONFIG
    except errors.FluxError as error:
        err.write(f"flux-adapters: {type(error).__name__}: {error}\n")
        return next(code for kind, code in _EXIT_FOR if isinstance(error, kind))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
