"""A `Store` in Redis: one queue's jobs under keys named after its stream.

Every state change is one Lua script, so it is atomic on the server and every worker of
the queue, on any machine, sees the same counts. The keys, for a stream named ``S``:

- ``S:job:<id>`` -- a hash per job: task, payload, request id, state, attempts, ...
- ``S:waiting`` -- the waiting jobs (pending and scheduled), scored by ``not_before``;
  ties go by the job's number (members are zero-padded ids), so the earliest-due job is
  claimed first, in enqueue order.
- ``S`` -- the stream of claims, read by the consumer group: a claim adds the job to the
  stream and reads it with ``XREADGROUP`` as the claiming worker, so ``XPENDING`` and
  ``XINFO CONSUMERS`` show which worker holds what; an outcome acknowledges and deletes
  the entry.
- ``S:leases`` -- the claimed jobs, scored by the end of their lease.
- ``S:dead`` -- the dead letters, a stream with the reason of each death.
- ``S:done`` -- completed jobs by the time they ended (for purging), ``S:dedupe`` --
  dedupe keys held by unfinished jobs, ``S:stats`` -- the ``completed`` and ``retried``
  counters, ``S:seq`` -- the last job number, ``S:wake`` -- a short list of wake-up
  tokens idle workers block on (every change that may make a job claimable pushes one),
  ``S:meta`` -- the schema version.

Times are the Redis server's clock (``TIME``), one clock for every worker, unless the
store is given a clock of its own (the tests' fake clock): then the scripts use it.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from ._exceptions import QueueFullError
from ._store import (
    LOST,
    SCHEMA_VERSION,
    UNREADABLE,
    Claim,
    Counts,
    DeadJob,
    NewJob,
    Outcome,
    SchemaVersionError,
    Store,
    _row_id,
    _text,
)

if TYPE_CHECKING:
    import coredis
    import trio

#: The longest an idle worker waits before looking again (a lease of a job claimed
#: elsewhere may run out meanwhile; nothing else goes unnoticed that long).
MAX_IDLE: Final = 0.5

#: Seconds a command may wait for its connection or its answer (an idle worker's
#: blocking wait, `MAX_IDLE` at most, included).
STREAM_TIMEOUT: Final = 5.0

#: Expired leases taken back per step of a claim.
_REAP_BATCH: Final = 256

_PRELUDE = r"""
local S = KEYS[1]
local server = ARGV[1] == ''
local now
if server then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local function at(x)
  if server then return now + tonumber(x) end
  return tonumber(x)
end
local function member(id) return string.format('%016d', tonumber(id)) end
-- A job record this code can read and change: a hash whose attempts are a whole number.
-- (Anything else under a job's key was written by something else; it is never changed.)
local function record_of(key)
  if redis.call('TYPE', key)['ok'] ~= 'hash' then return nil end
  local used = redis.call('HGET', key, 'attempts')
  if not used then return 0 end
  if not string.match(used, '^%-?%d+$') then return nil end
  return tonumber(used)
end
local function is_member(m) return string.match(m, '^%d+$') ~= nil end
local function idof(m) return (string.gsub(m, '^0+', '')) end
local function jobkey(id) return S .. ':job:' .. id end
local function wake()
  redis.call('LPUSH', S .. ':wake', '1')
  redis.call('LTRIM', S .. ':wake', 0, 63)
end
local function unhold(key, m, group)
  redis.call('ZREM', S .. ':leases', m)
  local entry = redis.call('HGET', key, 'entry')
  if entry then
    redis.call('XACK', S, group, entry)
    redis.call('XDEL', S, entry)
  end
  redis.call('HDEL', key, 'entry', 'token', 'worker')
end
local function release_dedupe(key, id)
  local d = redis.call('HGET', key, 'dedupe')
  if d and redis.call('HGET', S .. ':dedupe', d) == id then
    redis.call('HDEL', S .. ':dedupe', d)
  end
end
local function bury(key, id, err)
  redis.call('HSET', key, 'state', 'dead', 'error', err, 'finished_at', now)
  release_dedupe(key, id)
  local f = redis.call('HMGET', key, 'task', 'attempts')
  local entry = redis.call('XADD', S .. ':dead', '*', 'id', id, 'task', f[1] or '',
    'attempts', f[2] or '0', 'error', err)
  redis.call('HSET', key, 'dead_entry', entry)
end
-- A waiting or claimed entry whose job record cannot be read: to the dead letters (where
-- it is counted), changing nothing under the job's own key.
local function spoiled(m)
  redis.call('XADD', S .. ':dead', '*', 'id', idof(m), 'task', '', 'attempts', '0',
    'error', 'the stored job record is unreadable (written by something else?)')
end
"""

_SETUP = r"""
local S = KEYS[1]
local kind = redis.call('TYPE', S)['ok']
if kind ~= 'none' and kind ~= 'stream' then return {'not', kind} end
local kinds = {meta = 'hash', waiting = 'zset', leases = 'zset', done = 'zset',
  dead = 'stream', wake = 'list', dedupe = 'hash', stats = 'hash', seq = 'string'}
for suffix, expected in pairs(kinds) do
  local found = redis.call('TYPE', S .. ':' .. suffix)['ok']
  if found ~= 'none' and found ~= expected then return {'not', suffix} end
end
local version = redis.call('HGET', S .. ':meta', 'schema')
if version and version ~= ARGV[1] then return {'version', version} end
if not version then
  if kind == 'stream' or redis.call('EXISTS', S .. ':seq') == 1 then
    return {'not', 'stream'}
  end
  redis.call('HSET', S .. ':meta', 'schema', ARGV[1])
end
local ok = pcall(redis.call, 'XGROUP', 'CREATE', S, ARGV[2], '$', 'MKSTREAM')
local t = redis.call('TIME')
return {'ok', t[1], t[2]}
"""

# ARGV: now, task, payload, has_request_id, request_id, has_dedupe, dedupe, not_before,
# max_pending ('' for none).
_ENQUEUE = r"""
if ARGV[6] == '1' then
  local existing = redis.call('HGET', S .. ':dedupe', ARGV[7])
  if existing then return {0, existing} end
end
if ARGV[9] ~= '' then
  local n = redis.call('ZCARD', S .. ':waiting') + redis.call('ZCARD', S .. ':leases')
  if n >= tonumber(ARGV[9]) then return {1, n} end
end
local id = tostring(redis.call('INCR', S .. ':seq'))
local key = jobkey(id)
redis.call('HSET', key, 'task', ARGV[2], 'payload', ARGV[3], 'state', 'waiting',
  'attempts', 0, 'enqueued_at', now)
if ARGV[4] == '1' then redis.call('HSET', key, 'request_id', ARGV[5]) end
if ARGV[6] == '1' then
  redis.call('HSET', key, 'dedupe', ARGV[7])
  redis.call('HSET', S .. ':dedupe', ARGV[7], id)
end
local nb = tonumber(ARGV[8])
if server then nb = now + math.max(0, nb) end
redis.call('ZADD', S .. ':waiting', nb, member(id))
wake()
return {2, id}
"""

# ARGV: now, limit, lease, worker, group, token prefix, number of reaped jobs, then for
# each: member, token, verdict ('d' dead or 'r' retry).
_CLAIM = r"""
local limit, lease = tonumber(ARGV[2]), tonumber(ARGV[3])
local worker, group, prefix = ARGV[4], ARGV[5], ARGV[6]
local waiting, leases = S .. ':waiting', S .. ':leases'
local retried = 0
for i = 0, tonumber(ARGV[7]) - 1 do
  local m, tok, verdict = ARGV[8 + 3 * i], ARGV[9 + 3 * i], ARGV[10 + 3 * i]
  local id = idof(m)
  local key = jobkey(id)
  local until_ = redis.call('ZSCORE', leases, m)
  local current = false
  if is_member(m) and record_of(key) then current = redis.call('HGET', key, 'token') end
  if until_ and not current then
    redis.call('ZREM', leases, m)  -- (a lease without a claim to take back)
    if not (is_member(m) and record_of(key)) then spoiled(m) end
  elseif until_ and tonumber(until_) < now and current == tok then
    unhold(key, m, group)
    if verdict == 'd' then
      bury(key, id, LOST)
    else
      redis.call('HSET', key, 'state', 'waiting', 'error', LOST)
      redis.call('ZADD', waiting, now, m)
      redis.call('HINCRBY', S .. ':stats', 'retried', 1)
      retried = retried + 1
    end
  end
end
if retried > 0 then wake() end
local expired = {}
local rows = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'WITHSCORES', 'LIMIT', 0, REAP)
for i = 1, #rows, 2 do
  if tonumber(rows[i + 1]) < now then
    local key = jobkey(idof(rows[i]))
    local used = is_member(rows[i]) and record_of(key)
    if used then
      local f = redis.call('HMGET', key, 'token', 'task')
      expired[#expired + 1] = {rows[i], f[1] or '', f[2] or '', used}
    else
      expired[#expired + 1] = {rows[i], '', '', 0}  -- (taken out on the next step)
    end
  end
end
if #expired > 0 then return {'expired', expired} end
local claims = {}
if limit > 0 then
  local ms = redis.call('ZRANGEBYSCORE', waiting, '-inf', now, 'LIMIT', 0, limit)
  local ours = {}
  for _, m in ipairs(ms) do
    redis.call('ZREM', waiting, m)
    local id = idof(m)
    local key = jobkey(id)
    local used = is_member(m) and record_of(key)
    if not used then
      spoiled(m)
    else
      local tok = prefix .. (#claims + 1)
      local entry = redis.call('XADD', S, '*', 'id', id)
      ours[entry] = true
      redis.call('HSET', key, 'attempts', used + 1, 'state', 'running', 'token', tok,
        'worker', worker, 'entry', entry)
      redis.call('ZADD', leases, now + lease, m)
      local f = redis.call('HMGET', key, 'task', 'payload', 'request_id')
      claims[#claims + 1] = {id, f[1] or '', f[2] or false, f[3] or false, used + 1, tok}
    end
  end
  if #claims > 0 then
    local got = redis.call('XREADGROUP', 'GROUP', group, worker, 'COUNT', #claims + 16,
      'STREAMS', S, '>')
    if got then
      for _, e in ipairs(got[1][2]) do
        if not ours[e[1]] then redis.call('XACK', S, group, e[1]) end
      end
    end
  end
end
local next_at = false
local w = redis.call('ZRANGE', waiting, 0, 0, 'WITHSCORES')
if #w > 0 then next_at = tonumber(w[2]) end
local l = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
if #l > 0 and (not next_at or tonumber(l[2]) < next_at) then next_at = tonumber(l[2]) end
local next_in = false
if next_at then next_in = string.format('%.6f', next_at - now) end
return {'claims', claims, next_in}
"""

# ARGV: now, lease, group, then (id, token) pairs. (XCLAIM by the holder itself only
# resets the idle time XPENDING shows.)
_RENEW = r"""
local until_ = now + tonumber(ARGV[2])
local lost = {}
for i = 4, #ARGV, 2 do
  local id, tok = ARGV[i], ARGV[i + 1]
  local key = jobkey(id)
  local f = {}
  if is_member(id) and record_of(key) then
    f = redis.call('HMGET', key, 'state', 'token', 'entry', 'worker')
  end
  if f[1] == 'running' and f[2] == tok then
    redis.call('ZADD', S .. ':leases', 'XX', until_, member(id))
    if f[3] and f[4] then redis.call('XCLAIM', S, ARGV[3], f[4], 0, f[3], 'JUSTID') end
  else
    lost[#lost + 1] = id
  end
end
return lost
"""

# ARGV: now, group, then (id, token, verdict, error, delay) for each outcome.
_RECORD = r"""
local group = ARGV[2]
local held = {}
local woke = false
for i = 3, #ARGV, 5 do
  local id, tok, verdict, err, delay = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local key = jobkey(id)
  local f = {}
  if is_member(id) and record_of(key) then f = redis.call('HMGET', key, 'state', 'token') end
  if f[1] == 'running' and f[2] == tok then
    local m = member(id)
    unhold(key, m, group)
    if verdict == 'c' then
      redis.call('HSET', key, 'state', 'completed', 'finished_at', now)
      redis.call('HDEL', key, 'error')
      release_dedupe(key, id)
      redis.call('ZADD', S .. ':done', now, m)
      redis.call('HINCRBY', S .. ':stats', 'completed', 1)
    elseif verdict == 'd' then
      bury(key, id, err)
    elseif verdict == 'r' then
      redis.call('HSET', key, 'state', 'waiting', 'error', err)
      redis.call('ZADD', S .. ':waiting', now + tonumber(delay), m)
      redis.call('HINCRBY', S .. ':stats', 'retried', 1)
      woke = true
    else
      redis.call('HSET', key, 'state', 'waiting')
      redis.call('HINCRBY', key, 'attempts', -1)
      redis.call('ZADD', S .. ':waiting', now, m)
      woke = true
    end
    held[#held + 1] = 1
  else
    held[#held + 1] = 0
  end
end
if woke then wake() end
return held
"""

_COUNTS = r"""
local waiting = S .. ':waiting'
local pending = redis.call('ZCOUNT', waiting, '-inf', now)
local all = redis.call('ZCARD', waiting)
local stats = redis.call('HMGET', S .. ':stats', 'completed', 'retried')
return {pending, all - pending, redis.call('ZCARD', S .. ':leases'), tonumber(stats[1]) or 0,
  redis.call('XLEN', S .. ':dead'), tonumber(stats[2]) or 0}
"""

_STATUS = r"""
local id = ARGV[2]
if redis.call('TYPE', jobkey(id))['ok'] ~= 'hash' then
  if redis.call('ZSCORE', S .. ':waiting', member(id)) then return 'pending' end
  return false
end
local state = redis.call('HGET', jobkey(id), 'state')
if not state then return false end
if state == 'waiting' then
  local score = redis.call('ZSCORE', S .. ':waiting', member(id))
  if score and tonumber(score) <= now then return 'pending' end
  return 'scheduled'
end
return state
"""

_DEAD_JOBS = r"""
local out = {}
for _, e in ipairs(redis.call('XRANGE', S .. ':dead', '-', '+')) do
  local fields = {}
  for i = 1, #e[2], 2 do fields[e[2][i]] = e[2][i + 1] end
  local id = fields['id'] or ''
  local payload = false
  if is_member(id) and redis.call('TYPE', jobkey(id))['ok'] == 'hash' then
    payload = redis.call('HGET', jobkey(id), 'payload')
  end
  out[#out + 1] = {id, fields['task'] or '', payload,
    tonumber(fields['attempts']) or 0, fields['error'] or false}
end
return out
"""

_REQUEUE = r"""
local id = ARGV[2]
local key = jobkey(id)
if not record_of(key) or redis.call('HGET', key, 'state') ~= 'dead' then return 0 end
local entry = redis.call('HGET', key, 'dead_entry')
if entry then redis.call('XDEL', S .. ':dead', entry) end
redis.call('HSET', key, 'state', 'waiting', 'attempts', 0)
redis.call('HDEL', key, 'finished_at', 'dead_entry')
local d = redis.call('HGET', key, 'dedupe')
if d then
  if redis.call('HEXISTS', S .. ':dedupe', d) == 1 then
    redis.call('HDEL', key, 'dedupe')
  else
    redis.call('HSET', S .. ':dedupe', d, id)
  end
end
redis.call('ZADD', S .. ':waiting', now, member(id))
wake()
return 1
"""

# ARGV: now, older_than, limit, group.
_PURGE = r"""
local cutoff = at(ARGV[2])
local rows = redis.call('ZRANGEBYSCORE', S .. ':done', '-inf', cutoff, 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[3]))
local n = 0
for i = 1, #rows, 2 do
  if tonumber(rows[i + 1]) < cutoff then
    redis.call('DEL', jobkey(idof(rows[i])))
    redis.call('ZREM', S .. ':done', rows[i])
    n = n + 1
  end
end
-- Consumers of workers that died holding nothing, idle for a day: forget them.
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', S, ARGV[4])
if ok then
  for _, c in ipairs(consumers) do
    local f = {}
    for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
    if f['pending'] == 0 and f['idle'] > 86400000 then
      redis.call('XGROUP', 'DELCONSUMER', S, ARGV[4], f['name'])
    end
  end
end
return n
"""

# ARGV: now, group, then the names this process claimed under: each leaves the group if
# it holds nothing (its claims were recorded or given back).
_LEAVE = r"""
for i = 3, #ARGV do
  local ok, pending = pcall(redis.call, 'XPENDING', S, ARGV[2], '-', '+', 1, ARGV[i])
  if ok and #pending == 0 then
    redis.call('XGROUP', 'DELCONSUMER', S, ARGV[2], ARGV[i])
  end
end
return 0
"""

_VERDICTS: Final = {"complete": "c", "retry": "r", "dead": "d", "release": "l"}

# The scripts whose effect must happen once per call, however often the call is sent:
# the client sends a command again when its connection drops, and the first one may have
# run. Each call names a key of its own (KEYS[2]); the first run keeps its answer there
# for a minute, and a run that finds it answers that again and changes nothing. The
# next call deletes the keys of calls already answered (KEYS[3:]), so that only the
# answers of calls in flight are kept.
_ONCE_ONLY: Final = frozenset({"enqueue", "claim", "record", "requeue"})
_ONCE = r"""
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
local answered = redis.call('GET', KEYS[2])
if answered then return cjson.decode(answered) end
local answer = (function()
%s
end)()
redis.call('SET', KEYS[2], cjson.encode(answer), 'EX', 60)
return answer
"""


def _str(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class RedisStore(Store):
    """A `Store` in a Redis server, shared by any number of processes on any machines.

    Open it with `open_redis_store`. Commands go through one client (a pool of
    connections); an idle worker's blocking read has a client of its own.
    """

    def __init__(
        self,
        client: coredis.Redis[bytes],
        blocking: coredis.Redis[bytes],
        stream: str,
        group: str,
        clock: Callable[[], float] | None,
        offset: float,
    ) -> None:
        self._client = client
        self._blocking = blocking
        self.stream = stream
        self.group = group
        self._server_time = clock is None
        if clock is None:
            self.clock = lambda: time.time() + offset  # (the server's clock, as seen here)
        else:
            self.clock = clock
        self._keys = [stream]
        lost = LOST.replace("\\", "\\\\").replace("'", "\\'")
        prelude = _PRELUDE + f"local LOST = '{lost}'\nlocal REAP = {_REAP_BATCH}\n"
        scripts = {
            name: client.register_script(prelude + (_ONCE % body if name in _ONCE_ONLY else body))
            for name, body in (
                ("enqueue", _ENQUEUE),
                ("claim", _CLAIM),
                ("renew", _RENEW),
                ("record", _RECORD),
                ("counts", _COUNTS),
                ("status", _STATUS),
                ("dead_jobs", _DEAD_JOBS),
                ("requeue", _REQUEUE),
                ("purge", _PURGE),
                ("leave", _LEAVE),
            )
        }
        self._scripts = scripts
        # What the last claim saw: seconds until a waiting job falls due or a lease ends.
        self._next_in: float | None = None
        self._wake_key = f"{stream}:wake"
        self._workers: set[str] = set()  # the consumer names claims were made under
        self._answered: list[str] = []  # keys of calls answered since the last call

    def _now(self) -> str:
        return "" if self._server_time else repr(self.clock())

    def _when(self, t: float) -> str:
        """A time for a script: absolute on a given clock, else relative to now."""
        return repr(t - self.clock()) if self._server_time else repr(t)

    async def _run(self, name: str, args: list[Any]) -> Any:
        if name not in _ONCE_ONLY:
            return await self._scripts[name](keys=self._keys, args=[self._now(), *args])
        # A call of its own: sent again, it answers the same.
        call = f"{self.stream}:call:{secrets.token_hex(8)}"
        answered, self._answered = self._answered, []
        answer: Any = await self._scripts[name](
            keys=[self.stream, call, *answered], args=[self._now(), *args]
        )
        self._answered.append(call)
        return answer

    async def enqueue(self, job: NewJob, max_pending: int | None) -> str:
        reply = await self._run(
            "enqueue",
            [
                job.task,
                job.payload,
                "0" if job.request_id is None else "1",
                job.request_id or "",
                "0" if job.dedupe_key is None else "1",
                job.dedupe_key or "",
                self._when(job.not_before),
                "" if max_pending is None else str(max_pending),
            ],
        )
        kind, value = reply
        if kind == 1:
            raise QueueFullError(
                f"durable queue is full: {value} unfinished jobs (max_pending={max_pending})"
            )
        return _str(value)

    async def claim(
        self, worker: str, limit: int, lease: float, attempts: Callable[[str], int]
    ) -> list[Claim]:
        self._workers.add(worker)
        reap: list[Any] = []
        while True:
            prefix = secrets.token_hex(8) + ":"
            head = [str(max(0, limit)), repr(lease), worker, self.group, prefix, len(reap) // 3]
            reply = await self._run("claim", [*head, *reap])
            if reply[0] == b"expired":
                reap = []
                for m, token, task, used in reply[1]:
                    name = _text(task) or ""
                    # (Member and token go back as the bytes they are: another client may
                    # have written anything there.)
                    reap += [m, token, "d" if int(used) >= attempts(name) else "r"]
                continue
            _, rows, next_in = reply
            self._next_in = None if next_in is None else float(next_in)
            return [
                Claim(
                    _str(job_id),
                    _text(task) or "",
                    (None if payload is None else _text(payload)) or UNREADABLE,
                    None if request_id is None else _text(request_id),
                    int(attempt),
                    _str(token),
                )
                for job_id, task, payload, request_id, attempt, token in rows
            ]

    async def idle(self, enqueued: trio.Event) -> None:
        """Block until a wake-up token comes (something may be claimable), `MAX_IDLE` at most.

        Each change that makes a job claimable pushes one token, and a token wakes one
        idle worker: new work wakes a worker, not every worker. A token pushed while no
        worker waits stays in the list (at most 64 do), so none is missed between a claim
        that found nothing and this wait.
        """
        import trio
        from coredis.exceptions import ConnectionError as LostConnection

        timeout = MAX_IDLE if self._next_in is None else min(MAX_IDLE, self._next_in)
        try:
            await self._blocking.blpop([self._wake_key], timeout=max(0.001, timeout))
        except LostConnection:
            # (Nothing is lost with a wake-up: the next claim looks anyway, and its own
            # call waits for the server to come back.)
            await trio.sleep(timeout)

    async def renew(self, claims: Sequence[tuple[str, str]], lease: float) -> set[str]:
        args: list[Any] = [repr(lease), self.group]
        for job_id, token in claims:
            args += [job_id, token]
        return {_str(x) for x in await self._run("renew", args)}

    async def record(self, outcomes: Sequence[Outcome]) -> list[bool]:
        args: list[Any] = [self.group]
        for o in outcomes:
            args += [o.job_id, o.token, _VERDICTS[o.verdict], o.error or "", repr(o.delay)]
        return [bool(x) for x in await self._run("record", args)]

    async def counts(self) -> Counts:
        return Counts(*(int(x) for x in await self._run("counts", [])))

    async def status(self, job_id: str) -> str | None:
        if _row_id(job_id) is None:
            return None
        state = await self._run("status", [job_id])
        return None if state is None else _str(state)

    async def dead_jobs(self) -> list[DeadJob]:
        return [
            DeadJob(
                _str(job_id),
                _text(task) or "",
                (None if payload is None else _text(payload)) or UNREADABLE,
                int(attempts),
                None if error is None else _text(error),
            )
            for job_id, task, payload, attempts, error in await self._run("dead_jobs", [])
        ]

    async def requeue(self, job_id: str) -> bool:
        if _row_id(job_id) is None:
            return False
        return bool(await self._run("requeue", [job_id]))

    async def purge(self, older_than: float) -> int:
        total = 0
        while True:
            n = int(await self._run("purge", [self._when(older_than), 1000, self.group]))
            total += n
            if n < 1000:
                return total

    async def aclose(self) -> None:
        # (The clients are closed by open_redis_store.)
        if self._workers:
            workers = sorted(self._workers)
            self._workers.clear()
            with contextlib.suppress(Exception):  # (housekeeping: never worth an error)
                await self._run("leave", [self.group, *workers])


@contextlib.asynccontextmanager
async def open_redis_store(
    url: str, *, stream: str, group: str, clock: Callable[[], float] | None = None
) -> AsyncIterator[RedisStore]:
    """Connect to the Redis server at ``url`` and open the queue kept under ``stream``.

    Raises:
        SchemaVersionError: The keys hold another version's queue, or something else.
    """
    import coredis
    from coredis.exceptions import ConnectionError as LostConnection
    from coredis.retry import ConstantRetryPolicy, NoRetryPolicy

    # A command whose connection dropped, or that could not connect, is sent again, for
    # `STREAM_TIMEOUT` seconds at most (a server restarting, a failover): the scripts that
    # change state answer a second run of one call as they did the first (_ONCE_ONLY),
    # so a job is never stored twice nor a claim made twice. Timeouts bound every call,
    # so that a worker cut off from the server still stops.
    options: dict[str, Any] = {
        "decode_responses": False,
        "stream_timeout": STREAM_TIMEOUT,
        "connect_timeout": STREAM_TIMEOUT,
    }
    again = ConstantRetryPolicy((LostConnection,), None, deadline=STREAM_TIMEOUT, delay=0.1)
    once = NoRetryPolicy()
    try:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(url, retry_policy=again, **options)
        blocking: coredis.Redis[bytes] = coredis.Redis.from_url(url, retry_policy=once, **options)
    except Exception as exc:  # (ValueError, or an assertion in the client's parser)
        raise ValueError(f"not a Redis URL that can be used: {exc or type(exc).__name__}") from None
    # coredis's clients run task groups of their own: whatever happens inside (opening,
    # or the block) is raised again outside them, as it was raised, not in their groups.
    error: BaseException | None = None
    async with client, blocking:
        try:
            store = await _open(client, blocking, stream, group, clock)
        except BaseException as exc:
            error = exc
        else:
            try:
                yield store
            except BaseException as exc:
                error = exc
    if error is not None:
        raise error


async def _open(
    client: coredis.Redis[bytes],
    blocking: coredis.Redis[bytes],
    stream: str,
    group: str,
    clock: Callable[[], float] | None,
) -> RedisStore:
    setup = client.register_script(_SETUP)
    t0 = time.time()
    reply: Any = await setup(keys=[stream], args=[str(SCHEMA_VERSION), group])
    t1 = time.time()
    kind = _str(reply[0])
    if kind == "not":
        raise SchemaVersionError(
            f"the Redis key {stream!r} (or its {stream}:* keys) holds something that is "
            f"not a trio_background queue: pass another stream name"
        )
    if kind == "version":
        raise SchemaVersionError(
            f"the queue under {stream!r} has schema version {_str(reply[1])}; this "
            f"version of trio_background reads schema version {SCHEMA_VERSION} only: "
            f"use the version that created it, or another stream name"
        )
    server = int(reply[1]) + int(reply[2]) / 1e6
    return RedisStore(client, blocking, stream, group, clock, server - (t0 + t1) / 2)
