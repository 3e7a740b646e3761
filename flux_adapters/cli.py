"""The ``flux-adapters`` command: edit, models, explain, emulate.

Exit status, for scripts:

    0  success
    1  unexpected failure
    2  bad arguments or a request the provider's limits refuse (nothing was sent)
    3  the provider answered with an error (see the message for the status)
    4  no usable answer: connection failed or timed out
    5  configuration: unknown provider, no API key, a missing optional dependency
    6  the result URL expired before it was downloaded
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TextIO

from flux_adapters import errors
from flux_adapters.providers import PROVIDERS
from flux_adapters.request import MODELS

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_REQUEST, EXIT_PROVIDER, EXIT_TRANSPORT, EXIT_CONFIG, EXIT_EXPIRED = (
    range(7)
)


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


def _request(arguments: argparse.Namespace) -> object:
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
    from flux_adapters.request import EditRequest

    request = _request(arguments)
    assert isinstance(request, EditRequest)
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
    from flux_adapters.request import EditRequest

    request = _request(arguments)
    assert isinstance(request, EditRequest)
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
