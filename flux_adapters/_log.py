"""The ``flux_adapters`` logger: what a client decided, and why, never a key.

At WARNING: a configured provider left out by ``from_env`` because it has no API key (its
variable named). At INFO: routing decisions, one line each: a provider skipped (its limits, the budget, its
cooldown) and why, a failure and the billing rule it falls under, a retry and the wait before
it, a cooldown started, a failover, a failure that is not failed over (it may have been billed),
and who served the image. At DEBUG besides: the candidates in the order they will be tried,
each try, each exchange sent (method, URL, status, seconds) and each wait between a job's
polls. Each record carries the kind of step in ``record.flux_event`` (``"skip"``, ``"try"``,
``"failed"``, ``"retry"``, ``"give-up"``, ``"cooldown"``, ``"probe"``, ``"failover"``,
``"served"``, ``"exchange"``, ``"wait"``, ``"no-key"`` ...).

Every line is formatted here and passed through the client's `Redactor` (each of its keys in
every form, and anything shaped like a key or a URL signature) and stripped of control
characters before it is logged: the record holds the finished text and no arguments, so no
handler or formatter ever sees a key, even at DEBUG with a key in a URL or an error body.

Logging is off unless the application turns it on (the logger has a ``NullHandler``, as a
library's should; configure ``logging.getLogger("flux_adapters")`` like any other), or the
environment variable ``FLUX_LOG`` is ``info`` or ``debug`` when the client module is first
imported (like the OpenAI SDK's ``OPENAI_LOG``): lines then go to stderr through a handler of
the logger's own, and not also to the root logger's handlers.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Final

from flux_adapters._display import escape_controls

__all__ = ["LOGGER", "configure_from_env", "note"]

LOGGER: Final = logging.getLogger("flux_adapters")
LOGGER.addHandler(logging.NullHandler())

_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO}
_OFF: Final = frozenset({"", "0", "off", "false", "no", "none"})
_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_installed: list[logging.Handler] = []
"""The stderr handler ``FLUX_LOG`` put on the logger, if any (so that a second call replaces it)."""


def configure_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """Turn on logging to stderr when ``$FLUX_LOG`` says so; the level set, or ``None``.

    ``info`` or ``debug`` in any case; empty, ``0``, ``off``, ``false``, ``no`` and ``none``
    leave it off. Any other value leaves it off with a ``RuntimeWarning`` saying so (a typo
    must not look like "nothing to log").
    """
    value = (os.environ if environ is None else environ).get("FLUX_LOG", "")
    chosen = value.strip().lower()
    for handler in _installed:  # called again (a test): undo the previous setting first
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(logging.NOTSET)
        LOGGER.propagate = True
    _installed.clear()
    level = _LEVELS.get(chosen)
    if level is None:
        if chosen not in _OFF:
            warnings.warn(
                f"FLUX_LOG={escape_controls(value[:40])!r} is neither 'info' nor 'debug'; "
                "flux_adapters logs nothing",
                RuntimeWarning,
                stacklevel=2,
            )
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    LOGGER.propagate = False  # else an application's root handler prints each line twice
    _installed.append(handler)
    return level


def note(level: int, event: str, scrub: Callable[[str], str], template: str, *args: object) -> None:
    """Log ``template % args`` at *level*, scrubbed of keys, as a step of kind *event*.

    Nothing is formatted when the level is off, so a call costs a level check.
    """
    if not LOGGER.isEnabledFor(level):
        return
    try:
        text = template % args if args else template
    except Exception:  # a value's own __str__ failed: a log line must never break a call
        text = template
    LOGGER.log(level, escape_controls(scrub(text)), extra={"flux_event": event}, stacklevel=2)


configure_from_env()
