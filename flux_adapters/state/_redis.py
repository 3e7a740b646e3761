"""`RedisState`: the shared state in Redis, for many workers (the ``redis`` extra).

Every read-modify-write is one Lua script (atomic in Redis); every time is the server's
(``TIME``), never a worker's clock; every key starts with the prefix (``flux:``); no secret is
stored (buckets are digests of keys, gateway keys are kept as SHA-256 digests). Keys:

- ``<prefix>cb:<provider>:<model>``: a breaker circuit (hash ``until``, ``probing``);
- ``<prefix>budget:<scope>:<window>``: dollars spent and reserved (``window``: ``total`` or
  the UTC day number);
- ``<prefix>rate:<bucket>`` (hash ``tokens``, ``ts``) and ``<prefix>pause:<bucket>``;
- ``<prefix>gwkey:<id>`` (the record, JSON), ``<prefix>gwhash:<sha256>`` (its id) and
  ``<prefix>gwkeys`` (every id).

The async methods use ``redis.asyncio``; `blocking` gives the same scripts on redis-py's
blocking client, for `flux_adapters.FluxClient`. Every call is bounded by *timeout* (connect,
write and read) and never retried by redis-py; a failure raises `StateUnavailable`, or, with
``fallback="local"``, switches to in-process state with one WARNING an outage (Redis, gateway
key lookups included, is not asked again for 30 seconds; one more WARNING says when it
answers again).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs

from flux_adapters._extras import extra_imports
from flux_adapters.errors import ConfigurationError, StateUnavailable
from flux_adapters.routing import Admitted, Denied, Pass
from flux_adapters.state import (
    Ask,
    Finish,
    KeyRecord,
    Period,
    Reservation,
    check_bucket,
    check_period,
    check_rate,
    check_scope,
    check_seconds,
    check_usd,
    record_from_dict,
    record_to_dict,
    safe_part,
)
from flux_adapters.state._local import LocalState

if TYPE_CHECKING:
    import redis
    import redis.asyncio

_LOG = logging.getLogger("flux_adapters")

_NOW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function f(x) return string.format('%.17g', x) end
-- A number kept in *key* (raw: what Redis holds, false when nothing), or *default*. Anything
-- else (a hand edit: 'nan' compares false with everything, and would lift a budget) stops the
-- script before it writes, with an error naming the key.
local function num(key, raw, default, low)
  if not raw then return default end
  local x = tonumber(raw)
  if x == nil or x ~= x or x == math.huge or x == -math.huge or (low and x < low) then
    local shown = string.gsub(string.sub(tostring(raw), 1, 40), '[^%w%.%+%-]', '?')
    error('flux: ' .. key .. ' holds ' .. shown .. ', not a number it can hold: fix or delete it', 0)
  end
  return x
end
"""

ADMIT: Final = (
    _NOW
    + """
-- KEYS: circuit, pause, bucket, budget (without its window)
-- ARGV: has_key, has_bucket, rate, burst, has_budget, amount, limit, period, probe_ttl
if ARGV[2] == '1' then
  local paused = num(KEYS[2], redis.call('GET', KEYS[2]), 0)
  if paused > now then return {'paused', f(paused - now), '0'} end
end
local probe = 0
if ARGV[1] == '1' then
  local c = redis.call('HMGET', KEYS[1], 'until', 'probing')
  if c[1] then
    local left = num(KEYS[1], c[1]) - now
    if left > 0 then return {'cooling', f(left), '0'} end
    if c[2] and num(KEYS[1], c[2]) > now then return {'probing', '0', '0'} end
    probe = 1
  end
end
local tokens = 0
local rate = tonumber(ARGV[3])
if ARGV[2] == '1' and rate then
  local burst = tonumber(ARGV[4])
  local b = redis.call('HMGET', KEYS[3], 'tokens', 'ts')
  local had = num(KEYS[3], b[1], burst)
  local at = num(KEYS[3], b[2], now)
  tokens = math.min(burst, had + math.max(0, now - at) * rate)
  if tokens < 1 then return {'paced', f((1 - tokens) / rate), '0'} end
end
local window = 'total'
if ARGV[5] == '1' then
  if ARGV[8] == 'day' then window = string.format('%d', math.floor(now / 86400)) end
  local bkey = KEYS[4] .. ':' .. window
  local spent = num(bkey, redis.call('GET', bkey), 0, -1e-6)
  local amount = tonumber(ARGV[6])
  if spent + amount > tonumber(ARGV[7]) + 1e-9 then return {'budget', '0', f(spent)} end
  redis.call('SET', bkey, f(spent + amount))
  if window ~= 'total' then redis.call('EXPIRE', bkey, 172800) end
end
if ARGV[2] == '1' and rate then
  redis.call('HSET', KEYS[3], 'tokens', f(tokens - 1), 'ts', f(now))
  redis.call('EXPIRE', KEYS[3], 86400)
end
if probe == 1 then redis.call('HSET', KEYS[1], 'probing', f(now + tonumber(ARGV[9]))) end
return {'ok', tostring(probe), window}
"""
)

FINISH: Final = (
    _NOW
    + """
-- KEYS: circuit, budget (without its window), pause
-- ARGV: outcome, probe, cooldown, max_pause, retry_after, window, reserved, charge, pause_s
-- The numbers read first: one that is damaged stops the script before any write.
local charge = tonumber(ARGV[8])
if charge then
  local bkey = KEYS[2] .. ':' .. ARGV[6]
  num(bkey, redis.call('GET', bkey), 0, -1e-6)
end
local pause_s = tonumber(ARGV[9])
local old = 0
if pause_s and pause_s > 0 then old = num(KEYS[3], redis.call('GET', KEYS[3]), 0) end
local started = ''
if ARGV[1] == 'success' then
  redis.call('DEL', KEYS[1])
elseif ARGV[1] == 'failure' and tonumber(ARGV[3]) > 0 then
  local pause = tonumber(ARGV[3])
  local asked = tonumber(ARGV[5])
  if asked then pause = math.max(pause, math.min(asked, tonumber(ARGV[4]))) end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'until', f(now + pause))
  redis.call('EXPIRE', KEYS[1], math.ceil(pause) + 86400)
  started = f(pause)
elseif ARGV[2] == '1' then
  redis.call('HDEL', KEYS[1], 'probing')
end
if charge then
  local bkey = KEYS[2] .. ':' .. ARGV[6]
  redis.call('INCRBYFLOAT', bkey, f(charge - tonumber(ARGV[7])))
  if ARGV[6] ~= 'total' then redis.call('EXPIRE', bkey, 172800) end
end
if pause_s and pause_s > 0 then
  if now + pause_s > old then
    redis.call('SET', KEYS[3], f(now + pause_s), 'PX', math.ceil(pause_s * 1000) + 1000)
  end
end
return started
"""
)

SPENT: Final = (
    _NOW
    + """
local window = 'total'
if ARGV[1] == 'day' then window = string.format('%d', math.floor(now / 86400)) end
local bkey = KEYS[1] .. ':' .. window
local raw = redis.call('GET', bkey)
num(bkey, raw, 0, -1e-6)
return raw or '0'
"""
)

_DENIALS: Final = frozenset({"paused", "cooling", "probing", "paced", "budget"})
"""The statuses ``ADMIT`` refuses a call with."""

_RETRY_LOCAL: Final = 30.0
"""Seconds a fallen-back state waits before trying Redis again."""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Layout:
    """Keys and script arguments: shared by the async and blocking forms."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def circuit(self, key: tuple[str, str] | None) -> str:
        if key is None:
            return self.prefix + "cb:-"
        return f"{self.prefix}cb:{safe_part(key[0])}:{safe_part(key[1])}"

    def admit(self, ask: Ask) -> tuple[list[str], list[str]]:
        keys = [
            self.circuit(ask.key),
            f"{self.prefix}pause:{ask.bucket or '-'}",
            f"{self.prefix}rate:{ask.bucket or '-'}",
            f"{self.prefix}budget:{ask.scope or '-'}",
        ]
        args = [
            "1" if ask.key is not None else "0",
            "1" if ask.bucket is not None else "0",
            repr(ask.rate_per_s) if ask.bucket is not None and ask.rate_per_s else "",
            str(ask.burst),
            "1" if ask.scope is not None else "0",
            repr(ask.amount_usd),
            repr(ask.limit_usd),
            ask.period,
            repr(ask.probe_ttl),
        ]
        return keys, args

    @staticmethod
    def admitted(ask: Ask, answer: Any) -> Admitted | Denied:
        """The admission script's answer (``ADMIT``), checked: a wrong shape is `StateUnavailable`."""
        status, number, extra = _strings(answer, 3, "the admission")
        if status == "ok":
            if number not in ("0", "1") or not (extra == "total" or extra.isdigit()):
                raise _unreadable("the admission is not one the script gives")
            granted = Pass(ask.key, probe=number == "1") if ask.key is not None else None
            reservation = None
            if ask.scope is not None:
                reservation = Reservation(ask.scope, ask.period, extra, ask.amount_usd)
            return Admitted(granted, reservation)
        if status not in _DENIALS:
            raise _unreadable("the admission's status is not one the script gives")
        return Denied(
            status,  # type: ignore[arg-type]
            _amount(number, "the admission's wait"),
            _amount(extra, "the budget's spending"),
        )

    def finish(self, done: Finish) -> tuple[list[str], list[str]]:
        granted = done.granted
        reserved = done.reservation
        keys = [
            self.circuit(granted.key if granted is not None else None),
            f"{self.prefix}budget:{reserved.scope if reserved is not None else '-'}",
            f"{self.prefix}pause:{done.bucket or '-'}",
        ]
        args = [
            done.outcome if granted is not None else "none",
            "1" if granted is not None and granted.probe else "0",
            repr(done.cooldown),
            repr(done.max_pause),
            "" if done.retry_after is None else repr(done.retry_after),
            reserved.window if reserved is not None else "total",
            repr(reserved.amount_usd) if reserved is not None else "0",
            "" if reserved is None or done.charge_usd is None else repr(done.charge_usd),
            "" if done.bucket is None or done.pause_s is None else repr(done.pause_s),
        ]
        return keys, args

    @staticmethod
    def finished(answer: Any) -> float | None:
        """The finishing script's answer (``FINISH``): the cooldown started, if one was."""
        text = _string(answer, "the cooldown")
        return _amount(text, "the cooldown") if text else None


MAX_ANSWER: Final = 64 << 20
"""The most bytes one call reads from Redis (the async client: a claim of 10,000 jobs with
their records, or thousands of gateway keys, are a few MB)."""
MAX_ANSWER_BLOCKING: Final = 1 << 20
"""The most bytes one call of the blocking client reads (its answers are a few dozen bytes)."""


class AnswerTooLong(OSError):
    """Redis sent one call more than it may read (`MAX_ANSWER`): the connection is dropped."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an answer longer than {limit} bytes")
        self.limit = limit


_LEFT: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "flux_adapters_redis_left", default=None
)
"""The bytes the Redis call under way (in this thread or task) may still read, and its bound."""


@contextlib.contextmanager
def bounded_answer(limit: int) -> Iterator[None]:
    """Let the Redis call run inside read at most *limit* bytes (see `AnswerTooLong`)."""
    token = _LEFT.set([limit, limit])
    try:
        yield
    finally:
        _LEFT.reset(token)


def _count(size: int) -> None:
    """*size* bytes read for the call under way; `AnswerTooLong` past its bound."""
    left = _LEFT.get()
    if left is not None:
        left[0] -= size
        if left[0] < 0:
            raise AnswerTooLong(left[1])


def failure(exc: BaseException, timeout: float) -> tuple[str, str]:
    """How a Redis call failed, for a message: what Redis did, and the detail.

    An error reply (``-OOM ...``, ``-READONLY ...``, ``-NOSCRIPT ...``) is named with its text
    (cut, controls escaped: a hostile server writes it); a socket error or a timeout is "did not
    answer"; anything else redis-py raised on what it read is "an answer that cannot be read".
    """
    import redis.exceptions

    from flux_adapters._display import escape_controls

    cause: BaseException | None = exc
    for _ in range(10):  # redis-py raises its ConnectionError in the except of the real one
        if cause is None:
            break
        if isinstance(cause, AnswerTooLong):
            return "gave an answer longer than the bound", f"{cause.limit} bytes at most"
        code = getattr(cause, "status_code", None)
        if isinstance(cause, redis.exceptions.ResponseError) or (isinstance(code, str) and code):
            # An error reply (the async client wraps an AUTH one in a ConnectionError)
            text = str(cause)
            if isinstance(code, str) and code and not text.startswith(code):
                text = f"{code} {text}"  # redis-py strips the code of the errors it knows
            ours = text.find(" flux: ", text.find("@user_script:"))
            if "@user_script:" in text and ours >= 0:
                # A script's own error: its words, without Redis's wrapping (which script, which
                # line), and whole up to a longer bound: the key it names may be 220 characters.
                return "answered with an error", escape_controls(text[ours + 1 :][:400])
            return "answered with an error", escape_controls(text[:200])
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, OSError | redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return f"did not answer within {timeout:g} s", type(exc).__name__
    return "gave an answer that cannot be read", type(exc).__name__


_ENDING: contextvars.ContextVar[str] = contextvars.ContextVar(
    "flux_adapters_redis_ending", default="nothing was sent"
)
"""How a state error's message ends: an admission's failure means nothing was sent; a
finishing step's comes after the call (`_after_the_call`), and must not say so."""


@contextlib.contextmanager
def _ending(text: str) -> Iterator[None]:
    """State errors raised inside end with *text* instead of "nothing was sent"."""
    token = _ENDING.set(text)
    try:
        yield
    finally:
        _ENDING.reset(token)


def _after_the_call() -> contextlib.AbstractContextManager[None]:
    return _ending("after the call")


class DamagedState(StateUnavailable):
    """Redis answered, and a key of the state holds what the scripts never write.

    A hand edit (``nan`` in a budget, which would compare false with every limit) or a key of
    another type (``WRONGTYPE``): not an outage, so never a reason to fall back to this
    process's own state (``fallback="local"``), where a budget starts again from $0. The call
    fails closed, naming the key.
    """


_DAMAGE: Final = ("not a number it can hold", "WRONGTYPE")
"""What the error reply of a damaged key says: the scripts' own ``num`` check, or Redis's."""


def _damaged(exc: BaseException) -> bool:
    """Whether *exc* (or what it was raised from) is Redis's error reply for a damaged key."""
    import redis.exceptions

    cause: BaseException | None = exc
    for _ in range(10):
        if cause is None:
            return False
        if isinstance(cause, redis.exceptions.ResponseError):
            text = str(cause)  # whole: the key's name may be long, the marker after it
            return any(marker in text for marker in _DAMAGE)
        cause = cause.__cause__ or cause.__context__
    return False


def _unavailable(exc: BaseException, timeout: float) -> StateUnavailable:
    what, detail = failure(exc, timeout)
    made = DamagedState if _damaged(exc) else StateUnavailable
    return made(f"the shared state (Redis) {what}: {detail}; {_ENDING.get()}")


def _unreadable(what: str) -> StateUnavailable:
    return StateUnavailable(
        f"the shared state (Redis) gave an answer that cannot be read: {what}; {_ENDING.get()}"
    )


@contextlib.contextmanager
def _answered(timeout: float) -> Iterator[None]:
    """Raise a Redis call's failure as `StateUnavailable`.

    Anything raised inside is redis-py at work on what a server sent (a socket error, a
    timeout, an error reply, or a handshake answer of a shape it did not expect: an
    ``AttributeError`` there): the state's failure, never a bug to pass up as it is.
    """
    try:
        yield
    except Exception as exc:
        raise _unavailable(exc, timeout) from exc


def _string(part: object, what: str) -> str:
    """*part* of a script's answer as text, or `StateUnavailable`."""
    try:
        if isinstance(part, bytes):
            return part.decode()
    except UnicodeDecodeError:
        pass
    else:
        if isinstance(part, str):
            return part
    raise _unreadable(f"{what} is not text")


def _strings(answer: object, count: int, what: str) -> list[str]:
    """*answer* as *count* strings (a script's array of them), or `StateUnavailable`."""
    if not isinstance(answer, list) or len(answer) != count:
        raise _unreadable(f"{what} is not {count} values")
    return [_string(part, what) for part in answer]


def _amount(text: str, what: str) -> float:
    """*text* as a finite number from 0 (seconds or dollars), or `StateUnavailable`."""
    try:
        number = float(text)
    except ValueError:
        raise _unreadable(f"{what} is not a number") from None
    if not (math.isfinite(number) and number >= 0):
        raise _unreadable(f"{what} is not a finite number from 0")
    return number


def _record(raw: object) -> KeyRecord | None:
    if raw is None:
        return None
    try:
        data = json.loads(_text(raw))
    except (ValueError, RecursionError):  # a hand edit in Redis (RecursionError: nested deep)
        raise ConfigurationError("a gateway key record is damaged") from None
    return record_from_dict(data)


def _dumped(record: KeyRecord) -> str:
    return json.dumps(record_to_dict(record), allow_nan=False)


_URL_SECONDS: Final = (
    "socket_timeout",
    "socket_connect_timeout",
    "timeout",
    "health_check_interval",
)
"""The options of a state URL that are seconds (redis-py reads them as floats, NaN included)."""


def _checked_url(url: str) -> dict[str, Any]:
    """*url*'s options once redis-py can read it (its port, database and options), checked now.

    redis-py reads it only at the first call, and raises ``ValueError`` there: a
    `ConfigurationError` now instead, never showing the URL's password. A timeout in it must be
    a finite number of seconds above 0 and at most a day (redis-py takes ``nan``, ``inf``, a
    negative number or 0, which would make every call fail at once, or wait for ever).

    Raises:
        ConfigurationError: redis-py cannot read *url*, or a timeout in it is unusable.
    """
    import redis
    from redis.connection import parse_url

    try:
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        # A connection made now, without connecting: an option redis-py does not know (a typo,
        # "socket_timout") or cannot use ("protocol=9") fails here, not at every call as if
        # Redis had failed (and, with fallback="local", for ever unnoticed).
        arguments = dict(options)
        made = arguments.pop("connection_class", redis.Connection)
        for pool_option in ("max_connections", "timeout"):
            arguments.pop(pool_option, None)
        made(**arguments)
    except (ValueError, TypeError, redis.exceptions.RedisError) as exc:
        userinfo = url.partition("://")[2].partition("/")[0].rpartition("@")[0]
        reason = str(exc)[:200]
        if userinfo and userinfo.rpartition(":")[2] in reason:
            reason = type(exc).__name__
        raise ConfigurationError(f"the state URL cannot be used: {reason}") from None
    scheme, _, rest = url.partition("://")
    path = rest.partition("?")[0].partition("/")[2].strip("/")
    db = options.get("db", 0)
    named = scheme in ("redis", "rediss") and path and not path.isdigit()
    if named or db < 0:
        # redis-py reads "/flux" as no database at all (so 0), and takes -1 until it connects.
        shown = path if named else db
        raise ConfigurationError(
            "the state URL's database must be a whole number from 0 (redis://host:6379/0; "
            f"key names take prefix=), not {shown!r:.40}"
        )
    for name in _URL_SECONDS:
        value = options.get(name)
        if value is None:
            continue
        zero = name == "health_check_interval"  # 0: no health checks, redis-py's default
        if not (math.isfinite(value) and (value > 0 or (zero and value == 0)) and value <= 86400):
            low = "from 0" if zero else "above 0"
            raise ConfigurationError(
                f"the state URL's {name} must be a finite number of seconds {low} and at most "
                f"86400, not {value!r}"
            )
    return options


def _made_locally(done: Finish) -> bool:
    """Whether *done* settles a reservation made in the local state while Redis was down."""
    return done.reservation is not None and done.reservation.local


class _Fallback:
    """Whether Redis is skipped for now (``fallback="local"`` after a failure), and the warning."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.local = LocalState()
        self._until = 0.0
        self.down = False
        """Whether Redis failed and has not answered since (read after every Redis call)."""
        self._lock = threading.Lock()

    def active(self) -> bool:
        return self.enabled and time.monotonic() < self._until

    def finish_locally(self, done: Finish) -> float | None:
        """Finish *done* in the local state; a reservation Redis holds is left to Redis.

        Settling it here would refund (or charge) a local budget that never held it; left in
        Redis as reserved, it counts the estimate: the side that cannot overspend.
        """
        if done.reservation is not None and not _made_locally(done):
            done = attrs.evolve(done, reservation=None, charge_usd=None)
        return self.local.finish_now(done)

    def admit_locally(self, ask: Ask) -> Admitted | Denied:
        """Admit *ask* in the local state; its reservation marked as made here (`_made_locally`)."""
        answer = self.local.admit_now(ask)
        if isinstance(answer, Admitted) and isinstance(answer.reservation, Reservation):
            return Admitted(answer.granted, attrs.evolve(answer.reservation, local=True))
        return answer

    def fell(self, exc: StateUnavailable) -> None:
        """Redis failed: raise (fail closed), or use local state for a while, warning once.

        A damaged key (`DamagedState`) always fails closed: Redis answers, and falling back
        would lift the budget it holds.
        """
        if not self.enabled or isinstance(exc, DamagedState):
            raise exc
        with self._lock:
            self._until = time.monotonic() + _RETRY_LOCAL
            if self.down:
                return
            self.down = True
        _LOG.warning(
            "shared state unavailable (%s); using this process's own state instead "
            "(state_fallback = 'local'): budgets, breakers and rate limits are not shared "
            "until Redis answers again",
            exc,
        )

    def back(self) -> None:
        """Redis answered after a failure: say so once; its next failure warns again."""
        with self._lock:
            if not self.down:
                return
            self.down = False
        _LOG.warning(
            "shared state available again: budgets, breakers and rate limits are shared again "
            "(what this process counted meanwhile stays its own)"
        )


class RedisState:
    """The shared state in Redis (see the module docstring and `flux_adapters.state`)."""

    def __init__(
        self,
        url: str,
        *,
        fallback: Literal["none", "local"] = "none",
        timeout: float = 1.0,
        prefix: str = "flux:",
    ) -> None:
        with extra_imports():
            import redis  # noqa: F401  (the redis extra: raise its install hint now, not later)
        options = _checked_url(url)
        self._url = url
        self._timeout = check_seconds(timeout, "timeout")
        if self._timeout == 0:
            self._timeout = 1.0
        if options.get("socket_timeout") is not None:
            # redis-py lets the URL's option win over the one given in code: so does the state,
            # so that its deadlines and its messages say the timeout the sockets have.
            self._timeout = float(options["socket_timeout"])
        if not prefix or not all(c.isalnum() or c in ":_-." for c in prefix) or len(prefix) > 40:
            from flux_adapters.errors import ConfigurationError

            raise ConfigurationError("a state prefix must be 1 to 40 letters, digits or :_-.")
        self._layout = _Layout(prefix)
        self._fallback = _Fallback(fallback == "local")
        self._async: redis.asyncio.Redis | None = None
        self._loop: object = None  # the event loop `_async` was made in
        self._scripts: dict[str, Any] = {}
        self._blocking: _RedisBlocking | None = None

    def __repr__(self) -> str:
        return f"RedisState(prefix={self._layout.prefix!r}, timeout={self._timeout:g})"

    @property
    def prefix(self) -> str:
        return self._layout.prefix

    @property
    def fallback(self) -> Literal["none", "local"]:
        """What this state does when Redis does not answer: fail closed, or use local state."""
        return "local" if self._fallback.enabled else "none"

    def _options(self) -> dict[str, Any]:
        return {
            "socket_timeout": self._timeout,
            "socket_connect_timeout": self._timeout,
            "retry_on_timeout": False,
            "health_check_interval": 0,
            # RESP2: all the scripts need, spoken by every Redis they run on (5.0 and later:
            # TIME before writes). redis-py 8 asks for RESP3 by default, with a HELLO that a
            # Redis 5 (or a proxy without HELLO) refuses: every call would fail.
            "protocol": 2,
        }

    def _client(self) -> redis.asyncio.Redis:
        import asyncio

        loop = asyncio.get_running_loop()
        if self._async is not None and self._loop is not loop:
            # Its connections belong to the loop they were made in (closed by now, after an
            # asyncio.run): every call would fail with redis-py's RuntimeError. They cannot be
            # closed from here; the caller must (or open a state for each loop).
            raise ConfigurationError(
                "this Redis state was used in another event loop (asyncio.run called again?): "
                "close it there (await state.aclose()) before using it in another, or open "
                "one state for each loop"
            )
        if self._async is None:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # At most 64 connections; a call waits for a free one no longer than the timeout.
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self._url,
                max_connections=64,
                timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),
                connection_class=bounded_connection(self._url),
                **self._options(),
            )
            self._async = redis.asyncio.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
            self._loop = loop
            for name, source in (("admit", ADMIT), ("finish", FINISH), ("spent", SPENT)):
                self._scripts[name] = self._async.register_script(source)
        return self._async

    async def _call(self, name: str, keys: list[str], args: list[str]) -> Any:

        import asyncio

        client = self._client()
        # One deadline for the whole call: the pool's wait, connecting, and every round trip
        # (EVALSHA, and SCRIPT LOAD and EVALSHA again after a NOSCRIPT), each of which redis-py
        # bounds only on its own.
        # (_answered and bounded_answer written out: this is every AsyncFluxClient call's path)
        left = _LEFT.set([MAX_ANSWER, MAX_ANSWER])
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._scripts[name](keys=keys, args=args, client=client)
            if self._fallback.down:  # it failed before, and answers again
                self._fallback.back()
            return answer
        except Exception as exc:
            raise _unavailable(exc, self._timeout) from exc
        finally:
            _LEFT.reset(left)

    async def _raw(self, *command: str) -> Any:
        import asyncio

        client = self._client()
        with _answered(self._timeout), bounded_answer(MAX_ANSWER):
            async with asyncio.timeout(self._timeout * 2 + 0.5):
                return await client.execute_command(*command)  # type: ignore[no-untyped-call]

    async def where(self) -> Literal["redis", "local"]:
        """Where the state is kept now, for a readiness check (the gateway's ``/readyz``).

        ``"redis"`` once Redis answered a ``PING`` in time; ``"local"`` while this process's
        own state stands in for it (``fallback="local"`` after a failure).

        Raises:
            StateUnavailable: Redis did not answer, and there is no fallback.
        """
        if self._fallback.active():
            return "local"
        try:
            with _ending("asked by a readiness check"):
                await self._raw("PING")
        except StateUnavailable as exc:
            self._fallback.fell(exc)  # raises it again without a fallback
            return "local"
        if self._fallback.down:
            self._fallback.back()
        return "redis"

    # -- the atomic steps --------------------------------------------------------------------

    async def admit(self, ask: Ask) -> Admitted | Denied:
        """See `flux_adapters.state.StateBackend.admit`."""
        if self._fallback.active():
            return self._fallback.admit_locally(ask)
        keys, args = self._layout.admit(ask)
        try:
            return self._layout.admitted(ask, await self._call("admit", keys, args))
        except StateUnavailable as exc:
            self._fallback.fell(exc)
            return self._fallback.admit_locally(ask)

    async def finish(self, done: Finish) -> float | None:
        """See `flux_adapters.state.StateBackend.finish`."""
        if self._fallback.active() or _made_locally(done):
            return self._fallback.finish_locally(done)
        keys, args = self._layout.finish(done)
        try:
            with _after_the_call():
                return self._layout.finished(await self._call("finish", keys, args))
        except StateUnavailable as exc:
            self._fallback.fell(exc)
            return self._fallback.finish_locally(done)

    async def reserve(
        self, scope: str, amount_usd: float, limit_usd: float, period: Period
    ) -> Reservation | None:
        ask = Ask(
            scope=check_scope(scope),
            amount_usd=check_usd(amount_usd, "amount_usd"),
            limit_usd=check_usd(limit_usd, "limit_usd"),
            period=check_period(period),
        )
        answer = await self.admit(ask)
        return answer.reservation if isinstance(answer, Admitted) else None  # type: ignore[return-value]

    async def settle(self, reservation: Reservation, spent_usd: float) -> None:
        await self.finish(
            Finish(reservation=reservation, charge_usd=check_usd(spent_usd, "spent_usd"))
        )

    async def spent(self, scope: str, period: Period) -> float:
        key = f"{self._layout.prefix}budget:{check_scope(scope)}"
        if self._fallback.active():
            return await self._fallback.local.spent(scope, period)
        try:
            answer = await self._call("spent", [key], [check_period(period)])
            return _amount(_string(answer, "the budget's spending"), "the budget's spending")
        except StateUnavailable as exc:
            self._fallback.fell(exc)
            return await self._fallback.local.spent(scope, period)

    async def breaker_acquire(self, key: tuple[str, str]) -> Pass | float:
        answer = await self.admit(Ask(key=key))
        if isinstance(answer, Admitted):
            assert answer.granted is not None
            return answer.granted
        return answer.seconds

    async def breaker_success(self, key: tuple[str, str]) -> None:
        await self.finish(Finish(granted=Pass(key), outcome="success"))

    async def breaker_failure(
        self, key: tuple[str, str], retry_after: float | None, cooldown: float = 30.0
    ) -> float | None:
        asked = None if retry_after is None else check_seconds(retry_after, "retry_after")
        return await self.finish(
            Finish(
                granted=Pass(key),
                outcome="failure",
                retry_after=asked,
                cooldown=check_seconds(cooldown, "cooldown"),
            )
        )

    async def breaker_release(self, granted: Pass) -> None:
        await self.finish(Finish(granted=granted, outcome="release"))

    async def take(self, bucket: str, rate_per_s: float, burst: int) -> float:
        rate, size = check_rate(rate_per_s, burst)
        answer = await self.admit(Ask(bucket=check_bucket(bucket), rate_per_s=rate, burst=size))
        return 0.0 if isinstance(answer, Admitted) else answer.seconds

    async def pause(self, bucket: str, seconds: float) -> None:
        await self.finish(
            Finish(bucket=check_bucket(bucket), pause_s=check_seconds(seconds, "seconds"))
        )

    # -- gateway keys ------------------------------------------------------------------------

    async def put_key(self, record: KeyRecord) -> None:
        if not isinstance(record, KeyRecord):
            raise TypeError("put_key takes a KeyRecord")
        p = self._layout.prefix
        # One script: the record, its hash's index and the set of ids change together.
        answer = await self._raw(
            "EVAL",
            "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[2]); "
            "redis.call('SADD', KEYS[3], ARGV[2]); return 1",
            "3",
            f"{p}gwkey:{record.id}",
            f"{p}gwhash:{record.key_hash}",
            f"{p}gwkeys",
            _dumped(record),
            record.id,
        )
        if answer != 1:  # the script answers 1: anything else is not Redis confirming the write
            raise StateUnavailable(
                f"the shared state (Redis) did not confirm storing gateway key {record.id}"
            )

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        given: object = key_hash
        if not isinstance(given, str) or len(given) != 64:
            return None
        if self._fallback.active():
            # fallback="local", Redis failed moments ago: not asked again before it is retried,
            # as admit is not, so that a frozen Redis costs one call its timeout, not every call
            # (the gateway goes on with the keys it has seen).
            raise StateUnavailable(
                "the shared state (Redis) is not asked for a while after it failed "
                f"(state_fallback = 'local'); {_ENDING.get()}"
            )
        p = self._layout.prefix
        try:
            raw = await self._raw(
                "EVAL",
                "local id = redis.call('GET', KEYS[1]); if not id then return false end; "
                "return redis.call('GET', ARGV[1] .. id)",
                "1",
                f"{p}gwhash:{key_hash}",
                f"{p}gwkey:",
            )
        except StateUnavailable as exc:
            self._fallback.fell(exc)  # raises it again without a fallback
            raise
        if self._fallback.down:  # it failed before, and answers again
            self._fallback.back()
        return _record(raw)

    async def list_keys(self) -> list[KeyRecord]:
        p = self._layout.prefix
        ids = await self._raw("SMEMBERS", f"{p}gwkeys")
        if not isinstance(ids, list | set):  # a set in RESP3, a list in RESP2
            raise _unreadable("the set of gateway key ids is not a set")
        names = [_string(i, "a gateway key id") for i in ids]
        if not names:
            return []
        raws = await self._raw("MGET", *(f"{p}gwkey:{name}" for name in names))
        if not isinstance(raws, list) or len(raws) != len(names):
            raise _unreadable("the gateway key records are not one for each id")
        found = [r for r in (_record(raw) for raw in raws) if r is not None]
        return sorted(found, key=lambda r: (r.created, r.id))

    async def delete_key(self, key_id: str) -> bool:
        given: object = key_id
        if not isinstance(given, str) or not given.isalnum() or len(given) > 32:
            return False
        p = self._layout.prefix
        removed = await self._raw(
            "EVAL",
            "local raw = redis.call('GET', KEYS[1]); if not raw then return 0 end; "
            "local h = cjson.decode(raw)['key_hash']; redis.call('DEL', KEYS[1]); "
            "redis.call('DEL', ARGV[1] .. h); redis.call('SREM', KEYS[2], ARGV[2]); return 1",
            "2",
            f"{p}gwkey:{key_id}",
            f"{p}gwkeys",
            f"{p}gwhash:",
            key_id,
        )
        if removed not in (0, 1):
            raise _unreadable("the deletion of a gateway key is not 0 or 1")
        return bool(removed)

    async def aclose(self) -> None:
        import asyncio

        client, self._async = self._async, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose(close_connection_pool=True)
        # else: made in another loop, which alone can close its connections (if it still runs)
        if self._blocking is not None:
            self._blocking.close()

    # -- blocking form -----------------------------------------------------------------------

    @property
    def blocking(self) -> _RedisBlocking:
        """The same state on redis-py's blocking client (`flux_adapters.state.BlockingState`)."""
        if self._blocking is None:
            self._blocking = _RedisBlocking(self)
        return self._blocking


_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "flux_adapters_redis_deadline", default=None
)
"""When (``time.monotonic()``) the blocking Redis call under way in this thread must end."""


class _DeadlineSocket:
    """A blocking connection's socket whose reads and writes end at the call's deadline.

    redis-py bounds each ``recv`` by the socket timeout, not a reply: a Redis that drips its
    reply a byte at a time, or a call that takes several round trips (``EVALSHA``, then
    ``SCRIPT LOAD`` after a ``NOSCRIPT``), could go on for ever with every read in time. Here
    each read waits at most what is left of the deadline `_RedisBlocking` set for the call.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._timeout = sock.gettimeout()

    def settimeout(self, value: float | None) -> None:
        self._timeout = value
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def _cut(self) -> bool:
        """Lower the socket's timeout to what is left of the deadline; whether it was."""
        deadline = _DEADLINE.get()
        if deadline is None:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the Redis call's deadline passed")  # socket.timeout
        if self._timeout is not None and self._timeout <= left:
            return False  # the socket's own timeout ends this read within the deadline
        if self._timeout == 0:
            return False  # a non-blocking peek (redis-py checking for a closed connection)
        self._sock.settimeout(left)
        return True

    def recv(self, *args: Any) -> bytes:
        cut = self._cut()
        try:
            data = self._sock.recv(*args)
        finally:
            if cut:
                self._sock.settimeout(self._timeout)
        if len(args) < 2 or not args[1] & socket.MSG_PEEK:
            _count(len(data))
        return data

    def recv_into(self, *args: Any) -> int:
        cut = self._cut()
        try:
            size = self._sock.recv_into(*args)
        finally:
            if cut:
                self._sock.settimeout(self._timeout)
        _count(size)
        return size

    def sendall(self, data: Any) -> None:
        cut = self._cut()
        try:
            self._sock.sendall(data)
        finally:
            if cut:
                self._sock.settimeout(self._timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _BoundedReader:
    """An async connection's stream, counting what each call reads (`bounded_answer`)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def read(self, n: int = -1) -> bytes:
        data: bytes = await self._stream.read(n)
        _count(len(data))
        return data

    async def readline(self) -> bytes:
        data: bytes = await self._stream.readline()
        _count(len(data))
        return data

    async def readexactly(self, n: int) -> bytes:
        _count(n)  # before: the stream would gather all *n* bytes in memory first
        data: bytes = await self._stream.readexactly(n)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def bounded_connection(url: str) -> type[Any]:
    """The connection class ``redis.asyncio`` would use for *url*, its reads counted."""
    import redis.asyncio
    from redis.asyncio.connection import parse_url

    base: type[Any] = parse_url(url).get("connection_class", redis.asyncio.Connection)

    class BoundedConnection(base):  # type: ignore[misc]
        async def _connect(self) -> None:
            await super()._connect()
            self._reader = _BoundedReader(self._reader)  # type: ignore[has-type]

    return BoundedConnection


def _deadline_connection(url: str) -> type[Any]:
    """The connection class redis-py would use for *url*, its sockets `_DeadlineSocket`s."""
    import redis
    from redis.connection import parse_url

    base: type[Any] = parse_url(url).get("connection_class", redis.Connection)  # type: ignore[no-untyped-call]

    class DeadlineConnection(base):  # type: ignore[misc]
        def _connect(self) -> _DeadlineSocket:
            return _DeadlineSocket(super()._connect())

    return DeadlineConnection


class _RedisBlocking:
    """`RedisState` for `flux_adapters.FluxClient`: the same scripts, on the blocking client."""

    def __init__(self, state: RedisState) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._state = state
        pool = redis.BlockingConnectionPool.from_url(
            state._url,
            max_connections=64,
            timeout=state._timeout,
            retry=Retry(NoBackoff(), 0),
            connection_class=_deadline_connection(state._url),
            **state._options(),
        )
        self._client = redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        self._admit = self._client.register_script(ADMIT)
        self._finish = self._client.register_script(FINISH)

    def _call(self, script: Any, keys: list[str], args: list[str]) -> Any:
        # Every read of the call (the handshake of a new connection, EVALSHA, and SCRIPT LOAD
        # and EVALSHA again after a NOSCRIPT) shares one deadline: `_DeadlineSocket`.
        # (_answered and bounded_answer written out: this is every FluxClient call's path)
        timeout = self._state._timeout
        deadline = _DEADLINE.set(time.monotonic() + timeout)
        left = _LEFT.set([MAX_ANSWER_BLOCKING, MAX_ANSWER_BLOCKING])
        try:
            answer = script(keys=keys, args=args)
        except Exception as exc:
            raise _unavailable(exc, timeout) from exc
        else:
            if self._state._fallback.down:  # it failed before, and answers again
                self._state._fallback.back()
            return answer
        finally:
            _LEFT.reset(left)
            _DEADLINE.reset(deadline)

    def admit(self, ask: Ask) -> Admitted | Denied:
        fallback = self._state._fallback
        if fallback.active():
            return fallback.admit_locally(ask)
        keys, args = self._state._layout.admit(ask)
        try:
            return self._state._layout.admitted(ask, self._call(self._admit, keys, args))
        except StateUnavailable as exc:
            fallback.fell(exc)
            return fallback.admit_locally(ask)

    def finish(self, done: Finish) -> float | None:
        fallback = self._state._fallback
        if fallback.active() or _made_locally(done):
            return fallback.finish_locally(done)
        keys, args = self._state._layout.finish(done)
        try:
            with _after_the_call():
                return self._state._layout.finished(self._call(self._finish, keys, args))
        except StateUnavailable as exc:
            fallback.fell(exc)
            return fallback.finish_locally(done)

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()
