"""The Redis side of a batch shared by many workers: claims, leases, the journal, the counts.

Every step is one Lua script (atomic in Redis), every time is the server's (``TIME``, in
milliseconds), every key lives under ``<prefix>batch:{<batch id>}:`` (one hash tag: one slot
in a cluster) and every key's expiry is set again, to *keep* seconds, by every step: the state
of a batch goes away *keep* seconds after its last step. No secret is stored: the records hold
what the file-based journal holds (provider names, digests, job ids, result URLs without the
key).

Keys (``B`` = the block size, job *n* is in block ``n // B``):

``meta``     hash: total, block, blocks, lease (ms), round, next (the next block never
             claimed), file (digest of the jobs file), output, prev_round / prev_counts,
             epoch (random, made by the worker that began the batch: every later script of
             a worker names it, so a batch begun afresh under the same id after a flush is
             refused to the workers of the lost one)
``leases``   sorted set: block -> lease end (server ms); only the blocks being worked on
``owners``   hash: block -> the worker holding it
``jobs``     hash: job number -> its journal records (JSON lines), for the jobs in flight and
             those that ended unsaved (a rerun needs them); a saved job's are deleted
``saved``    bitmap: job number -> saved (its image is in the output)
``done``     bitmap: job number -> ended in this round (counted once)
``counts``   hash: status -> jobs of this round that ended so

Beside them, ``<prefix>batch-output:{<digest of the output>}`` (a string, its own slot) names the
batch the output is (`Store.take_output`), with the same expiry.

So what Redis holds grows with the jobs in flight and the jobs that ended unsaved, plus two bits
a job (250 KB for a million jobs), never with the jobs saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from attrs import frozen

from flux_adapters.errors import ConfigurationError, StateUnavailable

if TYPE_CHECKING:
    from flux_adapters.state._redis import RedisState

__all__ = ["Claim", "Store"]

_HEAD: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local meta, leases, owners, jobs, saved, done, counts =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local function keep(seconds)
  for i = 1, 7 do redis.call('EXPIRE', KEYS[i], seconds) end
end
"""

_FENCED: Final = (
    _HEAD
    + """
-- the batch this worker joined (its epoch, the last ARGV) is gone: flushed, or begun afresh
if redis.call('EXISTS', meta) == 0 or (redis.call('HGET', meta, 'epoch') or '') ~= ARGV[#ARGV] then
  return {'missing'}
end
"""
)
"""`_HEAD` and the fence of every script a worker runs after `BEGIN`: its last argument is the
batch's epoch (`Store.epoch`), and a batch that is not the one it joined answers ``missing``."""

BEGIN: Final = (
    _HEAD
    + """
-- ARGV: total, block, lease_ms, keep, file digest, output, epoch (for a new batch)
local total, block = tonumber(ARGV[1]), tonumber(ARGV[2])
local how = 'join'
if redis.call('EXISTS', meta) == 0 then
  redis.call('HSET', meta, 'total', total, 'block', block,
    'blocks', math.ceil(total / block), 'lease', ARGV[3], 'round', 1, 'next', 0,
    'file', ARGV[5], 'output', ARGV[6], 'epoch', ARGV[7])
  redis.call('DEL', leases, owners, jobs, saved, done, counts)
  how = 'new'
else
  if redis.call('HGET', meta, 'file') ~= ARGV[5] or tonumber(redis.call('HGET', meta, 'total')) ~= total then
    return {'mismatch', redis.call('HGET', meta, 'output') or ''}
  end
  local nxt = tonumber(redis.call('HGET', meta, 'next'))
  local blocks = tonumber(redis.call('HGET', meta, 'blocks'))
  if nxt >= blocks and redis.call('ZCARD', leases) == 0 then
    -- the last round is over: this worker begins another (a rerun)
    local round = tonumber(redis.call('HGET', meta, 'round'))
    redis.call('HSET', meta, 'prev_round', round,
      'prev_counts', cjson.encode(redis.call('HGETALL', counts)), 'round', round + 1, 'next', 0)
    redis.call('DEL', owners, done, counts)
    how = 'rerun'
  end
end
keep(tonumber(ARGV[4]))
local m = redis.call('HMGET', meta, 'round', 'block', 'lease', 'epoch')
return {how, m[1], m[2], m[3], m[4] or ''}
"""
)

CLAIM: Final = (
    _FENCED
    + """
-- ARGV: worker, round, keep, epoch
local m = redis.call('HMGET', meta, 'round', 'block', 'lease', 'next', 'blocks', 'total')
if m[1] ~= ARGV[2] then return {'over'} end
local block, lease, nxt = tonumber(m[2]), tonumber(m[3]), tonumber(m[4])
local blocks, total = tonumber(m[5]), tonumber(m[6])
local b, took
local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 1)
if #expired > 0 then
  -- 2: its lease was this worker's own, and no other took it meanwhile; 1: another's
  b, took = tonumber(expired[1]), redis.call('HGET', owners, expired[1]) == ARGV[1] and 2 or 1
elseif nxt < blocks then
  b, took = nxt, 0
  redis.call('HSET', meta, 'next', nxt + 1)
elseif redis.call('ZCARD', leases) > 0 then
  local first = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
  return {'wait', tostring(tonumber(first[2]) - now)}
else
  return {'done'}
end
redis.call('ZADD', leases, now + lease, b)
redis.call('HSET', owners, b, ARGV[1])
local first = b * block
local last = math.min(first + block, total) - 1
local out = {'block', tostring(b), tostring(took), ''}
local flags = {}
for n = first, last do
  flags[#flags + 1] = redis.call('GETBIT', done, n) .. redis.call('GETBIT', saved, n)
  out[#out + 1] = redis.call('HGET', jobs, n) or ''
end
out[4] = table.concat(flags)
keep(tonumber(ARGV[3]))
return out
"""
)

RENEW: Final = (
    _FENCED
    + """
-- ARGV: worker, keep, round, blocks..., epoch
local lease = tonumber(redis.call('HGET', meta, 'lease') or '0')
local lost = {}
for i = 4, #ARGV - 1 do
  if redis.call('HGET', owners, ARGV[i]) == ARGV[1] and redis.call('ZSCORE', leases, ARGV[i]) then
    redis.call('ZADD', leases, 'XX', now + lease, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
keep(tonumber(ARGV[2]))
local current = redis.call('HGET', meta, 'round') == ARGV[3]
return {table.concat(lost, ','), current and 1 or 0, redis.call('HGETALL', counts)}
"""
)

JOURNAL: Final = (
    _FENCED
    + """
-- ARGV: worker, keep, ops (JSON list of [job or block, record, end status, saved, release]), epoch
-- Every op is fenced: only the worker holding a job's block may write for it.
local block = tonumber(redis.call('HGET', meta, 'block') or '0')
local ops = cjson.decode(ARGV[3])
local out = {}
for i, op in ipairs(ops) do
  local n = op[1]
  local b = op[5] ~= '' and op[5] or tostring(math.floor(tonumber(n) / block))
  if block == 0 or redis.call('HGET', owners, b) ~= ARGV[1] or not redis.call('ZSCORE', leases, b) then
    out[i] = 'lost'
  else
    if op[5] ~= '' then
      if op[2] == 'finished' then
        redis.call('ZREM', leases, b)
        redis.call('HDEL', owners, b)
      else
        redis.call('ZADD', leases, 0, b)  -- given up: any worker takes it over at once
      end
    else
      if op[2] ~= '' then
        redis.call('HSET', jobs, n, (redis.call('HGET', jobs, n) or '') .. op[2] .. '\\n')
      end
      if op[3] ~= '' then
        if redis.call('GETBIT', done, n) == 0 then
          redis.call('SETBIT', done, n, 1)
          redis.call('HINCRBY', counts, op[3], 1)
        end
        if op[4] == 1 then
          redis.call('SETBIT', saved, n, 1)
          redis.call('HDEL', jobs, n)
        end
      end
    end
    out[i] = 'ok'
  end
end
keep(tonumber(ARGV[2]))
return out
"""
)

STATUS: Final = (
    _FENCED
    + """
-- ARGV: round, epoch
local m = redis.call('HMGET', meta, 'round', 'prev_round', 'prev_counts')
if m[1] == ARGV[1] then return {'current', cjson.encode(redis.call('HGETALL', counts))} end
if m[2] == ARGV[1] then return {'previous', m[3]} end
return {'gone', '[]'}
"""
)

OUTPUT: Final = """
-- KEYS: the output's key. ARGV: this batch's id, keep, the id of the batch it replaces ('')
-- The batch the output is this one's now, unless another holds it: that one's id.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] and holder ~= ARGV[3] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return ARGV[1]
"""
"""One output, one batch at a time (see `Store.take_output`)."""

HOLDER: Final = (
    _HEAD
    + """
-- KEYS: another batch's. What is left of it: 'gone'; 'live' (a lease not ended: a worker is
-- on it); 'open' (jobs not ended, no worker on them) or 'ended'; and its unconfirmed jobs.
if redis.call('EXISTS', meta) == 0 then return {'gone', '0'} end
local unconfirmed = redis.call('HGET', counts, 'unconfirmed') or '0'
if #redis.call('ZRANGEBYSCORE', leases, '(' .. now, '+inf', 'LIMIT', 0, 1) > 0 then
  return {'live', unconfirmed}
end
local m = redis.call('HMGET', meta, 'next', 'blocks')
if tonumber(m[1] or '0') < tonumber(m[2] or '0') or redis.call('ZCARD', leases) > 0 then
  return {'open', unconfirmed}
end
return {'ended', unconfirmed}
"""
)

STATUSES: Final = ("ok", "skipped", "failed", "unconfirmed", "changed")


@frozen
class Claim:
    """A block of jobs claimed: its number, whether it was taken over, and its jobs.

    ``jobs``: (job number, ended in this round, saved, journal records) for each job.
    ``own``: taken over from this worker itself (its lease ran out, a stalled loop, and no
    other worker held the block since): what this worker knows of its jobs is still all there
    is. Not so for a block another worker held meanwhile, even one this worker held before.
    """

    block: int
    taken_over: bool
    jobs: tuple[tuple[int, bool, bool, tuple[dict[str, Any], ...]], ...]
    own: bool = False


_PARTS: Final = ("meta", "leases", "owners", "jobs", "saved", "done", "counts")
"""The keys of a batch, under ``<prefix>batch:{<batch id>}:``, in the order the scripts take."""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _counts(flat: object) -> dict[str, int]:
    """``HGETALL``'s flat list (or cjson's list of it) as status -> count."""
    items = [_text(item) for item in flat] if isinstance(flat, list) else []
    found = dict.fromkeys(STATUSES, 0)
    for status, count in zip(items[::2], items[1::2], strict=False):
        if status in found:
            found[status] = max(int(count), 0)
    return found


def _positive(text: str) -> bool:
    return text.isdigit() and 0 < int(text) <= 10**12


def _records(raw: str) -> tuple[dict[str, Any], ...]:
    found = []
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested deep (not ours)
            continue
        if isinstance(record, dict):
            found.append(record)
    return tuple(found)


class Store:
    """One shared batch's state in Redis, through the state backend's connection.

    Every call is bounded by the state's timeout; any failure is `StateUnavailable`, whose
    message says the batch stops (the caller stops sending: a job whose ``sent`` record was not
    acknowledged is never sent).
    """

    def __init__(self, state: RedisState, batch_id: str, *, worker: str, keep_s: int) -> None:
        self._state = state
        self.batch_id = batch_id
        self.worker = worker
        self._keep = str(keep_s)
        base = f"{state.prefix}batch:{{{batch_id}}}:"
        self.keys = [base + part for part in _PARTS]
        self._scripts: dict[str, Any] = {}
        self._output: list[str] = []
        """The output's key, once taken (`take_output`)."""
        self.round = ""
        self.block = 0
        self.total = 0
        self.epoch = ""
        """The batch's own random id, made by the worker that began it: a batch begun afresh
        under the same id (after a flush) has another, and this worker's scripts refuse it."""

    async def _run(
        self, name: str, source: str, args: list[str], keys: list[str] | None = None
    ) -> Any:
        from flux_adapters.state._redis import MAX_ANSWER, bounded_answer, failure

        client = self._state._client()  # the state's pool: its timeouts, no retries
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = client.register_script(source)
        timeout = self._state._timeout
        try:
            with bounded_answer(MAX_ANSWER):
                async with asyncio.timeout(timeout * 2 + 0.5):  # a belt over the socket bounds
                    answer = await script(keys=keys or self.keys, args=args, client=client)
        except Exception as exc:  # redis-py at work on what the server sent: see _redis._answered
            what, detail = failure(exc, timeout)
            raise StateUnavailable(
                f"the batch's shared state (Redis) {what} ({detail}): no job is sent without "
                "its record there; stopping"
            ) from exc
        if isinstance(answer, list) and answer[:1] in ([b"missing"], ["missing"]):
            raise StateUnavailable(
                f"the shared state (Redis) no longer holds batch {self.batch_id} (flushed, "
                "restarted without persistence, or failed over to a replica that lacked it): "
                "its journal is lost, so no job is sent; stopping (see docs/scaling.md: "
                "appendonly yes, appendfsync always)"
            )
        return answer

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[None]:
        """Raise an answer of the wrong shape (a script's, read here) as `StateUnavailable`."""
        try:
            yield
        except (TypeError, ValueError, IndexError, KeyError, AttributeError, RecursionError) as exc:
            # ValueError: also UnicodeDecodeError and json's JSONDecodeError; RecursionError: JSON
            # nested deep
            raise StateUnavailable(
                f"the batch's shared state (Redis) gave an answer to {what} that cannot be read "
                f"({type(exc).__name__}): no job is sent without its record there; stopping"
            ) from None

    async def take_output(self, output: str, *, resend_unconfirmed: bool) -> None:
        """Make *output* (`flux_adapters._shared_batch.shown_location`) this batch's.

        A batch's journal knows its jobs by number in its own jobs file: another batch writing
        to the same output (another file, or the same one changed) would send its jobs again
        under their names, those in flight and those that may have been billed alike. So an
        output is one batch's at a time: another batch's becomes this one's once it ended with
        nothing unconfirmed (or is gone from Redis); with jobs that may have been billed, only
        with *resend_unconfirmed*; while a worker holds a lease of it, never.

        Raises:
            ConfigurationError: Another batch holds the output.
        """
        import hashlib

        place = hashlib.sha256(output.encode("utf-8", "surrogatepass")).hexdigest()[:24]
        key = self._output = [f"{self._state.prefix}batch-output:{{{place}}}"]
        replaced = ""
        for _ in range(3):  # another batch took it meanwhile: judged again, a few times
            answer = await self._run("output", OUTPUT, [self.batch_id, self._keep, replaced], key)
            with self._read("OUTPUT"):
                holder = _text(answer)
            if holder == self.batch_id:
                return
            if not 0 < len(holder) <= 64 or not holder.replace("-", "").replace("_", "").isalnum():
                raise StateUnavailable(
                    "the batch's shared state (Redis) holds a damaged key of the output "
                    f"({key[0]}): fix or delete it; no job is sent"
                )
            other = f"{self._state.prefix}batch:{{{holder}}}:"
            keys = [other + part for part in _PARTS]
            state = await self._run("holder", HOLDER, [], keys)
            with self._read("HOLDER"):
                how, unconfirmed = (_text(part) for part in state)
                count = int(unconfirmed)
                if how not in ("gone", "live", "open", "ended"):
                    raise ValueError(how)
            where = (
                f"the output {output[:200]!r} is batch {holder}'s (another jobs file, or this "
                "one changed since that batch began; each batch knows its jobs by their line in "
                "its own file, so this one would send that one's jobs again)"
            )
            if how == "live":
                raise ConfigurationError(
                    f"{where}, and a worker is on it: let it end, or write to another output"
                )
            if (how == "open" or count > 0) and not resend_unconfirmed:
                left = f"{count} unconfirmed job(s)" if count else "jobs not ended"
                raise ConfigurationError(
                    f"{where}, and it has {left}, which may have been billed and would be sent "
                    "again: end it with its own jobs file, write to another output, or pass "
                    "--resend-unconfirmed to send them again"
                )
            replaced = holder
        raise ConfigurationError(f"the output {output[:200]!r} changed hands three times; retry")

    async def keep_output(self) -> None:
        """Set the expiry of the output's key (`take_output`) again.

        As every step does the batch's: a batch running longer than its expiry
        (``--state-expiry``) keeps its output.
        """
        if self._output:
            await self._run("output", OUTPUT, [self.batch_id, self._keep, ""], self._output)

    async def begin(
        self, *, total: int, block: int, lease_ms: int, file_digest: str, output: str
    ) -> tuple[str, int, int]:
        """Join (or create, or rerun) the batch: how, its block size and lease (ms).

        Raises:
            ConfigurationError: Another batch has this id (it cannot, but for a digest match).
        """
        args = [
            *(str(total), str(block), str(lease_ms), self._keep, file_digest, output),
            secrets.token_hex(8),  # the batch's epoch, if this worker makes it
        ]
        raw = await self._run("begin", BEGIN, args)
        with self._read("BEGIN"):
            answer = [_text(part) for part in raw]
            if answer[0] == "mismatch":
                raise ConfigurationError(
                    f"the shared state holds another batch under id {self.batch_id} "
                    f"(output {answer[1][:200]!r}); use another --state prefix"
                )
            how, round_, size, lease, epoch = answer
            if how not in ("new", "join", "rerun") or not round_.isdigit():
                raise ValueError(how)
            if not (_positive(size) and _positive(lease)):
                raise ValueError(size)
        self.round, self.block, self.total, self.epoch = round_, int(size), total, epoch
        return how, int(size), int(lease)

    async def claim(self) -> Claim | float | None:
        """A block of jobs to work on.

        Else the seconds until a lease held by another worker ends (others are still working),
        or ``None`` when this round is over.
        """
        args = [self.worker, self.round, self._keep, self.epoch]
        answer = await self._run("claim", CLAIM, args)
        with self._read("CLAIM"):
            kind = _text(answer[0])
            if kind == "wait":
                return min(max(int(_text(answer[1])), 0), 86_400_000) / 1000
            if kind in ("over", "done"):
                return None
            if kind != "block":
                raise ValueError(kind)
            block, took, flags = int(_text(answer[1])), _text(answer[2]), _text(answer[3])
            first = block * self.block
            count = min(self.block, self.total - first)
            if block < 0 or count < 1 or took not in ("0", "1", "2"):
                raise ValueError(block)
            if len(answer) != 4 + count or len(flags) != 2 * count:
                raise ValueError(len(answer))
            jobs = tuple(
                (first + i, flags[2 * i] == "1", flags[2 * i + 1] == "1", _records(_text(raw)))
                for i, raw in enumerate(answer[4:])
            )
        return Claim(block, took != "0", jobs, own=took == "2")

    async def renew(self, blocks: list[int]) -> tuple[set[int], bool, dict[str, int]]:
        """Extend the leases of *blocks*: those lost, whether the round is current, the counts."""
        args = [self.worker, self._keep, self.round, *(str(b) for b in blocks), self.epoch]
        answer = await self._run("renew", RENEW, args)
        with self._read("RENEW"):
            lost, current, counts = answer
            text = _text(lost)
            return {int(b) for b in text.split(",") if b}, bool(int(current)), _counts(counts)

    async def journal(self, ops: list[list[object]]) -> list[bool]:
        """Apply *ops* in order, fenced; for each, whether it was (not lost to another worker)."""
        payload = json.dumps(ops, separators=(",", ":"), ensure_ascii=True)
        args = [self.worker, self._keep, payload, self.epoch]
        answer = await self._run("journal", JOURNAL, args)
        with self._read("JOURNAL"):
            results = [_text(part) for part in answer]
            if len(results) != len(ops) or not set(results) <= {"ok", "lost"}:
                raise ValueError(len(results))
        return [result == "ok" for result in results]

    async def totals(self) -> dict[str, int] | None:
        """The counts of this worker's round (``None`` when they have expired)."""
        answer = await self._run("status", STATUS, [self.round, self.epoch])
        with self._read("STATUS"):
            kind, raw = (_text(part) for part in answer)
            if kind == "gone":
                return None
            return _counts(json.loads(raw))
