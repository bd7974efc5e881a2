"""trio-background side of the benchmark: the TaskRegistry the workers import.

Served by ``python -m trio_background.worker redis_tasks_ours:tasks --redis URL ...``.
The tasks mirror redis_tasks_streaq.py one for one.

  BENCH_LOG   file that the latency / recovery tasks append to
"""

from __future__ import annotations

import os
import time

import trio

from trio_background import Retry
from trio_background.durable import TaskRegistry

tasks = TaskRegistry()

_log_path = os.environ.get("BENCH_LOG")
_log = open(_log_path, "a", buffering=1) if _log_path else None  # noqa: SIM115


@tasks.task(name="noop")
async def noop() -> None:
    return None


@tasks.task(name="sleep1ms")
async def sleep1ms() -> None:
    await trio.sleep(0.001)


@tasks.task(name="sleep20ms")
async def sleep20ms() -> None:
    await trio.sleep(0.02)


@tasks.task(name="stamp")
async def stamp(enqueued_at: float) -> None:
    """Latency probe: write (start - enqueue) wall-clock seconds."""
    started = time.time()
    assert _log is not None
    _log.write(f"{started - enqueued_at:.6f}\n")


# A worker lost mid-run uses up an attempt, and with no retry policy a task
# has one attempt only: the killed worker's job would go straight to the dead letters.
# streaq's default is max_tries=3, so give this task 3 attempts too, with no backoff
# (streaq re-runs a reclaimed task at once).
@tasks.task(name="long", retry=Retry(attempts=3, backoff=0.0, jitter=False))
async def long(tag: str, seconds: float) -> None:
    """Recovery probe: write a start line, then sleep."""
    assert _log is not None
    _log.write(f"start {tag} {time.time():.6f} {os.getpid()}\n")
    await trio.sleep(seconds)
