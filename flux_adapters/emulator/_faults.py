"""Faults the emulator can inject, and the record of calls it received (no server imports)."""

from __future__ import annotations

from attrs import define, frozen

__all__ = ["Call", "Fault"]


@frozen(kw_only=True)
class Fault:
    """A misbehaviour to inject into one provider's answers.

    Attributes:
        status: Answer with this HTTP status instead (429, 402, 500, 502, 503, ...), with a body
            in the provider's style.
        retry_after: Seconds for a ``Retry-After`` header (with 429 by default 1).
        delay: Seconds to wait before answering (or before the other misbehaviour).
        drop: Cut the connection after the request was read, without a complete answer.
        body: ``"malformed"`` or ``"empty"``: answer 200 with a body that is not the documented
            shape; ``"b64"``: answer with the image inline (``b64_json``) instead of a URL.
        moderation: Answer as the provider's content filter does.
        first: Misbehave only on the first N calls, then answer normally; ``None`` for every call.
    """

    status: int | None = None
    retry_after: float | None = None
    delay: float = 0.0
    drop: bool = False
    body: str | None = None
    moderation: bool = False
    first: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Read a command-line fault such as ``429,retry-after=2,first=1`` or ``drop``."""
        values: dict[str, object] = {}
        for item in (part.strip() for part in spec.split(",") if part.strip()):
            key, _, value = item.partition("=")
            if key.isdigit() and not value:
                values["status"] = int(key)
            elif key in ("drop", "moderation") and not value:
                values[key] = True
            elif key in ("malformed", "empty", "b64") and not value:
                values["body"] = key
            elif key in ("retry-after", "delay") and value:
                values[key.replace("-", "_")] = float(value)
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


@define
class _Armed:
    fault: Fault
    used: int = 0
