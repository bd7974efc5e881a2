"""The worker process: its command line, its drain on SIGTERM, and durability under kill -9.

Real processes, real time, local files only; every wait has an explicit bound, and every
process a test starts is stopped by PID before the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import durable_tasks
import pytest
import trio

from trio_background.durable import DurableQueue, DurableStatistics, open_sqlite_queue

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def worker_command(path: Path, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trio_background.worker",
        "durable_tasks:tasks",
        "--sqlite",
        str(path),
        *options,
    ]


def environment(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env["TB_RUN_LOG"] = str(tmp_path / "runs.log")
    env["TB_EFFECTS"] = str(tmp_path / "effects.db")
    return env


class Worker:
    """One worker process, started and waited for until it prints ``ready``."""

    def __init__(self, tmp_path: Path, path: Path, *options: str, redis: str | None = None) -> None:
        command = worker_command(path, *options)
        if redis is not None:  # (a Redis queue instead of the file)
            command[command.index("--sqlite") : command.index("--sqlite") + 2] = [
                "--redis",
                redis,
            ]
        self.proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=environment(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.output = b""
        try:
            line = self.ready_line = self.readline(20.0)
            stderr = self.proc.stderr
            assert stderr is not None
            assert line.startswith(b"ready"), (line, stderr.read() if self.proc.poll() else b"")
        except BaseException:
            self.kill()  # (not left running for the tests after this one)
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        stdout = self.proc.stdout
        assert stdout is not None
        while b"\n" not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"no line from the worker within {timeout} s: {self.output!r}"
            ready, _, _ = select.select([stdout], [], [], left)
            if ready:
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    break
                self.output += chunk
        line, _, self.output = self.output.partition(b"\n")
        return line

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> tuple[int, str, str]:
        """Send ``sig``, wait for the exit; return (status, stdout, stderr)."""
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, (self.output + out).decode(), err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=20)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Every worker a test starts; any still alive at the end is killed by PID."""
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(timeout=20)


def report_chaos(figures: Mapping[str, object]) -> None:
    """Append a chaos round's figures, as a JSON line, to ``$TB_CHAOS_REPORT`` if it is set."""
    report = os.environ.get("TB_CHAOS_REPORT")
    if report:
        with Path(report).open("a") as f:
            f.write(json.dumps(figures) + "\n")


def make_effects(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "effects.db")
    db.execute("CREATE TABLE effects (n INTEGER PRIMARY KEY)")
    db.commit()
    db.close()


def run_lines(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "runs.log"
    if not log.exists():
        return []
    return [line.split() for line in log.read_text().splitlines()]


async def statistics(path: Path) -> DurableStatistics:
    async with open_sqlite_queue(path, durable_tasks.tasks) as queue:
        return await queue.statistics()


async def wait_for(path: Path, predicate: object, limit: float) -> DurableStatistics:
    """Read the queue's statistics every 50 ms until ``predicate`` holds, ``limit`` s at most.

    If it never holds, the failure says what the queue last looked like.
    """
    stats = None
    with trio.move_on_after(limit):
        while True:
            stats = await statistics(path)
            if predicate(stats):  # type: ignore[operator]
                return stats
            await trio.sleep(0.05)
    async with open_sqlite_queue(path, durable_tasks.tasks) as queue:
        dead = await queue.dead_letters()
    raise AssertionError(
        f"not within {limit} s; last {stats}; dead letters (first 5): "
        f"{[(d.job_id, d.attempts, d.error) for d in dead[:5]]}"
    )


# -- the command line -----------------------------------------------------------------------


def run_worker(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the worker command to its end (60 s at most); its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "trio_background.worker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=environment(tmp_path),
    )


def test_help_lists_every_option_and_the_exit_statuses(tmp_path: Path) -> None:
    proc = run_worker(tmp_path, "--help")
    assert proc.returncode == 0
    for option in (
        "MODULE:REGISTRY",
        "--sqlite",
        "--redis",
        "--stream",
        "--group",
        "--consumer",
        "--concurrency",
        "--queue-size",
        "--drain-timeout",
        "--lease",
    ):
        assert option in proc.stdout
    assert "Exit status: 0" in " ".join(proc.stdout.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["durable_tasks:tasks"], "--sqlite"),
        (["durable_tasks", "--sqlite", "q.db"], "expected MODULE:REGISTRY"),
        (["no_such_module:tasks", "--sqlite", "q.db"], "cannot import 'no_such_module'"),
        (["durable_tasks:nothing", "--sqlite", "q.db"], "is nothing, not a"),
        (["durable_tasks:os", "--sqlite", "q.db"], "is a module, not a"),
        (
            ["durable_tasks:tasks", "--sqlite", "q.db", "--concurrency", "0"],
            "--concurrency must be >= 1",
        ),
        (
            ["durable_tasks:tasks", "--sqlite", "q.db", "--queue-size", "-1"],
            "--queue-size must be >= 0",
        ),
        (["durable_tasks:tasks", "--sqlite", "q.db", "--lease", "0"], "--lease must be"),
        (["durable_tasks:tasks", "--sqlite", "q.db", "--drain-timeout", "-1"], "--drain-timeout"),
        (["durable_tasks:tasks", "--sqlite", "foreign.db"], "not a trio_background queue"),
        (["durable_tasks:tasks", "--sqlite", "garbage.db"], "not a trio_background queue"),
        (["durable_tasks:tasks", "--sqlite", "missing/q.db"], "cannot serve missing/q.db"),
    ],
)
def test_bad_usage_exits_2_with_a_message(tmp_path: Path, args: list[str], message: str) -> None:
    foreign = sqlite3.connect(tmp_path / "foreign.db")
    foreign.execute("CREATE TABLE t (x)")
    foreign.close()
    (tmp_path / "garbage.db").write_bytes(b"not a database\n" * 100)
    proc = run_worker(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


# -- SIGTERM, drains, fencing: on each store -----------------------------------------------


class Place:
    """Where a test's queue lives: a SQLite file, or a stream on the tests' Redis server."""

    def __init__(self, tmp_path: Path, url: str | None = None, stream: str = "") -> None:
        self.tmp_path = tmp_path
        self.path = tmp_path / "q.db"
        self.url = url
        self.stream = stream

    def worker(self, *options: str) -> Worker:
        if self.url is None:
            return Worker(self.tmp_path, self.path, *options)
        return Worker(self.tmp_path, self.path, "--stream", self.stream, *options, redis=self.url)

    def queue(self) -> contextlib.AbstractAsyncContextManager[DurableQueue]:
        if self.url is None:
            return open_sqlite_queue(self.path, durable_tasks.tasks)
        from trio_background.redis import open_redis_queue

        return open_redis_queue(self.url, durable_tasks.tasks, stream=self.stream)

    async def statistics(self) -> DurableStatistics:
        async with self.queue() as queue:
            return await queue.statistics()

    async def freeze(self, worker: Worker) -> None:
        """SIGSTOP ``worker``, at an instant it is not writing to the SQLite file.

        A process stopped inside a write transaction holds SQLite's write lock, and every
        other process waits for it (that is SQLite's single writer): the test wants a
        worker stopped past its lease, not a file locked.
        """
        with trio.fail_after(20):
            while True:
                worker.proc.send_signal(signal.SIGSTOP)
                if self.url is not None or await trio.to_thread.run_sync(self._unlocked):
                    return
                worker.proc.send_signal(signal.SIGCONT)
                await trio.sleep(0.02)

    def _unlocked(self) -> bool:
        db = sqlite3.connect(self.path, timeout=0.2, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:  # (database is locked)
            return False
        finally:
            db.close()

    async def wait_for(self, predicate: object, limit: float) -> DurableStatistics:
        """Read the statistics every 50 ms until ``predicate`` holds, ``limit`` s at most."""
        with trio.fail_after(limit):
            async with self.queue() as queue:
                while True:
                    stats = await queue.statistics()
                    if predicate(stats):  # type: ignore[operator]
                        return stats
                    await trio.sleep(0.05)


@pytest.fixture(params=["sqlite", "redis"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    if request.param == "sqlite":
        return Place(tmp_path)
    pytest.importorskip("coredis")
    server = request.getfixturevalue("redis_server")
    return Place(tmp_path, server.url, request.getfixturevalue("redis_stream"))


async def test_sigterm_drains_then_exits_0(place: Place, workers: list[Worker]) -> None:
    async with place.queue() as queue:
        for i in range(40):
            await queue.enqueue(durable_tasks.nap, str(i), 0.05)
    worker = place.worker("--concurrency", "4", "--queue-size", "4")
    workers.append(worker)
    await place.wait_for(lambda s: s.completed >= 8, 20)
    status, out, err = worker.stop(signal.SIGTERM)
    assert status == 0, err
    summary = out.splitlines()[-1]
    assert summary.startswith("stopped (drained):")
    stats = await place.statistics()
    assert stats.running == 0
    assert stats.completed + stats.pending == 40
    assert f"{stats.completed} completed" in summary
    assert len(run_lines(place.tmp_path)) == stats.completed  # every run that began, recorded
    if place.url is not None:
        import coredis

        async with coredis.Redis.from_url(place.url) as client:  # it left the group
            assert await client.xinfo_consumers(place.stream, "workers") == ()


async def test_later_signals_during_the_drain_are_ignored(
    place: Place, workers: list[Worker]
) -> None:
    async with place.queue() as queue:
        await queue.enqueue(durable_tasks.nap, "long", 1.0)
    worker = place.worker("--drain-timeout", "10")
    workers.append(worker)
    await place.wait_for(lambda s: s.running == 1, 20)
    worker.proc.send_signal(signal.SIGTERM)
    await trio.sleep(0.2)  # (draining now: the job has most of its second to go)
    worker.proc.send_signal(signal.SIGINT)
    worker.proc.send_signal(signal.SIGTERM)
    status, out, err = worker.stop(signal.SIGTERM)
    assert status == 0, err
    assert out.splitlines()[-1].startswith("stopped (drained): 1 completed")
    assert "Traceback" not in err


async def test_a_drain_cut_short_gives_jobs_back_and_exits_1(
    place: Place, workers: list[Worker]
) -> None:
    async with place.queue() as queue:
        ids = [await queue.enqueue(durable_tasks.nap, str(i), 30.0) for i in range(6)]
    worker = place.worker("--concurrency", "2", "--queue-size", "2", "--drain-timeout", "0.2")
    workers.append(worker)
    await place.wait_for(lambda s: s.running == 4, 20)
    status, out, err = worker.stop(signal.SIGINT)
    assert status == 1, err
    lines = out.splitlines()
    assert lines[-3].startswith("stopped (drain cut short): 0 completed")
    assert lines[-2:] == ["  cut off while running: nap x2", "  given back unstarted: nap x2"]
    assert await place.statistics() == DurableStatistics(6, 0, 0, 0, 0, 0)  # no attempt used
    async with place.queue() as queue:
        assert {await queue.status(i) for i in ids} == {"pending"}


async def test_a_stopped_workers_job_is_reclaimed_and_its_late_result_ignored(
    place: Place, workers: list[Worker]
) -> None:
    async with place.queue() as queue:
        job_id = await queue.enqueue(durable_tasks.nap, "slow", 1.0)
    first = place.worker("--lease", "0.5")
    workers.append(first)
    await place.wait_for(lambda s: s.running == 1, 20)
    await place.freeze(first)  # past its lease: a zombie
    try:
        second = place.worker("--lease", "0.5")
        workers.append(second)
        stats = await place.wait_for(lambda s: s.completed == 1, 20)
    finally:
        first.proc.send_signal(signal.SIGCONT)
    assert stats == DurableStatistics(0, 0, 0, 1, 0, 1)
    # The zombie wakes up, finishes its run and tries to record it: refused.
    with trio.fail_after(20):
        while len(run_lines(place.tmp_path)) < 2:  # noqa: ASYNC110 (another process's file)
            await trio.sleep(0.05)
    status, _, err = first.stop()
    assert status == 0
    assert "its lease was lost" in err or "lease expired before it was renewed" in err
    assert second.stop()[0] == 0
    assert await place.statistics() == DurableStatistics(0, 0, 0, 1, 0, 1)  # counted nowhere
    runs = run_lines(place.tmp_path)
    assert sorted((int(pid), int(attempt)) for pid, _, _, attempt in runs) == sorted(
        [(first.pid, 1), (second.pid, 2)]
    )
    async with place.queue() as queue:
        assert await queue.status(job_id) == "completed"


# -- kill -9 --------------------------------------------------------------------------------

JOBS = 5000
WORKERS = 3
KILLS = 10  # one about every 0.5 s (plus the restart), while jobs remain


def claimed_by(path: Path, pid: int) -> int:
    db = sqlite3.connect(path, timeout=60)
    try:
        (n,) = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE state = 'running' AND worker LIKE ?",
            (f"%:{pid}:%",),
        ).fetchone()
    finally:
        db.close()
    return int(n)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
async def test_kill_9_chaos_loses_nothing_and_bounds_the_duplicates(
    tmp_path: Path, workers: list[Worker], round_: int
) -> None:
    rng = random.Random(round_)
    path = tmp_path / "q.db"
    make_effects(tmp_path)
    began = time.monotonic()
    async with open_sqlite_queue(path, durable_tasks.tasks) as queue:
        for n in range(JOBS):
            await queue.enqueue(durable_tasks.effect, n, 0.01)
    options = ("--concurrency", "16", "--queue-size", "8", "--lease", "2.0", "--drain-timeout", "1")
    alive = [Worker(tmp_path, path, *options) for _ in range(WORKERS)]
    workers.extend(alive)
    kills = at_risk = 0
    for _ in range(KILLS):
        await trio.sleep(rng.uniform(0.3, 0.7))
        victim = rng.randrange(WORKERS)
        # Frozen first, so that what it holds cannot change before the kill.
        alive[victim].proc.send_signal(signal.SIGSTOP)
        at_risk += claimed_by(path, alive[victim].pid)  # claimed = "running" in the store
        alive[victim].kill()
        kills += 1
        alive[victim] = Worker(tmp_path, path, *options)
        workers.append(alive[victim])
    # Every kill came while jobs were left: the last one too.
    assert (await statistics(path)).completed < JOBS
    stats = await wait_for(path, lambda s: s.completed == JOBS, 120)
    for worker in alive:
        assert worker.stop()[0] == 0
    wall = time.monotonic() - began
    assert stats == DurableStatistics(0, 0, 0, JOBS, 0, stats.retried)
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'completed'").fetchone() == (JOBS,)
    db.close()
    effects = sqlite3.connect(tmp_path / "effects.db")
    assert effects.execute("SELECT COUNT(*), MIN(n), MAX(n) FROM effects").fetchone() == (
        JOBS,
        0,
        JOBS - 1,
    )
    effects.close()
    runs = run_lines(tmp_path)
    done = {int(n) for _, _, n, _ in runs}
    assert done == set(range(JOBS))
    duplicates = len(runs) - JOBS
    assert 0 <= duplicates <= at_risk
    figures = {
        "round": round_,
        "jobs": JOBS,
        "kills": kills,
        "claimed at kills": at_risk,
        "duplicate runs": duplicates,
        "retried": stats.retried,
        "wall seconds": round(wall, 1),
    }
    report_chaos(figures)
    assert kills == KILLS
