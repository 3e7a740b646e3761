"""Checking what callers pass to the clients, when the client is built.

A wrong value is a `ConfigurationError` that says what was expected, raised before anything is
sent, never a raw ``TypeError`` at call time. Messages name where a value came from (an
argument, an environment variable) and never repeat a key.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final, TypeGuard
from urllib.parse import urlsplit

from flux_adapters._display import render_value, toml_key
from flux_adapters.errors import ConfigurationError

if TYPE_CHECKING:
    import httpx

    from flux_adapters.config import ProviderSettings
    from flux_adapters.providers import AnyAdapter

__all__ = [
    "MAX_CONCURRENCY",
    "MAX_KEEP_SECONDS",
    "MAX_SECONDS",
    "SHORTEST_KEY",
    "base_url_for",
    "check_adapter",
    "check_base_url",
    "check_key",
    "check_rate_per_minute",
    "check_seconds",
    "check_timeout",
    "check_variable_name",
    "did_you_mean",
    "is_number",
]

_ADAPTER_PARTS: Final = ("name", "default_base_url", "env_prefix", "limits")
_ADAPTER_METHODS: Final = ("build_request", "parse_response", "parse_error")
_JOB_ADAPTER_METHODS: Final = (
    "build_submit",
    "parse_submit",
    "build_poll",
    "parse_poll",
    "build_fetch",
    "parse_fetch",
    "build_cancel",
    "job_failure",
    "parse_error",
)
"""An asynchronous provider's adapter (`flux_adapters.jobs.JobAdapterBase` has them all)."""


def is_number(value: object) -> TypeGuard[int | float]:
    """Whether *value* is a real, finite number (``bool`` is not one here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def did_you_mean(value: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss of *known*, else an empty string."""
    import difflib  # lazy: only a wrong value needs it

    close = difflib.get_close_matches(value.lower(), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


SHORTEST_KEY: Final = 8
"""The fewest characters an API key may have. Every provider's keys are far longer (dozens of
characters); a shorter value is a placeholder or a slip (``any``, ``x``, the key's first
letters). It is also the redactor's fragment (`flux_adapters._redact.FRAGMENT`): a key of 8 or
more is removed from messages in every 8-character piece too, and one of 1 to 3 would not be
looked for at all (replacing it would mangle every message)."""


def check_key(value: object, source: str) -> str:
    """*value* as an API key; *source* says where it came from, e.g. ``$LAOZHANG_API_KEY``.

    A key goes into an HTTP header, so it must be printable ASCII without spaces. Whitespace
    around it (a line break from a CRLF ``.env`` file), or quotes (``"sk-..."`` read by a tool
    that keeps them), are refused rather than stripped: the key you set is the key that is sent.
    One shorter than `SHORTEST_KEY` is refused (never shown).
    """
    if not isinstance(value, str):
        raise ConfigurationError(f"{source} must be a string, not {type(value).__name__}")
    if not value:
        raise ConfigurationError(f"{source} is empty")
    if value != value.strip():
        ending = " a line break" if value[-1:] in ("\r", "\n") else " whitespace"
        raise ConfigurationError(
            f"{source} has{ending} around the key (a CRLF .env file?); remove it"
        )
    if value.lower().startswith(("bearer ", "key ", "token ")):
        raise ConfigurationError(f"{source} starts with a scheme word; give the key alone")
    if value[0] in "\"'`" or value[-1] in "\"'`":
        # KEY="sk-..." in a file read by something that keeps the quotes (docker --env-file,
        # systemd's EnvironmentFile= with odd quoting): the quotes would be sent as the key.
        raise ConfigurationError(f"{source} is wrapped in quotes; give the key without them")
    if not all(0x21 <= ord(character) <= 0x7E for character in value):
        raise ConfigurationError(
            f"{source} holds characters an HTTP header cannot carry (spaces, control or "
            "non-ASCII characters); check the key"
        )
    if len(value) < SHORTEST_KEY:
        raise ConfigurationError(
            f"{source} is {len(value)} character{'s' if len(value) != 1 else ''} long; an API "
            f"key has at least {SHORTEST_KEY} (no provider issues shorter ones): check the key"
        )
    # A plain copy of the characters: a str subclass may print itself as "****" (a "secret
    # string"), and the header is built by formatting the key.
    return str.__str__(value)


def _variable_text(value: object) -> bool:
    """Whether *value* can be (the start of) an environment variable's name as typed."""
    return (
        isinstance(value, str)
        and bool(value)
        and "=" not in value
        and all(c.isprintable() and not c.isspace() for c in value)
    )


def check_variable_name(value: object, source: str) -> str:
    """*value* as the name of an environment variable: no whitespace, ``=`` or control in it.

    A space typed after the name (``"LAOZHANG_API_KEY "``) names a variable nobody sets: the
    provider would be skipped as having no key while the key the user did set sat unread.
    """
    if not _variable_text(value):
        # Shown when it is a name with a space around it ("LAOZHANG_API_KEY "); not when it
        # may hold a key: "Bearer sk-...", "LAOZHANG_API_KEY=sk-...", "sk-...\n".
        core = value.strip() if isinstance(value, str) else ""
        shown = not (isinstance(value, str) and value) or (
            bool(_NAME.fullmatch(core)) and not _key_shaped(core)
        )
        raise ConfigurationError(
            f"{source} must be the name of an environment variable (no spaces, '=' or control "
            "characters), "
            + (
                f"not {render_value(value)}"
                if shown
                else "and the value given is not shown, as it may hold a key"
            )
        )
    if not isinstance(value, str) or not _NAME.fullmatch(value) or _key_shaped(value):
        # "sk-...", "a1b2:c3d4": the key itself, given where its variable's name goes (the
        # setting is called api_key_env). Shown, it would be in the error, and as "set sk-..."
        # in every "no API key" message and warning after it: it is not shown.
        raise ConfigurationError(
            f"{source} must be the name of an environment variable (letters, digits and _, not "
            "starting with a digit; 32 or more letters and digits without _ are taken for a "
            "key), such as LAOZHANG_API_KEY; the value given is not shown, as it may be a key: "
            "put the key in that variable, never in the configuration"
        )
    return str.__str__(value)


_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _key_shaped(name: str) -> bool:
    """Whether *name*, valid as a variable's name, is rather a key of letters and digits only.

    Names are words joined by ``_`` (``MY_LAOZHANG_KEY``); 32 letters and digits with no ``_``,
    in both cases or with digits among the letters, are a key (``Xk9fQ2mZ...``, 40 hex digits),
    not a name anyone types.
    """
    return (
        len(name) >= 32
        and name.isalnum()
        and not (name.isalpha() and (name.isupper() or name.islower()))
    )


def check_base_url(value: object, source: str) -> str:
    """*value* as a provider base URL: ``http(s)://host[:port][/path]``."""
    if not isinstance(value, str):
        raise ConfigurationError(f"{source} must be a URL string, not {type(value).__name__}")
    expected = "an http(s) URL with a host and no query, e.g. https://api.example.com"
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError:
        raise ConfigurationError(f"{source} must be {expected}") from None
    del port
    if parts.username is not None or parts.password is not None:
        # httpx sends them as Basic auth, in place of the key.
        raise ConfigurationError(
            f"{source} must not hold a user name or password; give the key as the API key"
        )
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or not value.isascii()
        or any(character.isspace() or not character.isprintable() for character in value)
    ):
        raise ConfigurationError(f"{source} must be {expected}")
    return str.__str__(value)  # a plain copy, as for the key


def base_url_for(
    adapter: AnyAdapter,
    given: str | None = None,
    settings: ProviderSettings | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The base URL a client sends *adapter*'s requests to, checked and without a final ``/v1``.

    *given* (``base_url=``, ``--base-url``), else ``$<PREFIX>_BASE_URL``, else the settings'
    ``base_url`` (the file), else the provider's real one.

    Raises:
        ConfigurationError: The URL chosen is not usable (the message names where it came from).
    """
    variable = f"{adapter.env_prefix}_BASE_URL"
    from_env = (os.environ if environ is None else environ).get(variable)
    if given is not None:
        base = check_base_url(given, "base_url=")
    elif from_env:
        base = check_base_url(from_env, f"${variable}")
    elif settings is not None and settings.base_url:
        where = f"base_url of [provider.{toml_key(adapter.name)}]"
        base = check_base_url(settings.base_url, where)
    else:
        base = adapter.default_base_url
    # Accept the OpenAI-SDK habit of a base URL ending in /v1; adapters add /v1/... themselves.
    base = base.rstrip("/")
    rest = base.partition("://")[2]
    if "/" in rest and rest.endswith("/v1"):  # a path ending in /v1, not a host named v1
        base = base[: -len("/v1")]
    return base


MIN_RATE_PER_MINUTE: Final = 1 / 1440
"""The lowest ``rate_per_minute`` taken: one a day. Below it, a key's first call holds the next
for years (1e-300 a minute said "the next call in 6000...0 s", 300 digits), which is no limit
anyone means: a typo for a rate, or 0 written as a tiny number."""

MAX_RATE_PER_MINUTE: Final = 60_000_000
"""The highest ``rate_per_minute`` a provider's settings take: a million a second."""


def check_rate_per_minute(value: object, source: str, most: float = MAX_RATE_PER_MINUTE) -> float:
    """*value* as a rate a minute, from one a day (`MIN_RATE_PER_MINUTE`) to *most*.

    The one check of every ``rate_per_minute``: a provider's (file or code) and a gateway
    key's (`flux_adapters.state.KeyRecord`, ``keys create --rate-per-minute``).
    """
    if not (is_number(value) and MIN_RATE_PER_MINUTE <= value <= most):
        raise ConfigurationError(
            f"{source} must be a number of requests a minute, at least one a day (1/1440) "
            f"and at most {most:.0f}, not {render_value(value)}"
        )
    return float(value)


MAX_CONCURRENCY: Final = 1000
"""The most jobs a batch runs at once (``edit_many(concurrency=)``, ``batch --concurrency``): a
batch makes one worker task for each, whatever the number of jobs, and more than this many in
flight only wait in the clients' queues (an AsyncFluxClient has at most 100 exchanges out)."""


MAX_SECONDS: Final = 86_400.0
"""The longest timeout or deadline taken: a day. A socket timeout of 1e10 s overflows time_t."""

MAX_KEEP_SECONDS: Final = 365 * 86_400.0
"""The longest a thing is kept: a year (a gateway's images, a shared batch's state in Redis)."""


def check_seconds(value: object, source: str) -> float:
    """*value* as a positive number of seconds, at most `MAX_SECONDS`."""
    if not is_number(value) or not 0 < value <= MAX_SECONDS:
        raise ConfigurationError(
            f"{source} must be a number of seconds > 0 and at most {MAX_SECONDS:.0f}, "
            f"not {render_value(value)}"
        )
    return float(value)


def check_timeout(value: object, source: str) -> httpx.Timeout:
    """*value* (seconds, or an ``httpx.Timeout`` with positive phases) as an ``httpx.Timeout``."""
    import httpx  # lazy: checking an adapter (the registry) needs no HTTP client

    if isinstance(value, httpx.Timeout):
        for phase in ("connect", "read", "write", "pool"):
            seconds = getattr(value, phase)
            if seconds is not None:
                check_seconds(seconds, f"{source} {phase}")
        return value
    if not is_number(value):
        raise ConfigurationError(
            f"{source} must be seconds (a number > 0) or an httpx.Timeout, not {render_value(value)}"
        )
    return httpx.Timeout(check_seconds(value, source))


def _attribute(value: object, name: str) -> object:
    from flux_adapters._foreign import is_interruption

    try:
        return getattr(value, name)
    except BaseException as exc:  # missing, or a property failing in its own way, even oddly
        if is_interruption(exc):
            raise
        return None


def _read_failure(value: object, name: str) -> str:
    """How reading *value*'s attribute *name* fails (a property raising), ``""`` if it does not.

    An attribute that is merely absent is no failure: the message says the part is missing.
    """
    from flux_adapters._display import describe_exception
    from flux_adapters._foreign import is_interruption

    try:
        getattr(value, name)
    except AttributeError:
        return ""
    except BaseException as exc:
        if is_interruption(exc):
            raise
        return f"could not be read ({describe_exception(exc)})"
    return ""


def _class_name(cls: type) -> str:
    """*cls*'s name for a message: printable, never raising (a metaclass may do anything)."""
    from flux_adapters._display import printable

    try:
        name = cls.__name__
    except Exception:
        return "the class"
    return printable(name) if type(name) is str else "the class"


def check_adapter(value: object) -> object:
    """*value* if it has what the client needs of an adapter, else `ConfigurationError`.

    An adapter with ``build_submit`` is an asynchronous provider's, and needs the whole job
    protocol; any other needs ``build_request``, ``parse_response`` and ``parse_error``.
    """
    if isinstance(value, type):
        # Its attributes are the class's and its methods callable: it would pass every check
        # below, then fail each call as an adapter bug ("missing 1 required argument").
        shown = _class_name(value)
        raise ConfigurationError(
            f"a provider must be an adapter object, not the class {shown}: pass {shown}()"
        )
    jobs = callable(_attribute(value, "build_submit"))
    methods = _JOB_ADAPTER_METHODS if jobs else _ADAPTER_METHODS
    missing = [part for part in _ADAPTER_PARTS if _attribute(value, part) is None]
    missing += [part for part in methods if not callable(_attribute(value, part))]
    if missing:
        failures = [f"{part}: {why}" for part in missing if (why := _read_failure(value, part))]
        raise ConfigurationError(
            f"a provider must be a provider id or an adapter; {type(value).__name__} has no "
            + ", ".join(missing)
            + (f" ({'; '.join(failures)})" if failures else "")
        )
    name = _attribute(value, "name")
    limits = _attribute(value, "limits")
    if not isinstance(name, str) or not name or not isinstance(limits, Mapping):
        raise ConfigurationError(
            f"adapter {type(value).__name__}: name must be a non-empty str and limits a mapping"
        )
    from flux_adapters import _declared
    from flux_adapters.providers import _NAME

    shown = render_value(name)
    # What a registered adapter's id already is; an adapter given to a client directly is
    # checked alike: its name goes into every message and log line, and keys the shared state.
    if not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"adapter {shown}: name must be a provider id, 1 to 64 lower-case letters, digits, "
            "'.', '_' or '-'"
        )
    prefix = _attribute(value, "env_prefix")
    if not _variable_text(prefix):
        raise ConfigurationError(
            f"adapter {shown}: env_prefix must start the name of an environment variable "
            f"(no spaces, '=' or control characters), not {render_value(prefix)}"
        )
    check_base_url(_attribute(value, "default_base_url"), f"adapter {shown}: default_base_url")
    _declared.check_limits(shown, limits)
    _declared.check_not_taken(shown, _optional(value, "not_taken", shown))
    _declared.check_prices(shown, _optional(value, "prices", shown), limits)
    _declared.check_usd_per_credit(shown, _optional(value, "usd_per_credit", shown))
    _declared.check_auth(shown, _optional(value, "auth", shown))
    return value


def _optional(value: object, name: str, shown: str) -> object:
    """*value*'s optional attribute *name*, ``None`` when it has none.

    One that fails to be read, in any way but being absent, is refused: the client reads it
    again on every call (``getattr(adapter, "not_taken", None)``), where it would fail alike.
    """
    from flux_adapters._display import describe_exception
    from flux_adapters._foreign import is_interruption

    try:
        return getattr(value, name, None)
    except BaseException as exc:
        if is_interruption(exc):
            raise
        raise ConfigurationError(
            f"adapter {shown}: {name} could not be read ({describe_exception(exc)})"
        ) from exc
