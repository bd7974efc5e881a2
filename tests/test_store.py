"""The store conformance suite: what every durable store must do, run against each store.

Each test gets a fresh store through the ``store`` fixture and a fake wall clock
(``clock``) that only moves when the test moves it, so leases expire and delays fall due
at exact instants. A store is added by giving the fixture one more parameter.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from redis_server import RedisServer

from trio_background import QueueFullError
from trio_background._store import (
    LOST,
    Claim,
    NewJob,
    Outcome,
    SchemaVersionError,
    SQLiteStore,
    Store,
)

if TYPE_CHECKING:
    from trio_background._redis_store import RedisStore

LEASE = 10.0


class Clock:
    """A wall clock for a store, moved by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> AsyncIterator[Store]:
    if request.param == "redis":
        pytest.importorskip("coredis")
        from trio_background._redis_store import open_redis_store

        server = request.getfixturevalue("redis_server")
        stream = request.getfixturevalue("redis_stream")
        async with open_redis_store(server.url, stream=stream, group="g", clock=clock) as redis:
            yield redis
        return
    opened: Store = SQLiteStore(str(tmp_path / "queue.db"), clock=clock)
    try:
        yield opened
    finally:
        await opened.aclose()


def job(task: str = "t", *args: Any, at: float = 0.0, dedupe: str | None = None) -> NewJob:
    return NewJob(task, json.dumps([task, *args]), at, "rid", dedupe)


def attempts_of(n: int) -> Any:
    return lambda task: n


async def claim(
    store: Store, limit: int = 100, attempts: int = 3, worker: str = "w"
) -> list[Claim]:
    return await store.claim(worker, limit, LEASE, attempts_of(attempts))


async def counts(store: Store) -> dict[str, int]:
    c = await store.counts()
    return {
        "pending": c.pending,
        "scheduled": c.scheduled,
        "running": c.running,
        "completed": c.completed,
        "dead": c.dead,
        "retried": c.retried,
    }


def zero(**nonzero: int) -> dict[str, int]:
    result = dict.fromkeys(("pending", "scheduled", "running", "completed", "dead", "retried"), 0)
    result.update(nonzero)
    return result


async def test_jobs_are_claimed_once_in_order_of_due_time_then_enqueue_order(
    store: Store, clock: Clock
) -> None:
    now = clock.now
    ids = [await store.enqueue(job("t", i, at=now), None) for i in range(3)]
    later = await store.enqueue(job("t", "later", at=now + 5), None)
    earlier = await store.enqueue(job("t", "earlier", at=now - 5), None)
    assert len({*ids, later, earlier}) == 5
    assert await counts(store) == zero(pending=4, scheduled=1)
    assert await store.status(later) == "scheduled"
    first = await claim(store, limit=2)
    assert [c.job_id for c in first] == [earlier, ids[0]]
    assert [c.attempt for c in first] == [1, 1]
    assert len({c.token for c in first}) == 2
    assert json.loads(first[1].payload) == ["t", 0]
    assert first[1].request_id == "rid"
    clock.now += 5
    rest = await claim(store)
    assert [c.job_id for c in rest] == [ids[1], ids[2], later]
    assert await claim(store) == []
    assert await counts(store) == zero(running=5)
    assert {await store.status(i) for i in (*ids, later, earlier)} == {"running"}


async def test_outcomes_complete_retry_dead_and_release(store: Store, clock: Clock) -> None:
    ids = [await store.enqueue(job("t", i, at=clock.now), None) for i in range(4)]
    c = {x.job_id: x for x in await claim(store)}
    held = await store.record(
        [
            Outcome(ids[0], c[ids[0]].token, "complete"),
            Outcome(ids[1], c[ids[1]].token, "retry", "ValueError: again", 3.0),
            Outcome(ids[2], c[ids[2]].token, "dead", "ValueError: no"),
            Outcome(ids[3], c[ids[3]].token, "release"),
        ]
    )
    assert held == [True, True, True, True]
    assert await counts(store) == zero(pending=1, scheduled=1, completed=1, dead=1, retried=1)
    assert [await store.status(i) for i in ids] == ["completed", "scheduled", "dead", "pending"]
    (released,) = await claim(store)
    assert (released.job_id, released.attempt) == (ids[3], 1)  # a release uses no attempt
    clock.now += 3
    (retried,) = await claim(store)
    assert (retried.job_id, retried.attempt) == (ids[1], 2)
    (dead,) = await store.dead_jobs()
    assert (dead.job_id, dead.task, dead.attempts, dead.error) == (ids[2], "t", 1, "ValueError: no")


async def test_only_the_current_claim_can_record_or_renew(store: Store, clock: Clock) -> None:
    job_id = await store.enqueue(job(at=clock.now), None)
    (first,) = await claim(store)
    clock.now += LEASE + 1  # the first worker's lease expired
    (second,) = await claim(store)
    assert (second.job_id, second.attempt) == (job_id, 2)
    assert second.token != first.token
    assert await counts(store) == zero(running=1, retried=1)
    # The stale worker's renewal and late result change nothing.
    assert await store.renew([(job_id, first.token)], LEASE) == {job_id}
    assert await store.record([Outcome(job_id, first.token, "complete")]) == [False]
    assert await store.record([Outcome(job_id, first.token, "dead", "late")]) == [False]
    assert await store.record([Outcome(job_id, first.token, "release")]) == [False]
    assert await counts(store) == zero(running=1, retried=1)
    assert await store.record([Outcome(job_id, second.token, "complete")]) == [True]
    assert await counts(store) == zero(completed=1, retried=1)
    # Recording twice under one claim counts once.
    assert await store.record([Outcome(job_id, second.token, "complete")]) == [False]
    assert await counts(store) == zero(completed=1, retried=1)


async def test_renewed_leases_do_not_expire(store: Store, clock: Clock) -> None:
    job_id = await store.enqueue(job(at=clock.now), None)
    (held,) = await claim(store)
    for _ in range(5):
        clock.now += LEASE * 0.9
        assert await store.renew([(job_id, held.token)], LEASE) == set()
        assert await claim(store) == []
    assert await counts(store) == zero(running=1)


async def test_a_job_whose_workers_keep_dying_goes_dead(store: Store, clock: Clock) -> None:
    job_id = await store.enqueue(job(at=clock.now), None)
    for attempt in (1, 2):
        (c,) = await claim(store, attempts=2)
        assert c.attempt == attempt
        clock.now += LEASE + 1
    assert await claim(store, attempts=2) == []
    assert await store.status(job_id) == "dead"
    (dead,) = await store.dead_jobs()
    assert (dead.attempts, dead.error) == (2, LOST)
    assert await counts(store) == zero(dead=1, retried=1)


async def test_dedupe_keys_hold_while_unfinished(store: Store, clock: Clock) -> None:
    first = await store.enqueue(job(dedupe="k", at=clock.now), None)
    assert await store.enqueue(job("other", dedupe="k", at=clock.now), None) == first
    assert await counts(store) == zero(pending=1)
    (c,) = await claim(store)
    assert await store.enqueue(job(dedupe="k", at=clock.now), None) == first  # running
    await store.record([Outcome(first, c.token, "complete")])
    second = await store.enqueue(job(dedupe="k", at=clock.now), None)
    assert second != first
    (c,) = await claim(store)
    await store.record([Outcome(second, c.token, "dead", "no")])
    third = await store.enqueue(job(dedupe="k", at=clock.now), None)
    assert third not in (first, second)
    # Requeueing the dead one while another holds the key: it gives the key up.
    await store.requeue(second)
    assert await store.enqueue(job(dedupe="k", at=clock.now), None) == third


async def test_max_pending_counts_unfinished_jobs(store: Store, clock: Clock) -> None:
    ids = [await store.enqueue(job(dedupe=f"k{i}", at=clock.now), 2) for i in range(2)]
    with pytest.raises(QueueFullError):
        await store.enqueue(job(at=clock.now), 2)
    assert await store.enqueue(job(dedupe="k0", at=clock.now), 2) == ids[0]  # never full
    assert await counts(store) == zero(pending=2)
    (c, _) = await claim(store)
    with pytest.raises(QueueFullError):  # running is unfinished too
        await store.enqueue(job(at=clock.now), 2)
    await store.record([Outcome(c.job_id, c.token, "complete")])
    await store.enqueue(job(at=clock.now), 2)


async def test_requeue_gives_a_dead_job_fresh_attempts(store: Store, clock: Clock) -> None:
    job_id = await store.enqueue(job(at=clock.now), None)
    (c,) = await claim(store)
    assert not await store.requeue(job_id)  # running, not dead
    assert not await store.requeue("no-such-id")
    assert not await store.requeue("12345")
    await store.record([Outcome(job_id, c.token, "dead", "no")])
    assert await store.requeue(job_id)
    assert await store.status(job_id) == "pending"
    assert await store.dead_jobs() == []
    (c,) = await claim(store)
    assert c.attempt == 1


async def test_completed_records_are_purged_but_still_counted(store: Store, clock: Clock) -> None:
    ids = [await store.enqueue(job(at=clock.now), None) for _ in range(3)]
    for c in await claim(store, limit=2):
        await store.record([Outcome(c.job_id, c.token, "complete")])
    clock.now += 100
    assert await store.purge(clock.now - 50) == 2
    assert [await store.status(i) for i in ids] == [None, None, "pending"]
    assert await counts(store) == zero(pending=1, completed=2)
    assert await store.status("nonsense") is None


async def test_random_programs_agree_with_a_model(store: Store, clock: Clock) -> None:
    # Every stored job under exactly one state, and every counter, against a model.
    rng = random.Random(7)
    model: dict[str, list[Any]] = {}  # id -> [state, not_before, attempts, token, lease_until]
    retried = completed = 0
    max_attempts = 3
    for _ in range(400):
        action = rng.random()
        now = clock.now
        if action < 0.3:
            delay = rng.choice((0, 0, 2, 5))
            job_id = await store.enqueue(job(at=now + delay), None)
            model[job_id] = ["waiting", now + delay, 0, None, None]
        elif action < 0.5:
            # What the store must take back first: expired leases.
            for row in model.values():
                if row[0] == "running" and row[4] < now:
                    if row[2] >= max_attempts:
                        row[0] = "dead"
                    else:
                        row[0], row[1], row[3] = "waiting", now, None
                        retried += 1
            ready = sorted(
                (row[1], int(i))
                for i, row in model.items()
                if row[0] == "waiting" and row[1] <= now
            )
            limit = rng.randint(0, 3)
            got = await claim(store, limit=limit, attempts=max_attempts)
            assert [c.job_id for c in got] == [str(i) for _, i in ready[:limit]]
            for c in got:
                row = model[c.job_id]
                row[0], row[2], row[3], row[4] = "running", row[2] + 1, c.token, now + LEASE
                assert c.attempt == row[2]
        elif action < 0.75:
            running = [i for i, row in model.items() if row[0] == "running"]
            if running:
                job_id = rng.choice(running)
                row = model[job_id]
                token = row[3] if rng.random() < 0.9 else "stale"
                verdict = rng.choice(("complete", "retry", "dead", "release"))
                (ok,) = await store.record([Outcome(job_id, token, verdict, "e", 2.0)])  # type: ignore[arg-type]
                assert ok == (token == row[3])
                if ok:
                    row[3] = None
                    if verdict == "complete":
                        row[0] = "completed"
                        completed += 1
                    elif verdict == "dead":
                        row[0] = "dead"
                    elif verdict == "retry":
                        row[0], row[1] = "waiting", now + 2.0
                        retried += 1
                    else:
                        row[0], row[1], row[2] = "waiting", now, row[2] - 1
        elif action < 0.85:
            held = [(i, row[3]) for i, row in model.items() if row[0] == "running"]
            lost = await store.renew(held, LEASE)
            for job_id, _ in held:
                row = model[job_id]
                assert (job_id in lost) == False  # noqa: E712 (nothing reclaims between)
                row[4] = now + LEASE
        else:
            clock.now += rng.choice((0.5, 1.0, 3.0, LEASE))
        now = clock.now
        expect = zero(retried=retried, completed=completed)
        for row in model.values():
            if row[0] == "waiting":
                expect["pending" if row[1] <= now else "scheduled"] += 1
            elif row[0] in ("running", "dead"):
                expect[row[0]] += 1
        assert await counts(store) == expect
    for job_id, row in model.items():
        status = (
            row[0] if row[0] != "waiting" else ("pending" if row[1] <= clock.now else "scheduled")
        )
        assert await store.status(job_id) == status


# -- SQLite only ----------------------------------------------------------------------------


async def test_sqlite_keeps_everything_across_reopening(tmp_path: Path, clock: Clock) -> None:
    path = str(tmp_path / "q.db")
    store = SQLiteStore(path, clock=clock)
    job_id = await store.enqueue(job(at=clock.now), None)
    (c,) = await claim(store)
    await store.aclose()
    store = SQLiteStore(path, clock=clock)
    try:
        assert await store.status(job_id) == "running"
        assert await store.record([Outcome(job_id, c.token, "complete")]) == [True]
    finally:
        await store.aclose()


def test_sqlite_refuses_a_schema_it_does_not_know(tmp_path: Path) -> None:
    import sqlite3

    newer = tmp_path / "newer.db"
    SQLiteStore(str(newer)).db.close()
    db = sqlite3.connect(newer)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(SchemaVersionError, match="schema version 99"):
        SQLiteStore(str(newer))
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE users (id INTEGER)")
    db.close()
    with pytest.raises(SchemaVersionError, match="not a trio_background queue"):
        SQLiteStore(str(other))
    db = sqlite3.connect(other)
    assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]  # untouched
    db.close()


async def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "q.db"))
    try:
        assert store.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert store.db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        await store.aclose()


def test_sqlite_leaves_a_file_it_refuses_exactly_as_it_was(tmp_path: Path) -> None:
    import sqlite3

    newer = tmp_path / "newer.db"
    db = sqlite3.connect(newer)
    db.execute("CREATE TABLE jobs (x)")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all\n" * 100)
    for path, message in ((newer, "schema version 99"), (garbage, "not a trio_background queue")):
        before = path.read_bytes()
        with pytest.raises(SchemaVersionError, match=message):
            SQLiteStore(str(path))
        assert path.read_bytes() == before  # (not even switched to WAL)


async def test_job_ids_name_exactly_one_job(store: Store, clock: Clock) -> None:
    job_id = await store.enqueue(job(at=clock.now), None)
    assert job_id == "1"
    for other in ("01", "+1", " 1", "1 ", "\uff11", "1" * 40, "-1", "", "1.0"):
        assert await store.status(other) is None, other
        assert not await store.requeue(other), other
    assert await store.status(job_id) == "pending"


async def test_what_another_client_wrote_is_read_without_raising(
    clock: Clock, tmp_path: Path
) -> None:
    import sqlite3

    store = SQLiteStore(str(tmp_path / "queue.db"), clock=clock)
    try:
        job_id = await store.enqueue(job(at=clock.now), None)
        db = sqlite3.connect(tmp_path / "queue.db")
        db.execute(
            "UPDATE jobs SET payload = x'ff00', request_id = x'ff', task = x'fe' WHERE id = ?",
            (int(job_id),),
        )
        db.commit()
        db.close()
        await read_back_garbage(store, job_id)
    finally:
        await store.aclose()


async def read_back_garbage(store: Store, job_id: str) -> None:
    """The job's task, payload and request id were overwritten with bytes that are not text."""
    (claim,) = await claim_one(store)
    assert (claim.task, claim.request_id) == ("", None)
    assert claim.payload.startswith("\x00")  # no JSON array: the queue dead-letters it
    await store.record([Outcome(job_id, claim.token, "dead", "unreadable")])
    (dead,) = await store.dead_jobs()
    assert (dead.task, dead.error) == ("", "unreadable")


async def claim_one(store: Store) -> list[Claim]:
    return await claim(store, limit=1)


# -- Redis only -----------------------------------------------------------------------------


@pytest.fixture
async def redis_store(
    redis_server: RedisServer, redis_stream: str, clock: Clock
) -> AsyncIterator[RedisStore]:
    pytest.importorskip("coredis")
    from trio_background._redis_store import open_redis_store

    async with open_redis_store(redis_server.url, stream=redis_stream, group="g", clock=clock) as s:
        yield s


async def test_redis_reads_what_another_client_wrote_without_raising(
    redis_store: RedisStore, clock: Clock
) -> None:
    job_id = await redis_store.enqueue(job(at=clock.now), None)
    key = f"{redis_store.stream}:job:{job_id}"
    garbage = {"payload": b"\xff\x00", "request_id": b"\xff", "task": b"\xfe"}
    await redis_store._client.hset(key, garbage)
    await read_back_garbage(redis_store, job_id)


async def test_redis_a_call_sent_twice_changes_state_once(
    redis_store: RedisStore, clock: Clock
) -> None:
    # The client sends a command again when its connection drops, and the first may have
    # run: a state-changing script answers a second run of one call as it did the first.
    store = redis_store
    call = [store.stream, f"{store.stream}:call:same"]
    args = [repr(clock.now), "t", '["t"]', "0", "", "0", "", repr(clock.now), ""]
    first: Any = await store._scripts["enqueue"](keys=call, args=args)
    again: Any = await store._scripts["enqueue"](keys=call, args=args)
    assert first == again
    assert await counts(store) == zero(pending=1)
    claim_call = [store.stream, f"{store.stream}:call:claim"]
    claim_args: list[str | int] = [repr(clock.now), "5", repr(LEASE), "w", "g", "tok:", 0]
    got: Any = await store._scripts["claim"](keys=claim_call, args=claim_args)
    got_again: Any = await store._scripts["claim"](keys=claim_call, args=claim_args)
    assert got == got_again
    assert len(got[1]) == 1
    assert await counts(store) == zero(running=1)
    (job_id, *_) = got[1][0]
    assert (await store._client.hget(f"{store.stream}:job:{job_id.decode()}", "attempts")) == b"1"


async def test_redis_job_records_written_by_something_else_go_dead_and_change_nothing(
    redis_store: RedisStore, clock: Clock
) -> None:
    store = redis_store
    ids = [await store.enqueue(job("t", n, at=clock.now), None) for n in range(4)]
    client = store._client
    await client.hset(f"{store.stream}:job:{ids[0]}", {"attempts": "many"})
    await client.delete([f"{store.stream}:job:{ids[1]}"])
    await client.set(f"{store.stream}:job:{ids[1]}", "a string")
    await client.zadd(f"{store.stream}:waiting", {"not-a-job": clock.now})
    claims = await claim(store)
    assert [c.job_id for c in claims] == ids[2:]  # the readable ones, in order
    # Every entry is still counted once: the unreadable ones as dead letters.
    assert await counts(store) == zero(running=2, dead=3)
    assert await client.get(f"{store.stream}:job:{ids[1]}") == b"a string"  # untouched
    assert await store.record([Outcome(c.job_id, c.token, "complete") for c in claims]) == [
        True,
        True,
    ]
    assert await counts(store) == zero(completed=2, dead=3)
    assert await store.status(ids[1]) is None
    assert {d.error for d in await store.dead_jobs()} == {
        "the stored job record is unreadable (written by something else?)"
    }


async def test_redis_refuses_keys_of_another_kind(
    redis_server: RedisServer, redis_stream: str
) -> None:
    from trio_background._redis_store import open_redis_store

    async with open_redis_store(redis_server.url, stream=redis_stream, group="g") as opened:
        await opened._client.set(f"{redis_stream}-x:waiting", "a string")
    with pytest.raises(SchemaVersionError, match="not a trio_background queue"):
        async with open_redis_store(redis_server.url, stream=f"{redis_stream}-x", group="g"):
            pass  # pragma: no cover


async def test_redis_keeps_the_answers_of_calls_in_flight_only(
    redis_store: RedisStore, clock: Clock
) -> None:
    for n in range(5):
        await redis_store.enqueue(job("t", n, at=clock.now), None)
    for c in await claim(redis_store):
        await redis_store.record([Outcome(c.job_id, c.token, "complete")])
    calls = [k async for k in redis_store._client.scan_iter(f"{redis_store.stream}:call:*")]
    assert len(calls) == 1  # the last call's; every earlier one was deleted by the next
