"""Faults the emulator can inject, and its records of calls received and jobs billed.

No server imports here: the conformance scenarios and the command line build faults without the
``emulator`` extra installed.
"""

from __future__ import annotations

from typing import Final

from attrs import define, frozen

__all__ = ["Billed", "Call", "Fault"]

GARBAGE_BODIES: Final = frozenset({"malformed", "empty", "bad-b64", "nested", "html"})
"""``Fault.body`` values that replace the answer with a 200 a client must not accept."""
BODIES: Final = GARBAGE_BODIES | {"b64"}
"""Every ``Fault.body`` value; ``"b64"`` is a success, with the image inline."""
DOWNLOADS: Final = frozenset({"html", "empty", "redirect", "redirect-loop", "not-image", "drip"})
"""Every ``Fault.download`` value."""


@frozen(kw_only=True)
class Fault:
    """A misbehaviour to inject into one provider's answers.

    A fault either replaces the answer (``status``, ``drop``, a garbage ``body``,
    ``moderation``: at most one of them) or changes how a success is delivered (``delay``,
    ``drip``, ``body="b64"``, ``download``). By default a replacing fault answers before any work,
    so nothing is billed; with ``after_work`` the job is validated, rendered and billed first.

    Attributes:
        status: Answer with this HTTP status instead (429, 402, 500, 502, 503, 504, ...), with a
            body in the provider's style (502 and 504 as a gateway's HTML page).
        retry_after: Seconds for a ``Retry-After`` header (with 429 by default 1); needs ``status``.
        delay: Seconds to wait before answering (or before the other misbehaviour).
        drop: Send the status line and headers, then cut the connection.
        body: A 200 that is not the documented shape: ``"malformed"`` (cut-off JSON), ``"empty"``,
            ``"bad-b64"`` (``data[0].b64_json`` that is not base64), ``"nested"`` (JSON nested
            100,000 levels deep), ``"html"`` (a ``text/html`` page); or ``"b64"``: a success
            with the image inline (``b64_json``) instead of a URL.
        moderation: Answer as the provider's content filter does.
        after_work: Do the job first (validate, render, bill), then send the fault's answer
            instead of the success: the provider took the money and the client got an error.
        download: Make the result URL of this job misbehave (the POST succeeds and is billed):
            ``"html"`` (a 200 HTML page), ``"empty"`` (a 200 without a body), ``"redirect"`` (302 to
            an HTML page), ``"redirect-loop"`` (302 to itself), ``"not-image"`` (a 200 with the
            image's content type and bytes that are no image), ``"drip"`` (the image one byte
            every ``drip`` seconds).
        drip: Send the answer's body one byte every this many seconds, after the headers; with
            ``download="drip"`` the download drips instead and the POST answer does not.
        chance: Apply to each call with this probability (drawn from the emulator's ``seed``).
        first: Apply only the first N times, then answer normally; ``None`` for every call.
    """

    status: int | None = None
    retry_after: float | None = None
    delay: float = 0.0
    drop: bool = False
    body: str | None = None
    moderation: bool = False
    after_work: bool = False
    download: str | None = None
    drip: float = 0.0
    chance: float = 1.0
    first: int | None = None

    def __attrs_post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError(f"invalid fault: {'; '.join(problems)}")

    def _problems(self) -> list[str]:
        problems: list[str] = []
        if self.status is not None and not 100 <= self.status <= 599:
            problems.append(f"status {self.status} is not an HTTP status")
        if self.body is not None and self.body not in BODIES:
            problems.append(f"body {self.body!r} is not one of {', '.join(sorted(BODIES))}")
        if self.download is not None and self.download not in DOWNLOADS:
            problems.append(
                f"download {self.download!r} is not one of {', '.join(sorted(DOWNLOADS))}"
            )
        # `not 0 <= x <= ...` also refuses NaN; a day is far past any test's patience.
        for name in ("delay", "drip", "retry_after"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 86_400:
                problems.append(f"{name} must be from 0 to 86400 seconds; got {value}")
        if not 0 <= self.chance <= 1:
            problems.append(f"chance must be from 0 to 1; got {self.chance}")
        if self.first is not None and self.first < 0:
            problems.append(f"first must be at least 0; got {self.first}")
        answers = self._replacements()
        if len(answers) > 1:
            problems.append(f"{' and '.join(answers)} each replace the answer; pick one")
        if self.retry_after is not None and self.status is None:
            problems.append("retry_after needs a status")
        if self.after_work and not answers:
            problems.append("after_work needs an answer to send after the work (status, ...)")
        if self.download is not None and (answers or self.body == "b64"):
            problems.append("download needs the POST to answer with a result URL")
        if self.download == "drip" and not self.drip:
            problems.append('download="drip" needs drip (seconds per byte)')
        if self.drop and self.drip:
            problems.append("drop sends no body to drip")
        return problems

    def _replacements(self) -> list[str]:
        candidates = (
            ("status", self.status is not None),
            ("drop", self.drop),
            ("body", self.body in GARBAGE_BODIES),
            ("moderation", self.moderation),
        )
        return [name for name, present in candidates if present]

    @property
    def fails(self) -> bool:
        """Whether the fault replaces the success answer (rather than delaying or reshaping it)."""
        return bool(self._replacements())

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Read a command-line fault such as ``429,retry-after=2,first=1`` or ``502,after-work``.

        Raises:
            ValueError: An unknown part, or a combination `Fault` refuses.
        """
        values: dict[str, object] = {}
        for item in (part.strip() for part in spec.split(",") if part.strip()):
            key, _, value = item.partition("=")
            if key.isdigit() and not value:
                values["status"] = int(key)
            elif key in ("drop", "moderation", "after-work") and not value:
                values[key.replace("-", "_")] = True
            elif key in BODIES and not value:
                values["body"] = key
            elif key == "download" and value:
                values["download"] = value
            elif key in ("retry-after", "delay", "drip", "chance") and value:
                try:
                    values[key.replace("-", "_")] = float(value)
                except ValueError:
                    raise ValueError(f"{key} must be a number; got {value!r}") from None
            elif key == "first" and value.isdigit():
                values["first"] = int(value)
            else:
                raise ValueError(f"unknown fault part {item!r}")
        return cls(**values)  # type: ignore[arg-type]


@frozen
class Call:
    """One request the emulator received."""

    provider: str
    method: str
    path: str
    at: float


@frozen(kw_only=True)
class Billed:
    """One job the emulator did (validated and rendered), whether or not its answer got through.

    Attributes:
        provider: The provider id that did it (``apiyi-multipart`` apart from ``apiyi``).
        model: The model, as the limits tables name it.
        prompt: The prompt; tests use it to tell jobs apart.
        seed: The seed sent, if any.
        at: Wall-clock time (``time.time()``) when the job was done.
    """

    provider: str
    model: str
    prompt: str
    seed: int | None
    at: float


@define
class _Armed:
    fault: Fault
    used: int = 0
