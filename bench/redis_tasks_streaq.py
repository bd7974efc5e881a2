"""streaq side of the benchmark: the Worker and its tasks.

Configured from the environment so that one module serves every scenario:

  BENCH_REDIS        redis URL
  BENCH_CONCURRENCY  Worker(concurrency=...)        (default 16, streaq's default)
  BENCH_IDLE_TIMEOUT Worker(idle_timeout=...) in s  (unset: streaq's default, 60 s)
  BENCH_LOG          file that the latency / recovery tasks append to
  BENCH_BACKEND      anyio backend, "trio" (default, the benchmark's) or "asyncio"
                     (an extra reference row only)
  BENCH_SILENT       "1" (default): tasks registered with silent=True, i.e. no
                     per-task INFO log lines; "0": streaq's default per-task logging

Run as ``python redis_tasks_streaq.py`` to serve: it starts ``worker.run_async`` on Trio
(anyio backend "trio", which streaq documents as supported) inside a task group and
prints ``ready`` once ``run_async`` has reported started (consumer group created,
consumers and the stream reader running), like ``streaq run redis_tasks_streaq:worker``
would, minus the readiness line the CLI lacks.
"""

from __future__ import annotations

import os
import time

from streaq import Worker

BACKEND = os.environ.get("BENCH_BACKEND", "trio")
if BACKEND == "trio":
    from trio import sleep as _sleep
else:
    from asyncio import sleep as _sleep

_kwargs: dict = {}
if os.environ.get("BENCH_IDLE_TIMEOUT"):
    _kwargs["idle_timeout"] = float(os.environ["BENCH_IDLE_TIMEOUT"])

worker = Worker(
    redis_url=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379"),
    concurrency=int(os.environ.get("BENCH_CONCURRENCY", "16")),
    anyio_backend=BACKEND,  # type: ignore[arg-type]
    **_kwargs,
)

SILENT = os.environ.get("BENCH_SILENT", "1") == "1"
_log_path = os.environ.get("BENCH_LOG")
_log = open(_log_path, "a", buffering=1) if _log_path else None  # noqa: SIM115


@worker.task(name="noop", silent=SILENT)
async def noop() -> None:
    return None


@worker.task(name="sleep1ms", silent=SILENT)
async def sleep1ms() -> None:
    await _sleep(0.001)  # trio.sleep on Trio, asyncio.sleep on asyncio


@worker.task(name="sleep20ms", silent=SILENT)
async def sleep20ms() -> None:
    await _sleep(0.02)


@worker.task(name="stamp", silent=SILENT)
async def stamp(enqueued_at: float) -> None:
    """Latency probe: write (start - enqueue) wall-clock seconds."""
    started = time.time()
    assert _log is not None
    _log.write(f"{started - enqueued_at:.6f}\n")


@worker.task(name="long", silent=SILENT)
async def long(tag: str, seconds: float) -> None:
    """Recovery probe: write a start line, then sleep."""
    assert _log is not None
    _log.write(f"start {tag} {time.time():.6f} {os.getpid()}\n")
    await _sleep(seconds)


def main() -> None:
    import logging.config

    import anyio
    from streaq.utils import default_log_config

    # The same logging set-up as the `streaq run` CLI (INFO to stderr).
    logging.config.dictConfig(default_log_config(worker.tz, False))

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run_async)
            print(f"ready streaq worker {worker.id} pid {os.getpid()}", flush=True)

    anyio.run(serve, backend=BACKEND)


if __name__ == "__main__":
    main()
