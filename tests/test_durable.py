"""Durable queues through a runtime: enqueue's checks, serving, outcomes, retries, drains.

These run on real time, with short delays, backoffs and leases, and every wait has an
explicit bound: the store works in threads (`trio.to_thread`), and a
`trio.testing.MockClock` that autojumps would jump while a store call runs (every task
is then blocked), expiring leases that were never at risk.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_background import (
    BackgroundShutdownError,
    BackgroundTaskConfig,
    QueueFullError,
    Retry,
    current_job,
    open_background_runtime,
)
from trio_background._store import SQLiteStore
from trio_background.durable import (
    DeadLetter,
    DurableQueue,
    DurableStatistics,
    SchemaVersionError,
    TaskRegistry,
    _open_queue,
    open_sqlite_queue,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

tasks = TaskRegistry()
runs: list[tuple[str, Any, int, str | None]] = []  # (task, argument, attempt, request id)


def ran(task: str, arg: Any) -> None:
    job = current_job()
    runs.append((task, arg, job.attempt, job.metadata.request_id))


@tasks.task
async def record(arg: Any) -> str:
    ran("record", arg)
    return "done"


@tasks.task(name="flaky", retry=Retry(attempts=3, backoff=0.05, jitter=False))
async def flaky(failures: int) -> None:
    ran("flaky", failures)
    if current_job().attempt <= failures:
        raise ValueError(f"run {current_job().attempt} fails")


@tasks.task(name="picky", retry=Retry(attempts=3, backoff=0.05, on=KeyError))
async def picky() -> None:
    raise ValueError("not a KeyError: never retried")


@tasks.task(
    name="slow",
    timeout=0.2,
    retry=Retry(attempts=2, backoff=0.05, jitter=False, on=trio.TooSlowError),
)
async def slow(seconds: float) -> None:
    ran("slow", seconds)
    await trio.sleep(seconds)


@tasks.task(name="sleeper")
async def sleeper(seconds: float) -> None:
    ran("sleeper", seconds)
    await trio.sleep(seconds)


@pytest.fixture(autouse=True)
def _fresh_runs() -> None:
    runs.clear()


# Each test runs on each store: ``queue_at(path)`` opens the queue in the SQLite file
# ``path``, or in Redis under a stream named after it (the same path, the same queue).
_backend: dict[str, Any] = {}


@pytest.fixture(autouse=True, params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "redis":
        pytest.importorskip("coredis")
        _backend["url"] = request.getfixturevalue("redis_server").url
    _backend["kind"] = request.param
    try:
        yield request.param
    finally:
        _backend.clear()


@asynccontextmanager
async def queue_at(
    path: Path,
    *,
    lease: float = 30.0,
    max_pending: int | None = None,
    keep_completed: float = 86400.0,
) -> AsyncIterator[DurableQueue]:
    if _backend["kind"] == "redis":
        from trio_background._redis_store import open_redis_store

        async with (
            open_redis_store(_backend["url"], stream=str(path), group="workers") as redis,
            _open_queue(redis, tasks, lease, max_pending, keep_completed) as queue,
        ):
            yield queue
        return
    store = SQLiteStore(str(path))
    async with _open_queue(store, tasks, lease, max_pending, keep_completed) as queue:
        yield queue


def stats(**nonzero: int) -> DurableStatistics:
    fields = dict.fromkeys(("pending", "scheduled", "running", "completed", "dead", "retried"), 0)
    fields.update(nonzero)
    return DurableStatistics(**fields)


async def until(predicate: Callable[[], Any], limit: float = 10.0) -> None:
    """Wait until ``await predicate()`` is true, looking every 10 ms, ``limit`` s at most."""
    with trio.fail_after(limit):
        while not await predicate():  # noqa: ASYNC110 (the store's state, read in a thread)
            await trio.sleep(0.01)


async def served(
    queue: DurableQueue, config: BackgroundTaskConfig, done: Callable[[DurableStatistics], bool]
) -> Any:
    """Serve ``queue`` into a new runtime until ``done(statistics)``; return the runtime."""
    async with open_background_runtime(config) as runtime, trio.open_nursery() as nursery:
        await nursery.start(queue.serve, runtime)

        async def finished() -> bool:
            return done(await queue.statistics())

        await until(finished)
        nursery.cancel_scope.cancel()
    return runtime


CONFIG = BackgroundTaskConfig(max_concurrent_tasks=4, max_queue_size=8, drain_timeout=60)


# -- the registry ---------------------------------------------------------------------------


def test_tasks_are_registered_under_stable_names() -> None:
    registry = TaskRegistry()

    async def job() -> None: ...

    assert registry.task(job) is job
    assert registry.get(f"{__name__}.test_tasks_are_registered_under_stable_names.<locals>.job")
    assert registry.task(job) is job  # the same function again: fine

    async def other() -> None: ...

    with pytest.raises(ValueError, match="is taken by"):
        registry.task(name=f"{__name__}.test_tasks_are_registered_under_stable_names.<locals>.job")(
            other
        )
    with pytest.raises(ValueError, match="registered already"):
        registry.task(name="renamed")(job)
    assert registry.task(name="named", timeout=5)(other) is other
    assert registry.get("named") is not None
    with pytest.raises(TypeError, match="name must be a str"):
        registry.task(name=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="retry must be a Retry"):
        registry.task(retry=3)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="timeout"):
        registry.task(timeout=-1)


# -- enqueue --------------------------------------------------------------------------------


async def test_enqueue_refuses_what_it_cannot_store_and_stores_nothing(tmp_path: Path) -> None:
    async def unregistered(x: int) -> None: ...

    async with queue_at(tmp_path / "q.db") as queue:
        with pytest.raises(TypeError, match="not a registered task"):
            await queue.enqueue(unregistered, 1)
        for bad in ((1, 2), {1: "a"}, {"a": (1,)}, math.nan, math.inf, b"x", {1, 2}, object()):
            with pytest.raises(TypeError, match="JSON"):
                await queue.enqueue(record, bad)
        with pytest.raises(ValueError, match="delay"):
            await queue.enqueue(record, 1, delay=-1)
        with pytest.raises(ValueError, match="delay"):
            await queue.enqueue(record, 1, delay=math.inf)
        with pytest.raises(TypeError, match="request_id"):
            await queue.enqueue(record, 1, request_id=5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="dedupe_key"):
            await queue.enqueue(record, 1, dedupe_key=5)  # type: ignore[arg-type]
        assert await queue.statistics() == stats()
        # JSON values of every kind come back equal.
        value = {"s": "x", "i": 10**30, "f": 1.5, "b": True, "n": None, "l": [1, [2, {"k": []}]]}
        job_id = await queue.enqueue(record, value, request_id="r-1")
        assert isinstance(job_id, str)
        assert await queue.status(job_id) == "pending"
        await served(queue, CONFIG, lambda s: s.completed == 1)
    assert runs == [("record", value, 1, "r-1")]


async def test_dedupe_and_max_pending(tmp_path: Path) -> None:
    async with queue_at(tmp_path / "q.db", max_pending=2) as queue:
        first = await queue.enqueue(record, 1, dedupe_key="k")
        assert await queue.enqueue(record, 2, dedupe_key="k") == first
        await queue.enqueue(record, 3)
        with pytest.raises(QueueFullError):
            await queue.enqueue(record, 4)
        assert await queue.enqueue(record, 5, dedupe_key="k") == first  # never QueueFullError
        assert await queue.statistics() == stats(pending=2)
        await served(queue, CONFIG, lambda s: s.completed == 2)
        assert await queue.enqueue(record, 6, dedupe_key="k") != first
    assert sorted(arg for _, arg, _, _ in runs) == [1, 3]


# -- serving --------------------------------------------------------------------------------


async def test_jobs_run_through_the_runtime_in_order(tmp_path: Path) -> None:
    async with queue_at(tmp_path / "q.db") as queue:
        for i in range(20):
            await queue.enqueue(record, i, request_id=f"r{i}")
        later = await queue.enqueue(record, "later", delay=0.3)
        assert await queue.status(later) == "scheduled"
        one = BackgroundTaskConfig(max_concurrent_tasks=1, max_queue_size=1)
        runtime = await served(queue, one, lambda s: s.completed == 21)
        assert await queue.status(later) == "completed"
    assert runs == [("record", i, 1, f"r{i}") for i in range(20)] + [("record", "later", 1, None)]
    s = runtime.statistics()
    assert (s.accepted, s.completed, s.failed) == (21, 21, 0)


async def test_serve_claims_no_more_than_the_runtime_has_room_for(tmp_path: Path) -> None:
    config = BackgroundTaskConfig(max_concurrent_tasks=2, max_queue_size=3, drain_timeout=60)
    async with queue_at(tmp_path / "q.db") as queue:
        for _ in range(30):
            await queue.enqueue(sleeper, 0.05)
        most = 0
        async with open_background_runtime(config) as runtime, trio.open_nursery() as nursery:
            await nursery.start(queue.serve, runtime)
            while (s := await queue.statistics()).completed < 30:
                # Claimed and not started: claimed ("running" in the store) less the jobs
                # that started and are not recorded yet (counted after the snapshot: so
                # never more than there were).
                started = sum(1 for task, *_ in runs if task == "sleeper")
                unstarted = s.running - (started - s.completed)
                most = max(most, unstarted)
                assert unstarted <= 5  # what the slots and the queue places have room for
                r = runtime.statistics()
                assert r.queued <= 3
                assert r.running <= 2
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert most >= 3  # it did claim ahead, into the queue places
        assert await queue.statistics() == stats(completed=30)


async def test_failed_runs_retry_by_the_task_policy_then_go_dead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with queue_at(tmp_path / "q.db") as queue:
        recovers = await queue.enqueue(flaky, 2)
        never = await queue.enqueue(flaky, 5)
        wrong = await queue.enqueue(picky)
        await served(queue, CONFIG, lambda s: s.completed + s.dead == 3)
        assert await queue.statistics() == stats(completed=1, dead=2, retried=4)
        assert await queue.status(recovers) == "completed"
        letters = await queue.dead_letters()
        assert [(d.job_id, d.task, d.args, d.attempts, d.error) for d in letters] == [
            (wrong, "picky", [], 1, "ValueError: not a KeyError: never retried"),
            (never, "flaky", [5], 3, "ValueError: run 3 fails"),
        ] or [(d.job_id, d.task, d.args, d.attempts, d.error) for d in letters] == [
            (never, "flaky", [5], 3, "ValueError: run 3 fails"),
            (wrong, "picky", [], 1, "ValueError: not a KeyError: never retried"),
        ]
        assert all(isinstance(d, DeadLetter) for d in letters)
        # A run the queue retries is a warning with its attempt; the last run, an error.
        flaky_logs = [
            (r.levelname, r.getMessage())
            for r in caplog.records
            if r.getMessage().startswith("background job 'flaky'")
        ]
        assert flaky_logs.count(("ERROR", "background job 'flaky' failed")) == 1
        assert (
            "WARNING",
            "background job 'flaky' failed on attempt 2 of 3; retrying in 0.1 seconds",
        ) in flaky_logs
        assert len(flaky_logs) == 5  # (2 runs of one job, 3 of the other)
        # Requeued, it runs again from attempt 1.
        with pytest.raises(ValueError, match="no dead job"):
            await queue.requeue(recovers)
        with pytest.raises(ValueError, match="no dead job"):
            await queue.requeue("nope")
        runs.clear()
        await queue.requeue(never)
        assert await queue.status(never) == "pending"
        await served(
            queue, CONFIG, lambda s: s.dead == 2 and s.pending + s.running + s.scheduled == 0
        )
    assert [attempt for _, _, attempt, _ in runs] == [1, 2, 3]
    assert sorted(a for t, a, att, _ in runs if t == "flaky") == [5, 5, 5]


async def test_a_timed_out_run_is_retried_when_the_policy_says_so(tmp_path: Path) -> None:
    async with queue_at(tmp_path / "q.db") as queue:
        job_id = await queue.enqueue(slow, 10.0)  # past its 0.2 s timeout, twice
        await served(queue, CONFIG, lambda s: s.dead == 1)
        (letter,) = await queue.dead_letters()
        assert (letter.job_id, letter.attempts, letter.error) == (
            job_id,
            2,
            "timed out after 0.2 seconds",
        )
        assert (await queue.statistics()).retried == 1


async def test_poison_payloads_go_dead_and_the_worker_carries_on(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    async with queue_at(path) as queue:
        bad_json = await queue.enqueue(record, "will be spoiled")
        unknown = await queue.enqueue(record, "renamed task")
        not_a_list = await queue.enqueue(record, "not a list")
        good = await queue.enqueue(record, "fine")
        await spoil(path, bad_json, payload="[1, 2")
        await spoil(path, unknown, task="gone.task")
        await spoil(path, not_a_list, payload="{}")
        await served(queue, CONFIG, lambda s: s.completed + s.dead == 4)
        assert await queue.statistics() == stats(completed=1, dead=3)
        letters = {d.job_id: d for d in await queue.dead_letters()}
        assert letters[bad_json].args is None
        assert "could not be decoded" in (letters[bad_json].error or "")
        assert "unknown task 'gone.task'" in (letters[unknown].error or "")
        assert "JSON array" in (letters[not_a_list].error or "")
        assert await queue.status(good) == "completed"
    assert runs == [("record", "fine", 1, None)]


async def test_leases_are_renewed_while_a_job_runs_past_them(tmp_path: Path) -> None:
    async with queue_at(tmp_path / "q.db", lease=0.3) as queue:
        await queue.enqueue(sleeper, 1.2)  # four leases long
        await served(queue, CONFIG, lambda s: s.completed == 1)
        assert await queue.statistics() == stats(completed=1)  # never reclaimed
    assert len(runs) == 1


async def test_a_drain_cut_off_gives_jobs_back_without_using_an_attempt(tmp_path: Path) -> None:
    config = BackgroundTaskConfig(max_concurrent_tasks=1, max_queue_size=2, drain_timeout=0.5)
    path = tmp_path / "q.db"
    async with queue_at(path) as queue:
        quick = await queue.enqueue(sleeper, 0.05)
        long = await queue.enqueue(sleeper, 3.0)
        waiting = await queue.enqueue(sleeper, 0.05)
        with pytest.raises(BackgroundShutdownError) as info:
            async with open_background_runtime(config) as runtime, trio.open_nursery() as nursery:
                await nursery.start(queue.serve, runtime)
                await until(lambda: _is(queue, long, "running"))
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()  # serve stops; the drain begins
        assert [job.name for job in info.value.cancelled] == ["sleeper"]
        assert [job.name for job in info.value.dropped] == ["sleeper"]
        assert await queue.status(quick) == "completed"  # recorded after serve() ended
        assert await queue.status(long) == "pending"
        assert await queue.status(waiting) == "pending"
        assert await queue.statistics() == stats(pending=2, completed=1)
        runs.clear()
        await served(queue, BackgroundTaskConfig(drain_timeout=600), lambda s: s.completed == 3)
    assert sorted(runs) == [("sleeper", 0.05, 1, None), ("sleeper", 3.0, 1, None)]  # attempt 1


async def _is(queue: DurableQueue, job_id: str, status: str) -> bool:
    return await queue.status(job_id) == status


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # (open_sqlite_queue itself)
async def test_open_sqlite_queue_checks_its_arguments_and_the_schema(tmp_path: Path) -> None:
    for kwargs, error in (
        ({"lease": 0}, ValueError),
        ({"lease": math.inf}, ValueError),
        ({"lease": "1"}, TypeError),
        ({"max_pending": 0}, ValueError),
        ({"max_pending": True}, TypeError),
        ({"max_pending": 1.5}, TypeError),
        ({"keep_completed": -1}, ValueError),
    ):
        with pytest.raises(error):
            async with open_sqlite_queue(tmp_path / "q.db", tasks, **kwargs):
                pass  # pragma: no cover
    with pytest.raises(TypeError, match="TaskRegistry"):
        async with open_sqlite_queue(tmp_path / "q.db", {}):  # type: ignore[arg-type]
            pass  # pragma: no cover
    db = sqlite3.connect(tmp_path / "other.db")
    db.execute("CREATE TABLE t (x)")
    db.close()
    with pytest.raises(SchemaVersionError):
        async with open_sqlite_queue(tmp_path / "other.db", tasks):
            pass  # pragma: no cover
    async with open_sqlite_queue(tmp_path / "q.db", tasks) as queue:
        assert await queue.statistics() == stats()
        assert await queue.status("1") is None


async def test_a_job_that_fails_logs_like_any_other(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with queue_at(tmp_path / "q.db") as queue:
        await queue.enqueue(picky, request_id="req-9")
        await served(queue, CONFIG, lambda s: s.dead == 1)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "background job 'picky' failed (request_id='req-9')"
    ]


gates: dict[int, trio.Event] = {}


@tasks.task(name="gated", retry=Retry(attempts=5, backoff=0))
async def gated() -> None:
    attempt = current_job().attempt
    ran("gated", None)
    gates[attempt] = trio.Event()
    await gates[attempt].wait()


async def test_a_claim_taken_again_by_the_same_worker_keeps_its_renewals(
    tmp_path: Path,
) -> None:
    # Its lease ran out while the worker was stalled, and the same worker claimed the job
    # again. The first run's late outcome is ignored, and must not stop the renewals of
    # the second run's claim (whose lease would run out in turn: a third run).
    path = tmp_path / "q.db"
    gates.clear()
    async with queue_at(path, lease=1.0) as queue:
        job_id = await queue.enqueue(gated)
        async with open_background_runtime(CONFIG) as runtime, trio.open_nursery() as nursery:
            await nursery.start(queue.serve, runtime)
            with trio.fail_after(10):
                while 1 not in gates:  # noqa: ASYNC110 (set by the job)
                    await trio.sleep(0.01)
                while 2 not in gates:  # the lease runs out, as in a stall; claimed again
                    await expire_lease(path, job_id, attempt=1)
                    await trio.sleep(0.1)
            gates[1].set()  # the first run ends: its outcome is ignored
            await trio.sleep(3.5)  # three leases and more: the second run stays claimed
            assert [attempt for _, _, attempt, _ in runs] == [1, 2]
            assert await queue.status(job_id) == "running"
            gates[2].set()
            await until(lambda: _is(queue, job_id, "completed"))
            nursery.cancel_scope.cancel()
        assert (await queue.statistics()).retried == 1


# -- found by review: what must never crash, strand or loop ---------------------------------


@tasks.task(name="cancels_itself", retry=Retry(attempts=3, backoff=0))
async def cancels_itself() -> None:
    ran("cancels_itself", None)
    current_job().cancel()
    await trio.sleep_forever()


@tasks.task(name="interrupted", retry=Retry(attempts=5, backoff=0))
async def interrupted(n: int) -> None:
    await trio.sleep(0.05)
    if n == 0:
        raise KeyboardInterrupt  # what Ctrl-C does when it lands in the job's code


async def spoil(path: Path, job_id: str, **fields: str | bytes) -> None:
    """Overwrite fields of a stored job, as another client (or a bug) might."""
    if _backend["kind"] == "redis":
        import coredis

        async with coredis.Redis.from_url(_backend["url"]) as client:
            await client.hset(f"{path}:job:{job_id}", fields)
        return
    db = sqlite3.connect(path)
    for name, value in fields.items():
        db.execute(f"UPDATE jobs SET {name} = ? WHERE id = ?", (value, int(job_id)))
    db.commit()
    db.close()


async def expire_lease(path: Path, job_id: str, attempt: int) -> None:
    """End the lease of a job's claim for run ``attempt`` now, as if its worker stalled.

    Nothing changes if the job is not running that run (a later claim keeps its lease).
    """
    if _backend["kind"] == "redis":
        import coredis

        async with coredis.Redis.from_url(_backend["url"]) as client:
            await client.eval(
                "if redis.call('HGET', KEYS[1], 'attempts') == ARGV[1] then "
                "redis.call('ZADD', KEYS[2], 'XX', 0, ARGV[2]) end",
                [f"{path}:job:{job_id}", f"{path}:leases"],
                [str(attempt), f"{int(job_id):016d}"],
            )
        return
    db = sqlite3.connect(path)
    db.execute(
        "UPDATE jobs SET lease_until = 0 WHERE id = ? AND attempts = ?", (int(job_id), attempt)
    )
    db.commit()
    db.close()


async def test_stored_jobs_nobody_can_run_go_dead_and_the_worker_carries_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    async with queue_at(path) as queue:
        deep = await queue.enqueue(record, "deep")
        bytes_ = await queue.enqueue(record, "bytes")
        good = await queue.enqueue(record, "good")
        await spoil(path, deep, payload="[" * 100_000)
        await spoil(path, bytes_, payload=b"\xff\x00\xff")
        await served(queue, CONFIG, lambda s: s.completed + s.dead == 3)
        letters = {d.job_id: d for d in await queue.dead_letters()}
        assert set(letters) == {deep, bytes_}
        assert "RecursionError" in (letters[deep].error or "")
        assert letters[deep].args is None
        assert letters[bytes_].args is None
        assert await queue.status(good) == "completed"


async def test_enqueue_refuses_deep_nesting_and_unencodable_ids(tmp_path: Path) -> None:
    class Key(str):
        pass

    async with queue_at(tmp_path / "q.db") as queue:
        deep: list[Any] = []
        for _ in range(5000):
            deep = [deep]
        with pytest.raises(TypeError, match="nested too deeply"):
            await queue.enqueue(record, deep)
        with pytest.raises(ValueError, match="request_id must be text that UTF-8 can encode"):
            await queue.enqueue(record, 1, request_id="\udc80")
        with pytest.raises(ValueError, match="dedupe_key"):
            await queue.enqueue(record, 1, dedupe_key="\udc80")
        assert await queue.statistics() == stats()
        await queue.enqueue(record, {Key("k"): 1})  # a str subclass is a str, as a key too
        assert await queue.statistics() == stats(pending=1)


def test_only_async_functions_can_be_tasks() -> None:
    registry = TaskRegistry()

    class Job:
        async def __call__(self) -> None: ...

    def blocking() -> None: ...

    for fn in (blocking, lambda: None, type("Klass", (), {}), print):
        with pytest.raises(TypeError, match="async function"):
            registry.task(name=f"t{id(fn)}")(fn)  # type: ignore[type-var]
    job = Job()
    assert registry.task(name="callable")(job) is job


async def test_a_job_cancelled_through_its_handle_goes_dead_once(tmp_path: Path) -> None:
    async with queue_at(tmp_path / "q.db") as queue:
        job_id = await queue.enqueue(cancels_itself)
        await served(queue, CONFIG, lambda s: s.dead == 1)
        (letter,) = await queue.dead_letters()
        assert (letter.job_id, letter.attempts, letter.error) == (
            job_id,
            1,
            "cancelled through its handle",
        )
    assert len(runs) == 1


async def test_ctrl_c_in_a_job_gives_it_back_with_its_attempt(tmp_path: Path) -> None:
    async with queue_at(tmp_path / "q.db") as queue:
        hit = await queue.enqueue(interrupted, 0)
        other = await queue.enqueue(interrupted, 1)
        with pytest.raises(KeyboardInterrupt):
            async with open_background_runtime(CONFIG) as runtime, trio.open_nursery() as nursery:
                await nursery.start(queue.serve, runtime)
                await trio.sleep(5)
        assert await queue.status(hit) == "pending"  # given back, not dead
        assert await queue.status(other) in ("pending", "completed")  # cut off, or done
        s = await queue.statistics()
        assert (s.dead, s.running, s.retried) == (0, 0, 0)


async def test_an_outcome_that_could_not_be_recorded_is_recorded_later(
    tmp_path: Path,
) -> None:
    # The store fails once: the recorder's error tears the queue down (the application
    # sees it), and the outcome it could not write is written as the queue closes.
    path = tmp_path / "q.db"
    failures: list[object] = []
    job_ids: list[str] = []
    with pytest.raises(BaseExceptionGroup) as info:  # (from the queue's own nursery)
        async with queue_at(path) as queue:
            real = queue._store.record

            async def failing_once(outcomes: Any) -> list[bool]:
                if not failures:
                    failures.append(outcomes)
                    raise sqlite3.OperationalError("database or disk is full")
                return await real(outcomes)

            queue._store.record = failing_once  # type: ignore[method-assign]
            job_ids.append(await queue.enqueue(record_task, 1))
            await served(queue, CONFIG, lambda s: s.completed == 1)
    assert "database or disk is full" in repr(info.value)
    assert failures
    async with queue_at(path) as queue:
        assert await queue.status(job_ids[0]) == "completed"
        assert await queue.statistics() == stats(completed=1)


record_task = record


async def test_a_serve_that_outlives_its_queue_stops_and_gives_its_claims_back(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    async with open_background_runtime(CONFIG) as runtime, trio.open_nursery() as nursery:
        async with queue_at(path) as queue:
            for _ in range(20):
                await queue.enqueue(sleeper, 0.2)
            await nursery.start(queue.serve, runtime)
            await until(lambda: _running(queue))
        # The queue closed while serve() and its jobs went on: serve() has stopped, its
        # claims were given back, and nothing went dead.
        await runtime.wait_idle()
    async with queue_at(path) as queue:
        s = await queue.statistics()
        assert (s.dead, s.running) == (0, 0)
        assert s.pending + s.completed == 20


async def _running(queue: DurableQueue) -> bool:
    return (await queue.statistics()).running > 0


async def test_two_serves_into_one_runtime_claim_within_its_room(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    config = BackgroundTaskConfig(max_concurrent_tasks=1, max_queue_size=1, drain_timeout=60)
    async with queue_at(path) as first, queue_at(path) as second:
        for _ in range(12):
            await first.enqueue(sleeper, 0.05)
        most = 0

        def claimed_and_not_ended() -> int:
            # Claims held by either queue whose job has not ended (an ended job's outcome
            # may wait a moment to be written: its claim holds no room any more).
            ending = {o.token for q in (first, second) for o in q._outcomes}
            ending |= first._writing_tokens | second._writing_tokens
            return sum(t not in ending for q in (first, second) for t in q._held.values())

        async with open_background_runtime(config) as runtime, trio.open_nursery() as nursery:
            await nursery.start(first.serve, runtime)
            await nursery.start(second.serve, runtime)
            with trio.fail_after(30):
                while (await first.statistics()).completed < 12:
                    for _ in range(10):
                        most = max(most, claimed_and_not_ended())
                        await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        assert 1 <= most <= 2  # the slot and the queue place


async def test_a_runtime_timeout_is_named_in_the_dead_letter(tmp_path: Path) -> None:
    async with queue_at(tmp_path / "q.db") as queue:
        await queue.enqueue(sleeper, 5.0)
        config = BackgroundTaskConfig(job_timeout=0.2, drain_timeout=60)
        await served(queue, config, lambda s: s.dead == 1)
        (letter,) = await queue.dead_letters()
        assert letter.error == "timed out after 0.2 seconds"


async def test_an_error_in_the_block_leaves_it_as_it_was_raised(tmp_path: Path) -> None:
    error = ValueError("from the block")
    with pytest.raises(ValueError, match="from the block") as info:
        async with queue_at(tmp_path / "q.db") as queue:
            await queue.enqueue(record, 1)
            raise error
    assert info.value is error  # not inside the queue's (or the client's) exception groups
    # A cancellation from outside leaves as a bare Cancelled, caught by its scope.
    with trio.CancelScope() as scope:
        async with queue_at(tmp_path / "q.db") as queue:
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    async with queue_at(tmp_path / "q.db") as queue:
        assert (await queue.statistics()).pending == 1


async def test_a_renewal_racing_the_outcome_being_written_is_not_a_lost_lease(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The outcome is in the store, but its write has not returned when a renewal finds
    # the job no longer running: that is not a lease lost to another worker.
    async with queue_at(tmp_path / "q.db", lease=0.3) as queue:
        real = queue._store.record
        slow: list[int] = []

        async def written_then_slow(outcomes: Any) -> list[bool]:
            held = await real(outcomes)
            slow.append(len(outcomes))
            await trio.sleep(0.35)  # (more than a renewal interval: one renewal runs now)
            return held

        queue._store.record = written_then_slow  # type: ignore[method-assign]
        await queue.enqueue(record, 1)
        with caplog.at_level(logging.WARNING, logger="trio_background"):
            await served(queue, CONFIG, lambda s: s.completed == 1)
        assert slow
    assert "lease" not in caplog.text


async def test_serve_cancelled_while_the_store_claims_gives_the_claims_back(
    tmp_path: Path,
) -> None:
    # The store made the claim, but its answer was still on the way when serve() was
    # cancelled: the claimed jobs go back at once, rather than wait out their leases.
    async with queue_at(tmp_path / "q.db") as queue:
        for n in range(3):
            await queue.enqueue(record, n)
        real = queue._store.claim
        in_claim = trio.Event()

        async def slow_answer(*args: Any) -> Any:
            claims = await real(*args)
            in_claim.set()
            await trio.sleep(0.2)  # (the answer on its way)
            return claims

        queue._store.claim = slow_answer  # type: ignore[method-assign,assignment]
        async with open_background_runtime(CONFIG) as runtime, trio.open_nursery() as nursery:
            await nursery.start(queue.serve, runtime)
            await in_claim.wait()
            nursery.cancel_scope.cancel()
        assert await queue.statistics() == stats(pending=3)
    assert runs == []
