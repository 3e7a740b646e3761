"""`AsyncFluxClient.edit_many`: many edits at once, never dying of one, never paying twice.

A fixed pool of workers takes requests one at a time from the caller's iterable, runs each
through the client's router, saves its images the moment they arrive, and yields one
`BatchItem` per job. Whatever goes wrong with one job (a typed error, a garbled answer, a bug)
becomes that job's item; the others go on. What a batch holds is the jobs in flight and the
items waiting for the reader (at most ``concurrency`` of each); all that grows with the number
of jobs is a 16-byte digest of each name (`NameSet`, to refuse a name used twice, 33 to 41
bytes a name in all) and, on a rerun, a slot of 8 bytes (8 to 16 as its table grows) for each
job of earlier runs not yet taken up: what the journal knows of it waits in a file beside the
journal (`flux_adapters._journal.EarlierStates`).

With an output folder, the journal (``flux_adapters._journal``) records each job's steps, the
``sent`` step durably before the request leaves. A rerun reads it and, per job:

- saved (its files are on disk and are whole images): skipped, unless ``force``;
- its request changed since it was sent: reported ``changed``, unless ``force``;
- may have been billed, no image saved: its result URLs (if any) are downloaded again, free;
  else a job an asynchronous provider accepted (its id is journaled durably the moment it is
  accepted) is polled again, free; otherwise reported ``unconfirmed`` and not sent unless
  ``resend_unconfirmed``;
- never sent, or provably not taken (or refused) every time: sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import hashlib
import mmap
import os
import unicodedata
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

from flux_adapters._display import render_value, type_name
from flux_adapters._files import SUFFIXED_NAME_MAX, plain_path, remove_partial_files
from flux_adapters._flows import Outcome
from flux_adapters._journal import (
    JobState,
    Journal,
    image_identities,
    request_digest,
    zeroed,
)
from flux_adapters._options import MAX_CONCURRENCY, is_number
from flux_adapters.errors import (
    ConfigurationError,
    FluxError,
    JobError,
    JobTimeout,
    OutputError,
    RequestError,
    Violation,
)
from flux_adapters.jobs import Job, _shown_id
from flux_adapters.request import EditRequest
from flux_adapters.result import BatchItem, BatchStatus, EditResult, ResultImage
from flux_adapters.routing import billing_rule, proven

if TYPE_CHECKING:
    from flux_adapters.client import AsyncFluxClient
    from flux_adapters.providers import Answer

__all__ = ["NameSet", "file_key", "run_batch"]

CHANGED_REASON: Final = "the request for this id is not the one sent before (force=True sends it)"
"""A ``changed`` job's reason; the command line names its flag instead (`COMMAND_REASONS`)."""
COMMAND_REASONS: Final = {
    CHANGED_REASON: "the request for this id is not the one sent before (run with --force to "
    "send it)"
}
"""Reasons that name an argument of `edit_many`, as ``flux-adapters batch`` says them."""

_ItemMaker = Callable[..., BatchItem]

_MAX_NAME: Final = 200
_NO_STATE: Final = JobState()
"""What the journal knows of a job it has no record of (read, never changed)."""


def _name_problem(name: object) -> str:
    """Why *name* cannot be a file name in the output folder (empty when it can)."""
    if not isinstance(name, str):
        return f"must be a string, not {type(name).__name__}"
    if not name or len(name) > _MAX_NAME:
        return f"must be 1 to {_MAX_NAME} characters"
    if name in (".", "..") or name.startswith("."):
        return "must not start with a dot"
    if "/" in name or "\\" in name or "\0" in name or not name.isprintable():
        return "must be a plain file name (no folder separator or control character)"
    if not name.isascii() and name.encode("utf-8", errors="replace").decode() != name:
        return "must be valid text (no lone surrogate)"
    if not name.isascii() and len(name.encode()) > SUFFIXED_NAME_MAX:
        # Else sent and billed, then refused by the file system when its image is saved (its
        # name and the extension its bytes add, as `atomic_image` does).
        return (
            f"must be at most {SUFFIXED_NAME_MAX} bytes in UTF-8 (its file name, with the "
            "extension, must fit in the 255 bytes a file system takes)"
        )
    return ""


def file_key(name: str) -> str:
    """What *name* is as a file name where case and Unicode normalisation do not count.

    macOS (APFS, HFS+) and Windows ignore case, and macOS ignores normalisation (``é`` as one
    code point or as ``e`` and an accent): two names with one key are one file there.
    """
    if name.isascii():  # the same, at a batch's pace: ASCII is its own NFD, and casefolds as lower
        return name.lower()
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


class NameSet:
    """Names seen, each kept as a digest in one open-addressing table, not as a string.

    A batch checks that no two jobs share a file name (`file_key`) without keeping a million
    names: the table is at most two thirds full, so a name takes 1.5 to 3 times *digest_size*
    bytes (measured: 33 to 41 by default, 32 MB for a million names, and half as much again
    while the table doubles), where a ``set`` of short strings takes 92 to 100. The table is
    an anonymous memory map, not a ``bytearray``: freed, it goes back to the system at once,
    where a heap block among the small objects of the JSON parsed meanwhile stays with the
    process (8 MB of a 100,000-line file's check did). Two different names count as one only
    if their BLAKE2b digests are equal: with the default 128 bits and a million names, a
    chance of about 1 in 10**26, the odds the journal's request digests already live with. A
    caller for whom a false match only costs work (`compact_report`) may take 8 bytes.
    """

    def __init__(self, digest_size: int = 16) -> None:
        self._width = digest_size
        self._empty = bytes(digest_size)
        self._table = zeroed(digest_size * 1024)
        self._mask = 1023
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def table_bytes(self) -> int:
        """The bytes its table takes."""
        return len(self._table)

    def add(self, name: str) -> bool:
        """Add *name*; whether it was not there yet."""
        data = name.encode("utf-8", "surrogatepass")
        key = hashlib.blake2b(data, digest_size=self._width).digest()
        if key == self._empty:  # the all-zero digest marks a free slot
            key = b"\1" + key[1:]
        if not self._insert(self._table, self._mask, key):
            return False
        self._count += 1
        if self._count * 3 > self._mask * 2:
            self._grow()
        return True

    def _insert(self, table: mmap.mmap, mask: int, key: bytes) -> bool:
        width = self._width
        slot = int.from_bytes(key[:8], "little") & mask
        while True:
            start = slot * width
            found = table[start : start + width]
            if found == key:
                return False
            if found == self._empty:
                table[start : start + width] = key
                return True
            slot = (slot + 1) & mask

    def _grow(self) -> None:
        old, width = self._table, self._width
        mask = self._mask * 2 + 1
        table = zeroed(width * (mask + 1))
        for start in range(0, len(old), width):
            key = old[start : start + width]
            if key != self._empty:
                self._insert(table, mask, key)
        self._table, self._mask = table, mask
        old.close()


def _iterable(value: object, argument: str) -> Iterator[object]:
    """An iterator over *value*, a list or generator of the caller's (not one item, not a str).

    Raises:
        ConfigurationError: It is not one.
    """
    if isinstance(value, str | bytes | EditRequest):
        raise ConfigurationError(
            f"{argument} must be a list or an iterable (one per job), not a single "
            f"{type(value).__name__}"
        )
    # A job is named by its place (or by names= in the same order): a set's order changes from
    # one process to the next (str hashing is salted), so a rerun's jobs would each meet
    # another's journal. A dict gives its keys.
    if isinstance(value, set | frozenset):
        raise ConfigurationError(
            f"{argument} must be in order (a list or a generator), not a {type(value).__name__}: "
            "each job is named by its place, which a set does not keep from one run to the next"
        )
    if argument == "requests" and isinstance(value, Mapping):
        raise ConfigurationError(
            f"requests must be in order (a list or a generator), not a {type(value).__name__}, "
            "whose keys it would give; for named jobs pass names=list(jobs) and "
            "requests=list(jobs.values())"
        )
    try:
        return iter(value)  # type: ignore[call-overload,no-any-return]
    except TypeError:
        raise ConfigurationError(
            f"{argument} must be a list or an iterable, not {type(value).__name__}"
        ) from None


def _numbered(
    requests: Iterator[object], names: Iterator[object] | None
) -> Iterator[tuple[int, object, object]]:
    if names is None:
        for index, request in enumerate(requests):
            yield index, f"{index:05d}", request
        return
    for index, (name, request) in enumerate(zip(names, requests, strict=True)):
        yield index, name, request


def _finished_record(
    provider: str,
    reply: Outcome | Answer | FluxError,
    not_taken: Mapping[int, str] | None,
    key_only: Callable[[str], str],
) -> dict[str, object]:
    """The journal record of an attempt at *provider* that ended with *reply*.

    Judged by the same rule as the router's (with the statuses the adapter says are not billed).
    A refusal (moderation) of a job the provider had accepted may have been billed, as the
    budget counts it (fal bills a job it moderated): a rerun must not send it again.
    A result URL that carries the API key (a provider echoing it) is not kept: the journal is a
    file in the output folder, and the key never goes in a file.
    """
    if isinstance(reply, FluxError):
        rule = billing_rule(reply, not_taken)
        record: dict[str, object] = {
            "k": "attempt",
            "p": provider,
            "b": rule.name,
            "proves": proven(rule, reply),
            "e": f"{type(reply).__name__}: {reply}"[:300],
        }
        if isinstance(reply, JobError) and not isinstance(reply, JobTimeout):
            record["over"] = True  # the provider ended the job: a rerun has nothing to poll
        return record
    answer = reply.answer if isinstance(reply, Outcome) else reply
    urls = [image.url for image in answer.images if image.url]
    return {"k": "answered", "p": provider, "urls": [url for url in urls if key_only(url) == url]}


class _JobWatcher:
    """Records one job's attempts in the journal: ``sent`` durably, before it goes."""

    def __init__(self, journal: Journal, job: str) -> None:
        self._journal = journal
        self._job = job

    async def sending(self, provider: str) -> None:
        try:
            await self._journal.durable(self._job, "sent", p=provider)
        except asyncio.CancelledError:
            # Stopped while its record was being synced: the request never left.
            self._journal.note(
                self._job, "attempt", p=provider, b="not-connected", proves="not taken",
                e="stopped before the request was sent",
            )  # fmt: skip
            raise

    async def accepted(self, provider: str, job: Job) -> None:
        record = {"p": provider, "job": job.to_dict()}
        try:
            await self._journal.durable(self._job, "job", **record)
        except asyncio.CancelledError:
            self._journal.note(self._job, "job", **record)  # written, if not yet synced
            raise

    def finished(
        self,
        provider: str,
        reply: Outcome | Answer | FluxError,
        not_taken: Mapping[int, str] | None,
        key_only: Callable[[str], str],
    ) -> None:
        record = _finished_record(provider, reply, not_taken, key_only)
        self._journal.note(self._job, str(record.pop("k")), **record)


class _MemoryWatcher:
    """Without an output folder: what the journal would know of one job, kept in memory.

    A job cut short after its request went out (a stop past its grace, a bug in a transport)
    may have been billed; only this tells it apart from one that never left.
    """

    def __init__(self, state: JobState) -> None:
        self._state = state

    async def sending(self, provider: str) -> None:
        self._state.fold({"k": "sent", "p": provider})

    async def accepted(self, provider: str, job: Job) -> None:
        self._state.fold({"k": "job", "p": provider, "job": job.to_dict()})

    def finished(
        self,
        provider: str,
        reply: Outcome | Answer | FluxError,
        not_taken: Mapping[int, str] | None,
        key_only: Callable[[str], str],
    ) -> None:
        self._state.fold(_finished_record(provider, reply, not_taken, key_only))


async def _save_all(images: Iterable[ResultImage], folder: Path, name: str) -> tuple[Path, ...]:
    saved = []
    for number, image in enumerate(images):
        stem = name if number == 0 else f"{name}-{number + 1}"
        saved.append(await image._save_async(folder / stem, add_suffix=True))  # folder checked
    return tuple(saved)


def _check_options(
    concurrency: object, per_provider: object, grace: object, flags: dict[str, object]
) -> None:
    if (
        isinstance(concurrency, bool)
        or not isinstance(concurrency, int)
        or not 1 <= concurrency <= MAX_CONCURRENCY
    ):
        raise ConfigurationError(
            f"concurrency= must be a whole number from 1 to {MAX_CONCURRENCY} "
            "(one worker is made for each)"
        )
    if per_provider is not None and (
        isinstance(per_provider, bool) or not isinstance(per_provider, int) or per_provider < 1
    ):
        raise ConfigurationError("per_provider= must be a whole number >= 1, or None")
    if not is_number(grace) or grace < 0:
        raise ConfigurationError("grace= must be a number of seconds >= 0")
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigurationError(f"{flag}= must be True or False")


def _open_folder(output_dir: object) -> Path:
    try:
        folder = plain_path(output_dir)  # a str subclass's characters, not its __str__
    except TypeError as exc:
        raise ConfigurationError(f"output_dir= must be a path ({exc})") from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OutputError(reason, path=str(folder)) from None
    return folder


def _refuse_shared_output(folder: Path, resend_unconfirmed: bool = False) -> None:
    """Refuse *folder* if a batch shared through Redis writes or wrote there (`SHARED_MARK`).

    Its journal is in Redis: this batch would find none of its jobs that may have been billed
    with no image, and send them again; with *resend_unconfirmed*, only while one of its
    workers runs there (it would send the jobs those are sending).

    Raises:
        ConfigurationError: It did, and may have left such jobs; or one of its workers runs.
    """
    from flux_adapters._journal import SHARED_MARK, shared_batch_in, shared_batch_running

    if shared_batch_running(folder):
        raise ConfigurationError(
            f"{folder} is the output of a batch shared through Redis whose workers run there "
            f"now ({SHARED_MARK} is held): this batch would send again the jobs they are "
            "sending. Let it end, run this one with its --state, or write to another output"
        )
    if resend_unconfirmed:
        return
    found = shared_batch_in(folder)
    if found is None:
        return
    state = found["state"] or "its Redis"
    raise ConfigurationError(
        f"{folder} is the output of a batch shared through Redis ({state}, batch "
        f"{found['batch'] or '?'}; {SHARED_MARK}), whose journal is there, not in the folder: "
        "jobs it left maybe billed with no image would be sent again. Finish it with "
        "--state (the same jobs file and output), or pass --resend-unconfirmed to send again "
        "every job without an image"
    )


class _Batch:
    """One run of `run_batch`: its options, journal and bookkeeping."""

    def __init__(
        self,
        client: AsyncFluxClient,
        folder: Path | None,
        *,
        resend_unconfirmed: bool,
        force: bool,
    ) -> None:
        self.client = client
        self.folder = folder
        self.journal = Journal(folder) if folder is not None else None
        if folder is not None:
            remove_partial_files(folder)  # a killed run's half-written images; the lock is ours
        self.resend_unconfirmed = resend_unconfirmed
        self.force = force
        self.seen = NameSet()
        """The file names (`file_key`) of this run's jobs so far."""
        self.named: set[int] = set()
        """Indexes of the jobs of this run whose name is theirs alone (valid and unique)."""
        self.started: set[int] = set()
        """Indexes of the jobs of this run that got as far as being recorded as accepted."""
        self.memory: dict[int, JobState] = {}
        """Without a journal: the jobs in flight, as the journal would know them."""
        self.grace_over: set[asyncio.Task[None]] = set()
        """Workers cancelled because the grace after a stop ran out, their job in flight."""

    async def run(self, index: int, name: object, request: object) -> BatchItem:
        """Run one job; every outcome, of any kind, is its item."""
        # A plain copy of a str (a subclass's methods never run), else a safe rendering.
        shown = str.__str__(name) if issubclass(type(name), str) else render_value(name)

        def item(status: BatchStatus, **values: object) -> BatchItem:
            return BatchItem(
                index=index,
                name=shown,
                request=request if issubclass(type(request), EditRequest) else None,  # type: ignore[arg-type]
                status=status,
                **values,  # type: ignore[arg-type]
            )

        try:
            if not issubclass(type(name), str):
                problem = f"must be a string, not {type_name(name)}"
                raise RequestError([Violation("name", problem, "a plain file name", shown)])
            return await self._run(index, shown, request, item)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            # Only the grace running out (one cancel, from the watchdog) becomes an item; any
            # other cancel (the iterator closed, the event loop shutting down) ends the task.
            if task is None or task not in self.grace_over or task.cancelling() > 1:
                raise
            self.grace_over.discard(task)
            task.uncancel()
            stopped = FluxError("interrupted: the batch was stopped while this job was in flight")
            return item(self._status_after(index, shown), error=stopped)
        except FluxError as error:
            return item(self._status_after(index, shown), error=error)
        except Exception as exc:  # a bug, in this library or a provider package: contained
            bug = FluxError(f"unexpected {type(exc).__name__}: {str(exc)[:200]}")
            bug.__cause__ = exc
            return item(self._status_after(index, shown), error=bug)
        finally:  # a batch of a million jobs keeps nothing per finished job but its name's digest
            if index in self.named and self.journal is not None:
                self.journal.forget(shown)  # its name is its own: no other job's state
            self.named.discard(index)
            self.started.discard(index)
            self.memory.pop(index, None)

    def _status_after(self, index: int, name: str) -> BatchStatus:
        """``"unconfirmed"`` when this job may have been billed in this run, else ``"failed"``."""
        if index not in self.started:
            # Not sent in this run; but a job an earlier run may have had billed stays so.
            journal = self.journal if index in self.named else None
            return "unconfirmed" if journal and journal.state(name).may_be_billed else "failed"
        state = self.journal.state(name) if self.journal is not None else self.memory.get(index)
        return "unconfirmed" if state is not None and state.may_be_billed else "failed"

    async def _run(self, index: int, name: str, request: object, item: _ItemMaker) -> BatchItem:
        problem = _name_problem(name) if self.folder is not None else ""
        # Two names that differ only in case or normalisation are one file on macOS (file_key).
        if not problem and not self.seen.add(file_key(name)):
            problem = "is used by another job of this batch"
        if problem:
            raise RequestError([Violation("name", problem, "a unique plain file name", name)])
        self.named.add(index)
        if not issubclass(type(request), EditRequest):  # type() cannot be fooled; isinstance can
            kind = type_name(request)
            raise RequestError(
                [Violation("request", "must be an EditRequest", "EditRequest", kind)]
            )
        assert isinstance(request, EditRequest)
        if self.journal is None or self.folder is None:
            self.started.add(index)
            watcher = _MemoryWatcher(self.memory.setdefault(index, JobState()))
            return item("ok", result=await self.client._edit(request, watcher))
        journal, folder = self.journal, self.folder
        digest = request_digest(request)
        known = journal.knows(name)
        # A new job (most of a first run) has no state to read: nothing is made for it here.
        state = journal.state(name) if known else _NO_STATE
        verdict, files = state.judged(digest, folder, name) if known else ("new", [])
        if verdict == "saved" and not self.force:
            if files != state.files:  # renamed into place, then a kill before it was recorded
                journal.note(name, "saved", files=files)
            return item(
                "skipped", saved=tuple(folder / file for file in files), reason="already saved"
            )
        before = None
        if not known and not self.force:
            before = image_identities(folder, name)
            if before:  # a folder filled before it had a journal: the image is the job's own
                existing = tuple(folder / file for file in before)
                return item("skipped", saved=existing, reason="already saved (no journal entry)")
        if verdict == "changed" and not self.force:
            return item("changed", reason=CHANGED_REASON)
        if verdict == "unconfirmed":
            recovered, failure = await self._download_again(name, state)
            if recovered:
                return item("ok", saved=recovered, reason="downloaded again from its result URL")
            if state.job is not None:
                self.started.add(index)
                resumed = await self.client._resume(state.job, _JobWatcher(journal, name))
                polled = f"job {_shown_id(state.job.id, self.client._scrub)} polled again"
                return await self._save(name, resumed, item, polled)
            if not self.resend_unconfirmed:
                why = failure or state.why_unconfirmed
                return item("unconfirmed", reason=f"may have been billed, no image saved: {why}")
        if before is None:
            before = image_identities(folder, name)  # images that are not this run's, if any
        journal.note(name, "accepted", d=digest, **({"old": before} if before else {}))
        self.started.add(index)
        result: EditResult = await self.client._edit(request, _JobWatcher(journal, name))
        return await self._save(name, result, item)

    async def _save(
        self, name: str, result: EditResult, item: _ItemMaker, reason: str = ""
    ) -> BatchItem:
        """Save *result*'s images as job *name*'s, and journal them."""
        assert self.journal is not None
        assert self.folder is not None
        journal, folder = self.journal, self.folder
        try:
            saved = await _save_all(result.images, folder, name)
        except FluxError as error:
            # Paid for, and not lost yet: the result goes back to the caller, and the journal
            # keeps its URLs for a rerun.
            again = "a rerun downloads it again while its URL lasts (about 10 minutes)"
            inline = "it came inline, not as a URL: the item's result holds it"
            why = again if any(image.url for image in result.images) else inline
            return item(
                "unconfirmed",
                result=result,
                error=error,
                reason=f"answered (billed), but its image could not be saved; {why}",
            )
        journal.note(name, "saved", files=[path.name for path in saved])
        return item("ok", result=result, saved=saved, reason=reason)

    async def _download_again(self, name: str, state: JobState) -> tuple[tuple[Path, ...], str]:
        """Save an answered job's images from their URLs, if they still work (it costs nothing).

        Returns the files saved, or why they could not be.
        """
        if not state.urls or self.journal is None or self.folder is None:
            return (), ""
        # Checked as the URLs of the provider that gave them (the journal says which).
        downloader = self.client._downloader_of(state.urls_by)
        images = [ResultImage(url=url, downloader=downloader) for url in state.urls]
        try:
            saved = await _save_all(images, self.folder, name)
        except Exception as error:  # a URL from the journal is data: whatever fails, no image
            return (), f"its answer's images could not be downloaded again ({type(error).__name__})"
        self.journal.note(name, "saved", files=[path.name for path in saved])
        return saved, ""

    async def close(self) -> None:
        if self.journal is not None:
            await self.journal.close()


class _Results:
    """A batch's items on their way from its workers to its one reader: a bounded queue.

    `asyncio.Queue`'s ``put`` and ``get`` for a single reader, at one call each while the queue
    is neither full nor empty (asyncio's runs five or six Python calls for each, for every job).
    """

    def __init__(self, size: int) -> None:
        self._items: collections.deque[BatchItem | None] = collections.deque()
        self._size = size
        self._reader: asyncio.Future[None] | None = None
        self._writers: collections.deque[asyncio.Future[None]] = collections.deque()

    async def put(self, item: BatchItem | None) -> None:
        """Add *item*, once there is room (the reader is not more than the size behind)."""
        while len(self._items) >= self._size:
            room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._writers.append(room)
            try:
                await room
            except asyncio.CancelledError:
                if not room.cancelled():  # woken, then cancelled: the room is another's
                    self._wake_writer()
                raise
        self._items.append(item)
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    async def get(self) -> BatchItem | None:
        """The next item, once there is one."""
        while not self._items:
            self._reader = asyncio.get_running_loop().create_future()
            await self._reader
        item = self._items.popleft()
        self._wake_writer()
        return item

    def _wake_writer(self) -> None:
        while self._writers:
            room = self._writers.popleft()
            if not room.done():  # a writer cancelled meanwhile no longer waits
                room.set_result(None)
                return


async def run_batch(
    client: AsyncFluxClient,
    requests: Iterable[EditRequest],
    *,
    concurrency: int,
    per_provider: int | None,
    output_dir: str | os.PathLike[str] | None,
    names: Iterable[str] | None,
    resend_unconfirmed: bool,
    force: bool,
    stop: asyncio.Event | None,
    grace: float,
) -> AsyncGenerator[BatchItem, None]:
    """See `AsyncFluxClient.edit_many`."""
    from flux_adapters.client import _GATES

    _check_options(
        concurrency, per_provider, grace, {"resend_unconfirmed": resend_unconfirmed, "force": force}
    )
    if stop is not None and not isinstance(stop, asyncio.Event):
        raise ConfigurationError("stop= must be an asyncio.Event")
    jobs = _iterable(requests, "requests")
    named = _iterable(names, "names=") if names is not None else None
    folder = _open_folder(output_dir) if output_dir is not None else None
    if folder is not None:
        _refuse_shared_output(folder, resend_unconfirmed)
    batch = _Batch(client, folder, resend_unconfirmed=resend_unconfirmed, force=force)
    source = _numbered(jobs, named)
    # Bounded: a caller that reads slowly (or stopped reading without closing the iterator)
    # holds the workers back instead of piling up results, images and all, in memory.
    results = _Results(concurrency)
    failures: list[BaseException] = []
    in_job: set[asyncio.Task[None]] = set()
    """Workers running a job (not waiting for the reader): those the grace may cut short."""
    # The batch's tasks run in their own context, so its per-provider gates stay its own.
    context = contextvars.copy_context()
    # Each worker has one attempt in flight at most: a limit of *concurrency* or more never binds.
    if per_provider is not None and per_provider < concurrency:
        gates = {name: asyncio.Semaphore(per_provider) for name in client.providers}
        context.run(_GATES.set, gates)

    async def work() -> None:
        me = asyncio.current_task()
        assert me is not None
        while not (stop is not None and stop.is_set()) and not failures:
            try:
                index, name, request = next(source)
            except StopIteration:
                break
            except Exception as exc:  # the caller's iterable failed: stop taking jobs
                failures.append(exc)
                break
            in_job.add(me)
            try:
                finished = await batch.run(index, name, request)
            finally:
                in_job.discard(me)
            await results.put(finished)  # waits while the reader is behind
        await results.put(None)  # this worker is done

    async def interrupt_after_grace() -> None:
        assert stop is not None
        await stop.wait()
        await asyncio.sleep(grace)
        for worker in list(in_job):  # an item waiting for the reader is done: it goes out
            batch.grace_over.add(worker)
            worker.cancel()

    workers = [asyncio.create_task(work(), context=context) for _ in range(concurrency)]
    watchdog = asyncio.create_task(interrupt_after_grace()) if stop is not None else None
    try:
        running = len(workers)
        while running:
            finished = await results.get()
            if finished is None:
                running -= 1
            else:
                yield finished
        if failures:
            failure = failures[0]
            if isinstance(failure, ValueError) and "zip()" in str(failure):
                raise ConfigurationError("names= and requests have different lengths")
            raise failure
    finally:
        for task in [*workers, *([watchdog] if watchdog else [])]:
            task.cancel()
        await asyncio.gather(*workers, *([watchdog] if watchdog else []), return_exceptions=True)
        await batch.close()
