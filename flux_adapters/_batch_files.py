"""The files of ``flux-adapters batch``: the JSONL file of requests, and the JSONL report.

Each line of the request file is a JSON object whose shape (its keys, and the JSON type of each
value) is structured by `flux_adapters._schema`: an unknown key, a missing prompt or a number
written as a string make the line malformed, and one malformed line refuses the whole file
before anything is sent. What the values mean (sizes, model ids, image files, provider limits)
is each request's own check, when it is built and sent.

Image paths in a line are read relative to the folder of the request file, so the file works
from any working directory; absolute paths, URLs and data URLs are taken as they are.

The report gets one line per job as each job ends (appended: a crash keeps every line
written); at the end of a run it is rewritten with one line per job (`compact_report`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

from attrs import field, frozen

from flux_adapters import _schema
from flux_adapters.errors import RequestError, Violation

if TYPE_CHECKING:
    from flux_adapters.request import EditRequest

__all__ = [
    "URL_PREFIXES",
    "BatchLine",
    "ChosenLines",
    "build_request",
    "check_file",
    "compact_report",
    "image_source",
    "is_url",
    "parse_line",
    "read_lines",
    "requests",
    "structure_line",
]

URL_PREFIXES: Final = ("http://", "https://", "data:")


def is_url(text: str) -> bool:
    """Whether *text* is a URL or data URL rather than a path.

    As `EditRequest` tells them apart: by the scheme in any case (``HTTPS://`` is https, RFC 3986
    section 3.1).
    """
    return text[:8].lower().startswith(URL_PREFIXES)


@frozen(kw_only=True)
class BatchLine:
    """One line of a batch file, as JSON types; the fields of `EditRequest` and an ``id``."""

    prompt: str
    id: str | int | None = field(
        default=None, metadata={"expected": "a file name (text) or a whole number"}
    )
    model: str = "flux-2-pro"  # _DEFAULT_MODEL
    images: list[str] = field(
        factory=list, metadata={"expected": "a list of paths or URLs (strings)"}
    )
    width: int | None = None
    height: int | None = None
    size: str | None = field(default=None, metadata={"expected": 'text such as "1024x768"'})
    aspect_ratio: str | None = field(default=None, metadata={"expected": 'text such as "16:9"'})
    seed: int | None = None
    output_format: str | None = field(
        default=None, metadata={"expected": '"jpeg", "png" or "webp"'}
    )
    safety_tolerance: int | None = None
    prompt_upsampling: bool | None = None
    steps: int | None = None
    guidance: float | None = None
    allow_conversions: bool | None = None

    def name(self, number: int) -> str:
        """The job's id: its ``id``, else its line number."""
        return str(self.id) if self.id is not None else str(number)


def read_lines(path: Path) -> Iterator[tuple[int, dict[str, object] | str]]:
    """Each non-blank line of the JSONL file: its number and its object, or what is wrong.

    Raises:
        RequestError: It cannot be read, or is no longer a regular file (it was replaced since
            the command started: a FIFO in its place is not waited on).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RequestError(
            [Violation("file", reason, "a readable JSONL file", str(path))]
        ) from None
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            violation = Violation("file", "is not a regular file", "a JSONL file", str(path))
            raise RequestError([violation])
        for number, raw in enumerate(stream, start=1):
            if raw.strip():
                yield number, parse_line(raw)


def parse_line(raw: bytes) -> dict[str, object] | str:
    """One non-blank line of a JSONL file: its object, or what is wrong with it."""
    # The usual line, an object in UTF-8 (a first byte "{" and a second that is not NUL is what
    # json.detect_encoding calls UTF-8), read by the decoder's scanner directly; anything else,
    # or anything the scanner does not take, the way json.loads reads it, for its message.
    if raw[:1] == b"{" and raw[1:2] != b"\0":
        try:
            text = raw.decode("utf-8", "surrogatepass")
            item, end = _SCAN(text, 0)
        except Exception:  # read again below, for what is wrong
            pass
        else:
            if not text[end:].strip(_JSON_SPACE) and isinstance(item, dict):
                return item
    return _parse_line(raw)


def _parse_line(raw: bytes) -> dict[str, object] | str:
    try:
        # What json.loads(raw, object_pairs_hook=_unique_keys) does, with one decoder for all.
        item = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except _RepeatedKey as exc:
        return f"{exc.args[0]!r} given twice: which one is meant is a guess"
    except (ValueError, RecursionError) as exc:
        return f"not JSON ({str(exc)[:80]})"
    return item if isinstance(item, dict) else "must be a JSON object"


class _RepeatedKey(Exception):
    """A key given twice in one JSON object (internal to `read_lines`)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads keeps the last of two equal keys, silently: {"prompt": "a", "prompt": "b"}.
    found = dict(pairs)
    if len(found) != len(pairs):  # the first key given again, named
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key[:40])
            seen.add(key)
    return found


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_unique_keys)
_SCAN: Final[Callable[[str, int], tuple[object, int]]] = _DECODER.scan_once  # type: ignore[attr-defined]
_JSON_SPACE: Final = " \t\n\r"
"""What JSON takes as white space around a value (`str.strip` alone takes more)."""


def structure_line(where: str, item: dict[str, object] | str) -> BatchLine | list[Violation]:
    """The line as a `BatchLine`, or a violation (named *where*, ``file:line``) per problem."""
    from flux_adapters._schema import Unstructured, structure

    if isinstance(item, str):
        return [Violation(where, item, "a JSON object per line", "line")]
    try:
        return structure(item, BatchLine)
    except Unstructured as error:
        found = []
        for problem in error.problems:
            if problem.kind == "unknown":
                found.append(Violation(where, "unknown fields", problem.expected, problem.value))
            elif problem.kind == "missing":
                required = f"required ({problem.expected})"
                found.append(Violation(where, f"{problem.field} is missing", required, "nothing"))
            else:
                message = f"{problem.field} must be {problem.expected}"
                found.append(Violation(where, message, problem.expected, problem.value))
        return found


def check_file(path: Path) -> int:
    """Check the whole file before anything is sent; return how many requests it holds.

    Raises:
        RequestError: Lines that are not JSON objects of the right shape, or whose id is
            missing, unsafe or repeated (every one, with its line number).
    """
    from flux_adapters._batch import NameSet, _name_problem, file_key

    problems: list[Violation] = []
    seen = NameSet()  # a digest per line, not its id: about 32 MB for a million lines, not 90
    count = 0
    file_name = path.name
    for number, item in read_lines(path):
        count += 1
        where = f"{file_name}:{number}"
        if isinstance(item, dict) and _schema.fits(item, BatchLine):
            given = item.get("id")  # as BatchLine.name has it, without making the BatchLine
            name = str(given) if given is not None else str(number)
        else:
            line = structure_line(where, item)
            if isinstance(line, list):
                problems += line
                given = item.get("id", number) if isinstance(item, dict) else None
                if type(given) not in (str, int):
                    continue  # no id to check (its type is among the problems)
                name = str(given)
            else:
                name = line.name(number)
        # Two ids that differ only in case or normalisation are one file on macOS (file_key).
        trouble = _name_problem(name) or ("" if seen.add(file_key(name)) else "is used twice")
        if trouble:
            problems.append(Violation(where, f"id {trouble}", "a unique file name", name))
    if problems:
        raise RequestError(problems)
    return count


def image_source(text: str, folder: Path) -> str | Path:
    """An image of a line: a URL or data URL as it is; a path, relative to *folder*."""
    if is_url(text):
        return text
    given = Path(text)
    return given if given.is_absolute() else folder / given


def requests(
    path: Path, refused: Callable[[str, RequestError], None]
) -> Iterator[tuple[str, EditRequest]]:
    """The requests of a checked file, read lazily; a line that cannot be one is *refused*.

    Lines were checked by `check_file`, but lines added or edited since then are checked here.
    """
    folder, file_name = path.parent, path.name
    for number, item in read_lines(path):
        name, request = build_request(file_name, folder, number, item)
        if isinstance(request, RequestError):
            refused(name, request)
        else:
            yield name, request


def build_request(
    file_name: str, folder: Path, number: int, item: dict[str, object] | str
) -> tuple[str, EditRequest | RequestError]:
    """The job of line *number* (as `read_lines` gives it): its name, and its request or why not."""
    from flux_adapters.request import EditRequest

    if isinstance(item, dict) and _schema.fits(item, BatchLine):
        # The values a BatchLine would hold (its defaults for the keys not given), read from
        # the line itself: a BatchLine made only to be read again costs as much as the check.
        get = item.get
        given = get("id")
        name = str(given) if given is not None else str(number)
        prompt, model = item["prompt"], get("model", _DEFAULT_MODEL)
        images: Iterable[object] = get("images", ())  # type: ignore[assignment]
        allow_conversions = get("allow_conversions")
        settings = {key: get(key) for key in _SETTINGS}
    else:
        line = structure_line(f"{file_name}:{number}", item)
        if isinstance(line, list):
            name = str(item.get("id", number)) if isinstance(item, dict) else str(number)
            return name, RequestError(line)
        name = line.name(number)
        prompt, model, images = line.prompt, line.model, line.images
        allow_conversions = line.allow_conversions
        settings = dict(zip(_SETTINGS, _settings_of(line), strict=True))
    try:
        return name, EditRequest(
            prompt=prompt,  # type: ignore[arg-type]  # a str: fits() or BatchLine says so
            model=model,  # type: ignore[arg-type]  # EditRequest checks it
            images=[image_source(image, folder) for image in images],  # type: ignore[arg-type]
            allow_conversions=bool(allow_conversions),
            **settings,  # type: ignore[arg-type]
        )
    except RequestError as error:
        return name, error


_SETTINGS: Final = (
    "width", "height", "size", "aspect_ratio", "seed", "output_format", "safety_tolerance",
    "prompt_upsampling", "steps", "guidance",
)  # fmt: skip
"""The fields of a line passed to `EditRequest` as they are."""
_settings_of: Final = operator.attrgetter(*_SETTINGS)
_DEFAULT_MODEL: Final = "flux-2-pro"
"""`BatchLine.model` when a line does not give one."""


_SKIPPED: Final = "skipped"


def compact_report(path: Path) -> bool:
    """Rewrite the report at *path* with one line per job; whether it was rewritten.

    A job's line is its latest, except that a ``skipped`` line (nothing was done) does not
    replace an earlier one, which says how the job was done. Each job keeps the place of its
    first line; lines without an id are kept as they are. The new file replaces the old one
    atomically, so a crash leaves one or the other whole (and its temporary file, which the
    next call removes). Nothing is done while another process
    has the report open (it holds a lock on it), or when no job has two lines.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not _lock_alone(fd):
            return False
        target = Path(os.path.realpath(path))
        _remove_stale_temporaries(target)
        if not _may_repeat_an_id(stream):  # a first run's report: no id is held in memory
            return False
        stream.seek(0)
        chosen = ChosenLines()
        """Each id's line to keep: its offset, length, and whether it is a skipped one."""
        try:
            offset, repeated = 0, False
            for raw in stream:
                job, status = _id_and_status(raw)
                if job is not None:
                    repeated = chosen.offer(job, offset, len(raw), status == _SKIPPED) or repeated
                offset += len(raw)
            if not repeated:
                return False
            temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
            try:
                with open(temporary, "xb") as out:
                    os.fchmod(out.fileno(), stat.S_IMODE(os.fstat(fd).st_mode))
                    stream.seek(0)
                    for raw in stream:
                        job, _ = _id_and_status(raw)
                        if job is None:
                            out.write(raw)
                        else:
                            line = chosen.take(job)  # None: its line is written already
                            if line is not None:
                                out.write(os.pread(fd, line[1], line[0]))
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, target)
            except OSError:
                with contextlib.suppress(OSError):
                    temporary.unlink()
                return False
        finally:
            chosen.close()
    from flux_adapters._journal import _sync_directory

    _sync_directory(target.parent)
    return True


class ChosenLines:
    """Which line of a report to keep for each id, while it is compacted (`compact_report`).

    One open-addressing table in an anonymous memory map (as `flux_adapters._batch.NameSet`),
    32 bytes a slot: the id's 16-byte BLAKE2b digest (the odds of two ids taken for one are
    those `NameSet` lives with), the offset of the line to keep, its length, whether it is a
    ``skipped`` line, and whether it was written. A dict of ids and tuples took about 200 bytes
    an id, and a set of those written as many again: a rerun of 100,000 saved jobs peaked 25 MB
    higher at its report's compaction than while it ran; the table takes 4 to 8 MB (at most
    four fifths full), given back when closed.
    """

    _WIDTH: Final = 32
    _EMPTY: Final = bytes(16)

    def __init__(self) -> None:
        from flux_adapters._journal import zeroed

        self._zeroed = zeroed
        self._slots = 1024
        self._map = zeroed(self._WIDTH * self._slots)
        self._words = memoryview(self._map).cast("Q")
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def offer(self, job: str, offset: int, length: int, skipped: bool) -> bool:
        """A line of *job* at *offset*; whether the job had one before.

        It becomes the one kept, unless the one kept so far says how the job was done and this
        one is a ``skipped`` one (nothing was done).
        """
        slot, known = self._slot(job)
        words = self._words
        if not known or words[slot * 4 + 3] & 2 or not skipped:
            words[slot * 4 + 2] = offset
            words[slot * 4 + 3] = length << 2 | (2 if skipped else 0)
        return known

    def take(self, job: str) -> tuple[int, int] | None:
        """The offset and length of the line kept for *job*, the first time it is asked."""
        slot, known = self._slot(job, add=False)
        words = self._words
        if not known or words[slot * 4 + 3] & 1:
            return None
        words[slot * 4 + 3] |= 1
        return words[slot * 4 + 2], words[slot * 4 + 3] >> 2

    def close(self) -> None:
        """Give the table back to the system."""
        self._words.release()
        self._map.close()

    def _slot(self, job: str, *, add: bool = True) -> tuple[int, bool]:
        """The slot of *job*, and whether it was there (if not and *add*, it is now)."""
        key = hashlib.blake2b(job.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if key == self._EMPTY:  # the all-zero digest marks a free slot
            key = b"\1" + key[1:]
        if add and (self._count + 1) * 5 > self._slots * 4:
            self._grow()
        table, width, mask = self._map, self._WIDTH, self._slots - 1
        slot = int.from_bytes(key[:8], "little") & mask
        while True:
            start = slot * width
            found = table[start : start + 16]
            if found == key:
                return slot, True
            if found == self._EMPTY:
                if add:
                    table[start : start + 16] = key
                    self._count += 1
                return slot, False
            slot = (slot + 1) & mask

    def _grow(self) -> None:
        old, old_words, width = self._map, self._words, self._WIDTH
        self._slots *= 2
        table, mask = self._zeroed(width * self._slots), self._slots - 1
        for start in range(0, len(old), width):
            key = old[start : start + 16]
            if key != self._EMPTY:
                slot = int.from_bytes(key[:8], "little") & mask
                while table[slot * width : slot * width + 16] != self._EMPTY:
                    slot = (slot + 1) & mask
                table[slot * width : (slot + 1) * width] = old[start : start + width]
        old_words.release()
        old.close()
        self._map, self._words = table, memoryview(table).cast("Q")


def _remove_stale_temporaries(target: Path) -> None:
    """Remove the temporary files of compactions of *target* that were killed before the end.

    Called with the report's lock held: no other compaction of it is under way, so any such
    file is left over (a SIGKILL or power loss between creating it and renaming it).
    """
    prefix = f".{target.name}."
    # One entry at a time: the report is often in a batch's output folder, beside 100,000
    # images (Path.glob lists a folder whole: 17 MB of entries at the end of such a batch).
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        for entry in entries:
            name = entry.name
            if (
                name.startswith(prefix)
                and name.endswith(".tmp")
                and re.fullmatch(r"[0-9a-f]{8}", name[len(prefix) : -len(".tmp")])
            ):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _may_repeat_an_id(lines: Iterable[bytes]) -> bool:
    """Whether some id may have two of these report lines (the caller checks exactly)."""
    from flux_adapters._batch import NameSet

    seen = NameSet(digest_size=8)  # a false match only costs the exact pass that follows
    for raw in lines:
        job, _ = _id_and_status(raw)
        if job is not None and not seen.add(job):
            return True
    return False


def _id_and_status(raw: bytes) -> tuple[str | None, str]:
    if not raw.endswith(b"\n"):
        return None, ""  # a torn last line: kept as it is, repaired when the file is next opened
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None, ""
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        return None, ""
    status = record.get("status")
    return record["id"], status if isinstance(status, str) else ""


def _lock_alone(fd: int) -> bool:
    """Lock the file open as *fd* for this process alone (held until it is closed).

    The journal's lock, except that any failure to take it (not only another holder) means
    "leave the report alone".
    """
    from flux_adapters._journal import _lock

    try:
        return _lock(fd, exclusive=False)
    except OSError:
        return False
