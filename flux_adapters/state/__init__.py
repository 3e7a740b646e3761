"""State shared by every call, client, worker and machine: breakers, budgets, rate limits, keys.

One small interface (`StateBackend`), two implementations:

- `LocalState`: in-process, thread-safe; the embedded default. Shared by the clients and
  threads of one process.
- `RedisState`: Redis (the ``redis`` extra: ``pip install flux-adapters[redis]``), shared by
  every process that points at the same server. Every read-modify-write is one Lua script, so it
  is atomic; every time is the Redis server's (``TIME``), so the clocks of the workers do not
  matter; every key is namespaced (``flux:`` by default); no secret is stored, only hashes.

`open_state` picks one from a URL (``FLUX_STATE_URL``, or ``state_url`` in the configuration
file): ``None``/``"local"`` for in-process state, ``redis://``, ``rediss://`` or ``unix://``
for Redis. Every Redis call has a bounded timeout (1 s by default, ``?socket_timeout=`` in the
URL); when Redis does not answer, a `StateUnavailable` is raised (fail closed), or, with
``fallback="local"`` (``state_fallback = "local"``), in-process state is used instead with one
WARNING on the ``flux_adapters`` logger. See docs/scaling.md.

Nothing here is imported by ``import flux_adapters``; redis-py only when Redis is used.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Final, Literal, Protocol, TypeAlias

from attrs import field, frozen

from flux_adapters._options import check_rate_per_minute, is_number
from flux_adapters.errors import BudgetExceeded, ConfigurationError, StateUnavailable

if TYPE_CHECKING:
    from flux_adapters.routing import Admitted, Denied, Pass
    from flux_adapters.state._local import LocalState
    from flux_adapters.state._redis import RedisState

__all__ = [
    "Ask",
    "BlockingState",
    "BudgetExceeded",
    "KeyRecord",
    "LocalState",
    "Pass",
    "Period",
    "RedisState",
    "Reservation",
    "StateBackend",
    "StateUnavailable",
    "bucket_id",
    "open_state",
]

Period: TypeAlias = Literal["day", "total"]
Outcome: TypeAlias = Literal["success", "failure", "release", "none"]

MAX_USD: Final = 1_000_000_000.0
"""The largest budget or amount accepted (a larger one is a mistake, refused)."""
MAX_TOKENS: Final = 1_000_000
"""The most a token bucket holds, and refills a second (a key's rate: a minute's worth)."""
MAX_SECONDS: Final = 86_400.0
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/+=-]{0,199}")
_BUCKET: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HASH: Final = re.compile(r"[0-9a-f]{64}")


def check_scope(scope: object) -> str:
    """*scope* when it is a usable name: letters, digits and ``_.:@/+=-``, 1 to 200 characters.

    Raises:
        ConfigurationError: anything else (a line break, a space, an empty or huge name, ...).
    """
    if not isinstance(scope, str) or not _NAME.fullmatch(scope):
        shown = repr(scope)[:60] if isinstance(scope, str) else type(scope).__name__
        raise ConfigurationError(
            f"a state scope must be 1 to 200 letters, digits or _.:@/+=- (starting with a letter "
            f"or digit), not {shown}"
        )
    return scope


def check_url(url: object, source: str = "a state URL") -> str:
    """*url* when it is ``local`` or a Redis URL; *source* names where it was given.

    Raises:
        ConfigurationError: anything else (an empty string, a space, another scheme, ...).
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"{source} must be a string, not {type(url).__name__}")
    if url != "local" and (
        not url.startswith(("redis://", "rediss://", "unix://")) or any(ord(c) < 33 for c in url)
    ):
        raise ConfigurationError(
            f"{source} must be 'local' or start with redis://, rediss:// or unix:// "
            "(with no space or control character)"
        )
    return url


def check_bucket(bucket: object) -> str:
    """*bucket* when it is a usable bucket id (`bucket_id` makes them)."""
    if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket):
        raise ConfigurationError("a rate-limit bucket id must be 1 to 64 letters, digits, _ or -")
    return bucket


def check_usd(value: object, what: str, *, zero: bool = True) -> float:
    """*value* as dollars: a finite number from 0 (or above 0) to `MAX_USD`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{what} must be a number of dollars, not {type(value).__name__}")
    if not is_number(value) or value < 0 or (not zero and value == 0) or value > MAX_USD:
        low = ">= 0" if zero else "> 0"
        raise ConfigurationError(f"{what} must be a finite number of dollars {low} and at most 1e9")
    return float(value)


def check_seconds(value: object, what: str) -> float:
    """*value* as seconds: a finite number from 0 to a day."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if not (is_number(value) and 0 <= value <= MAX_SECONDS):
        raise ConfigurationError(f"{what} must be a finite number of seconds from 0 to 86400")
    return float(value)


def check_period(value: object) -> Period:
    if value == "day" or value == "total":
        return value
    raise ConfigurationError(f"a budget period must be 'day' or 'total', not {value!r:.40}")


def check_rate(rate_per_s: object, burst: object) -> tuple[float, int]:
    """A token bucket's refill rate (per second, finite, > 0) and size (1 to 1,000,000)."""
    if isinstance(rate_per_s, bool) or not isinstance(rate_per_s, int | float):
        raise ConfigurationError("a rate must be a number of requests per second")
    if not (is_number(rate_per_s) and 0 < rate_per_s <= MAX_TOKENS):
        raise ConfigurationError(
            "a rate must be a finite number above 0 and at most 1e6 per second"
        )
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_TOKENS:
        raise ConfigurationError("a burst must be a whole number from 1 to 1000000")
    return float(rate_per_s), burst


def safe_part(name: str) -> str:
    """*name* as it can go in a key: itself when it is a plain name, else a digest of it."""
    if _NAME.fullmatch(name) and len(name) <= 100:
        return name
    return "h-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def bucket_id(provider: str, api_key: str) -> str:
    """The rate-limit bucket of *api_key* at *provider*: a digest, never the key itself."""
    digest = hashlib.sha256(f"{provider}\0{api_key}".encode("utf-8", "surrogatepass"))
    return "k-" + digest.hexdigest()[:40]


@frozen
class Reservation:
    """Dollars set aside in a budget before a call; `StateBackend.settle` makes them final.

    ``window`` is the budget's window the amount went to (``"total"``, or the UTC day number by
    the state's clock), so a call that ends after midnight settles in the day it began.
    ``local`` marks one a `RedisState` made in its process's own state while Redis was down
    (``fallback="local"``): it is settled there, never in Redis, which never held it.
    """

    scope: str
    period: Period
    window: str
    amount_usd: float
    local: bool = False


@frozen(kw_only=True)
class Ask:
    """What a call asks before sending to a (provider, model); every part is optional.

    Checked in this order, atomically: the provider key's pause (a 429's ``Retry-After``), the
    breaker of *key*, the key's token bucket, the budget. Nothing is taken unless all agree.
    """

    key: tuple[str, str] | None = None
    bucket: str | None = None
    rate_per_s: float | None = None
    burst: int = 1
    scope: str | None = None
    amount_usd: float = 0.0
    limit_usd: float = 0.0
    period: Period = "total"
    probe_ttl: float = 600.0
    """How long a half-open probe may stay out before another worker may probe (a worker that
    died while probing must not keep the provider skipped for ever)."""


@frozen(kw_only=True)
class Finish:
    """How an admitted call ended, for `StateBackend.finish` (see `Ask`)."""

    granted: Pass | None = None
    outcome: Outcome = "none"
    retry_after: float | None = None
    cooldown: float = 30.0
    max_pause: float = 900.0
    reservation: Reservation | None = None
    charge_usd: float | None = None
    """The amount the reservation becomes (0.0 refunds it); ``None`` keeps it as reserved."""
    bucket: str | None = None
    pause_s: float | None = None
    """Pause *bucket* for everyone this long (a 429's ``Retry-After``)."""


@frozen(kw_only=True)
class KeyRecord:
    """A gateway key as stored: never the key, only its SHA-256 (hex).

    Attributes:
        id: Short public id (the ``<id>`` of ``fxg_<id>_<random>``).
        key_hash: SHA-256 hex digest of the whole secret.
        name: A label.
        budget_usd: The key's budget (``None``: none), over *period*.
        allowed_models / allowed_providers: Empty means all.
        rate_per_minute: Requests a minute (``None``: no limit).
        created: Unix seconds.
    """

    id: str = field()
    key_hash: str = field()
    name: str = ""
    budget_usd: float | None = None
    period: Period = "day"
    allowed_models: tuple[str, ...] = ()
    allowed_providers: tuple[str, ...] = ()
    rate_per_minute: float | None = None
    created: float = 0.0

    @id.validator
    def _check_id(self, _: object, value: object) -> None:
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9]{1,32}", value):
            raise ConfigurationError("a key id must be 1 to 32 letters or digits")

    @key_hash.validator
    def _check_hash(self, _: object, value: object) -> None:
        if not isinstance(value, str) or not _HASH.fullmatch(value):
            raise ConfigurationError("key_hash must be a SHA-256 hex digest (64 lowercase hex)")

    def __attrs_post_init__(self) -> None:
        name: object = self.name
        if not isinstance(name, str) or len(name) > 200 or not name.isprintable():
            raise ConfigurationError(
                "a key's name must be printable text of at most 200 characters"
            )
        if self.budget_usd is not None:
            check_usd(self.budget_usd, "budget_usd")
        check_period(self.period)
        groups: tuple[object, ...] = (self.allowed_models, self.allowed_providers)
        for names in groups:
            if not isinstance(names, tuple) or not all(
                isinstance(n, str) and _NAME.fullmatch(n) for n in names
            ):
                raise ConfigurationError("allowed models and providers must be a tuple of names")
        if self.rate_per_minute is not None:  # (the bucket holds a minute's worth)
            check_rate_per_minute(self.rate_per_minute, "rate_per_minute", MAX_TOKENS)
        if isinstance(self.created, bool) or not isinstance(self.created, int | float):
            raise ConfigurationError("created must be unix seconds")
        if not is_number(self.created):
            raise ConfigurationError("created must be finite unix seconds")


def record_to_dict(record: KeyRecord) -> dict[str, object]:
    """*record* as JSON data (the hash included, never a key)."""
    return {
        "id": record.id,
        "key_hash": record.key_hash,
        "name": record.name,
        "budget_usd": record.budget_usd,
        "period": record.period,
        "allowed_models": list(record.allowed_models),
        "allowed_providers": list(record.allowed_providers),
        "rate_per_minute": record.rate_per_minute,
        "created": record.created,
    }


def record_from_dict(data: object) -> KeyRecord:
    """Read a record written by `record_to_dict`, each field of the type it writes.

    Raises:
        ConfigurationError: *data* is not such a record (a field missing or of another type:
            ``"allowed_providers": "bfl"`` is not read as the letters b, f and l).
    """
    try:
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        budget = data.get("budget_usd")
        rate = data.get("rate_per_minute")
        return KeyRecord(
            id=data["id"],  # KeyRecord checks the strings themselves
            key_hash=data["key_hash"],
            name=data.get("name", ""),
            budget_usd=None if budget is None else _number(budget),
            period=data.get("period", "total"),
            allowed_models=_names(data.get("allowed_models", [])),
            allowed_providers=_names(data.get("allowed_providers", [])),
            rate_per_minute=None if rate is None else _number(rate),
            created=_number(data.get("created", 0.0)),
        )
    except ConfigurationError as exc:
        # A value KeyRecord refuses (its messages show no key): say which rule, so that a record
        # written under an older one (a rate below one a day) can be found and fixed.
        raise ConfigurationError(f"a gateway key record is damaged: {exc}") from None
    except (KeyError, TypeError, ValueError, OverflowError):
        # OverflowError: float() of an integer beyond a float's range (json reads 1e400 written
        # out in digits as an int)
        raise ConfigurationError("a gateway key record is damaged") from None


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("not a JSON number")
    return float(value)


def _names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise TypeError("not a JSON list of strings")
    return tuple(value)


class StateBackend(Protocol):
    """The shared state, async; every read-modify-write atomic (see the module docstring)."""

    async def reserve(
        self, scope: str, amount_usd: float, limit_usd: float, period: Period
    ) -> Reservation | None:
        """Set *amount_usd* aside in *scope*'s budget; ``None`` when it would pass *limit_usd*."""
        ...

    async def settle(self, reservation: Reservation, spent_usd: float) -> None:
        """Make *reservation* final at *spent_usd* (0.0 refunds it)."""
        ...

    async def spent(self, scope: str, period: Period) -> float:
        """Dollars spent and reserved in *scope* in the current *period*."""
        ...

    async def breaker_acquire(self, key: tuple[str, str]) -> Pass | float:
        """As `flux_adapters.routing.Breaker.acquire`, shared by every worker."""
        ...

    async def breaker_success(self, key: tuple[str, str]) -> None:
        """The call to *key* succeeded: close its circuit."""
        ...

    async def breaker_failure(
        self, key: tuple[str, str], retry_after: float | None, cooldown: float = 30.0
    ) -> float | None:
        """The call to *key* failed: open its circuit; the seconds it stays open."""
        ...

    async def breaker_release(self, granted: Pass) -> None:
        """*granted* ended without showing either way: a probe lets the next call probe."""
        ...

    async def take(self, bucket: str, rate_per_s: float, burst: int) -> float:
        """Take a token from *bucket*; the seconds to wait first (0: go). Honours `pause`."""
        ...

    async def pause(self, bucket: str, seconds: float) -> None:
        """Pause *bucket* for everyone (a 429's ``Retry-After``)."""
        ...

    async def admit(self, ask: Ask) -> Admitted | Denied:
        """Everything a call asks before sending, in one atomic step (see `Ask`)."""
        ...

    async def finish(self, done: Finish) -> float | None:
        """Everything after a call, in one atomic step; the cooldown started, if one was."""
        ...

    async def put_key(self, record: KeyRecord) -> None:
        """Store *record* (it holds only the hash of the key)."""
        ...

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        """The record whose key hashes to *key_hash*."""
        ...

    async def list_keys(self) -> list[KeyRecord]:
        """Every record, oldest first."""
        ...

    async def delete_key(self, key_id: str) -> bool:
        """Delete the record *key_id*; whether there was one."""
        ...

    async def aclose(self) -> None:
        """Close the connections."""
        ...


class BlockingState(Protocol):
    """What `flux_adapters.FluxClient` (sync) needs of the state, without asyncio."""

    def admit(self, ask: Ask) -> Admitted | Denied:
        """`StateBackend.admit`, blocking."""
        ...

    def finish(self, done: Finish) -> float | None:
        """`StateBackend.finish`, blocking."""
        ...

    def close(self) -> None:
        """Close the connections."""
        ...


def open_state(
    url: str | None = None,
    *,
    fallback: Literal["none", "local"] = "none",
    timeout: float = 1.0,
    prefix: str = "flux:",
) -> LocalState | RedisState:
    """The state *url* names.

    ``None`` or ``"local"``: this process's `LocalState`; ``redis://``, ``rediss://``,
    ``unix://``: a `RedisState` (the ``redis`` extra).

    Args:
        url: Where the state lives.
        fallback: ``"local"``: when Redis does not answer, use in-process state (one WARNING
            as an outage starts, one as it ends);
            ``"none"`` (default): raise `StateUnavailable` (fail closed).
        timeout: Seconds any one Redis call may take (connect, send, answer); a
            ``socket_timeout`` in *url* takes its place.
        prefix: The namespace of every Redis key.

    Raises:
        ConfigurationError: *url* is not one of those, or an argument is not usable.
        MissingExtraError: Redis asked for and redis-py is not installed.
    """
    if fallback not in ("none", "local"):
        raise ConfigurationError(f"state fallback must be 'none' or 'local', not {fallback!r:.40}")
    if url is None or url == "local":
        from flux_adapters.state._local import shared_local

        return shared_local()
    check_url(url)
    from flux_adapters.state._redis import RedisState

    return RedisState(url, fallback=fallback, timeout=timeout, prefix=prefix)


def __getattr__(name: str) -> object:
    if name == "LocalState":
        from flux_adapters.state._local import LocalState

        return LocalState
    if name == "Pass":  # the breaker's leave to send, as `flux_adapters.routing` defines it
        from flux_adapters.routing import Pass

        return Pass
    if name == "RedisState":
        from flux_adapters.state._redis import RedisState

        return RedisState
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
