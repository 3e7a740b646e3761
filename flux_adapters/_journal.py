"""The write-ahead journal of a batch, and appending JSON lines that survive any kill.

A batch that is killed (SIGKILL, power loss) must never re-send a job the provider may have
billed. So before each request goes out, a ``sent`` record for its job is on disk (``fsync``);
what happened next is recorded as it happens::

    accepted   the job (its id and a digest of its request) was taken up; images already named
               after it, if any, with their identity (a later one is this job's)
    sent       a request for it is about to go to a provider (durable before it goes)
    attempt    that request failed; its billing row says whether it may have been billed
    answered   a provider answered with the image(s); the result URLs, to download again
    saved      the image files are complete on disk

Records of a job are folded into a `JobState`; `JobState.verdict` tells a rerun what to do.
Group commit: one ``fsync`` (in a worker thread) covers every record written while the
previous one ran, so a batch of many jobs in flight pays for few ``fsync`` calls, and never
sends a request before its record is durable. The other records are written at the next turn
of the event loop, all those noted meanwhile in one ``write``, without an ``fsync``: a kill (not
a power loss) loses only what was noted in the moment before it. An image renamed into place
just before a kill, its ``saved`` record not yet written, is still recognised: it is not one of
the images that were there when the job was accepted. Images are not synced: after a power
loss, an image renamed just before may be empty or cut short under its name; it is not taken for
a saved one (it does not start like an image, or does not end like a whole one), and its job is
downloaded again from the URLs of its ``answered`` record if that reached the disk, else reported
``unconfirmed``.

A record is one JSON line written with a single ``write`` on an ``O_APPEND`` file, so a kill
cannot tear it; a power loss can leave a partial last line, which `repair_tail` cuts off when
the file is opened again, but only by a process that has the file to itself: a write of another
process still under way looks like a partial line too, and cutting it would lose the records
it carries (for a journal, ``sent`` records already on disk). So the journal is locked
exclusively before it is repaired or read (two batches never share one journal), and a report,
which several processes may append to, is repaired only when no other process has it open.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import json
import marshal
import mmap
import operator
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Container, Iterator
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

import attrs
from attrs import define, field

from flux_adapters._bodies import compiled_encoder
from flux_adapters._display import escape_surrogates
from flux_adapters.errors import ConfigurationError, OutputError
from flux_adapters.jobs import Job
from flux_adapters.request import BytesImage, DataUrlImage, EditRequest, FileImage, UrlImage

__all__ = [
    "JOURNAL_NAME",
    "SHARED_MARK",
    "Busy",
    "EarlierStates",
    "JobState",
    "Journal",
    "JsonLines",
    "ReportLines",
    "file_batch_in",
    "image_identities",
    "is_image_file",
    "load_packed",
    "load_states",
    "mark_shared",
    "request_digest",
    "shared_batch_in",
    "shared_batch_running",
    "unmark_shared",
    "zeroed",
]

JOURNAL_NAME: Final = ".flux-journal.jsonl"
_READ: Final = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
"""How a file is opened to be read: a FIFO put in its place opens at once (and is refused)."""
_SAMPLE: Final = 64 * 1024

Verdict: TypeAlias = Literal["new", "saved", "changed", "unconfirmed", "retry"]


def request_digest(request: EditRequest) -> str:
    """A digest of everything that decides the image: settings, prompt and image contents.

    Local files are identified by their size and first and last 64 KiB, not by path or time,
    so moving or re-checking-out the inputs does not make a job look changed.
    """
    fields, values = _settings_fields()
    settings = values(request)
    text = _settings_text(settings)
    if text is None:  # a value of another kind: the encoder says how
        text = _encode_digest(dict(zip(fields, settings, strict=True)))
    hasher = hashlib.sha256(text.encode())
    for image in request.images:
        hasher.update(b"\0image:")
        if isinstance(image, UrlImage):
            hasher.update(b"url:" + image.url.encode("utf-8", errors="surrogatepass"))
        elif isinstance(image, DataUrlImage):
            hasher.update(b"data:" + image.data_url.encode("ascii", errors="replace"))
        elif isinstance(image, BytesImage):
            hasher.update(b"bytes:" + image.data)
        else:
            hasher.update(b"file:" + _file_sample(image))
    return hasher.hexdigest()[:32]


_encode_digest: Final = compiled_encoder(json.JSONEncoder(ensure_ascii=True))
"""`json.dumps(..., sort_keys=True, ensure_ascii=True)` of a dict whose keys are in order already
(`_settings_fields`), made once: a batch digests every job, and sorting its keys each time cost
as much as the rest of the encoding."""


_quote_ascii: Final = json.encoder.encode_basestring_ascii
_INFINITY: Final = float("inf")


def _settings_text(values: tuple[object, ...]) -> str | None:
    """`_encode_digest` of the settings *values* (in `_settings_fields` order), written directly.

    For text, whole numbers, ``true``, ``false``, ``null`` and finite numbers, which is what an
    `EditRequest` holds: the encoder costs about four times as much for these thirteen values.
    ``None`` for any other value (the caller asks the encoder).
    """
    parts = []
    for head, value in zip(_settings_heads(), values, strict=True):
        if value is None:
            parts.append(head + "null")
        elif type(value) is str:
            parts.append(head + _quote_ascii(value))
        elif type(value) is bool:
            parts.append(head + ("true" if value else "false"))
        elif type(value) is int:
            parts.append(head + int.__repr__(value))
        elif type(value) is float and -_INFINITY < value < _INFINITY:
            parts.append(head + float.__repr__(value))
        else:
            return None
    return "{" + ", ".join(parts) + "}"


@functools.cache
def _settings_heads() -> tuple[str, ...]:
    """Each setting's key as the digest's JSON writes it, ahead of its value."""
    return tuple(f"{_quote_ascii(name)}: " for name in _settings_fields()[0])


@functools.cache
def _settings_fields() -> tuple[tuple[str, ...], Callable[[EditRequest], tuple[object, ...]]]:
    """Every field of `EditRequest` but the images (hashed by content): a field added later too.

    Sorted by name, as the digest's JSON has them, with a getter of their values as a tuple.
    """
    names = sorted(field.name for field in attrs.fields(EditRequest) if field.name != "images")
    return tuple(names), operator.attrgetter(*names)


def _file_sample(image: FileImage) -> bytes:
    size = image.info.byte_size
    with image.open() as stream:
        head = stream.read(_SAMPLE)
        if size > 2 * _SAMPLE:
            stream.seek(size - _SAMPLE)
        tail = stream.read(_SAMPLE)
    return str(size).encode() + b":" + head + b":" + tail


@define
class JobState:
    """What the journal knows of one job, folded from its records.

    Attributes:
        digest: The digest of the request it was accepted with.
        before: Images named after the job when it was accepted: file name -> identity.
        open_sends: Providers sent to with no answer or failure recorded (a crash, a cancel).
        billed: Some provider may have billed it (an ambiguous failure, or an answer).
        urls: Result URLs of the last answer, to download again.
        urls_by: The provider that gave them (its URLs are checked as its own), ``""`` if the
            record does not say.
        job: The job an asynchronous provider accepted for it and has not ended: a rerun
            polls it (`AsyncFluxClient.resume`) rather than paying for another.
        files: The image files saved, when it was saved.
        note: The last thing that went wrong, in words; once a try may have billed the job,
            what went wrong in that try (the reason it may have been billed).
    """

    digest: str = ""
    before: dict[str, str] = field(factory=dict)
    open_sends: list[str] = field(factory=list)
    billed: bool = False
    urls: list[str] = field(factory=list)
    urls_by: str = ""
    job: Job | None = None
    files: list[str] = field(factory=list)
    note: str = ""

    def fold(self, record: dict[str, Any]) -> None:
        """Take one record into account.

        A journal may come from another version or be edited by hand: a value of the wrong
        kind is read the cautious way (an answer without usable URLs, no files saved, a digest
        that matches no request), never trusted and never an exception.
        """
        kind = record.get("k")
        provider = str(record.get("p", ""))[:100]
        if kind == "accepted":
            digest = record.get("d", "")
            digest = digest if isinstance(digest, str) else "?"
            if self.digest and digest != self.digest:
                # Another request under this name (forced): what was known is of the old one,
                # whose answer's URLs are not this request's image.
                self.open_sends, self.billed, self.urls, self.note = [], False, [], ""
                self.job, self.urls_by = None, ""
            self.digest = digest
            self.files = []
            before = record.get("old")
            self.before = before if before and _is_string_map(before) else {}
        elif kind == "sent":
            self.open_sends.append(provider)
        elif kind == "job":
            job = record.get("job")
            self.job = Job.from_dict(job) if isinstance(job, dict) else None
        elif kind in ("attempt", "answered"):
            if provider in self.open_sends:
                self.open_sends.remove(provider)
            if kind == "answered":
                self.billed = True
                urls = _strings(record.get("urls"))
                self.urls = [url for url in urls if url.startswith(("https://", "http://"))]
                self.urls_by = provider
            else:
                billed = record.get("proves") == "may be billed"
                if billed or not self.billed:
                    # Once a try may have billed the job, its words stay the reason: a later
                    # try's refusal elsewhere (failover_on_ambiguous) did not bill it.
                    self.note = str(record.get("e", ""))[:300]
                self.billed = self.billed or billed
                if record.get("over") is True:  # the provider ended the job: nothing to poll
                    self.job = None
        elif kind == "saved":
            files = _strings(record.get("files"))
            # Only plain names in the folder: a path elsewhere was not saved by this batch.
            for name in files:
                if not _plain_name(name):
                    break
            else:
                if files:
                    self.files = files

    @property
    def why_unconfirmed(self) -> str:
        """What is known of a job that may have been billed, in words."""
        if self.open_sends:
            providers = ", ".join(dict.fromkeys(self.open_sends))
            return f"it was sent to {providers} and no answer was recorded (interrupted?)"
        if self.note:
            return self.note
        return "it was answered, and no image was saved from the answer"

    @property
    def may_be_billed(self) -> bool:
        """Whether some provider may have done (and billed) the job."""
        return self.billed or bool(self.open_sends)

    def saved_files(self, folder: Path, name: str = "") -> list[str]:
        """The job's images in *folder*: those recorded as saved, if all are there and images.

        Else, given the job's *name*, an image named after it that was not there (as it is)
        when the job was accepted: a kill can come between its rename and its ``saved`` record.
        """
        if self.files and all(is_image_file(folder / file) for file in self.files):
            return self.files
        if not (name and self.may_be_billed):
            return []  # nothing was made for this job: an image named after it is not its own
        found = image_identities(folder, name)
        return [file for file, identity in found.items() if self.before.get(file) != identity]

    def verdict(self, digest: str, folder: Path, name: str = "") -> Verdict:
        """What a new run should do with this job (given its request's *digest* now).

        ``saved``: its images are on disk; ``changed``: its request is not the one the journal
        knows; ``unconfirmed``: it may have been billed and has no saved image; ``retry``: it
        was tried and provably never taken (or refused); ``new``: never sent.
        """
        return self.judged(digest, folder, name)[0]

    def judged(self, digest: str, folder: Path, name: str = "") -> tuple[Verdict, list[str]]:
        """`verdict`, with the files `saved_files` found (empty unless ``saved``).

        A rerun skips a saved job with the files it just checked, instead of opening each
        image again to name them.
        """
        if self.digest and digest != self.digest:
            return "changed", []
        files = self.saved_files(folder, name)
        if files:
            return "saved", files
        if self.may_be_billed:
            return "unconfirmed", []
        return ("retry" if self.note else "new"), []


def image_identities(folder: Path, name: str) -> dict[str, str]:
    """The images named after job *name* in *folder* (``name.png`` ...): file name -> identity.

    The identity (inode and modification time) changes when an image is renamed over the file.
    """
    found = {}
    # Plain strings: a batch asks this of every job, and three `Path`s would cost as much as the
    # three stats (pathlib parses each one and interns its new part).
    stem = os.path.join(folder, name)
    for kind in ("png", "jpeg", "webp"):
        try:
            # Asked first: for a new job's names (none there) a failed stat costs an exception.
            if not os.access(f"{stem}.{kind}", os.F_OK):
                continue
            info = os.stat(f"{stem}.{kind}")
        except (OSError, ValueError):
            continue
        file = f"{name}.{kind}"
        if stat.S_ISREG(info.st_mode) and is_image_file(folder / file):
            found[file] = f"{info.st_ino}:{info.st_mtime_ns}"
    return found


# Loops rather than all() over a generator: a journal folds four records a job.


def _is_string_map(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    for item in value.values():  # noqa: SIM110 - all() over a generator costs a call per item
        if not isinstance(item, str):
            return False
    return True


def _strings(value: object) -> list[str]:
    """*value* if it is a list of strings, else an empty list."""
    if not isinstance(value, list):
        return []
    for item in value:
        if not isinstance(item, str):
            return []
    return value


def _plain_name(name: str) -> bool:
    return (
        bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def is_image_file(path: Path) -> bool:
    """Whether *path* is a readable file holding a whole png, jpeg or webp image.

    Told from its first bytes and its last (`flux_adapters._files.image_is_whole`), not by
    decoding it. Images are written to a temporary file and renamed once complete, so a kill
    never leaves part of one under its name; a power loss can (the rename may reach the disk
    before the data), and such an image is not taken for a saved one.
    """
    from flux_adapters._files import (
        IMAGE_FORMATS,
        SNIFF_BYTES,
        TAIL_BYTES,
        image_format,
        image_is_whole,
    )

    try:
        with path.open("rb") as stream:
            head = stream.read(SNIFF_BYTES)
            if image_format(head) not in IMAGE_FORMATS:
                return False
            size = os.fstat(stream.fileno()).st_size
            stream.seek(max(size - TAIL_BYTES, 0))
            return image_is_whole(head, stream.read(TAIL_BYTES), size)
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return False


def repair_tail(fd: int) -> None:
    """Cut a partial last line (a write torn by a power loss) off the file open as *fd*."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    position = size
    while position > 0:
        start = max(0, position - 4096)
        chunk = os.pread(fd, position - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            end = start + cut + 1
            if end != size:
                os.ftruncate(fd, end)
            return
        position = start
    os.ftruncate(fd, 0)


class Busy(Exception):
    """Another process holds the file that `JsonLines` was asked to have to itself."""


def _lock(fd: int, *, exclusive: bool) -> bool:
    """Lock the file open as *fd* for this process alone; whether that was possible.

    Raises:
        Busy: *exclusive*, and another process holds a lock on the file.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no lock, and nobody to race
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if exclusive:
            raise Busy from None
        return False
    return True


def _share(fd: int) -> None:
    """Hold a shared lock on *fd*, so that a process opening it later knows it is in use."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return
    for _ in range(100):
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:  # another process is repairing it just now
            time.sleep(0.01)
    # Held exclusively for a second: the file is some batch's journal. Append unlocked.


_encode_line: Final = compiled_encoder(json.JSONEncoder(ensure_ascii=False, separators=(",", ":")))
"""How `JsonLines.encode` writes a record, made once (as `json.dumps` with these options)."""


_quote: Final = json.encoder.encode_basestring
"""How `_encode_line` writes text (``ensure_ascii=False``): the same C function where there is one."""


def _record_line(job: str, kind: str, values: dict[str, object], record: dict[str, object]) -> str:
    """Journal *record* (``{"id": job, "k": kind, **values}``) as `_encode_line` writes it.

    With its newline. The usual records (text, and lists of text) are written here directly,
    at about half the cost of the C encoder for so small an object (a batch writes four a
    job). Any other value sends the record to the encoder.
    """
    if "id" in values or "k" in values:  # one key twice: the dict keeps the last, in place
        return _encode_line(record) + "\n"
    line = f'{{"id":{_quote(job)},"k":{_quote(kind)}'
    for key, value in values.items():
        if type(value) is str:
            line += f",{_quote(key)}:{_quote(value)}"
        elif type(value) is list:
            for item in value:
                if type(item) is not str:
                    return _encode_line(record) + "\n"
            line += f",{_quote(key)}:[{','.join(map(_quote, value))}]"
        else:
            return _encode_line(record) + "\n"
    return line + "}\n"


class JsonLines:
    """An append-only JSON-lines file whose every line is whole, whatever kills the process.

    Args:
        path: The file, created if missing.
        exclusive: Hold an exclusive lock on it while it is open (raise `Busy` if another
            process has it); otherwise a shared one, which other writers may hold too.

    Raises:
        OutputError: The file cannot be opened or written.
        Busy: *exclusive*, and another process has the file open with a lock.
    """

    def __init__(self, path: Path, *, exclusive: bool = False) -> None:
        self.path = path
        self._appended = 0
        """Bytes this object appended to the file."""
        for _ in range(10):
            self._fd = self._open(path, exclusive=exclusive)
            if self._still_at(path):
                self._started_empty = os.fstat(self._fd).st_size == 0
                return
            # Replaced while its lock was awaited (a report being compacted): open the new one.
            os.close(self._fd)
        raise OutputError("keeps being replaced by another process", path=str(path))

    @staticmethod
    def _open(path: Path, *, exclusive: bool) -> int:
        # O_NONBLOCK: a FIFO in its place opens at once (and is refused) instead of hanging.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc), path=str(path)) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputError("is not a regular file", path=str(path))
            if _lock(fd, exclusive=exclusive):
                repair_tail(fd)  # no other process is writing: a partial line is torn
            if not exclusive:
                _share(fd)
        except OSError as exc:
            os.close(fd)
            raise OutputError(exc.strerror or str(exc), path=str(path)) from exc
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _still_at(self, path: Path) -> bool:
        """Whether the file open is still the one at *path*."""
        try:
            here, opened = os.stat(path), os.fstat(self._fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (opened.st_dev, opened.st_ino)

    @staticmethod
    def encode(record: dict[str, object]) -> bytes:
        """*record* as one line of JSON."""
        return (_encode_line(record) + "\n").encode()

    def write(self, data: bytes) -> None:
        """Append whole lines with one ``write`` (a kill cannot leave half of one).

        All or nothing: when the disk is full part way, the part written is cut off again. A
        caller told that the write failed must not find some of its lines there later (a
        ``sent`` record for a request that never went out would make it look billed).
        """
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                end = os.fstat(self._fd).st_size - written
                os.ftruncate(self._fd, max(end, 0))
                repair_tail(self._fd)
                raise OSError(28, "No space left on device")
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc), path=str(self.path)) from exc
        self._appended += written

    def holds_only_its_own_lines(self) -> bool:
        """Whether every line in the file is one appended here.

        It was empty when opened, and holds what was appended since and nothing else (no other
        process appended to it).
        """
        try:
            return self._started_empty and os.fstat(self._fd).st_size == self._appended
        except OSError:
            return False

    def append(self, record: dict[str, object]) -> None:
        """Append *record* as one line."""
        self.write(self.encode(record))

    def sync(self) -> None:
        """Make everything appended so far durable."""
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc), path=str(self.path)) from exc

    def fileno(self) -> int:
        """The file descriptor (for locking)."""
        return self._fd

    def close(self) -> None:
        """Close the file."""
        with contextlib.suppress(OSError):
            os.close(self._fd)


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file; a torn or unreadable line is skipped.

    Nothing but a regular file is read (a FIFO in its place would block forever).
    """
    try:
        fd = os.open(path, _READ)
    except FileNotFoundError:
        return
    stream = os.fdopen(fd, "rb")
    with stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        for line in stream:
            if not line.endswith(b"\n"):
                return  # torn by a power loss: repaired when the file is next opened
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                yield record


def _sync_directory(folder: Path) -> None:
    """Make the entries of *folder* durable (where the system can; some cannot sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # EINVAL: this file system does not sync folders
        pass
    finally:
        os.close(fd)


SHARED_MARK: Final = ".flux-shared-batch.json"
"""In a folder that a batch shared through Redis writes to: that batch's state URL (its
password hidden) and id. Its journal is in Redis, not in the folder: a batch run there without
``--state`` knows nothing of the jobs it left maybe billed with no image, and refuses the
folder (`shared_batch_in`), unless told to send those again. Removed once the batch ended with
none such."""

_MOST_MARK_BYTES: Final = 4096


def mark_shared(folder: Path, state: str, batch: str) -> int:
    """Leave `SHARED_MARK` in *folder*: a batch shared through *state* (shown) writes there.

    Returns a descriptor open on it, holding a shared lock while the worker runs (close it at
    the end): a batch run without ``--state`` finds it locked (`shared_batch_running`) and
    stays out even when told to send again the jobs left unconfirmed, which the workers are
    sending now. A mark the same batch left is kept (another worker's lock is on it).

    Raises:
        OutputError: It cannot be written (nor can the images be).
    """
    text = json.dumps({"state": state, "batch": batch}) + "\n"
    path = folder / SHARED_MARK
    partial = folder / f"{SHARED_MARK}.{os.urandom(8).hex()}.part"
    try:
        partial.write_text(text, encoding="utf-8")
        try:
            os.link(partial, path)
        except FileExistsError:
            found = shared_batch_in(folder)
            if found is None or found.get("batch") != batch or not path.is_file():
                os.replace(partial, path)
        fd = os.open(path, _READ)
    except OSError as exc:
        raise OutputError(exc.strerror or str(exc), path=str(path)) from None
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()
    _share(fd)
    return fd


def shared_batch_running(folder: Path) -> bool:
    """Whether a worker of a batch shared through Redis writes to *folder* now (`mark_shared`)."""
    return _held(folder / SHARED_MARK) is True


def _held(path: Path) -> bool | None:
    """Whether another process holds a lock on the regular file *path*; ``None``: no such file.

    Asked by taking the lock, at once released.
    """
    try:
        fd = os.open(path, _READ)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return not _lock(fd, exclusive=False)
    except OSError:
        return None
    finally:
        os.close(fd)  # (and the lock taken, if it was)


def unmark_shared(folder: Path, batch: str) -> None:
    """Remove `SHARED_MARK` from *folder* if batch *batch* left it (it ended, nothing unsettled)."""
    found = shared_batch_in(folder)
    if found is not None and found.get("batch") == batch:
        with contextlib.suppress(OSError):
            (folder / SHARED_MARK).unlink()


def shared_batch_in(folder: Path) -> dict[str, str] | None:
    """The `SHARED_MARK` in *folder* (``state``, ``batch``), if a shared batch left one.

    One that cannot be read as such (damaged, not a regular file) still says a shared batch
    wrote there: its values are then empty.
    """
    path = folder / SHARED_MARK
    try:
        fd = os.open(path, _READ)
    except FileNotFoundError:
        return None
    except OSError:
        return {"state": "", "batch": ""}
    data = None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            data = json.loads(os.read(fd, _MOST_MARK_BYTES))
    except (OSError, ValueError, RecursionError):
        pass
    finally:
        os.close(fd)
    if not isinstance(data, dict):
        return {"state": "", "batch": ""}
    return {name: str(data.get(name, ""))[:500] for name in ("state", "batch")}


def file_batch_in(folder: Path) -> tuple[bool, list[str]]:
    """What a batch run without ``--state`` left in *folder*, for a batch shared through Redis.

    Whether it is running there now (it holds its journal locked), and the jobs its journal
    knows as maybe billed with no image saved: a shared batch keeps its journal in Redis and
    does not read this one, so it would send them again. Only the jobs not saved are held
    while the journal is read.
    """
    path = folder / JOURNAL_NAME
    held = _held(path)
    if held is None:  # none
        return False, []
    if held:
        return True, []
    states: dict[str, JobState] = {}
    for record in read_lines(path):
        job = record.get("id")
        if not isinstance(job, str):
            continue
        state = states.setdefault(job, JobState())
        state.fold(record)
        if state.files and not state.open_sends and state.job is None:
            del states[job]  # saved: nothing of it is sent again (a forced rerun starts anew)
    return False, [
        name
        for name, state in states.items()
        if state.may_be_billed and not state.saved_files(folder, name)
    ]


def load_states(path: Path, jobs: Container[str] | None = None) -> dict[str, JobState]:
    """What the journal at *path* knows of each job (of *jobs* only, if given)."""
    states: dict[str, JobState] = {}
    for record in read_lines(path):
        job = record.get("id")
        if isinstance(job, str) and (jobs is None or job in jobs):
            states.setdefault(job, JobState()).fold(record)
    return states


_RECENT: Final = 256
"""States kept unpacked while a journal is read: a job's records lie close together in it."""


def _pack(state: JobState) -> bytes:
    """*state* as compact bytes (`marshal`, of this process's own making): a fifth of its size."""
    job = state.job.to_dict() if state.job is not None else None
    fields = (state.digest, state.before, state.open_sends, state.billed, state.urls, job)
    return marshal.dumps((*fields, state.files, state.note, state.urls_by))


def _unpack(packed: bytes) -> JobState:
    digest, before, open_sends, billed, urls, job, files, note, urls_by = marshal.loads(packed)
    return JobState(
        digest=digest,
        before=before,
        open_sends=open_sends,
        billed=billed,
        urls=urls,
        urls_by=urls_by,
        job=Job.from_dict(job) if job is not None else None,
        files=files,
        note=note,
    )


class EarlierStates:
    """What a journal knew of each job of earlier runs, packed (`_pack`), kept out of memory.

    Each state is written to an unnamed temporary file beside the journal as it is read; what
    stays in memory is one 8-byte slot a job in an open-addressing table (an anonymous memory
    map, as `NameSet`'s): 24 bits of the name's hash and where its state lies in the file. A
    state is read back (one ``pread``) when its job comes up, and the name stored with it is
    compared, so two names whose hashes agree are never taken for one. A rerun of 100,000
    saved jobs held about 300 bytes a job as a dict of packed states (+38 MB); this holds 8 to
    16 bytes a job (the file's pages are the system's cache, not the process's memory).

    Answers as the ``dict[str, bytes]`` it replaces does, for `Journal`: ``in``, `get`, `pop`,
    ``len``.

    Raises:
        OutputError: The temporary file cannot be made or written.
    """

    _DEAD: Final = (1 << 40) - 1
    """The place of a state taken (popped): its slot stays, so that probing goes past it."""
    _LIMIT: Final = _DEAD - 1

    def __init__(self, folder: Path) -> None:
        import tempfile

        try:
            # Unnamed where the system can (O_TMPFILE); else a dot file, unlinked at once.
            self._file = tempfile.TemporaryFile(dir=folder, prefix=".flux-earlier-")  # noqa: SIM115
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc), path=str(folder)) from exc
        self._folder = folder
        self._fd = self._file.fileno()
        self._size = 0
        """Bytes written to the file so far: where the next state goes."""
        self._slots = 1024
        self._map = zeroed(8 * self._slots)
        self._table = memoryview(self._map).cast("Q")
        self._live = 0
        self._used = 0
        """Slots holding a state or a taken one (`_DEAD`): what makes probing long."""
        self._last: tuple[str, int, bytes] | None = None
        """The job last found, its slot and state: a batch asks of one job two or three times
        in a row (`Journal.knows`, `Journal.state`, then takes it), each a read otherwise."""

    def __len__(self) -> int:
        return self._live

    def __contains__(self, job: object) -> bool:
        return isinstance(job, str) and self._find(job)[0] >= 0

    def get(self, job: str, default: None = None) -> bytes | None:
        """The packed state of *job*, if the journal knew it and it was not taken."""
        return self._find(job)[1]

    def pop(self, job: str, default: None = None) -> bytes | None:
        """`get`, and forget *job*: asked again, it is unknown."""
        slot, packed = self._find(job)
        if slot >= 0:
            self._table[slot] |= self._DEAD
            self._live -= 1
            self._last = None
        return packed

    def add(self, job: str, packed: bytes) -> None:
        """Keep *packed* as *job*'s state (a job not in the table, or taken from it)."""
        self._last = None
        blob = marshal.dumps((job, packed))
        place = self._size
        if place + 4 + len(blob) > self._LIMIT:
            raise OutputError("too many earlier states to hold", path=str(self._folder))
        data = len(blob).to_bytes(4, "little") + blob
        try:
            written = os.pwrite(self._fd, data, place)
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc), path=str(self._folder)) from exc
        if written != len(data):
            raise OutputError("No space left on device", path=str(self._folder))
        self._size += len(data)
        if (self._used + 1) * 4 > self._slots * 3:
            # Doubled when half of it is states; else made again at its size without the taken
            # ones (a journal whose jobs were each taken and put back holds more of those).
            self._rebuild(self._slots * 2 if (self._live + 1) * 2 > self._slots else self._slots)
        tag, slot = self._start(job)
        table, mask = self._table, self._slots - 1
        while table[slot]:
            slot = (slot + 1) & mask
        table[slot] = (tag << 40) | place
        self._live += 1
        self._used += 1

    def close(self) -> None:
        """Give back the table and remove the file."""
        self._table.release()
        self._map.close()
        self._file.close()

    def _start(self, job: str) -> tuple[int, int]:
        """*job*'s tag (the top 24 bits of its hash, never 0) and first slot.

        The first slot is the tag's top bits while the table has at most 2**24 slots, so that
        growing it never reads a state back to place it again; beyond that, the hash's low bits.
        """
        hashed = self._hash(job)
        tag = (hashed >> 40) or 1
        return tag, self._first(tag, hashed)

    @staticmethod
    def _hash(job: str) -> int:
        """64 bits of *job*'s hash (this process's: the table lives and dies with it)."""
        return hash(job) & 0xFFFFFFFFFFFFFFFF

    def _first(self, tag: int, hashed: int) -> int:
        bits = self._slots.bit_length() - 1
        return tag >> (24 - bits) if bits <= 24 else hashed & (self._slots - 1)

    def _find(self, job: str) -> tuple[int, bytes | None]:
        """The slot of *job*'s live state and the state, or ``(-1, None)``."""
        if not self._live:
            return -1, None
        last = self._last
        if last is not None and last[0] == job:
            return last[1], last[2]
        tag, slot = self._start(job)
        table, mask = self._table, self._slots - 1
        while value := table[slot]:
            place = value & self._DEAD
            if value >> 40 == tag and place != self._DEAD:
                name, packed = self._read(place)
                if name == job:
                    self._last = (job, slot, packed)
                    return slot, packed
            slot = (slot + 1) & mask
        return -1, None

    def _read(self, place: int) -> tuple[str, bytes]:
        try:
            head = os.pread(self._fd, 512, place)
            size = int.from_bytes(head[:4], "little")
            if size + 4 > len(head):
                head += os.pread(self._fd, size + 4 - len(head), place + len(head))
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc), path=str(self._folder)) from exc
        name, packed = marshal.loads(head[4 : 4 + size])
        return name, packed

    def held(self) -> dict[str, bytes]:
        """Every live state, read back into a dict (what it replaces).

        Raises:
            OutputError: The file cannot be read.
        """
        return {
            name: packed
            for value in self._table
            if value and value & self._DEAD != self._DEAD
            for name, packed in [self._read(value & self._DEAD)]
        }

    @property
    def table_bytes(self) -> int:
        """The bytes its table takes in memory."""
        return len(self._map)

    def _rebuild(self, slots: int) -> None:
        self._last = None
        old, old_map = self._table, self._map
        self._slots = slots
        self._map = zeroed(8 * self._slots)
        table, mask = memoryview(self._map).cast("Q"), self._slots - 1
        for value in old:
            place = value & self._DEAD
            if value and place != self._DEAD:  # taken states are left behind
                tag = value >> 40
                # Beyond 2**24 slots (12 million jobs and more) the tag no longer places it.
                large = self._slots > 1 << 24
                hashed = self._hash(self._read(place)[0]) if large else 0
                slot = self._first(tag, hashed)
                while table[slot]:
                    slot = (slot + 1) & mask
                table[slot] = value
        self._table, self._used = table, self._live
        old.release()
        old_map.close()


def zeroed(size: int) -> mmap.mmap:
    """*size* bytes of zeros, private to this process, given back to the system when closed."""
    if hasattr(mmap, "MAP_PRIVATE"):
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    return mmap.mmap(-1, size)  # pragma: no cover - Windows: an anonymous map is private


def load_packed(path: Path) -> EarlierStates | dict[str, bytes]:
    """`load_states` of every job, each state packed (`_pack`) as soon as its records are read.

    Kept in an `EarlierStates` beside the journal (an empty dict when the journal knows no
    job: a first run asks nothing of it); in a dict when no file can be made or written there
    (a disk full, a folder that takes no new file while its journal is writable), as before. A rerun of 100,000 jobs holds what the journal knows
    of each until the job is taken up: as `JobState` objects that was about 800 bytes a job;
    packed, in a dict, about 300; in an `EarlierStates`, 8 to 16 bytes. Only the `_RECENT` jobs
    last read are held unpacked meanwhile.

    Raises:
        OutputError: The states written beside the journal cannot be read back.
    """
    packed: EarlierStates | dict[str, bytes] | None = None
    recent: collections.OrderedDict[str, JobState] = collections.OrderedDict()

    def keep(job: str, state: JobState) -> None:
        nonlocal packed
        data = _pack(state)
        if isinstance(packed, dict):
            packed[job] = data
            return
        try:
            if packed is None:
                packed = EarlierStates(path.parent)
            packed.add(job, data)
        except OutputError:
            # No room beside the journal: in memory, as before (a rerun is not refused for it).
            held = packed.held() if isinstance(packed, EarlierStates) else {}
            if isinstance(packed, EarlierStates):
                packed.close()
            held[job] = data
            packed = held

    try:
        for record in read_lines(path):
            job = record.get("id")
            if not isinstance(job, str):
                continue
            state = recent.pop(job, None)
            if state is None:
                earlier = packed.pop(job, None) if packed is not None else None
                state = _unpack(earlier) if earlier is not None else JobState()
            state.fold(record)
            recent[job] = state
            if len(recent) > _RECENT:
                keep(*recent.popitem(last=False))
        for job, state in recent.items():
            keep(job, state)
    except BaseException:
        if isinstance(packed, EarlierStates):
            packed.close()
        raise
    return packed if packed is not None else {}


class ReportLines(JsonLines):
    r"""A batch's report: `JsonLines` whose lines may name paths whose bytes are not UTF-8.

    Python decodes such a path (an output folder named ``shots\xff``) to a lone surrogate,
    which cannot be written as UTF-8: the first report line naming a saved image stopped the
    batch. Here it is escaped (``\udcff``), which is JSON and reads back to the same path.
    """

    @staticmethod
    def encode(record: dict[str, object]) -> bytes:
        """*record* as one line of JSON, in UTF-8."""
        line = _encode_line(record) + "\n"
        try:
            return line.encode()
        except UnicodeEncodeError:
            return escape_surrogates(line).encode()


class Journal:
    """The journal of the batch writing to one folder; see the module docstring.

    Args:
        folder: The batch's output folder; the journal is ``<folder>/.flux-journal.jsonl``.

    Raises:
        ConfigurationError: Another process has the journal open.
        OutputError: It cannot be created or written.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        path = folder / JOURNAL_NAME
        try:
            # Refuses anything but a regular file, and locks it before repairing or reading it.
            self._lines = JsonLines(path, exclusive=True)
        except Busy:
            raise ConfigurationError(
                f"another batch is writing to {folder} (its journal is locked); wait for it or "
                "choose another output folder"
            ) from None
        try:
            earlier = load_packed(path)
        except BaseException:
            self._lines.close()
            raise
        self._earlier = earlier
        """What the journal knew, when it was opened, of each job not taken up since (packed)."""
        self.states: dict[str, JobState | list[dict[str, object]]] = {}
        """The jobs taken up in this run and not ended yet (forgotten when they end): what is
        known of each, or, for a job no earlier run knew, its records so far, folded into its
        state only if it is asked for (`state`): a job that goes well never is."""
        self._entry_durable = False
        """Whether the journal's own directory entry (and its folder's) has been synced."""
        self._unwritten: list[bytes] = []
        """Records noted and not written yet: written together at the next turn of the loop."""
        self._write_soon: asyncio.Handle | None = None
        self._unwritten_waiters: list[asyncio.Future[None]] = []
        """A waiter for each of those records that must be durable before its job goes on."""
        self._written = 0
        """Writes made so far that some caller waits to see synced (numbered from 1)."""
        self._unsynced: collections.deque[tuple[int, list[asyncio.Future[None]]]] = (
            collections.deque()
        )
        """The waiters of each such write not yet covered by an fsync, by its number."""
        self._syncer: _Syncer | None = None

    def knows(self, job: str) -> bool:
        """Whether the journal has a record of *job*."""
        return job in self.states or job in self._earlier

    def state(self, job: str) -> JobState:
        """What is known of *job* (an empty state for a new one).

        For a job of an earlier run not taken up yet in this one, a copy: what is noted of the
        job (`note`) is folded into the journal's own.
        """
        known = self.states.get(job)
        if type(known) is list:
            state = JobState()
            for record in known:
                state.fold(record)
            self.states[job] = state
            return state
        if known is not None:
            return known  # type: ignore[return-value]  # a JobState
        earlier = self._earlier.get(job)
        return _unpack(earlier) if earlier is not None else JobState()

    def forget(self, job: str) -> None:
        """Drop what is known of *job* from memory (it has ended; the file keeps its records).

        A batch of a million jobs then holds the states of the jobs in flight only, and of the
        jobs of earlier runs not taken up yet.
        """
        self.states.pop(job, None)
        self._earlier.pop(job, None)

    def note(self, job: str, kind: str, /, **values: object) -> None:
        """Record something that need not be durable before the next step.

        It is written at the next turn of the event loop, with every record noted meanwhile (one
        ``write``: a kill does not tear it), and made durable by the next ``fsync``.
        """
        record: dict[str, object] = {"id": job, "k": kind, **values}
        known = self.states.get(job)
        if type(known) is list:
            known.append(record)
        elif known is not None:
            known.fold(record)  # type: ignore[union-attr]  # a JobState
        else:  # taken up now: what earlier runs knew of it, if anything
            earlier = self._earlier.pop(job, None)
            if earlier is None:
                self.states[job] = [record]
            else:
                state = _unpack(earlier)
                state.fold(record)
                self.states[job] = state
        self._unwritten.append(_record_line(job, kind, values, record).encode())
        if self._write_soon is None:
            self._write_soon = asyncio.get_running_loop().call_soon(self._write_now)

    async def durable(self, job: str, kind: str, /, **values: object) -> None:
        """Record something, and return once it (and all noted before it) is on disk.

        Group commit: the record is written at the next turn of the event loop, with every
        record noted meanwhile, and one ``fsync`` in a worker thread covers every record written
        while the previous ``fsync`` ran, so the event loop never waits for the disk and jobs in
        flight share few ``fsync`` calls. An ``fsync`` counts for a record only when it started
        after the record was written.

        Raises:
            OutputError: The record could not be written or synced.
        """
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.note(job, kind, **values)
        self._unwritten_waiters.append(waiter)
        # Awaited as it is (no shield): a caller cancelled meanwhile cancels its own waiter,
        # which the write and the fsync then pass over (they never set a done waiter), so no
        # error is ever left unretrieved.
        await waiter

    def _write_now(self) -> None:
        """Write the records noted so far with one ``write``, then have them synced if awaited.

        A write that fails leaves none of its records in the file (`JsonLines.write`); the
        callers waiting for one of them hear of it, the others' records are lost, as they would
        be to a kill.
        """
        if self._write_soon is not None:
            self._write_soon.cancel()
            self._write_soon = None
        data, self._unwritten = b"".join(self._unwritten), []
        waiters, self._unwritten_waiters = self._unwritten_waiters, []
        if not data:
            return
        try:
            self._lines.write(data)
        except OutputError as error:
            _fail(waiters, error)
            return
        if waiters:
            self._written += 1
            self._unsynced.append((self._written, waiters))
            self._sync_through(self._written)

    def _sync_through(self, written: int) -> None:
        """Have the syncer cover the writes up to number *written* with an fsync begun later."""
        if self._syncer is None:
            self._syncer = _Syncer(self._sync, asyncio.get_running_loop(), self._synced)
        self._syncer.want(written)

    def _synced(self, written: int, failure: Exception | None) -> None:
        """The writes up to number *written* are durable (or their fsync failed): tell waiters."""
        while self._unsynced and self._unsynced[0][0] <= written:
            _, waiters = self._unsynced.popleft()
            if failure is None:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            else:  # every waiter must hear of it, or it waits forever
                _fail(
                    waiters,
                    failure
                    if isinstance(failure, OutputError)
                    else OutputError(
                        f"the journal could not be synced ({type(failure).__name__})",
                        path=str(self._lines.path),
                    ),
                )

    def _sync(self) -> None:
        self._lines.sync()
        if not self._entry_durable:
            # An fsync of a new file does not make its name durable: after a power loss the
            # journal (or the folder just made for it) could be gone, with the jobs it recorded
            # as sent. Its folder, and that folder's parent, are synced once.
            _sync_directory(self.folder)
            _sync_directory(self.folder.absolute().parent)
            self._entry_durable = True

    async def close(self) -> None:
        """Write and sync what is pending, then close."""
        self._write_now()
        last: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._written += 1  # one more fsync: it covers the records noted without a waiter too
        self._unsynced.append((self._written, [last]))
        try:
            self._sync_through(self._written)
            with contextlib.suppress(OutputError):
                await last
        finally:
            if self._syncer is not None:
                self._syncer.stop()
            self._lines.close()
            if isinstance(self._earlier, EarlierStates):
                self._earlier.close()


class _Syncer:
    """The thread that makes a journal's writes durable: one ``fsync`` after another.

    Each ``fsync`` covers every write numbered up to what was wanted when it began (`want`, called
    after the write). One thread for the batch, not a worker of the loop's pool per ``fsync``:
    waking a sleeping thread costs more than the ``fsync`` of a few records on some machines (100
    to 200 us on a 2-core VM), and a thread that finds more writes wanted when an ``fsync`` ends
    goes on at once, with no wake. Its results go back to the loop (`call_soon_threadsafe`).

    What is wanted reaches it through a `queue.SimpleQueue` (one call in C each way), not a
    `threading.Condition`, whose Python code held the GIL both threads take turns at.
    """

    def __init__(
        self,
        sync: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        synced: Callable[[int, Exception | None], None],
    ) -> None:
        self._sync = sync
        self._loop = loop
        self._synced = synced
        self._wants: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        """The numbers of the writes wanted synced, in order; ``None``: stop after them."""
        self._thread = threading.Thread(target=self._run, name="flux-journal-fsync", daemon=True)
        self._thread.start()

    def want(self, written: int) -> None:
        """Cover the writes up to number *written* (already written) with an fsync."""
        self._wants.put(written)

    def stop(self) -> None:
        """End the thread once the fsyncs wanted are done (at once if none is)."""
        self._wants.put(None)
        self._thread.join()

    def _run(self) -> None:
        wants, done = self._wants, 0
        while True:
            wanted = wants.get()
            stopping = wanted is None
            covered = done if wanted is None else wanted
            while not wants.empty():  # wanted meanwhile: one fsync, begun now, covers them all
                wanted = wants.get()
                if wanted is None:
                    stopping = True
                else:
                    covered = wanted
            if covered > done:
                failure: Exception | None = None
                try:
                    self._sync()
                except Exception as exc:  # the waiters hear of it, typed
                    failure = exc
                done = covered
                try:
                    self._loop.call_soon_threadsafe(self._synced, covered, failure)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    return
            if stopping:
                return


def _fail(waiters: list[asyncio.Future[None]], error: OutputError) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(error)
