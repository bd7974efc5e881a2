#!/usr/bin/env python
"""Durable jobs over Redis: trio-background's Redis queue against streaq, on one redis-server.

From the repository root, with the ``bench`` extra installed (it brings streaq, a
benchmark-only dependency) and ``redis-server`` on the PATH (the benchmark starts its own,
on 127.0.0.1 and a free port, and stops it by PID)::

    python -m bench.redis_queues --quick    # small N, one round, a few scenarios (CI)
    python -m bench.redis_queues            # full: 3 interleaved rounds

What it measures (for each contender, rounds interleaved A,B / B,A / A,B ...; medians):

1. Throughput. N jobs (no-op, or a 1 ms trio.sleep) are enqueued first, then W worker
   processes (1 or 4) with concurrency C (16 or 128) are started. jobs/s = N / (time
   from the first worker's "ready" line to the queue reporting N completed: streaq's
   own results index ZCARD, our queue.statistics().completed). Worker CPU/job = the
   workers' utime+stime (/proc/PID/stat) from each one's ready line to completion, / N.
   Peak RSS = max VmHWM (/proc/PID/status) over the workers. Redis CPU/job likewise.
2. Enqueue->start latency: idle, ready workers; 200 jobs/s enqueued for 5 s, each
   carrying time.time() at enqueue; the job writes time.time() - that at its start.
3. Recovery: one worker runs a long job; SIGKILL it 2 s after the job started, start a
   fresh worker at once; time from the kill until the job starts again (bounded 150 s).

Both contenders run on Trio (streaq through anyio's trio backend), both workers are
single processes started by this script, both get the same concurrency and the same
number of claimed-but-unstarted jobs (streaq buffers prefetch=concurrency beyond the
running ones; ours gets --queue-size equal to --concurrency), and both acknowledge a
job only after it ran (streaq XACK/XDELs in finish_task; ours records the outcome
after the run).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent  # (the workers import the task modules from here)
PY = sys.executable
REDIS_SERVER = shutil.which("redis-server") or "redis-server"
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL = 0.005

# Every process this script starts (redis-server included), by Popen: all are ended,
# by PID, when the script leaves.
_STARTED: list[subprocess.Popen[bytes]] = []


# ---------------------------------------------------------------------------------------
# /proc readers


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (None-safe: 0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return math.nan
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def vm_hwm_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


# ---------------------------------------------------------------------------------------
# a tiny synchronous RESP client (FLUSHALL, ZCARD, ...): the harness's own probes


def resp_command(port: int, *args: str | int) -> Any:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = str(a).encode()
            out.append(f"${len(b)}\r\n".encode() + b + b"\r\n")
        s.sendall(b"".join(out))
        f = s.makefile("rb")
        return _read_resp(f)


def _read_resp(f: Any) -> Any:
    line = f.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data.decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_resp(f) for _ in range(n)]
    raise RuntimeError(f"bad RESP reply {line!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.workdir / "redis.log"),
        ]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        _STARTED.append(self.proc)
        deadline = time.monotonic() + 10
        while True:
            try:
                if resp_command(self.port, "PING") == "PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not come up")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def flush(self) -> None:
        resp_command(self.port, "FLUSHALL", "SYNC")

    def version(self) -> str:
        info = resp_command(self.port, "INFO", "server")
        for line in info.splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1].strip()
        return "?"


def end_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL; by PID only."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


def end_all() -> None:
    for proc in reversed(_STARTED):
        if proc.poll() is None:
            end_process(proc, grace=5.0)


# ---------------------------------------------------------------------------------------
# worker processes


class WorkerProc:
    def __init__(self, argv: list[str], env: dict[str, str], logdir: Path, label: str) -> None:
        self.stdout_path = logdir / f"{label}.out"
        self.stderr_path = logdir / f"{label}.err"
        self._out = open(self.stdout_path, "wb")  # noqa: SIM115
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, env=env, cwd=HERE, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err
        )
        _STARTED.append(self.proc)
        self.pid = self.proc.pid
        self.ready_at: float | None = None
        self.cpu_at_ready = math.nan

    def check_ready(self) -> bool:
        if self.ready_at is not None:
            return True
        try:
            text = self.stdout_path.read_text(errors="replace")
        except OSError:
            return False
        if any(line.startswith("ready") for line in text.splitlines()):
            self.ready_at = time.monotonic()
            self.cpu_at_ready = cpu_seconds(self.pid)
            return True
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"worker exited {self.proc.returncode} before ready: "
                + self.stderr_path.read_text(errors="replace")[-2000:]
            )
        return False

    def stop(self, *, kill: bool = False) -> int | None:
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)
            rc = self.proc.returncode
        else:
            rc = end_process(self.proc)
        self._out.close()
        self._err.close()
        return rc


async def wait_ready(workers: list[WorkerProc], limit: float = 60.0) -> None:
    with trio.fail_after(limit):
        while not all(w.check_ready() for w in workers):  # noqa: ASYNC110 (other processes' state)
            await trio.sleep(POLL)


# ---------------------------------------------------------------------------------------
# contenders


class Streaq:
    """streaq 7.2.0: Worker(concurrency=C, anyio_backend="trio"), tasks silent=True."""

    name = "streaq"

    def __init__(self, server: RedisServer, *, silent: bool = True, backend: str = "trio") -> None:
        self.server = server
        self.silent = silent
        self.backend = backend
        if not silent:
            self.name = "streaq (per-task INFO logs)"
        if backend != "trio":
            self.name = f"streaq (on {backend})"
        os.environ["BENCH_REDIS"] = server.url
        sys.path.insert(0, str(HERE))
        import redis_tasks_streaq as tasks_streaq

        self.mod = tasks_streaq
        self.results_key = tasks_streaq.worker._results_set

    def worker_argv(self, concurrency: int, *, lease: float | None, log: Path | None):
        env = dict(os.environ)
        env.update(
            BENCH_REDIS=self.server.url,
            BENCH_CONCURRENCY=str(concurrency),
            BENCH_SILENT="1" if self.silent else "0",
            PYTHONPATH=str(HERE),
            BENCH_BACKEND=self.backend,
        )
        env.pop("BENCH_IDLE_TIMEOUT", None)
        env.pop("BENCH_LOG", None)
        if lease is not None:
            env["BENCH_IDLE_TIMEOUT"] = str(lease)
        if log is not None:
            env["BENCH_LOG"] = str(log)
        return [PY, str(HERE / "redis_tasks_streaq.py")], env

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Streaq]:
        # One streaq Worker (the module's) is the enqueueing client; it is entered once
        # for the whole benchmark and reused by every run (a Worker can't be re-entered).
        if getattr(self.mod, "_bench_entered", False):
            yield self
            return
        async with self.mod.worker:
            self.mod._bench_entered = True
            try:
                yield self
            finally:
                self.mod._bench_entered = False

    async def enqueue_bulk(self, kind: str, n: int) -> None:
        fn = getattr(self.mod, kind)
        for start in range(0, n, 1000):
            await self.mod.worker.enqueue_many([fn.enqueue() for _ in range(min(1000, n - start))])

    async def enqueue_stamp(self) -> None:
        await self.mod.stamp.enqueue(time.time())

    async def enqueue_long(self, tag: str, seconds: float) -> None:
        await self.mod.long.enqueue(tag, seconds)

    async def completed(self) -> int:
        return int(resp_command(self.server.port, "ZCARD", self.results_key))

    async def check_run(self, workers: list[WorkerProc], n: int) -> str:
        """Sum of the workers' own shutdown counters, as a sanity check."""
        done = failed = 0
        for w in workers:
            for line in w.stderr_path.read_text(errors="replace").splitlines():
                if "shutdown worker" in line:
                    body = line[line.find("{") + 1 : line.rfind("}")]
                    for part in body.split(","):
                        if ":" in part:
                            k, v = part.split(":")
                            if k.strip() == "completed":
                                done += int(v)
                            elif k.strip() == "failed":
                                failed += int(v)
        return (
            "" if done == n and not failed else f"workers report {done} completed, {failed} failed"
        )


class Ours:
    """trio-background's Redis queue (or its SQLite queue, with --ours-sqlite)."""

    name = "ours"

    def __init__(self, server: RedisServer, *, sqlite: Path | None = None) -> None:
        self.server = server
        self.sqlite = sqlite
        if sqlite is not None:
            self.name = "ours (sqlite!)"
        sys.path.insert(0, str(HERE))
        import redis_tasks_ours as tasks_ours

        self.mod = tasks_ours
        self.queue: Any = None

    def worker_argv(self, concurrency: int, *, lease: float | None, log: Path | None):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(HERE)
        env.pop("BENCH_LOG", None)
        if log is not None:
            env["BENCH_LOG"] = str(log)
        where = ["--sqlite", str(self.sqlite)] if self.sqlite else ["--redis", self.server.url]
        argv = [
            PY,
            "-m",
            "trio_background.worker",
            "redis_tasks_ours:tasks",
            *where,
            "--concurrency",
            str(concurrency),
            "--queue-size",
            str(concurrency),
        ]
        if lease is not None:
            argv += ["--lease", str(lease)]
        return argv, env

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Ours]:
        if self.sqlite is not None:
            from trio_background.durable import open_sqlite_queue

            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(self.sqlite) + suffix)
            opened = open_sqlite_queue(self.sqlite, self.mod.tasks)
        else:
            from trio_background.redis import open_redis_queue

            opened = open_redis_queue(self.server.url, self.mod.tasks)
        async with opened as queue:
            self.queue = queue
            try:
                yield self
            finally:
                self.queue = None

    async def enqueue_bulk(self, kind: str, n: int) -> None:
        fn = getattr(self.mod, kind)
        left = n

        async def enqueuer() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await self.queue.enqueue(fn)

        async with trio.open_nursery() as nursery:
            for _ in range(32):
                nursery.start_soon(enqueuer)

    async def enqueue_stamp(self) -> None:
        await self.queue.enqueue(self.mod.stamp, time.time())

    async def enqueue_long(self, tag: str, seconds: float) -> None:
        await self.queue.enqueue(self.mod.long, tag, seconds)

    async def completed(self) -> int:
        return int((await self.queue.statistics()).completed)

    async def check_run(self, workers: list[WorkerProc], n: int) -> str:
        stats = await self.queue.statistics()
        problems = []
        if stats.completed != n or stats.dead or stats.retried:
            problems.append(f"stats {stats}")
        return "; ".join(problems)


# ---------------------------------------------------------------------------------------
# scenarios


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


class Bench:
    def __init__(self, server: RedisServer, rundir: Path) -> None:
        self.server = server
        self.rundir = rundir
        self.counter = 0

    def fresh_run(self, label: str, log_name: str) -> tuple[Path, Path]:
        """An empty Redis, a log directory for the run, and an empty log the jobs write."""
        logdir = self.logdir(label)
        log = logdir / log_name
        log.touch()
        self.server.flush()
        return logdir, log

    def logdir(self, label: str) -> Path:
        self.counter += 1
        d = self.rundir / f"{self.counter:03d}-{label}"
        d.mkdir(parents=True)
        return d

    def start_workers(
        self,
        side: Any,
        n: int,
        concurrency: int,
        logdir: Path,
        *,
        lease: float | None = None,
        log: Path | None = None,
        prefix: str = "w",
    ) -> list[WorkerProc]:
        argv, env = side.worker_argv(concurrency, lease=lease, log=log)
        return [WorkerProc(argv, env, logdir, f"{prefix}{i}") for i in range(n)]

    async def throughput(
        self, side: Any, kind: str, concurrency: int, nworkers: int, n: int, limit: float = 150.0
    ) -> dict[str, Any]:
        label = f"{side.name.split()[0]}-{kind}-c{concurrency}-w{nworkers}"
        logdir = self.logdir(label)
        self.server.flush()
        async with side.client():
            t = time.monotonic()
            await side.enqueue_bulk(kind, n)
            enqueue_s = time.monotonic() - t
            workers = self.start_workers(side, nworkers, concurrency, logdir)
            result: dict[str, Any] = {"n": n, "enqueue_s": enqueue_s}
            try:
                await wait_ready(workers)
                t0 = min(w.ready_at for w in workers)  # type: ignore[type-var]
                t_all = max(w.ready_at for w in workers)  # type: ignore[type-var]
                redis_cpu0 = cpu_seconds(self.server.pid)
                done_at_all_ready = None
                with trio.move_on_after(limit) as scope:
                    while True:
                        done = await side.completed()
                        if done_at_all_ready is None and time.monotonic() >= t_all:
                            done_at_all_ready = done
                        if done >= n:
                            break
                        await trio.sleep(POLL)
                t_end = time.monotonic()
                cpu = sum(cpu_seconds(w.pid) - w.cpu_at_ready for w in workers)
                redis_cpu = cpu_seconds(self.server.pid) - redis_cpu0
                rss = max(vm_hwm_mb(w.pid) for w in workers)
                if scope.cancelled_caught:
                    result.update(error=f"timed out after {limit}s with {done}/{n} done")
                    return result
                elapsed = t_end - t0
                result.update(
                    elapsed=elapsed,
                    jobs_per_s=n / elapsed,
                    cpu_ms_per_job=cpu / n * 1000,
                    redis_cpu_ms_per_job=redis_cpu / n * 1000,
                    rss_mb=rss,
                    ready_spread_s=t_all - t0,
                    done_when_all_ready=done_at_all_ready,
                )
            finally:
                rcs = [w.stop() for w in workers]
                result["exit_codes"] = rcs
            problem = await side.check_run(workers, n)
            if problem:
                result["warning"] = problem
            return result

    async def latency(
        self, side: Any, nworkers: int, concurrency: int, rate: float, seconds: float
    ) -> dict[str, Any]:
        logdir, log = self.fresh_run(f"{side.name.split()[0]}-latency-w{nworkers}", "latency.txt")
        count = int(rate * seconds)
        async with side.client():
            workers = self.start_workers(side, nworkers, concurrency, logdir, log=log)
            try:
                await wait_ready(workers)
                await trio.sleep(1.0)  # idle, blocked in their reads
                t0 = trio.current_time()
                for i in range(count):
                    await trio.sleep_until(t0 + i / rate)
                    await side.enqueue_stamp()
                late = trio.current_time() - (t0 + (count - 1) / rate)
                with trio.move_on_after(30) as scope:
                    while await side.completed() < count:  # noqa: ASYNC110 (other processes' state)
                        await trio.sleep(0.02)
                if scope.cancelled_caught:
                    return {"error": f"only {await side.completed()}/{count} done after 30 s"}
                await trio.sleep(0.2)
            finally:
                for w in workers:
                    w.stop()
        lat = [float(x) * 1000 for x in log.read_text().split()]
        return {
            "count": len(lat),
            "p50_ms": pct(lat, 0.50),
            "p99_ms": pct(lat, 0.99),
            "max_ms": max(lat) if lat else math.nan,
            "producer_late_s": late,
        }

    async def recovery(
        self, side: Any, lease: float | None, bound: float = 150.0
    ) -> dict[str, Any]:
        logdir, log = self.fresh_run(f"{side.name.split()[0]}-recovery-{lease}", "starts.txt")
        tag = f"job{random.randrange(10**9)}"

        def starts() -> list[tuple[float, int]]:
            out = []
            for line in log.read_text().splitlines():
                parts = line.split()
                if len(parts) == 4 and parts[0] == "start" and parts[1] == tag:
                    out.append((float(parts[2]), int(parts[3])))
            return out

        async with side.client():
            first = self.start_workers(side, 1, 16, logdir, lease=lease, log=log, prefix="killed")
            fresh: list[WorkerProc] = []
            try:
                await wait_ready(first)
                await side.enqueue_long(tag, 600.0)
                with trio.fail_after(30):
                    while not starts():  # noqa: ASYNC110 (other processes' state)
                        await trio.sleep(0.01)
                await trio.sleep(2.0)
                first[0].stop(kill=True)
                t_kill = time.time()
                fresh = self.start_workers(
                    side, 1, 16, logdir, lease=lease, log=log, prefix="fresh"
                )
                fresh_ready = None
                with trio.move_on_after(bound) as scope:
                    while True:
                        if fresh_ready is None and fresh[0].check_ready():
                            fresh_ready = time.time() - t_kill
                        again = [s for s in starts() if s[1] != first[0].pid]
                        if again:
                            break
                        await trio.sleep(0.01)
                if scope.cancelled_caught:
                    return {"recovery_s": math.inf, "fresh_ready_s": fresh_ready}
                return {"recovery_s": again[0][0] - t_kill, "fresh_ready_s": fresh_ready}
            finally:
                for w in first + fresh:
                    if w.proc.poll() is None:
                        w.stop(kill=True)
                    else:
                        w._out.close()
                        w._err.close()


# ---------------------------------------------------------------------------------------
# reporting


def med(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def fmt(v: float, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if math.isinf(v):
        return ">150 s"
    return f"{v:,.{digits}f}"


def ratio(a: float, b: float) -> str:
    if any(x is None or math.isnan(x) or math.isinf(x) for x in (a, b)) or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def report(results: dict[str, Any], names: list[str]) -> str:
    out = []
    ours = next((n for n in names if n.startswith("ours")), None)
    base = "streaq"
    out.append("### Throughput (pre-enqueued N, medians over rounds)\n")
    out.append(
        "| scenario | N streaq/ours | streaq jobs/s | ours jobs/s | ours/streaq "
        "| streaq worker CPU ms/job "
        "| ours worker CPU ms/job | ours/streaq | streaq Redis CPU ms/job | ours Redis CPU ms/job "
        "| streaq peak RSS MB | ours peak RSS MB |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    extra_rows = []
    for scen, by_side in results["throughput"].items():

        def m(side: str | None, key: str, by_side: dict[str, Any] = by_side) -> float:
            if side is None or side not in by_side:
                return math.nan
            return med([r.get(key, math.nan) for r in by_side[side]])

        n = "/".join(str(by_side[x][0].get("n")) if x in by_side else "-" for x in (base, ours))
        row = [
            scen,
            n,
            fmt(m(base, "jobs_per_s")),
            fmt(m(ours, "jobs_per_s")),
            ratio(m(ours, "jobs_per_s"), m(base, "jobs_per_s")),
            fmt(m(base, "cpu_ms_per_job"), 3),
            fmt(m(ours, "cpu_ms_per_job"), 3),
            ratio(m(ours, "cpu_ms_per_job"), m(base, "cpu_ms_per_job")),
            fmt(m(base, "redis_cpu_ms_per_job"), 3),
            fmt(m(ours, "redis_cpu_ms_per_job"), 3),
            fmt(m(base, "rss_mb"), 1),
            fmt(m(ours, "rss_mb"), 1),
        ]
        out.append("| " + " | ".join(row) + " |")
        for side in by_side:
            if side not in (base, ours):
                extra_rows.append(
                    f"| {scen} | {side} | {fmt(m(side, 'jobs_per_s'))} | "
                    f"{fmt(m(side, 'cpu_ms_per_job'), 3)} | {fmt(m(side, 'rss_mb'), 1)} |"
                )
    if extra_rows:
        out.append("\nExtra (not in the ratio):\n")
        out.append("| scenario | contender | jobs/s | worker CPU ms/job | peak RSS MB |")
        out.append("|---|---|---:|---:|---:|")
        out.extend(extra_rows)

    out.append(
        "\n### Enqueue → start latency (idle workers, concurrency 16, medians over rounds)\n"
    )
    out.append(
        "| scenario | streaq p50 ms | ours p50 ms | ours/streaq | streaq p99 ms | ours p99 ms "
        "| ours/streaq |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for scen, by_side in results["latency"].items():

        def m(side: str | None, key: str, by_side: dict[str, Any] = by_side) -> float:
            if side is None or side not in by_side:
                return math.nan
            return med([r.get(key, math.nan) for r in by_side[side]])

        out.append(
            f"| {scen} | {fmt(m(base, 'p50_ms'), 2)} | {fmt(m(ours, 'p50_ms'), 2)} | "
            f"{ratio(m(ours, 'p50_ms'), m(base, 'p50_ms'))} | {fmt(m(base, 'p99_ms'), 2)} | "
            f"{fmt(m(ours, 'p99_ms'), 2)} | {ratio(m(ours, 'p99_ms'), m(base, 'p99_ms'))} |"
        )

    out.append(
        "\n### Recovery after SIGKILL mid-job (kill → the job starts again on a fresh worker)\n"
    )
    out.append(
        "| contender | setting | median s | rounds (s) | fresh worker ready after kill (s) |"
    )
    out.append("|---|---|---:|---|---|")
    for scen, by_side in results["recovery"].items():
        side, setting = scen.split(" | ")
        runs = by_side[side]
        vals = [r.get("recovery_s", math.nan) for r in runs]
        infs = [v for v in vals if v is not None and math.isinf(v)]
        mv = math.inf if len(infs) * 2 > len(vals) else med([v for v in vals if not math.isinf(v)])
        out.append(
            f"| {side} | {setting} | {fmt(mv, 1)} | "
            f"{', '.join(fmt(v, 1) for v in vals)} | "
            f"{', '.join(fmt(r.get('fresh_ready_s') or math.nan, 2) for r in runs)} |"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Versions of what is measured, and hashes of the trio-background files installed."""
    import hashlib
    from importlib import metadata

    out = {}
    for dist in ("streaq", "coredis", "trio", "anyio", "trio-background"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        import trio_background

        root = Path(trio_background.__file__).parent
        for name in ("redis.py", "_redis_store.py", "durable.py"):
            path = root / name
            if path.exists():
                out[f"sha1 {name}"] = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    except ImportError:
        pass
    return out


def ours_available() -> str | None:
    try:
        import trio_background.redis  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def amain(args: argparse.Namespace) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="bench-redis-"))
    rundir = base / (stamp + ("-quick" if args.quick else ""))
    rundir.mkdir(parents=True)
    server = RedisServer(rundir)
    server.start()
    print(
        f"redis-server {server.version()} pid {server.pid} on {server.url}; logs in {rundir}",
        flush=True,
    )
    bench = Bench(server, rundir)

    sides: list[Any] = []
    if args.only in (None, "streaq"):
        sides.append(Streaq(server))
    if args.only in (None, "ours"):
        if args.ours_sqlite:
            sides.append(Ours(server, sqlite=rundir / "ours.sqlite"))
        elif (why := ours_available()) is None:
            sides.append(Ours(server))
        else:
            print(f"ours skipped: import trio_background.redis failed ({why})", flush=True)
    names = [s.name for s in sides]
    print(f"versions: {json.dumps(versions())}", flush=True)
    streaq_side = next((s for s in sides if s.name == "streaq"), None)

    rounds = 1 if args.quick else args.rounds
    scale = 0.2 if args.quick else 1.0
    # N per scenario and contender, chosen so that a run lasts ~2-20 s on this 2-core
    # machine: the contenders differ ~10x in speed, so one N cannot keep both in that
    # window (N is reported with every figure).
    sizes = {
        "streaq": {1: 3000, 4: 6000},
        "ours": {1: 20000, 4: 30000},
    }
    if args.n_scale:
        scale *= args.n_scale
    results: dict[str, Any] = {
        "throughput": {},
        "latency": {},
        "recovery": {},
        "meta": {
            "redis": server.version(),
            "sides": names,
            "rounds": rounds,
            "quick": args.quick,
            "versions": versions(),
        },
    }

    def record(section: str, scen: str, side: str, res: dict[str, Any]) -> None:
        results[section].setdefault(scen, {}).setdefault(side, []).append(res)
        print(f"  [{section}] {scen} {side}: {json.dumps(res, default=str)}", flush=True)
        (rundir / "results.json").write_text(json.dumps(results, indent=1, default=str))

    def ordered(r: int) -> list[Any]:
        return sides if r % 2 == 0 else list(reversed(sides))

    try:
        if streaq_side is not None:
            async with streaq_side.client():  # the enqueueing client, open throughout
                await run_all(args, bench, ordered, rounds, scale, sizes, record, sides)
        else:
            await run_all(args, bench, ordered, rounds, scale, sizes, record, sides)
    finally:
        end_all()
    table = report(results, names)
    print("\n" + table)
    (rundir / "results.md").write_text(table + "\n")
    print(f"\nraw results: {rundir / 'results.json'}")
    return 0


async def run_all(args, bench, ordered, rounds, scale, sizes, record, sides) -> None:
    parts = args.parts.split(",")
    for r in range(rounds):
        print(f"== round {r + 1}/{rounds}", flush=True)
        if "throughput" in parts:
            combos = list(itertools.product(("noop", "sleep1ms"), (16, 128), (1, 4)))
            # Jobs long enough (20 ms) that one worker of 16 slots is bound by its slots,
            # not its CPU: how throughput grows with workers when the CPU is not the limit.
            combos += [("sleep20ms", 16, 1), ("sleep20ms", 16, 4)]
            if args.quick:
                combos = [("noop", 16, 1), ("sleep1ms", 16, 4)]
            for kind, conc, nw in combos:
                scen = f"{kind} c{conc} w{nw}"

                def size(side: Any, nw: int = nw, kind: str = kind) -> int:
                    factor = 0.2 if kind == "sleep20ms" else 1.0
                    return max(200, int(sizes[side.name.split()[0]][nw] * scale * factor))

                for side in ordered(r):
                    record(
                        "throughput",
                        scen,
                        side.name,
                        await bench.throughput(side, kind, conc, nw, size(side)),
                    )
                if args.streaq_extras and not args.quick and any(s.name == "streaq" for s in sides):
                    # reference rows, not in the ratios: streaq with its default
                    # per-task logging, and streaq on its default loop (asyncio)
                    extras = [Streaq(bench.server, backend="asyncio")]
                    if (kind, conc, nw) == ("noop", 16, 1):
                        extras.insert(0, Streaq(bench.server, silent=False))
                    for extra in extras:
                        record(
                            "throughput",
                            scen,
                            extra.name,
                            await bench.throughput(extra, kind, conc, nw, size(extra)),
                        )
        if "latency" in parts:
            secs = 2.0 if args.quick else 5.0
            for nw in (1, 4):
                scen = f"200 jobs/s for {secs:g} s, {nw} worker{'s' if nw > 1 else ''}"
                for side in ordered(r):
                    record(
                        "latency", scen, side.name, await bench.latency(side, nw, 16, 200.0, secs)
                    )
        if "recovery" in parts:
            for side in ordered(r):
                if side.name.startswith("streaq"):
                    settings: list[tuple[str, float | None]] = [("idle_timeout=5 s", 5.0)]
                    if not args.quick:
                        settings.insert(0, ("default (idle_timeout=60 s)", None))
                else:
                    settings = [("--lease 5", 5.0)]
                    if not args.quick:
                        settings.append(("default (--lease 30)", None))
                for setting, lease in settings:
                    record(
                        "recovery",
                        f"{side.name} | {setting}",
                        side.name,
                        await bench.recovery(side, lease),
                    )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small N, one round, short latency run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", choices=["streaq", "ours"])
    p.add_argument("--parts", default="throughput,latency,recovery")
    p.add_argument("--n-scale", type=float, default=None, help="multiply every N by this")
    p.add_argument(
        "--no-streaq-extras",
        dest="streaq_extras",
        action="store_false",
        help="skip the reference streaq runs (per-task INFO logging; asyncio loop)",
    )
    p.add_argument(
        "--ours-sqlite",
        action="store_true",
        help="run 'ours' on the SQLite queue instead (not a Redis result)",
    )
    p.add_argument("--output", help="directory for the logs and results (default: a temporary one)")
    args = p.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (apt-get install redis-server): nothing to measure")
        return 0
    try:
        return trio.run(amain, args)
    finally:
        end_all()


if __name__ == "__main__":
    sys.exit(main())
