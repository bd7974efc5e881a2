"""10. Durable jobs: what a SQLite-backed queue costs, against the runtime alone and a floor.

Three contenders run the same N no-op jobs, interleaved round by round, each on a fresh
file in a temporary directory (WAL mode, ``synchronous=FULL``: every commit is on disk):

- ``trio_background durable``: ``await queue.enqueue(noop)`` N times (each call timed:
  its latency is the time until the job is committed), then one ``queue.serve`` into a
  runtime of 16 slots and 64 places until the store records every job completed.
- ``in-process runtime``: the same N jobs spawned into the same runtime, no store: what
  durability costs.
- ``hand-written sqlite3 loop``: the floor. The same table shape and durability, plain
  ``sqlite3`` in the Trio thread with no worker threads: one INSERT per job committed on
  its own, then claim 64 at a time (one transaction), run them, record them completed
  (one transaction).

End-to-end jobs/s count from the first claim to the last recorded outcome (for the
runtime alone: from the first spawn to idle); CPU seconds are the whole process's,
worker threads included, so the CPU per job stays meaningful on a shared machine.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import trio

from ._util import clock, fmt_ratio, fmt_us, interleave, log, median, percentile, ratios, since

SLOTS = 16
PLACES = 64


class DurableRun(NamedTuple):
    enqueue: list[float]  # seconds per enqueue call
    wall: float  # end to end
    cpu: float


def _durable(tb: ModuleType, n: int) -> DurableRun:
    from trio_background.durable import TaskRegistry, open_sqlite_queue

    tasks = TaskRegistry()
    done = 0

    @tasks.task(name="noop")
    async def noop() -> None:
        nonlocal done
        done += 1

    async def main() -> DurableRun:
        with tempfile.TemporaryDirectory() as root:
            async with open_sqlite_queue(Path(root) / "bench.db", tasks) as queue:
                latencies = []
                for _ in range(n):
                    t = time.perf_counter()
                    await queue.enqueue(noop)
                    latencies.append(time.perf_counter() - t)
                config = tb.BackgroundTaskConfig(max_concurrent_tasks=SLOTS, max_queue_size=PLACES)
                start = clock()
                async with (
                    tb.open_background_runtime(config) as runtime,
                    trio.open_nursery() as nursery,
                ):
                    await nursery.start(queue.serve, runtime)
                    # Looked at every millisecond: the last job, then its recorded outcome.
                    while done < n:  # noqa: ASYNC110 (a counter, not an event, in the job)
                        await trio.sleep(0.001)
                    while (await queue.statistics()).completed < n:  # noqa: ASYNC110
                        await trio.sleep(0.001)
                    nursery.cancel_scope.cancel()
                elapsed = since(start)
                return DurableRun(latencies, elapsed.wall, elapsed.cpu)

    return trio.run(main)


def _in_process(tb: ModuleType, n: int) -> DurableRun:
    async def noop() -> None:
        pass

    async def main() -> DurableRun:
        config = tb.BackgroundTaskConfig(max_concurrent_tasks=SLOTS, max_queue_size=PLACES)
        async with tb.open_background_runtime(config) as runtime:
            handle = runtime.handle()
            start = clock()
            for _ in range(n):
                await handle.send(noop)
            await runtime.wait_idle()
            elapsed = since(start)
        return DurableRun([], elapsed.wall, elapsed.cpu)

    return trio.run(main)


def _floor(n: int) -> DurableRun:
    async def noop() -> None:
        pass

    async def main() -> DurableRun:
        with tempfile.TemporaryDirectory() as root:
            db = sqlite3.connect(Path(root) / "floor.db", isolation_level=None)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute(
                "CREATE TABLE jobs (id INTEGER PRIMARY KEY, task TEXT, payload TEXT, "
                "state TEXT, not_before REAL, lease_until REAL)"
            )
            db.execute("CREATE INDEX ready ON jobs (not_before, id) WHERE state = 'waiting'")
            latencies = []
            for _ in range(n):
                t = time.perf_counter()
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "INSERT INTO jobs (task, payload, state, not_before) "
                    "VALUES ('noop', '[]', 'waiting', ?)",
                    (time.time(),),
                )
                db.execute("COMMIT")
                latencies.append(time.perf_counter() - t)
            start = clock()
            left = n
            while left:
                db.execute("BEGIN IMMEDIATE")
                rows = db.execute(
                    "SELECT id FROM jobs WHERE state = 'waiting' AND not_before <= ? "
                    "ORDER BY not_before, id LIMIT ?",
                    (time.time(), PLACES),
                ).fetchall()
                until = time.time() + 30
                db.executemany(
                    "UPDATE jobs SET state = 'running', lease_until = ? WHERE id = ?",
                    [(until, job_id) for (job_id,) in rows],
                )
                db.execute("COMMIT")
                async with trio.open_nursery() as nursery:
                    for _ in rows:
                        nursery.start_soon(noop)
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "UPDATE jobs SET state = 'completed' WHERE id = ?",
                    [(job_id,) for (job_id,) in rows],
                )
                db.execute("COMMIT")
                left -= len(rows)
            elapsed = since(start)
            db.close()
            return DurableRun(latencies, elapsed.wall, elapsed.cpu)

    return trio.run(main)


DURABLE = "trio_background durable"
IN_PROCESS = "in-process runtime"
FLOOR = "hand-written sqlite3 loop"


def durable(tb: ModuleType | None, sizes: Any) -> Any:
    from ._scenarios import Section

    n = sizes.durable
    log(f"durable: {n:,} no-op jobs through SQLite, {sizes.rounds} interleaved rounds")
    section = Section(
        "durable",
        f"10. Durable jobs: {n:,} no-op jobs, one worker, {SLOTS} slots, {PLACES} places "
        "(SQLite, WAL, synchronous=FULL)",
        [
            "contender",
            "enqueue p50",
            "enqueue p99",
            "jobs/s (wall)",
            "CPU per job",
            "jobs/s vs durable",
        ],
        data={"n": n, "rounds": sizes.rounds},
    )
    if tb is None:
        section.notes.append("trio_background could not be imported: nothing to measure.")
        return section
    contenders = {
        DURABLE: lambda: _durable(tb, n),
        IN_PROCESS: lambda: _in_process(tb, n),
        FLOOR: lambda: _floor(n),
    }
    results = interleave(contenders, sizes.rounds, label="durable")
    rates = {name: [n / r.wall for r in runs] for name, runs in results.items()}
    for name, runs in results.items():
        latencies = [x for r in runs for x in r.enqueue]
        section.rows.append(
            [
                name,
                fmt_us(median([percentile(r.enqueue, 50) for r in runs])) if latencies else "-",
                fmt_us(median([percentile(r.enqueue, 99) for r in runs])) if latencies else "-",
                f"{median(rates[name]):,.0f}/s",
                fmt_us(median([r.cpu / n for r in runs])),
                fmt_ratio(median(ratios(rates[name], rates[DURABLE]))),
            ]
        )
    section.data["jobs_per_wall_second"] = rates
    section.data["cpu_per_job"] = {
        name: [r.cpu / n for r in runs] for name, runs in results.items()
    }
    section.data["enqueue_p50"] = {
        name: [percentile(r.enqueue, 50) for r in runs]
        for name, runs in results.items()
        if runs[0].enqueue
    }
    section.data["enqueue_p99"] = {
        name: [percentile(r.enqueue, 99) for r in runs]
        for name, runs in results.items()
        if runs[0].enqueue
    }
    section.notes.append(
        "Enqueue latency: one call, until the job is committed (fsync included). End to "
        "end: from serving (or spawning) to the last outcome recorded; CPU: the whole "
        "process, threads included."
    )
    return section
