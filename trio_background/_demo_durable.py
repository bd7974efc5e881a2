"""The durable demo, ``python -m trio_background --durable``: kill -9 a worker, lose nothing.

It enqueues receipts on a durable queue in a temporary SQLite file, starts a worker
process (``python -m trio_background.worker``), kills it with SIGKILL while it holds
claimed jobs, starts another one, and checks at the end that every receipt was sent:
each once in the store's own record and in the receipts table (an idempotent insert),
with no more extra runs than the killed worker held jobs.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import trio

from ._config import Retry
from .durable import DurableQueue, DurableStatistics, TaskRegistry, open_sqlite_queue

tasks = TaskRegistry()

_DIR = "TRIO_BACKGROUND_DEMO_DIR"  # where a worker of the demo finds its files
LEASE = 1.0


# A job whose worker dies uses up an attempt: without retries it would go dead.
@tasks.task(name="send_receipt", retry=Retry(attempts=3, backoff=0.1))
async def send_receipt(order: int) -> None:
    """Mail the receipt of ``order`` (simulated), once per order, whatever runs twice."""
    await trio.sleep(0.02 + (order * 7919 % 60) / 1000)  # 20 to 80 ms
    await trio.to_thread.run_sync(_record, order)


def _record(order: int) -> None:
    root = Path(os.environ[_DIR])
    db = sqlite3.connect(root / "receipts.db", timeout=60, isolation_level=None)
    try:  # the idempotent side effect: one row per order, however many runs
        db.execute("INSERT OR IGNORE INTO receipts VALUES (?)", (order,))
    finally:
        db.close()
    fd = os.open(root / "runs.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:  # every run, for the check (one write: lines of two processes never mix)
        os.write(fd, f"{order}\n".encode())
    finally:
        os.close(fd)


class _Worker:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = b""

    async def line(self) -> str:
        stdout = self.process.stdout
        assert stdout is not None
        while b"\n" not in self.output:
            chunk = await stdout.receive_some()
            if not chunk:
                break
            self.output += chunk
        line, _, self.output = self.output.partition(b"\n")
        return line.decode()

    async def rest(self) -> list[str]:
        lines: list[str] = []
        while True:
            line = await self.line()
            if not line and not self.output:
                return lines
            lines.append(line)


async def _start(path: Path, root: Path) -> _Worker:
    env = {**os.environ, _DIR: str(root)}
    command = [
        sys.executable,
        "-m",
        "trio_background.worker",
        f"{__name__}:tasks",
        "--sqlite",
        str(path),
        "--concurrency",
        "8",
        "--queue-size",
        "8",
        "--lease",
        str(LEASE),
    ]
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    worker = _Worker(process)
    with trio.fail_after(30):
        line = await worker.line()
    if not line.startswith("ready"):
        process.kill()
        raise RuntimeError(f"the worker did not start: {line!r}")
    return worker


def _claimed_by(path: Path, pid: int) -> int:
    db = sqlite3.connect(path, timeout=60)
    try:
        (n,) = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE state = 'running' AND worker LIKE ?",
            (f"%:{pid}:%",),
        ).fetchone()
    finally:
        db.close()
    return int(n)


def durable_demo(jobs: int, out: TextIO, width: int) -> int:
    """Run the demo with ``jobs`` receipts, printing to ``out``; returns the exit status."""

    def say(line: str) -> None:
        indent = " " * (len(line) - len(line.lstrip()) + 2)
        print(textwrap.fill(line, width - 1, subsequent_indent=indent), file=out, flush=True)

    return trio.run(run_durable_demo, jobs, say)


async def run_durable_demo(jobs: int, say: Callable[[str], None]) -> int:
    """Run the demo with ``jobs`` receipts; ``say`` prints a line. Returns the exit status."""
    with tempfile.TemporaryDirectory(prefix="trio-background-demo-") as tmp:
        root = Path(tmp)
        path = root / "queue.db"
        db = sqlite3.connect(root / "receipts.db")
        db.execute("CREATE TABLE receipts (n INTEGER PRIMARY KEY)")
        db.close()
        workers: list[_Worker] = []
        try:
            async with open_sqlite_queue(path, tasks, lease=LEASE) as queue:
                began = time.perf_counter()
                for order in range(jobs):
                    await queue.enqueue(send_receipt, order)
                took = time.perf_counter() - began
                say(f"Enqueued {jobs} receipts in {took:.2f} s: each one committed to {path.name}")
                workers.append(await _start(path, root))
                say(f"worker 1 (pid {workers[0].process.pid}) is serving the queue")
                stats = await _follow(queue, say, lambda s: s.completed >= jobs // 3)
                victim = workers[0].process
                victim.send_signal(signal.SIGSTOP)  # what it holds cannot change now
                held = await trio.to_thread.run_sync(_claimed_by, path, victim.pid)
                victim.kill()
                await victim.wait()
                say(
                    f"kill -9 worker 1 with {stats.completed} receipts sent and {held} jobs "
                    f"claimed: they run again once their {LEASE:g} s leases expire"
                )
                workers.append(await _start(path, root))
                say(f"worker 2 (pid {workers[1].process.pid}) is serving the queue")
                stats = await _follow(queue, say, lambda s: s.completed >= jobs)
                workers[1].process.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    summary = await workers[1].rest()
                    status = await workers[1].process.wait()
                say(f"worker 2 stopped on SIGTERM (exit status {status}): {summary[-1]}")
                stats = await queue.statistics()
        finally:
            for worker in workers:
                if worker.process.returncode is None:
                    worker.process.kill()
                    with trio.CancelScope(shield=True):
                        await worker.process.wait()
        return _report(root, jobs, stats, held, say)


async def _follow(
    queue: DurableQueue, say: Callable[[str], None], done: Callable[[DurableStatistics], bool]
) -> DurableStatistics:
    shown = -1.0
    with trio.fail_after(120):
        while True:
            stats = await queue.statistics()
            now = time.monotonic()
            if done(stats):
                return stats
            if stats.pending + stats.scheduled + stats.running == 0:
                return stats  # (nothing left to run: the report says what went wrong)
            if now - shown >= 0.5:
                shown = now
                say(
                    f"  pending {stats.pending:>4}  running {stats.running:>3}  "
                    f"completed {stats.completed:>4}  retried {stats.retried:>3}  "
                    f"dead {stats.dead}"
                )
            await trio.sleep(0.05)


def _report(
    root: Path, jobs: int, stats: DurableStatistics, held: int, say: Callable[[str], None]
) -> int:
    db = sqlite3.connect(root / "receipts.db")
    (receipts,) = db.execute("SELECT COUNT(DISTINCT n) FROM receipts").fetchone()
    db.close()
    runs = (root / "runs.log").read_text().split()
    extra = len(runs) - len(set(runs))
    say(
        f"Store: {stats.completed} completed, {stats.dead} dead, {stats.pending} pending, "
        f"{stats.running} running, {stats.retried} retried"
    )
    say(
        f"Receipts: {receipts} of {jobs} sent, each once; {len(runs)} runs finished, {extra} "
        f"of them twice (at most the {held} jobs the killed worker held may run twice)"
    )
    problems = []
    if stats.completed != jobs or stats.dead or stats.pending or stats.running:
        problems.append(f"the store does not show all {jobs} jobs completed")
    if receipts != jobs or len(set(runs)) != jobs:
        problems.append(f"{receipts} receipts and {len(set(runs))} orders run, not {jobs}")
    if extra > held:
        problems.append(f"{extra} runs again, more than the {held} jobs held at the kill")
    if problems:
        say("Self-check FAILED: " + "; ".join(problems))
        return 1
    say("Self-check passed: every receipt was sent once, and no job was lost.")
    return 0
