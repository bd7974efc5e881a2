"""Workers on a Redis queue: the command line, drains, fencing, many workers under kill -9,
and a Redis restart.

Real processes and a real redis-server of the tests' own (127.0.0.1, a free port, stopped
by PID); real time, and every wait has an explicit bound. Each test uses a stream of its
own, so tests never see each other's jobs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import durable_tasks
import pytest
import trio
from redis_server import RedisServer
from test_worker import ROOT, Worker, report_chaos, run_lines, run_worker
from test_worker import workers as workers  # (the fixture: every worker is killed by PID)

from trio_background.durable import DurableQueue, DurableStatistics

coredis = pytest.importorskip("coredis")

from trio_background.redis import open_redis_queue  # noqa: E402


class RedisWorker(Worker):
    def __init__(self, tmp_path: Path, url: str, stream: str, *options: str) -> None:
        super().__init__(tmp_path, Path(), "--stream", stream, *options, redis=url)


@asynccontextmanager
async def queue(url: str, stream: str, **options: Any) -> AsyncIterator[DurableQueue]:
    async with open_redis_queue(url, durable_tasks.tasks, stream=stream, **options) as q:
        yield q


async def statistics(url: str, stream: str) -> DurableStatistics:
    async with queue(url, stream) as q:
        return await q.statistics()


async def wait_for(url: str, stream: str, predicate: Any, limit: float) -> DurableStatistics:
    """Read the queue's statistics every 50 ms until ``predicate`` holds, ``limit`` s at most."""
    with trio.fail_after(limit):
        while True:
            async with queue(url, stream) as q:
                while True:
                    stats = await q.statistics()
                    if predicate(stats):
                        return stats
                    await trio.sleep(0.05)


@asynccontextmanager
async def raw(url: str) -> AsyncIterator[Any]:
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        yield client


async def claimed_by(url: str, stream: str, pid: int) -> int:
    """Jobs the worker with process id ``pid`` holds, by the store's own record."""
    async with raw(url) as client:
        members = await client.zrange(f"{stream}:leases", 0, -1)
        held = 0
        for m in members:
            worker = await client.hget(f"{stream}:job:{int(m)}", "worker")
            held += worker is not None and f":{pid}:" in worker
        return held


# -- the command line -----------------------------------------------------------------------


async def test_bad_redis_usage_exits_2_with_a_message(
    tmp_path: Path, redis_server: RedisServer, redis_stream: str
) -> None:
    async with raw(redis_server.url) as client:
        await client.set(f"{redis_stream}-string", "not a queue")
    cases = [
        (["--sqlite", "q.db", "--redis", redis_server.url], "not allowed with argument"),
        (["--sqlite", "q.db", "--stream", "s"], "--stream goes with --redis"),
        (["--redis", redis_server.url, "--group", ""], "--group must not be empty"),
        (["--redis", "redis://127.0.0.1:1/0"], "cannot serve redis://127.0.0.1:1/0"),
        (["--redis", "redis://127.0.0.1:99999/0"], "not a Redis URL"),
        (["--redis", "redis://127.0.0.1:1/0?db=x"], "not a Redis URL"),
        (["--redis", "redis://:se/cret@127.0.0.1:1/0"], "cannot serve"),
        (["--redis", "redis://127.0.0.1:1/0?password=s3cret"], "?password=***"),
        (
            ["--redis", redis_server.url, "--stream", f"{redis_stream}-string"],
            "not a trio_background queue",
        ),
    ]
    for args, message in cases:
        proc = run_worker(tmp_path, "durable_tasks:tasks", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert "s3cret" not in proc.stderr


async def test_a_password_goes_in_the_url_and_is_never_printed(
    tmp_path: Path, workers: list[Worker], redis_stream: str
) -> None:
    server = RedisServer(tmp_path / "redis", password="s3cret-pw").start()
    try:
        wrong = server.url.replace("s3cret-pw", "wrong-pw")
        proc = run_worker(tmp_path, "durable_tasks:tasks", "--redis", wrong)
        assert proc.returncode == 2
        assert "cannot serve redis://:***@127.0.0.1" in proc.stderr
        assert "wrong-pw" not in proc.stderr
        async with queue(server.url, redis_stream) as q:
            await q.enqueue(durable_tasks.nap, "pw", 0.0)
        worker = RedisWorker(tmp_path, server.url, redis_stream)
        workers.append(worker)
        await wait_for(server.url, redis_stream, lambda s: s.completed == 1, 20)
        status, out, err = worker.stop()
        assert status == 0, err
        assert "s3cret-pw" not in worker.ready_line.decode() + out + err
        assert "redis://:***@127.0.0.1" in worker.ready_line.decode()
    finally:
        server.stop()


async def test_tls_goes_through_the_url(tmp_path: Path, redis_stream: str) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    server = RedisServer(tmp_path / "redis", tls_ca=tmp_path / "ca.pem")
    port = server.port
    server.extra = [
        *("--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"),
        *("--tls-cert-file", str(tmp_path / "cert.pem")),
        *("--tls-key-file", str(tmp_path / "key.pem")),
        *("--tls-ca-cert-file", str(tmp_path / "ca.pem")),
    ]
    server.start()
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'ca.pem'}"
        async with queue(url, redis_stream) as q:
            job_id = await q.enqueue(durable_tasks.nap, "tls", 0.0)
            assert await q.status(job_id) == "pending"
    finally:
        server.stop()


# -- many workers under kill -9, and a zombie -----------------------------------------------

JOBS = 20_000
HEAD_START = 10_000
SECONDS = 0.08  # per job: four workers of 16 slots run about 800 a second
WORKERS = 4
KILLS = 10
LEASE = 2.0


# Jobs 1..N in the completed state, and the attempts they used, by the jobs' own records.
TALLY = """
local completed, attempts = 0, 0
for i = 1, tonumber(ARGV[1]) do
  local f = redis.call('HMGET', KEYS[1] .. ':job:' .. i, 'state', 'attempts')
  if f[1] == 'completed' then completed = completed + 1 end
  attempts = attempts + tonumber(f[2] or '0')
end
return {completed, attempts}
"""


async def enqueue_all(
    url: str, stream: str, jobs: int, seconds: float, ids: list[str]
) -> list[str]:
    async with queue(url, stream) as q:

        async def some(start: int) -> None:
            for n in range(start, jobs, 8):
                ids.append(await q.enqueue(durable_tasks.tick, n, seconds))

        async with trio.open_nursery() as nursery:
            for start in range(8):
                nursery.start_soon(some, start)
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
async def test_many_workers_under_kill_9_and_a_zombie_complete_every_job_once(
    tmp_path: Path,
    workers: list[Worker],
    redis_server: RedisServer,
    redis_stream: str,
    round_: int,
) -> None:
    rng = random.Random(round_)
    url = redis_server.url
    began = time.monotonic()
    options = ("--concurrency", "16", "--queue-size", "16", "--lease", str(LEASE),
               "--drain-timeout", "1")  # fmt: skip
    at_risk = kills = 0
    async with trio.open_nursery() as nursery:
        ids_box: list[list[str]] = []
        acknowledged: list[str] = []

        async def load() -> None:
            ids_box.append(await enqueue_all(url, redis_stream, JOBS, SECONDS, acknowledged))

        nursery.start_soon(load)
        # A head start, so that the workers are busy (each holding up to 32 claims) from
        # the first kill on; the rest is enqueued as they work.
        with trio.fail_after(60):
            while len(acknowledged) < HEAD_START:  # noqa: ASYNC110 (enqueues under way)
                await trio.sleep(0.05)
        alive = [RedisWorker(tmp_path, url, redis_stream, *options) for _ in range(WORKERS)]
        workers.extend(alive)
        zombie_at = rng.randrange(KILLS)
        for k in range(KILLS):
            await trio.sleep(rng.uniform(0.5, 1.0))
            victim = rng.randrange(WORKERS)
            proc = alive[victim].proc
            # Frozen first, so that what it holds cannot change before it is counted.
            proc.send_signal(signal.SIGSTOP)
            held = await claimed_by(url, redis_stream, alive[victim].pid)
            at_risk += held
            if k == zombie_at:
                # A zombie: stopped past its lease, then woken; whatever it finishes from
                # then on must be refused (its claims were taken back).
                await trio.sleep(LEASE + 1.0)
                proc.send_signal(signal.SIGCONT)
                continue
            alive[victim].kill()
            kills += 1
            alive[victim] = RedisWorker(tmp_path, url, redis_stream, *options)
            workers.append(alive[victim])
        assert (await statistics(url, redis_stream)).completed < JOBS  # the last kill, too
    (ids,) = ids_box
    assert sorted(map(int, ids)) == list(range(1, JOBS + 1))  # decimal ids, one per job
    stats = await wait_for(url, redis_stream, lambda s: s.completed == JOBS, 180)
    for worker in alive:
        assert worker.stop()[0] == 0
    wall = time.monotonic() - began
    final = await statistics(url, redis_stream)
    assert final == DurableStatistics(0, 0, 0, JOBS, 0, stats.retried)
    # The store's own record: every job completed, nothing held, nothing left pending in
    # the consumer group, and retries add up to the attempts the jobs used.
    async with raw(url) as client:
        completed, attempts = await client.eval(TALLY, [redis_stream], [JOBS])
        assert completed == JOBS
        assert attempts - JOBS == final.retried
        assert await client.zcard(f"{redis_stream}:done") == JOBS
        assert await client.zcard(f"{redis_stream}:waiting") == 0
        assert await client.zcard(f"{redis_stream}:leases") == 0
        assert await client.xlen(f"{redis_stream}:dead") == 0
        assert await client.xlen(redis_stream) == 0
        pending = await client.xpending(redis_stream, "workers")
        assert pending.pending == 0
    runs = run_lines(tmp_path)
    assert {int(n) for _, _, n, _ in runs} == set(range(JOBS))  # every job ran
    duplicates = len(runs) - JOBS
    assert 0 <= duplicates <= at_risk
    figures = {
        "store": "redis",
        "round": round_,
        "jobs": JOBS,
        "workers": WORKERS,
        "kills": kills,
        "zombies": 1,
        "claimed at kills and at the stop": at_risk,
        "duplicate runs": duplicates,
        "retried": final.retried,
        "wall seconds": round(wall, 1),
    }
    report_chaos(figures)
    assert kills == KILLS - 1


# -- a Redis restart ------------------------------------------------------------------------


async def test_a_redis_restart_with_aof_always_loses_no_acknowledged_enqueue(
    tmp_path: Path, redis_stream: str
) -> None:
    server = RedisServer(tmp_path / "aof", "--appendonly", "yes", "--appendfsync", "always").start()
    acknowledged: list[str] = []
    try:
        async with queue(server.url, redis_stream) as q:

            async def enqueue_until_it_fails() -> None:
                try:
                    while True:
                        acknowledged.append(await q.enqueue(durable_tasks.nap, "aof", 0.0))
                except Exception:
                    return  # (the server went down under it)

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(enqueue_until_it_fails)
                    while len(acknowledged) < 300:  # noqa: ASYNC110 (enqueues under way)
                        await trio.sleep(0.01)
                    server.kill()  # SIGKILL: no shutdown, no last write
        assert len(acknowledged) >= 300
        server.start()  # the same port and directory: it replays its append-only file
        async with queue(server.url, redis_stream) as q:
            for job_id in acknowledged:
                assert await q.status(job_id) == "pending", job_id
            stats = await q.statistics()
            assert stats.pending >= len(acknowledged)
            assert stats == DurableStatistics(stats.pending, 0, 0, 0, 0, 0)
    finally:
        server.stop()


async def test_a_server_that_cannot_be_reached_raises_the_clients_own_error(
    redis_stream: str,
) -> None:
    with pytest.raises(coredis.exceptions.ConnectionError):
        async with queue("redis://127.0.0.1:1/0", redis_stream):
            pass  # pragma: no cover


# -- the monitored worker example -----------------------------------------------------------


async def test_the_monitored_worker_example_exports_its_jobs_and_the_queues(
    tmp_path: Path, redis_server: RedisServer, redis_stream: str
) -> None:
    pytest.importorskip("prometheus_client")
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    from redis_server import free_port

    sys.path.insert(0, str(ROOT / "examples" / "redis_worker"))
    try:
        from tasks import resize_image, tasks
    finally:
        sys.path.pop(0)
    url = redis_server.url
    async with open_redis_queue(url, tasks, stream=redis_stream) as q:
        for n in range(5):
            await q.enqueue(resize_image, f"{n}.png", 100)
        await q.enqueue(resize_image, "notes.txt", 100)  # fails three runs: dead
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once; its output read in a thread)
        [sys.executable, str(ROOT / "examples" / "redis_worker" / "worker.py"), url,
         "--stream", redis_stream, "--metrics-port", str(port), "--every", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        with trio.fail_after(20):
            line = await trio.to_thread.run_sync(proc.stdout.readline)
        assert line.startswith(b"ready"), line

        def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }

        async with httpx.AsyncClient() as http:
            with trio.fail_after(20):
                while True:
                    got = samples((await http.get(f"http://127.0.0.1:{port}/metrics")).text)
                    queue_jobs = {
                        dict(labels)["state"]: value
                        for (name, labels), value in got.items()
                        if name == "trio_background_queue_jobs"
                    }
                    if queue_jobs.get("completed") == 5 and queue_jobs.get("dead") == 1:
                        break
                    await trio.sleep(0.05)
        assert queue_jobs == {
            "pending": 0, "scheduled": 0, "running": 0, "completed": 5, "dead": 1, "retried": 2,
        }  # fmt: skip
        finished = {
            dict(labels)["outcome"]: value
            for (name, labels), value in got.items()
            if name == "trio_background_jobs_finished_total"
        }
        assert finished["completed"] == 5
        assert finished["failed"] == 3  # each failed run, the two retried ones included
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(lambda: proc.wait(20)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


async def test_a_worker_rides_out_a_short_redis_restart(
    tmp_path: Path, workers: list[Worker], redis_stream: str
) -> None:
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    try:
        worker = RedisWorker(tmp_path, server.url, redis_stream, "--lease", "5")
        workers.append(worker)
        async with queue(server.url, redis_stream) as q:
            await q.enqueue(durable_tasks.nap, "before", 0.0)
        await wait_for(server.url, redis_stream, lambda s: s.completed == 1, 20)
        server.stop()
        await trio.sleep(0.5)  # (the server is down: the idle worker's calls fail)
        server.start()
        async with queue(server.url, redis_stream) as q:
            await q.enqueue(durable_tasks.nap, "after", 0.0)
        stats = await wait_for(server.url, redis_stream, lambda s: s.completed == 2, 20)
        assert stats == DurableStatistics(0, 0, 0, 2, 0, 0)
        assert worker.proc.poll() is None
        status, _, err = worker.stop()
        assert status == 0, err
        assert sorted(tag for _, _, tag, _ in run_lines(tmp_path)) == ["after", "before"]
    finally:
        server.stop()
