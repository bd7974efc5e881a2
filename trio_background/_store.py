"""Where durable jobs live: the store interface, and its SQLite implementation.

A store keeps every job of one durable queue and moves it between states, each move one
transaction. The queue (`trio_background.durable`) holds the rules -- which task, which
retry policy, what an outcome means -- and a store only keeps and fences the records, so
that a second store (Redis) implements the same small interface and passes the same
conformance tests.

A job's state in a store is one of ``waiting`` (ready once ``not_before`` has passed:
the public statuses ``"pending"`` and ``"scheduled"``), ``running`` (claimed under a
lease), ``completed`` or ``dead``. A claim gives the job a fresh lease *token*; every
later change made on behalf of that claim (renewal, outcome, release) names the token
and changes nothing if the job has been claimed again since: that is the fencing.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs

from ._exceptions import QueueFullError

if TYPE_CHECKING:
    import trio

#: The schema this code reads and writes (``PRAGMA user_version``).
SCHEMA_VERSION: Final = 1

#: The error text of a job whose worker died once too often.
LOST: Final = "worker lost (lease expired)"

#: What an outcome does to a claimed job.
Verdict = Literal["complete", "retry", "dead", "release"]

UNFINISHED: Final = ("waiting", "running")

#: Seconds between two looks at the store for new work, when another process may add it.
POLL_INTERVAL: Final = 0.05


class SchemaVersionError(RuntimeError):
    """The store was written by another version of trio_background, with another schema.

    Nothing was changed. Open it with the version that created it (the message says
    which schema it has), or point the queue at a new file.
    """


@attrs.frozen
class NewJob:
    """A job to store: what `Store.enqueue` is given."""

    task: str
    payload: str  # the arguments, as a JSON array
    not_before: float  # wall-clock time (time.time()) from which it may be claimed
    request_id: str | None
    dedupe_key: str | None


@attrs.frozen
class Claim:
    """A job claimed by a worker, under the lease ``token``."""

    job_id: str
    task: str
    payload: str
    request_id: str | None
    attempt: int  # the number of this run: 1 for the first claim
    token: str


@attrs.frozen
class Outcome:
    """What became of a claimed job's run, to be recorded under its claim's token.

    ``retry`` makes it wait ``delay`` seconds (it counts as retried), ``release`` gives it
    back at once without using up its attempt, ``dead`` ends it with ``error``.
    """

    job_id: str
    token: str
    verdict: Verdict
    error: str | None = None
    delay: float = 0.0


@attrs.frozen
class Counts:
    """Every stored job under exactly one state (``completed`` counts deleted ones too)."""

    pending: int
    scheduled: int
    running: int
    completed: int
    dead: int
    retried: int


@attrs.frozen
class DeadJob:
    job_id: str
    task: str
    payload: str
    attempts: int
    error: str | None


class Store(ABC):
    """A durable queue's storage: every method is one transaction (or none).

    Times are wall-clock seconds (``clock()``, by default `time.time`), shared by every
    process using the store.
    """

    clock: Callable[[], float] = staticmethod(time.time)

    @abstractmethod
    async def enqueue(self, job: NewJob, max_pending: int | None) -> str:
        """Store ``job`` and return its id.

        If an unfinished job has its dedupe key, store nothing and return that job's
        id. Raises `QueueFullError` if ``max_pending`` jobs are unfinished.
        """

    @abstractmethod
    async def claim(
        self, worker: str, limit: int, lease: float, attempts: Callable[[str], int]
    ) -> list[Claim]:
        """Claim up to ``limit`` ready jobs for ``lease`` seconds.

        Earliest ``not_before`` first, ties in enqueue order. First, jobs whose lease
        expired are taken back: each counts as retried, or goes dead with `LOST` if
        ``attempts(task)`` runs are used up.
        """

    @abstractmethod
    async def renew(self, claims: Sequence[tuple[str, str]], lease: float) -> set[str]:
        """Extend the leases of ``(job_id, token)`` pairs; return the ids no longer held."""

    @abstractmethod
    async def record(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Record outcomes (one transaction); for each, whether its claim still held."""

    @abstractmethod
    async def counts(self) -> Counts:
        """Count every job by state, at one instant."""

    @abstractmethod
    async def status(self, job_id: str) -> str | None:
        """The public status of one job, or None if there is no such job."""

    @abstractmethod
    async def dead_jobs(self) -> list[DeadJob]:
        """The dead jobs, oldest first."""

    @abstractmethod
    async def requeue(self, job_id: str) -> bool:
        """Make a dead job pending with a fresh attempt count; False if it is not dead."""

    @abstractmethod
    async def purge(self, older_than: float) -> int:
        """Delete completed jobs that finished before ``older_than``; return how many."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release the store's connections."""

    async def idle(self, enqueued: trio.Event) -> None:
        """Wait a little after a claim found nothing: until ``enqueued`` is set, or a poll.

        ``enqueued`` is set by this process's enqueues; jobs another process adds are
        seen at the next poll (`POLL_INTERVAL`). A store that can be told of new work
        (Redis) waits for that instead.
        """
        import trio

        with trio.move_on_after(POLL_INTERVAL):
            await enqueued.wait()


_SCHEMA = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task TEXT NOT NULL,
    payload TEXT NOT NULL,
    request_id TEXT,
    dedupe_key TEXT,
    state TEXT NOT NULL CHECK (state IN ('waiting', 'running', 'completed', 'dead')),
    not_before REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    token TEXT,
    lease_until REAL,
    worker TEXT,
    error TEXT,
    enqueued_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX jobs_ready ON jobs (not_before, id) WHERE state = 'waiting';
CREATE INDEX jobs_leases ON jobs (lease_until) WHERE state = 'running';
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE state = 'completed';
CREATE UNIQUE INDEX jobs_dedupe ON jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state IN ('waiting', 'running');
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters VALUES ('completed', 0), ('retried', 0), ('unfinished', 0);
"""


class SQLiteStore(Store):
    """A `Store` in one SQLite file, in WAL mode, shared by any processes on one machine.

    One connection, used by one thread at a time (`trio.to_thread`, one call at a time).
    Every change runs in ``BEGIN IMMEDIATE`` ... ``COMMIT`` with ``synchronous=FULL``: a
    committed change survives the process being killed and, as far as the disk keeps its
    promises, the machine losing power.
    """

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.lock = threading.Lock()  # (calls are serialised by the queue; this is a guard)
        self.db = sqlite3.connect(path, timeout=60.0, isolation_level=None, check_same_thread=False)
        try:
            self._setup()
        except BaseException:
            self.db.close()
            raise

    # -- the synchronous side, run in a worker thread ---------------------------------

    def _setup(self) -> None:
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:  # (not a database at all, say)
            raise SchemaVersionError(
                f"{self.path} is not a trio_background queue ({exc}): use another file"
            ) from None
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if version == 0 and not tables - {"sqlite_sequence"}:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION or "jobs" not in tables:
                what = (
                    f"schema version {version}"
                    if version
                    else "tables that are not a trio_background queue's"
                )
                raise SchemaVersionError(
                    f"{self.path} holds {what}; this version of trio_background reads "
                    f"schema version {SCHEMA_VERSION} only: open it with the version that "
                    f"created it, or use another file"
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # Only once the file is known to be a queue of this schema (a refused file is
        # left exactly as it was).
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")

    def _transaction(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        with self.lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

    def _add(self, db: sqlite3.Connection, counter: str, n: int) -> None:
        if n:
            db.execute("UPDATE counters SET value = value + ? WHERE name = ?", (n, counter))

    def enqueue_sync(self, job: NewJob, max_pending: int | None) -> str:
        def run(db: sqlite3.Connection) -> str:
            if job.dedupe_key is not None:
                row = db.execute(
                    "SELECT id FROM jobs WHERE dedupe_key = ? AND state IN ('waiting', 'running')",
                    (job.dedupe_key,),
                ).fetchone()
                if row is not None:
                    return str(row[0])
            if max_pending is not None:
                (unfinished,) = db.execute(
                    "SELECT value FROM counters WHERE name = 'unfinished'"
                ).fetchone()
                if unfinished >= max_pending:
                    raise QueueFullError(
                        f"durable queue is full: {unfinished} unfinished jobs "
                        f"(max_pending={max_pending})"
                    )
            cursor = db.execute(
                "INSERT INTO jobs (task, payload, request_id, dedupe_key, state, not_before, "
                "enqueued_at) VALUES (?, ?, ?, ?, 'waiting', ?, ?)",
                (
                    job.task,
                    job.payload,
                    job.request_id,
                    job.dedupe_key,
                    job.not_before,
                    self.clock(),
                ),
            )
            self._add(db, "unfinished", 1)
            return str(cursor.lastrowid)

        return self._transaction(run)  # type: ignore[no-any-return]

    def claim_sync(
        self, worker: str, limit: int, lease: float, attempts: Callable[[str], int]
    ) -> list[Claim]:
        def run(db: sqlite3.Connection) -> list[Claim]:
            now = self.clock()
            expired = db.execute(
                "SELECT id, task, attempts FROM jobs WHERE state = 'running' AND lease_until < ?",
                (now,),
            ).fetchall()
            retried = 0
            lost = 0
            for job_id, task, used in expired:
                if used >= attempts(task):
                    db.execute(
                        "UPDATE jobs SET state = 'dead', error = ?, token = NULL, "
                        "lease_until = NULL, worker = NULL, finished_at = ? WHERE id = ?",
                        (LOST, now, job_id),
                    )
                    lost += 1
                else:
                    db.execute(
                        "UPDATE jobs SET state = 'waiting', not_before = ?, error = ?, "
                        "token = NULL, lease_until = NULL, worker = NULL WHERE id = ?",
                        (now, LOST, job_id),
                    )
                    retried += 1
            self._add(db, "retried", retried)
            self._add(db, "unfinished", -lost)
            if limit <= 0:
                return []
            rows = db.execute(
                "SELECT id, CAST(task AS BLOB), CAST(payload AS BLOB), "
                "CAST(request_id AS BLOB), attempts FROM jobs "
                "WHERE state = 'waiting' AND not_before <= ? ORDER BY not_before, id LIMIT ?",
                (now, limit),
            ).fetchall()
            claims = []
            until = now + lease
            for job_id, task, payload, request_id, used in rows:
                token = secrets.token_hex(8)
                db.execute(
                    "UPDATE jobs SET state = 'running', attempts = ?, token = ?, "
                    "lease_until = ?, worker = ? WHERE id = ?",
                    (used + 1, token, until, worker, job_id),
                )
                claims.append(
                    Claim(
                        str(job_id),
                        _text(task) or "",
                        _text(payload) or UNREADABLE,
                        _text(request_id),
                        used + 1,
                        token,
                    )
                )
            return claims

        return self._transaction(run)  # type: ignore[no-any-return]

    def renew_sync(self, claims: Sequence[tuple[str, str]], lease: float) -> set[str]:
        def run(db: sqlite3.Connection) -> set[str]:
            until = self.clock() + lease
            lost = set()
            for job_id, token in claims:
                cursor = db.execute(
                    "UPDATE jobs SET lease_until = ? WHERE id = ? AND token = ? "
                    "AND state = 'running'",
                    (until, int(job_id), token),
                )
                if cursor.rowcount != 1:
                    lost.add(job_id)
            return lost

        return self._transaction(run)  # type: ignore[no-any-return]

    def record_sync(self, outcomes: Sequence[Outcome]) -> list[bool]:
        def run(db: sqlite3.Connection) -> list[bool]:
            now = self.clock()
            held = []
            completed = retried = finished = 0
            for outcome in outcomes:
                key = (int(outcome.job_id), outcome.token)
                verdict = outcome.verdict
                if verdict == "complete":
                    cursor = db.execute(
                        "UPDATE jobs SET state = 'completed', token = NULL, lease_until = NULL, "
                        "finished_at = ?, error = NULL WHERE id = ? AND token = ? "
                        "AND state = 'running'",
                        (now, *key),
                    )
                    ok = cursor.rowcount == 1
                    completed += ok
                    finished += ok
                elif verdict == "dead":
                    cursor = db.execute(
                        "UPDATE jobs SET state = 'dead', token = NULL, lease_until = NULL, "
                        "finished_at = ?, error = ? WHERE id = ? AND token = ? "
                        "AND state = 'running'",
                        (now, outcome.error, *key),
                    )
                    ok = cursor.rowcount == 1
                    finished += ok
                elif verdict == "retry":
                    cursor = db.execute(
                        "UPDATE jobs SET state = 'waiting', token = NULL, lease_until = NULL, "
                        "worker = NULL, not_before = ?, error = ? WHERE id = ? AND token = ? "
                        "AND state = 'running'",
                        (now + outcome.delay, outcome.error, *key),
                    )
                    ok = cursor.rowcount == 1
                    retried += ok
                else:  # release: back at once, and this run does not count
                    cursor = db.execute(
                        "UPDATE jobs SET state = 'waiting', token = NULL, lease_until = NULL, "
                        "worker = NULL, not_before = ?, attempts = attempts - 1 "
                        "WHERE id = ? AND token = ? AND state = 'running'",
                        (now, *key),
                    )
                    ok = cursor.rowcount == 1
                held.append(ok)
            self._add(db, "completed", completed)
            self._add(db, "retried", retried)
            self._add(db, "unfinished", -finished)
            return held

        return self._transaction(run)  # type: ignore[no-any-return]

    def counts_sync(self) -> Counts:
        def run(db: sqlite3.Connection) -> Counts:
            now = self.clock()
            pending, scheduled, running, dead = db.execute(
                "SELECT "
                "COUNT(*) FILTER (WHERE state = 'waiting' AND not_before <= :now), "
                "COUNT(*) FILTER (WHERE state = 'waiting' AND not_before > :now), "
                "COUNT(*) FILTER (WHERE state = 'running'), "
                "COUNT(*) FILTER (WHERE state = 'dead') FROM jobs",
                {"now": now},
            ).fetchone()
            counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
            return Counts(
                pending, scheduled, running, counters["completed"], dead, counters["retried"]
            )

        return self._transaction(run)  # type: ignore[no-any-return]

    def status_sync(self, job_id: str) -> str | None:
        key = _row_id(job_id)
        if key is None:
            return None

        def run(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT state, not_before FROM jobs WHERE id = ?", (key,)).fetchone()
            if row is None:
                return None
            state, not_before = row
            if state == "waiting":
                return "pending" if not_before <= self.clock() else "scheduled"
            return str(state)

        return self._transaction(run)  # type: ignore[no-any-return]

    def dead_jobs_sync(self) -> list[DeadJob]:
        def run(db: sqlite3.Connection) -> list[DeadJob]:
            rows = db.execute(
                "SELECT id, CAST(task AS BLOB), CAST(payload AS BLOB), attempts, "
                "CAST(error AS BLOB) FROM jobs WHERE state = 'dead' ORDER BY finished_at, id"
            ).fetchall()
            return [
                DeadJob(
                    str(job_id),
                    _text(task) or "",
                    _text(payload) or UNREADABLE,
                    attempts,
                    _text(error),
                )
                for job_id, task, payload, attempts, error in rows
            ]

        return self._transaction(run)  # type: ignore[no-any-return]

    def requeue_sync(self, job_id: str) -> bool:
        key = _row_id(job_id)
        if key is None:
            return False

        def run(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT dedupe_key FROM jobs WHERE id = ? AND state = 'dead'", (key,)
            ).fetchone()
            if row is None:
                return False
            dedupe = row[0]
            if (
                dedupe is not None
                and db.execute(
                    "SELECT 1 FROM jobs WHERE dedupe_key = ? AND state IN ('waiting', 'running')",
                    (dedupe,),
                ).fetchone()
            ):
                dedupe = None  # another job holds the key now: this one gives it up
            db.execute(
                "UPDATE jobs SET state = 'waiting', attempts = 0, not_before = ?, "
                "finished_at = NULL, dedupe_key = ? WHERE id = ?",
                (self.clock(), dedupe, key),
            )
            self._add(db, "unfinished", 1)
            return True

        return self._transaction(run)  # type: ignore[no-any-return]

    def purge_sync(self, older_than: float) -> int:
        def run(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "DELETE FROM jobs WHERE state = 'completed' AND finished_at < ?", (older_than,)
            )
            return cursor.rowcount

        return self._transaction(run)  # type: ignore[no-any-return]

    # -- the async side ------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        import trio  # (kept local: the synchronous side is usable without Trio)

        return await trio.to_thread.run_sync(fn, *args)

    async def enqueue(self, job: NewJob, max_pending: int | None) -> str:
        return await self._call(self.enqueue_sync, job, max_pending)  # type: ignore[no-any-return]

    async def claim(
        self, worker: str, limit: int, lease: float, attempts: Callable[[str], int]
    ) -> list[Claim]:
        return await self._call(self.claim_sync, worker, limit, lease, attempts)  # type: ignore[no-any-return]

    async def renew(self, claims: Sequence[tuple[str, str]], lease: float) -> set[str]:
        return await self._call(self.renew_sync, claims, lease)  # type: ignore[no-any-return]

    async def record(self, outcomes: Sequence[Outcome]) -> list[bool]:
        return await self._call(self.record_sync, outcomes)  # type: ignore[no-any-return]

    async def counts(self) -> Counts:
        return await self._call(self.counts_sync)  # type: ignore[no-any-return]

    async def status(self, job_id: str) -> str | None:
        return await self._call(self.status_sync, job_id)  # type: ignore[no-any-return]

    async def dead_jobs(self) -> list[DeadJob]:
        return await self._call(self.dead_jobs_sync)  # type: ignore[no-any-return]

    async def requeue(self, job_id: str) -> bool:
        return await self._call(self.requeue_sync, job_id)  # type: ignore[no-any-return]

    async def purge(self, older_than: float) -> int:
        return await self._call(self.purge_sync, older_than)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        with self.lock:
            self.db.close()


#: What a claim carries instead of a payload that is not text (it does not decode).
UNREADABLE: Final = "\x00 (the stored payload is not UTF-8 text)"


def _text(value: bytes | str | None) -> str | None:
    """Stored text, read as bytes (a row written by something else may hold anything)."""
    if value is None or isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _row_id(job_id: str) -> int | None:
    """The row of a job id (the decimal form of a positive int64, exactly), or None."""
    if not (job_id.isascii() and job_id.isdigit()) or job_id.startswith("0") or len(job_id) > 19:
        return None
    key = int(job_id)
    return key if key < 2**63 else None


def encode(args: Iterable[object]) -> str:
    """The JSON text of ``args``; `TypeError` unless every one comes back equal from it."""
    args = list(args)
    try:
        text = json.dumps(args, allow_nan=False, separators=(",", ":"))
        back = json.loads(text)
        same = [_same(arg, again) for arg, again in zip(args, back, strict=True)]
    except RecursionError:
        raise TypeError(
            "durable job arguments are nested too deeply to store: flatten them"
        ) from None
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"durable job arguments must be JSON values (str, int, float, bool, None, and "
            f"lists and str-keyed dicts of them): {exc}"
        ) from None
    for n, (arg, again) in enumerate(zip(args, back, strict=True)):
        if not same[n]:
            raise TypeError(
                f"argument {n + 1} ({arg!r}) would not come back equal from JSON "
                f"(it would be {again!r}): pass lists instead of tuples and str keys in "
                f"dicts"
            )
    return text


def _same(a: object, b: object) -> bool:
    """Equal, and of the same JSON kind all the way down (so ``1 != True``, ``(1,) != [1]``)."""
    if type(a) is bool or type(b) is bool:
        return a is b
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and all(isinstance(k, str) for k in a)
            and a.keys() == b.keys()
            and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, (tuple, set, frozenset, bytes)):
        return False
    return bool(a == b)
