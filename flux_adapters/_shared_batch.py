"""A batch shared by many workers through Redis: ``flux-adapters batch ... --state redis://``.

Every worker started with the same jobs file and the same output (`batch_id`) works on one
batch. Jobs are claimed in blocks (`Store.claim`: the next block number, one atomic step, with
a lease that its worker renews while it lives); a worker that dies loses its leases when they
end (Redis time) and any worker takes its blocks over. The journal of each job is kept in Redis
(`flux_adapters._shared_batch_store`) with the records and verdicts of the file journal
(`flux_adapters._journal`): ``sent`` acknowledged by Redis before the request goes out; a job an
asynchronous provider accepted is polled again, not sent; a sent job with no answer is reported
``unconfirmed`` and sent again only with ``resend_unconfirmed``; a saved job is skipped.

Why blocks and not a claim per job: one claim (one round trip, which also brings what the
journal knows of its jobs) serves a block of jobs, and Redis holds a lease per block in flight,
not per job; the journal's writes of all the jobs in flight go to Redis together (group commit,
one script call at a time), so a job costs no round trip of its own when many are in flight.

Outputs go to a folder or to any fsspec URL (`open_output`), each image written whole under a
temporary name and renamed (`mv`) once complete, so a kill never leaves part of one under its
name.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import contextvars
import glob
import hashlib
import json
import os
import secrets
import stat
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
from attrs import define, field, frozen

from flux_adapters._batch import CHANGED_REASON, COMMAND_REASONS, _finished_record, _save_all
from flux_adapters._batch_files import build_request, parse_line
from flux_adapters._journal import (
    JobState,
    image_identities,
    is_image_file,
    mark_shared,
    request_digest,
    unmark_shared,
)
from flux_adapters._redact import shown_state_url
from flux_adapters._shared_batch_store import STATUSES, Claim, Store
from flux_adapters.errors import (
    FluxError,
    OutputError,
    RequestError,
    StateUnavailable,
    Violation,
)
from flux_adapters.jobs import _shown_id
from flux_adapters.request import EditRequest
from flux_adapters.result import EditResult, ResultImage

if TYPE_CHECKING:
    from flux_adapters._flows import Outcome
    from flux_adapters.client import AsyncFluxClient
    from flux_adapters.jobs import Job
    from flux_adapters.providers import Answer

__all__ = ["Ended", "SharedOptions", "Summary", "batch_id", "open_output", "run_shared"]

_IMAGE_KINDS: Final = ("png", "jpeg", "webp")


def output_location(output: str) -> str:
    """The output as it goes into the batch id.

    An fsspec URL as given (without a trailing ``/``); a folder (or ``file://`` URL) as
    ``file://`` and its absolute path.
    """
    if "://" in output and not output.startswith("file://"):
        return output.rstrip("/")
    path = output.removeprefix("file://")
    return "file://" + os.path.abspath(path)


def shown_location(location: str) -> str:
    """*location* without the password (or token) of its ``user:password@`` part, if any.

    fsspec URLs may carry credentials (``ftp://user:pw@host/dir``, ``sftp://``, ``smb://``):
    this form is the one kept in Redis and shown in messages; the batch id digests the whole.
    """
    scheme, sep, rest = location.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not sep or not at:
        return location
    user, colon, _ = userinfo.partition(":")
    hidden = f"{user}:***" if colon else "***"
    return f"{scheme}://{hidden}@{host}{slash}{path}"


def batch_id(file_digest: str, output: str) -> str:
    """The id of the batch of the jobs file whose SHA-256 is *file_digest*, writing to *output*.

    Workers given the same file (byte for byte) and the same output (`output_location`) share
    one batch; another file, or another output, is another batch.
    """
    text = f"flux-batch-v1\0{file_digest}\0{output_location(output)}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


class Lines:
    """The jobs of a JSONL file by number (its non-blank lines): where each line starts.

    Made in one pass, which also digests the file; 20 bytes a job (20 MB for a million): where
    its line starts, its number, and its CRC-32, so that a line read again later is the one the
    digest covered (a file edited in place meanwhile is not taken for the batch's).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offsets = array.array("q")
        self._numbers = array.array("q")
        self._sums = array.array("I")
        hasher = hashlib.sha256()
        try:
            # One handle, read here and kept: the lines read later are those of this file, not
            # of one renamed into its place since; opened without waiting (a FIFO put there).
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:  # as `check_file` says it: the jobs file is an input
            reason = exc.strerror or str(exc)
            violation = Violation("file", reason, "a readable JSONL file", str(path))
            raise RequestError([violation]) from None
        stream = os.fdopen(fd, "rb")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                violation = Violation("file", "is not a regular file", "a JSONL file", str(path))
                raise RequestError([violation])
            offset = 0
            for number, raw in enumerate(stream, start=1):
                hasher.update(raw)
                if raw.strip():
                    self._offsets.append(offset)
                    self._numbers.append(number)
                    self._sums.append(zlib.crc32(raw))
                offset += len(raw)
        except OSError as exc:
            stream.close()
            reason = exc.strerror or str(exc)
            violation = Violation("file", reason, "a readable JSONL file", str(path))
            raise RequestError([violation]) from None
        except BaseException:
            stream.close()
            raise
        self._size = offset
        self.digest = hasher.hexdigest()
        self._stream = stream

    def __len__(self) -> int:
        return len(self._offsets)

    def job(self, index: int) -> tuple[str, EditRequest | RequestError]:
        """Job *index*'s name, and its request or why it cannot be one."""
        start = self._offsets[index]
        end = self._offsets[index + 1] if index + 1 < len(self._offsets) else self._size
        self._stream.seek(start)
        raw = self._stream.readline(end - start)  # no more than its line was, whatever is there
        number = self._numbers[index]
        if zlib.crc32(raw) != self._sums[index]:
            where = f"{self.path.name}:{number}"
            changed = Violation(
                where,
                "changed since this worker read the file (edited in place?): not sent",
                "the line the batch began with",
                "another line",
            )
            return where, RequestError([changed])
        return build_request(self.path.name, self.path.parent, number, parse_line(raw))

    def close(self) -> None:
        self._stream.close()


# --- outputs -------------------------------------------------------------------------------------


class LocalOutput:
    """A folder: images saved as a batch saves them (`_save_all`: temporary file, then rename)."""

    def __init__(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc), path=str(folder)) from None
        self.folder = folder

    def where(self, file: str) -> str:
        return str(self.folder / file)

    async def save(self, images: Iterable[ResultImage], name: str) -> list[str]:
        return [path.name for path in await _save_all(images, self.folder, name)]

    async def identities(self, name: str) -> dict[str, str]:
        return await asyncio.to_thread(image_identities, self.folder, name)

    async def is_whole(self, file: str) -> bool:
        return await asyncio.to_thread(is_image_file, self.folder / file)

    async def remove_partial(self, name: str) -> None:
        """Remove the temporary file of job *name*'s image a killed worker left, if any.

        Only for a job taken over from another worker: the folder is listed (by `glob`).
        """

        def remove() -> None:
            pattern = glob.escape(str(self.folder / f".{name}.")) + "[0-9a-f]" * 8 + ".part"
            for found in glob.glob(pattern):
                with contextlib.suppress(OSError):
                    os.unlink(found)

        await asyncio.to_thread(remove)


class FsspecOutput:
    """Any fsspec file system (``s3://bucket/run``, ``memory://out``, ...).

    Each image is written to a temporary name, then moved under its own: no reader (and no kill)
    sees part of one under its name.
    """

    def __init__(self, url: str) -> None:
        from flux_adapters._extras import extra_imports

        with extra_imports():
            import fsspec  # type: ignore[import-untyped]

        self.url = url.rstrip("/")
        try:
            # A file system is made (and may connect: ftp://, sftp://) here too: an unknown
            # protocol, its package missing, a server refusing, all before anything is sent.
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
            self.fs.makedirs(self.root, exist_ok=True)
        except Exception as exc:  # any file system's own error
            # Its text may quote the URL (and its password): only a missing package is named.
            detail = str(exc)[:200] if isinstance(exc, ImportError) else ""
            raise OutputError(
                f"cannot open or create it ({type(exc).__name__}{': ' if detail else ''}{detail})",
                path=shown_location(self.url),
            ) from None

    def where(self, file: str) -> str:
        return shown_location(f"{self.url}/{file}")

    async def save(self, images: Iterable[ResultImage], name: str) -> list[str]:
        from flux_adapters._files import IMAGE_FORMATS, SNIFF_BYTES, image_format, image_is_whole

        saved = []
        for number, image in enumerate(images):
            data = await image.read_async()
            kind = image_format(data[:SNIFF_BYTES])
            if kind not in IMAGE_FORMATS or not image_is_whole(data[:SNIFF_BYTES], data, len(data)):
                raise OutputError("the download is not a whole image", path=self.where(name))
            file = f"{name if number == 0 else f'{name}-{number + 1}'}.{kind}"
            await asyncio.to_thread(self._put, file, data)
            saved.append(file)
        return saved

    def _put(self, file: str, data: bytes) -> None:
        temporary = f"{self.root}/.{file}.{secrets.token_hex(4)}.part"
        try:
            self.fs.pipe_file(temporary, data)
            self.fs.mv(temporary, f"{self.root}/{file}")
        except Exception as exc:  # any file system's own error
            # Whatever of the temporary object was written goes (a failed write may have left
            # part of it, a failed move all of it); if even that fails, it stays, under its
            # temporary name only.
            with contextlib.suppress(Exception):
                self.fs.rm_file(temporary)
            if self._holds(file, data):  # a move is a copy, then a delete: only the delete failed
                return
            raise OutputError(
                f"cannot write it ({type(exc).__name__})", path=self.where(file)
            ) from None

    def _holds(self, file: str, data: bytes) -> bool:
        """Whether *file* holds exactly *data* (read back; ``False`` when it cannot be read).

        Its size is asked first: an object of another size is not read at all, however large.
        """
        path = f"{self.root}/{file}"
        try:
            return self.fs.size(path) == len(data) and bool(self.fs.cat_file(path) == data)
        except Exception:  # any file system's own error
            return False

    async def identities(self, name: str) -> dict[str, str]:
        return await asyncio.to_thread(self._identities, name)

    def _identities(self, name: str) -> dict[str, str]:
        found = {}
        for kind in _IMAGE_KINDS:
            file = f"{name}.{kind}"
            try:
                info = self.fs.info(f"{self.root}/{file}")
            except (OSError, ValueError):
                continue
            if info.get("type") == "file" and self._whole(file, int(info.get("size") or 0)):
                stamp = next(
                    (
                        info[key]
                        for key in ("mtime", "created", "LastModified", "ETag")
                        if key in info
                    ),
                    "",
                )
                found[file] = f"{info.get('size')}:{stamp}"
        return found

    async def is_whole(self, file: str) -> bool:
        return await asyncio.to_thread(self._whole, file, None)

    async def remove_partial(self, name: str) -> None:
        """Nothing: a temporary object a killed worker left stays (see docs/scaling.md)."""

    def _whole(self, file: str, size: int | None) -> bool:
        from flux_adapters._files import (
            IMAGE_FORMATS,
            SNIFF_BYTES,
            TAIL_BYTES,
            image_format,
            image_is_whole,
        )

        path = f"{self.root}/{file}"
        try:
            if size is None:
                size = int(self.fs.size(path) or 0)
            head = self.fs.cat_file(path, 0, SNIFF_BYTES)
            if image_format(head) not in IMAGE_FORMATS:
                return False
            tail = self.fs.cat_file(path, max(size - TAIL_BYTES, 0), size)
        except (OSError, ValueError):
            return False
        return image_is_whole(head, tail, size)


Output = LocalOutput | FsspecOutput


def open_output(output: str) -> Output:
    """The output named *output*: a folder, a ``file://`` URL, or any fsspec URL."""
    if "://" in output and not output.startswith("file://"):
        return FsspecOutput(output)
    return LocalOutput(Path(output.removeprefix("file://")))


# --- the journal in Redis -------------------------------------------------------------------------


class LeaseLost(FluxError):
    """This worker's lease on the job's block ended; another worker holds it now.

    The job is not sent (or recorded) by this worker.
    """


class _Writer:
    """The records of every job in flight, sent to Redis together.

    One script call at a time, with everything noted while the last one ran (group commit). A
    waiter hears of its record's fate: acknowledged, lost to another worker (`LeaseLost`), or
    Redis gone (`StateUnavailable`).
    """

    def __init__(self, store: Store, broken: Callable[[StateUnavailable], None]) -> None:
        self._store = store
        self._broken = broken
        self._ops: list[list[object]] = []
        self._waiters: list[asyncio.Future[bool] | None] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.failure: StateUnavailable | None = None
        self._task = asyncio.create_task(self._run())

    def note(
        self,
        job: int,
        record: Mapping[str, object] | None = None,
        *,
        end: str = "",
        saved: bool = False,
    ) -> asyncio.Future[bool]:
        """Queue a record of *job* (and its end, counted once); its future tells the outcome."""
        text = json.dumps(record, separators=(",", ":"), ensure_ascii=False) if record else ""
        return self._queue([str(job), text, end, int(saved), ""])

    def release(self, block: int, *, finished: bool) -> asyncio.Future[bool]:
        """Queue the end of this worker's lease on *block* (every job ended, or given up)."""
        return self._queue(["", "finished" if finished else "given up", "", 0, str(block)])

    def _queue(self, op: list[object]) -> asyncio.Future[bool]:
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiter.add_done_callback(lambda done: done.cancelled() or done.exception())
        if self.failure is not None:
            waiter.set_exception(self.failure)
            return waiter
        self._ops.append(op)
        self._waiters.append(waiter)
        self._idle.clear()
        self._wake.set()
        return waiter

    async def durable(self, job: int, record: Mapping[str, object]) -> None:
        """Record *record* and return once Redis has it (this worker still holding the job).

        Raises:
            LeaseLost: Another worker holds the job's block now.
            StateUnavailable: Redis did not answer.
        """
        if not await asyncio.shield(self.note(job, record)):
            raise LeaseLost("another worker took this job's block over (this worker's lease ended)")

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ops, self._ops = self._ops, []
            waiters, self._waiters = self._waiters, []
            if not ops:
                self._idle.set()
                continue
            try:
                results = await self._store.journal(ops)
            except StateUnavailable as exc:
                self.failure = exc
                for waiter in [*waiters, *self._waiters]:
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(exc)
                self._ops, self._waiters = [], []
                self._idle.set()
                self._broken(exc)
                return
            for waiter, result in zip(waiters, results, strict=False):
                if waiter is not None and not waiter.done():
                    waiter.set_result(result)
            if not self._ops:
                self._idle.set()

    async def drain(self) -> None:
        """Wait until everything queued is written (or Redis failed)."""
        if self.failure is None:
            await self._idle.wait()

    async def close(self) -> None:
        await self.drain()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class _Watcher:
    """A job's journal in Redis: the `flux_adapters.client.Watcher` of its edit.

    Each record is folded into the job's `JobState` here as well.
    """

    def __init__(
        self,
        writer: _Writer,
        job: int,
        state: JobState,
        held: Callable[[int], Awaitable[bool]],
    ) -> None:
        self._writer = writer
        self._job = job
        self.state = state
        self._held = held

    async def sending(self, provider: str) -> None:
        record = {"k": "sent", "p": provider}
        try:
            await self._writer.durable(self._job, record)  # acknowledged before anything goes out
        except asyncio.CancelledError:
            # Stopped while its record was on its way: the request never left.
            self._unsent(provider, "stopped before the request was sent")
            raise
        # The acknowledgement proves the lease was this worker's when Redis wrote the record,
        # not that it still is: a worker that stalled since (SIGSTOP, a swapped-out machine, a
        # stalled loop) may have lost the block to another, which decides by the journal (and
        # may send the job itself, with --resend-unconfirmed).
        try:
            held = await self._held(self._job)
        except BaseException:
            self._unsent(provider, "not sent: its lease could not be confirmed")
            raise
        if not held:
            why = "this worker's lease on its block ended (the worker stalled)"
            self._unsent(provider, f"not sent: {why}")
            raise LeaseLost(f"{why}: the job was not sent; the worker holding the block decides")
        self.state.fold(record)

    def _unsent(self, provider: str, why: str) -> None:
        """Record that the request whose ``sent`` record was written never left."""
        self._writer.note(
            self._job,
            {"k": "attempt", "p": provider, "b": "not-connected", "proves": "not taken", "e": why},
        )

    async def accepted(self, provider: str, job: Job) -> None:
        record = {"k": "job", "p": provider, "job": job.to_dict()}
        self.state.fold(record)
        await self._writer.durable(self._job, record)

    def finished(
        self,
        provider: str,
        reply: Outcome | Answer | FluxError,
        not_taken: Mapping[int, str] | None,
        key_only: Callable[[str], str],
    ) -> None:
        record = _finished_record(provider, reply, not_taken, key_only)
        self.state.fold(record)
        self._writer.note(self._job, record)


# --- the run ------------------------------------------------------------------------------------


@define(kw_only=True)
class SharedOptions:
    """The options of a shared batch (see the ``batch`` command)."""

    state_url: str = field(repr=shown_state_url)
    output: str = field(repr=lambda output: repr(shown_location(output)))
    """A folder or an fsspec URL, whose ``user:password@`` part its repr does not show."""
    concurrency: int = 8
    per_provider: int | None = 4
    block: int = 50
    lease_s: float = 30.0
    keep_s: int = 7 * 86400
    resend_unconfirmed: bool = False
    force: bool = False
    grace: float = 30.0
    timeout: float = 1.0


@define
class Ended:
    """One job this worker ended: as `flux_adapters.result.BatchItem`, with file locations."""

    name: str
    status: str
    reason: str = ""
    error: FluxError | None = None
    result: EditResult | None = None
    files: list[str] = field(factory=list)
    counted: bool = True
    """Whether it counts in the batch's totals (not when another worker had taken it over)."""
    given_back: bool = False
    """Cut short by a stop: not ended, its block goes back to the batch with it."""


@define
class Summary:
    """What a worker says at the end: the batch's totals and its own."""

    batch: str
    round: int
    how: str
    total: int
    totals: dict[str, int]
    mine: dict[str, int]
    interrupted: bool = False
    finished: bool = False
    """Whether every job of the batch ended (this worker saw the round over)."""


@frozen
class _Queued:
    """A job claimed, waiting for a worker task: which claim gave it, and its journal."""

    claim: int
    block: int
    job: int
    done: bool
    saved: bool
    records: tuple[dict[str, Any], ...]


async def _first(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until one of *events* is set (or *timeout* seconds)."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class _Run:
    def __init__(
        self,
        client: AsyncFluxClient,
        lines: Lines,
        output: Output,
        store: Store,
        options: SharedOptions,
        stop: asyncio.Event,
        on_end: Callable[[Ended], None],
        on_progress: Callable[[dict[str, int]], None],
    ) -> None:
        self.client = client
        self.lines = lines
        self.output = output
        self.store = store
        self.options = options
        self.stop = stop
        self.on_end = on_end
        self.on_progress = on_progress
        self.queue: asyncio.Queue[_Queued | None] = asyncio.Queue()
        self.more = asyncio.Event()
        self.released = asyncio.Event()
        """Set when Redis has acknowledged the end of a block of this worker's: the round may be
        over, and the claimer waiting on others' leases asks again at once."""
        self.held: dict[int, int] = {}
        """Blocks this worker holds -> jobs of it not ended yet."""
        self.claims: dict[int, int] = {}
        """Blocks this worker holds -> the number of the claim that gave it (`_take`)."""
        self.leased: dict[int, float] = {}
        """Blocks this worker holds -> when (`time.monotonic`) the claim or renewal that last
        set their lease was asked for: the lease lasts at least `lease_s` from then (`holds`)."""
        self.claimed = 0
        self.running: dict[int, int] = {}
        """The jobs this worker has in flight -> the claim whose count their end takes down."""
        self.ended_late: set[int] = set()
        """Jobs that ended after their block was claimed again: their turn in the new claim is
        still queued, and only takes the count down."""
        self.failure: StateUnavailable | None = None
        self.mine = dict.fromkeys(STATUSES, 0)
        self.finished = False
        self.writer = _Writer(store, self._broken)
        self.in_job: set[asyncio.Task[None]] = set()
        self.grace_over: set[asyncio.Task[None]] = set()

    def _broken(self, failure: StateUnavailable) -> None:
        if self.failure is None:
            self.failure = failure
        self.stop.set()
        self.more.set()

    # -- claiming and leases ------------------------------------------------------------------

    async def claimer(self) -> None:
        try:
            while not self.stop.is_set():
                while self.queue.qsize() >= self.options.concurrency and not self.stop.is_set():
                    await _first(self.more, self.stop)
                    self.more.clear()
                if self.stop.is_set():
                    break
                self.released.clear()
                asked = time.monotonic()
                claim = await self.store.claim()
                if claim is None:
                    self.finished = True
                    break
                if isinstance(claim, float):  # others still work: their leases may end
                    # (or this worker's own last jobs, whose end wakes it: not a second later)
                    waited = min(max(claim, 0.05), self.options.lease_s / 3, 1.0)
                    await _first(self.stop, self.released, timeout=waited)
                    continue
                self._take(claim, asked)
        except StateUnavailable as exc:
            self._broken(exc)
        finally:
            for _ in range(self.options.concurrency):
                self.queue.put_nowait(None)

    def holds(self, job: int) -> bool:
        """Whether this worker's lease on *job*'s block surely lasts still.

        By this machine's monotonic clock, which runs on while the process is stopped.
        """
        block = job // self.options.block
        asked = self.leased.get(block)
        return (
            block in self.held
            and asked is not None
            and time.monotonic() - asked < self.options.lease_s
        )

    async def confirm(self, job: int) -> bool:
        """Whether this worker still holds *job*'s block, for a request to go out now.

        Known by the monotonic clock while the lease surely lasts (`holds`); past that (the
        worker stalled), asked of Redis, which renews the lease if no other worker took the
        block meanwhile.

        Raises:
            StateUnavailable: Redis did not answer.
        """
        if self.holds(job):
            return True
        block = job // self.options.block
        if block not in self.held:
            return False
        asked = time.monotonic()
        lost, _, _ = await self.store.renew([block])
        if block in lost or block not in self.leased:
            return False
        self.leased[block] = max(self.leased[block], asked)
        return self.holds(job)  # (unless it stalled again while Redis answered)

    def _take(self, claim: Claim, asked: float) -> None:
        self.leased[claim.block] = asked  # a claim sets the block's lease anew (own or not)
        if claim.own and claim.block in self.held:
            # Its own block again: its lease ran out (a stalled loop) before anyone took it
            # over, and the claim renewed it. Its jobs are queued or in flight already.
            return
        # A block lost (taken over) and claimed again later: the jobs of the first claim still
        # queued are dropped (this claim's come with what the journal knows now: the other
        # worker may have sent some of them), and one still in flight here is not started
        # twice (`running`). So too for a block still held here as far as this worker knows
        # (the renewal that would have said it was lost has not come back yet).
        self.claimed += 1
        self.claims[claim.block] = self.claimed
        self.held[claim.block] = len(claim.jobs)
        for number, done, saved, records in claim.jobs:
            self.queue.put_nowait(_Queued(self.claimed, claim.block, number, done, saved, records))

    async def renewer(self) -> None:
        period = self.options.lease_s / 3
        output_kept = time.monotonic()
        try:
            while True:
                await asyncio.sleep(period)
                if time.monotonic() - output_kept > self.options.keep_s / 4:
                    output_kept = time.monotonic()
                    await self.store.keep_output()
                asked, blocks = time.monotonic(), sorted(self.held)
                lost, _, counts = await self.store.renew(blocks)
                for block in blocks:
                    if block in lost:
                        self.held.pop(block, None)
                        self.claims.pop(block, None)
                        self.leased.pop(block, None)
                    elif block in self.leased:
                        self.leased[block] = max(self.leased[block], asked)
                self.on_progress(counts)
        except StateUnavailable as exc:
            self._broken(exc)

    def _job_over(self, block: int) -> None:
        left = self.held.get(block)
        if left is None:
            return
        if left <= 1:
            del self.held[block]
            del self.claims[block]
            self.leased.pop(block, None)
            released = self.writer.release(block, finished=True)
            released.add_done_callback(lambda _: self.released.set())
        else:
            self.held[block] = left - 1

    # -- jobs -----------------------------------------------------------------------------------

    async def worker(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while True:
            taken = await self.queue.get()
            if self.queue.qsize() < self.options.concurrency:
                self.more.set()
            if taken is None:
                return
            block, number = taken.block, taken.job
            if self.stop.is_set() or self.claims.get(block) != taken.claim:
                continue  # not started: the block goes back (given up) or is another's now
            if number in self.running:
                # In flight here from an earlier claim of its block: it ends there, for this one.
                self.running[number] = taken.claim
                continue
            if number in self.ended_late:  # ended there since this claim: not run again
                self.ended_late.discard(number)
                self._job_over(block)
                continue
            if taken.done:  # ended in this round already (a block taken over)
                self._job_over(block)
                continue
            self.in_job.add(me)
            self.running[number] = taken.claim
            try:
                ended = await self.run_job(number, taken.saved, taken.records)
            finally:
                self.in_job.discard(me)
            try:
                await self._end(block, number, ended)
            finally:
                del self.running[number]

    async def _end(self, block: int, number: int, ended: Ended) -> None:
        if ended.given_back:  # its block is not finished: given up at the end of the run
            self.on_end(ended)
            return
        saved = ended.status in ("ok", "skipped") and (
            bool(ended.files) or ended.status == "skipped"
        )
        record = {"k": "saved", "files": ended.files} if ended.files else None
        try:
            ended.counted = await self.writer.note(number, record, end=ended.status, saved=saved)
            lost = "another worker took this job's block over (this worker's lease ended)"
        except StateUnavailable:
            ended.counted = False
            # (the worker's one line after the run says why: no answer, an error, a flush)
            lost = "its end could not be recorded in the shared state (Redis)"
        if not ended.counted:
            ended.reason = f"{ended.reason}; {lost}" if ended.reason else lost
        else:
            self.mine[ended.status] += 1
        self.on_end(ended)
        if self.claims.get(block) == self.running.get(number):
            self._job_over(block)
        elif block in self.held:  # claimed again since it started: its new turn is queued
            self.ended_late.add(number)

    async def run_job(self, number: int, saved: bool, records: tuple[dict[str, Any], ...]) -> Ended:
        name, request = self.lines.job(number)
        state = JobState()
        try:
            if isinstance(request, RequestError):
                return Ended(name, "failed", error=request)
            for record in records:
                state.fold(record)
            return await self._run(number, name, request, saved, state, bool(records))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task not in self.grace_over or task.cancelling() > 1:
                raise
            self.grace_over.discard(task)
            task.uncancel()
            stopped = FluxError(
                "interrupted: this worker was stopped while the job was in flight; its block is "
                "given back, and the worker that takes it over decides by the journal"
            )
            return Ended(name, self._status(state), error=stopped, counted=False, given_back=True)
        except FluxError as error:
            if isinstance(error, StateUnavailable):
                self._broken(error)
            return Ended(name, self._status(state), error=error)
        except Exception as exc:  # a bug, in this library or a provider package: contained
            bug = FluxError(f"unexpected {type(exc).__name__}: {str(exc)[:200]}")
            bug.__cause__ = exc
            return Ended(name, self._status(state), error=bug)

    @staticmethod
    def _status(state: JobState) -> str:
        return "unconfirmed" if state.may_be_billed else "failed"

    async def _run(
        self,
        number: int,
        name: str,
        request: EditRequest,
        saved: bool,
        state: JobState,
        known: bool,
    ) -> Ended:
        force = self.options.force
        if saved and not force:
            return Ended(name, "skipped", reason="already saved")
        digest = request_digest(request)
        if known and state.digest and state.digest != digest and not force:
            return Ended(
                name,
                "changed",
                reason=COMMAND_REASONS[CHANGED_REASON],
            )
        if known and state.may_be_billed and not (force and state.digest != digest):
            recovered = await self._recover(number, name, state)
            if recovered is not None:
                return recovered
        before: dict[str, str] | None = None
        if not known and not force:
            before = await self.output.identities(name)
            if before:  # an image there before the batch knew of this job: the job's own
                return Ended(
                    name, "skipped", reason="already saved (no journal entry)", files=list(before)
                )
        if before is None:
            before = await self.output.identities(name)
        accepted: dict[str, object] = {"k": "accepted", "d": digest}
        if before:
            accepted["old"] = before
        state.fold(accepted)
        self.writer.note(number, accepted)
        watcher = _Watcher(self.writer, number, state, self.confirm)
        result = await self.client._edit(request, watcher)
        return await self._save(name, result)

    async def _recover(self, number: int, name: str, state: JobState) -> Ended | None:
        """A job that may have been billed (a worker stopped with it in flight).

        Its image saved meanwhile, its answer downloaded again, its provider's job polled
        again, or it is reported; ``None``: send it (``--resend-unconfirmed``).
        """
        if state.files and all([await self.output.is_whole(file) for file in state.files]):
            return Ended(name, "ok", reason="saved before its worker stopped", files=state.files)
        await self.output.remove_partial(name)
        found = await self.output.identities(name)
        new = [file for file, identity in found.items() if state.before.get(file) != identity]
        if new:  # renamed into place, then its worker stopped before recording it
            return Ended(name, "ok", reason="saved before its worker stopped", files=new)
        failure = ""
        if state.urls:
            # Checked as the URLs of the provider that gave them (the journal says which).
            downloader = self.client._downloader_of(state.urls_by)
            images = [ResultImage(url=url, downloader=downloader) for url in state.urls]
            try:
                files = await self.output.save(images, name)
            except Exception as error:  # a URL from the journal is data: whatever fails, no image
                failure = (
                    f"its answer's images could not be downloaded again ({type(error).__name__})"
                )
            else:
                return Ended(name, "ok", reason="downloaded again from its result URL", files=files)
        if state.job is not None:
            watcher = _Watcher(self.writer, number, state, self.confirm)
            resumed = await self.client._resume(state.job, watcher)
            polled = f"job {_shown_id(state.job.id, self.client._scrub)} polled again"
            return await self._save(name, resumed, polled)
        if not self.options.resend_unconfirmed:
            why = failure or state.why_unconfirmed
            return Ended(name, "unconfirmed", reason=f"may have been billed, no image saved: {why}")
        return None

    async def _save(self, name: str, result: EditResult, reason: str = "") -> Ended:
        try:
            files = await self.output.save(result.images, name)
        except FluxError as error:
            again = "a rerun downloads it again while its URL lasts (about 10 minutes)"
            inline = "it came inline, not as a URL: it is lost"
            why = again if any(image.url for image in result.images) else inline
            return Ended(
                name,
                "unconfirmed",
                result=result,
                error=error,
                reason=f"answered (billed), but its image could not be saved; {why}",
            )
        return Ended(name, "ok", result=result, files=files, reason=reason)

    # -- the whole run --------------------------------------------------------------------------

    async def interrupt_after_grace(self) -> None:
        await self.stop.wait()
        await asyncio.sleep(self.options.grace)
        for task in list(self.in_job):
            self.grace_over.add(task)
            task.cancel()

    async def run(self) -> None:
        from flux_adapters.client import _GATES

        context = contextvars.copy_context()
        if self.options.per_provider is not None:
            gates = {
                name: asyncio.Semaphore(self.options.per_provider) for name in self.client.providers
            }
            context.run(_GATES.set, gates)
        claimer = asyncio.create_task(self.claimer())
        renewer = asyncio.create_task(self.renewer())
        watchdog = asyncio.create_task(self.interrupt_after_grace())
        workers = [
            asyncio.create_task(self.worker(), context=context)
            for _ in range(self.options.concurrency)
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in (claimer, renewer, watchdog, *workers):
                task.cancel()
            await asyncio.gather(claimer, renewer, watchdog, *workers, return_exceptions=True)
            # Blocks with jobs not started (a stop): given back, any worker takes them at once.
            for block in list(self.held):
                self.writer.release(block, finished=False)
            self.held.clear()
            await self.writer.close()
            if self.failure is None and self.writer.failure is not None:
                self.failure = self.writer.failure


async def _check_file_batch(folder: Path, resend_unconfirmed: bool) -> None:
    """Refuse a folder that a batch run without ``--state`` writes to, or whose journal knows jobs.

    Jobs that may have been billed (unless *resend_unconfirmed*): this batch's journal is in
    Redis, and would send them again.

    Raises:
        ConfigurationError: Either.
    """
    from flux_adapters._journal import JOURNAL_NAME, file_batch_in
    from flux_adapters.errors import ConfigurationError

    running, unsettled = await asyncio.to_thread(file_batch_in, folder)
    where = f"{folder} holds the journal of a batch run without --state ({JOURNAL_NAME})"
    if running:
        raise ConfigurationError(
            f"{where}, running there now: let it end, or write to another output"
        )
    if unsettled and not resend_unconfirmed:
        shown = ", ".join(repr(name[:60]) for name in unsettled[:3])
        more = f" and {len(unsettled) - 3} more" if len(unsettled) > 3 else ""
        raise ConfigurationError(
            f"{where}, which knows {len(unsettled)} job(s) that may have been billed and have no "
            f"image ({shown}{more}); a batch shared through Redis does not read it, and would "
            "send them again: rerun that batch without --state to settle them, write to another "
            "output, or pass --resend-unconfirmed to send them again"
        )


async def run_shared(
    client: AsyncFluxClient,
    lines: Lines,
    options: SharedOptions,
    *,
    stop: asyncio.Event,
    on_end: Callable[[Ended], None],
    on_progress: Callable[[dict[str, int]], None],
    worker: str | None = None,
) -> Summary:
    """Work on the shared batch of *lines* until it is over (or *stop*); what was done.

    Raises:
        StateUnavailable: Redis did not answer (at the start, or during the run: then no job
            was sent after its ``sent`` record went unacknowledged, and the jobs in flight got
            the grace to end and save their images).
        ConfigurationError, MissingExtraError, OutputError: The state or the output is unusable.
    """
    from flux_adapters.state import open_state
    from flux_adapters.state._redis import RedisState

    output = open_output(options.output)
    if isinstance(output, LocalOutput):
        await _check_file_batch(output.folder, options.resend_unconfirmed)
    state = open_state(options.state_url, fallback="none", timeout=options.timeout)
    if not isinstance(state, RedisState):
        from flux_adapters.errors import ConfigurationError

        raise ConfigurationError("--state must name a Redis server (redis://, rediss://, unix://)")
    identity = batch_id(lines.digest, options.output)
    store = Store(
        state,
        identity,
        worker=worker or f"{os.getpid()}-{secrets.token_hex(6)}",
        keep_s=options.keep_s,
    )
    held: int | None = None  # the mark, locked while this worker runs
    try:
        shown = shown_location(output_location(options.output))
        how, _, lease_ms = await store.begin(
            total=len(lines),
            block=options.block,
            lease_ms=max(int(options.lease_s * 1000), 1),
            file_digest=lines.digest,
            output=shown,
        )
        # After `begin`: a batch that took the output has its state in Redis by then, so two
        # batches starting at once never both find the other gone.
        await store.take_output(shown, resend_unconfirmed=options.resend_unconfirmed)
        if isinstance(output, LocalOutput):  # so that a batch without --state stops there
            held = await asyncio.to_thread(
                mark_shared, output.folder, shown_state_url(options.state_url), identity
            )
        # The first worker's lease and block size are the batch's.
        options = attrs.evolve(options, lease_s=lease_ms / 1000, block=store.block)
        run = _Run(client, lines, output, store, options, stop, on_end, on_progress)
        try:
            await run.run()
        finally:
            if run.failure is not None:
                raise run.failure
        totals = await store.totals()
        settled = run.finished and totals is not None and not totals.get("unconfirmed")
        if isinstance(output, LocalOutput) and settled:  # nothing a batch could pay twice
            await asyncio.to_thread(unmark_shared, output.folder, identity)
        return Summary(
            batch=identity,
            round=int(store.round),
            how=how,
            total=len(lines),
            totals=totals if totals is not None else dict(run.mine),
            mine=run.mine,
            interrupted=not run.finished,
            finished=run.finished,
        )
    finally:
        if held is not None:
            with contextlib.suppress(OSError):
                os.close(held)
        await state.aclose()
