"""What the command shows on a terminal: rich (the ``cli`` extra) when it can, plain text if not.

On a terminal with rich installed, waiting shows a spinner with the time elapsed and a batch a
progress bar, both drawn on standard error, and tables fit the terminal's width. Anywhere else
(a pipe, a file, a CI log, or rich not installed) the output is plain and quiet: one line when a
wait begins, one line per job that did not succeed, nothing that redraws itself.

rich is imported here only, and only when it will draw: ``import flux_adapters`` never loads it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from rich.console import Console

    from flux_adapters.limits import ModelLimits

__all__ = [
    "BatchDisplay",
    "batch_progress",
    "is_terminal",
    "models_table",
    "rich_console",
    "waiting",
]


def is_terminal(stream: TextIO | None) -> bool:
    """Whether *stream* is a terminal (a closed stream is not)."""
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):  # closed
        return False


def rich_console(stream: TextIO, *, terminal_only: bool = True) -> Console | None:
    """A rich console writing to *stream*; ``None`` without rich, or (*terminal_only*) off a terminal.

    Off a terminal its width is ``$COLUMNS``, else 80 (also for a width of 0), and it writes no
    colour or control codes.
    """
    if terminal_only and not is_terminal(stream):
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None

    class Quiet(Console):
        def on_broken_pipe(self) -> None:
            # rich's own ends the process with status 1; the command ends a closed pipe its way.
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, "the reader of this output is gone")

    console = Quiet(file=stream, highlight=False, soft_wrap=False)
    if console.width < 1:  # COLUMNS=0 (a container's shell without a size): rich draws nothing
        console.width = 80
    return console


def _say(stream: TextIO, line: str) -> None:
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):  # the reader of stderr is gone: keep working quietly
        pass


@contextmanager
def waiting(message: str, stream: TextIO) -> Iterator[None]:
    """While the provider works: a spinner with the time elapsed, or *message* once."""
    console = rich_console(stream)
    if console is None:
        _say(stream, message)
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        progress.add_task(message, total=None)
        yield


class BatchDisplay(Protocol):
    """What a batch shows as jobs end."""

    def advance(self) -> None:
        """One more job ended."""

    def say(self, line: str) -> None:
        """Show *line* (a job that did not succeed), above the progress bar if there is one."""


class _Plain:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def advance(self) -> None:
        pass

    def say(self, line: str) -> None:
        _say(self._stream, line)


@contextmanager
def batch_progress(total: int, stream: TextIO) -> Iterator[BatchDisplay]:
    """A progress bar of *total* jobs on a terminal; elsewhere, only the lines said."""
    console = rich_console(stream)
    if console is None:
        yield _Plain(stream)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("batch"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("batch", total=total)

        class Bar:
            def advance(self) -> None:
                bar.advance(task)

            def say(self, line: str) -> None:
                bar.console.print(line, markup=False, highlight=False, overflow="fold")

        yield Bar()


def _settings(limits: ModelLimits) -> str:
    found = [
        f"safety_tolerance {limits.safety_tolerance}" if limits.safety_tolerance else "",
        f"steps {limits.steps}" if limits.steps else "",
        f"guidance {limits.guidance}" if limits.guidance else "",
        "prompt_upsampling" if limits.prompt_upsampling else "",
        f"prompt ≤ {limits.prompt_max_chars} chars" if limits.prompt_max_chars else "",
        f"seed {limits.seed}",
    ]
    return "; ".join(part for part in found if part)


def _size(limits: ModelLimits) -> str:
    parts = []
    if limits.sizes is not None:
        parts.append(
            limits.sizes.describe() + (" (size or width/height)" if limits.size_string else "")
        )
    if limits.ratios is not None:
        parts.append("aspect ratio " + limits.ratios.describe())
    return "; ".join(parts) or "none"


def models_table(console: Console, provider: str, origin: str, prices: dict[str, str]) -> None:
    """Print *provider*'s limits for each model it offers, and *prices*, in the console's width.

    One block per model, a line per limit (a row per model with a column per limit does not
    fit 80 columns: every cell would be cut into fragments).
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from flux_adapters._display import escape_controls
    from flux_adapters.providers import get_adapter

    rows = get_adapter(provider).limits
    table = Table(
        title=Text(f"{provider} ({origin})", style="bold"),
        title_justify="left",
        box=box.SIMPLE,
        show_header=False,
        pad_edge=False,
    )
    table.add_column("model", style="bold", no_wrap=True)
    table.add_column("limit", style="dim", no_wrap=True)
    table.add_column("value", overflow="fold")
    for model, limits in rows.items():
        low, high = limits.images.low, limits.images.high
        lines = [
            ("wire id", limits.wire_model),
            ("edits", limits.edit_wire_model or ""),
            ("images", str(low) if low == high else f"{low} to {high}"),
            ("size", _size(limits)),
            ("settings", _settings(limits)),
            ("formats", " / ".join(limits.output_formats)),
            ("price", prices.get(model, "not documented")),
        ]
        shown = [(label, value) for label, value in lines if value]
        for number, (label, value) in enumerate(shown):
            table.add_row(  # Text, never markup: a provider package's "[/]" is text
                Text(model if number == 0 else ""),
                label,
                Text(escape_controls(value)),
                end_section=number == len(shown) - 1,
            )
    console.print(table)
    first = next(iter(rows.values()))  # check_adapter refuses limits that offer no model
    rule = first.image
    console.print(
        Text(
            f"Reference images: given as {', '.join(sorted(k.replace('_', ' ') for k in rule.kinds))}; "
            f"local ones at most {rule.max_bytes // (1024 * 1024)} MB and {rule.max_pixels / 1e6:g} "
            f"MP, formats {' / '.join(sorted(rule.formats))}.\nSource: {first.source}\n"
        ),
        overflow="fold",
    )
