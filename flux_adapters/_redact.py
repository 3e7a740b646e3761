"""Scrub secrets from text that came from a provider before it reaches a message or log."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["redact"]

_SECRETS: Final = re.compile(
    r"(sk-[A-Za-z0-9_-]{6,}|Bearer\s+\S+|signature=[^&\s\"']+)", re.IGNORECASE
)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove *secrets*, anything shaped like an API key or bearer token, and URL signatures."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _SECRETS.sub("[redacted]", text)
