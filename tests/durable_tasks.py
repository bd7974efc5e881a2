"""Tasks for the worker-process tests (``python -m trio_background.worker durable_tasks:tasks``).

Each run appends a line to the file named by ``$TB_RUN_LOG`` (one ``write`` with
``O_APPEND``, so lines of concurrent processes never mix), and `effect` also inserts its
job number into the SQLite file ``$TB_EFFECTS`` (``INSERT OR IGNORE``: idempotent).
"""

from __future__ import annotations

import os
import sqlite3

import trio

from trio_background import Retry, current_job
from trio_background.durable import TaskRegistry

tasks = TaskRegistry()


def _log(what: str) -> None:
    line = f"{os.getpid()} {what} {current_job().attempt}\n".encode()
    fd = os.open(os.environ["TB_RUN_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _insert(n: int) -> None:
    db = sqlite3.connect(os.environ["TB_EFFECTS"], timeout=60, isolation_level=None)
    try:
        db.execute("INSERT OR IGNORE INTO effects VALUES (?)", (n,))
    finally:
        db.close()


@tasks.task(name="effect", retry=Retry(attempts=20, backoff=0.01, jitter=False))
async def effect(n: int, seconds: float) -> None:
    """Sleep, then record job ``n``'s effect idempotently, and log the run."""
    await trio.sleep(seconds)
    await trio.to_thread.run_sync(_insert, n)
    _log(f"effect {n}")


@tasks.task(name="nap", retry=Retry(attempts=3, backoff=0.01, jitter=False))
async def nap(tag: str, seconds: float) -> None:
    """Sleep ``seconds``, then log the run under ``tag``."""
    await trio.sleep(seconds)
    _log(f"nap {tag}")


@tasks.task(name="tick", retry=Retry(attempts=20, backoff=0.01, jitter=False))
async def tick(n: int, seconds: float) -> None:
    """Sleep, then log job ``n``'s run (the log is the effect: one line per run)."""
    await trio.sleep(seconds)
    _log(f"tick {n}")
