"""trio_background under the same scenarios as the peers (see ``_peers``)."""

from __future__ import annotations

import gc
import math
import time
import tracemalloc
from types import ModuleType
from typing import Any, NamedTuple

import trio
import trio.testing

from ._peers import latency_jobs, noop
from ._util import Timing, clock, since

perf_counter = time.perf_counter
process_time = time.process_time


def _config(tb: ModuleType, *, queue: int, cap: int) -> Any:
    return tb.BackgroundTaskConfig(
        max_queue_size=queue, max_concurrent_tasks=cap, drain_timeout=math.inf
    )


def _check(runtime: Any, completed: int) -> None:
    stats = runtime.statistics()
    if stats.completed != completed or stats.failed or stats.cancelled or stats.dropped:
        raise AssertionError(f"benchmark run went wrong: {stats!r}")


def burst(
    tb: ModuleType, n: int, cap: int, instruments: tuple[object, ...] | None = None
) -> Timing:
    """``n`` x ``handle.spawn(noop)`` into a queue of ``n``, then leave the block (drain).

    ``instruments=None`` calls ``open_background_runtime(config)`` without the argument.
    """

    async def main() -> Timing:
        t0 = clock()
        config = _config(tb, queue=n, cap=cap)
        if instruments is None:
            cm = tb.open_background_runtime(config)
        else:
            cm = tb.open_background_runtime(config, instruments=instruments)
        async with cm as runtime:
            handle = runtime.handle()
            for _ in range(n):
                handle.spawn(noop)
        elapsed = since(t0)
        _check(runtime, n)
        return elapsed

    return trio.run(main)


SCHEDULING_VARIANTS = ("plain", "delayed", "keyed")
SCHEDULING_KEYS = 1000


def scheduling_delays(n: int) -> list[float]:
    """``n`` delays spread over 0 to 9.99 s, deterministically (1,000 distinct values)."""
    return [(i * 7919 % 1000) / 100 for i in range(n)]


def scheduling_keys(n: int) -> list[str]:
    """``n`` keys, ``SCHEDULING_KEYS`` distinct ones, taken in turn."""
    return [f"k{i % SCHEDULING_KEYS}" for i in range(n)]


class ScheduledRun(NamedTuple):
    """One run of `scheduled_burst`: timings, and the CPU seconds the cyclic GC took."""

    spawn: Timing  # the spawn loop alone
    whole: Timing  # opening the runtime to the end of the drain
    spawn_gc: float  # of ``spawn.cpu``, in garbage collections
    whole_gc: float  # of ``whole.cpu``, in garbage collections


class _GCTime:
    """A `gc.callbacks` entry adding up the CPU time of each collection."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = process_time()
        else:
            self.total += process_time() - self._start


def scheduled_burst(tb: ModuleType, n: int, cap: int, variant: str) -> ScheduledRun:
    """``n`` x ``handle.spawn(noop)`` (``plain``), with ``delay=`` (``delayed``) or with
    ``key=`` (``keyed``) into a queue of ``n``, then leave the block (drain).

    Runs under ``trio.testing.MockClock(autojump_threshold=0)``, whatever the variant, so
    that the delays cost no wall time. Times the spawn loop alone and the whole run
    (opening the runtime to the end of the drain), and how much of each went to the
    cyclic garbage collector. The delays and keys are built before either timing starts.
    """
    if variant not in SCHEDULING_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    delays = scheduling_delays(n) if variant == "delayed" else []
    keys = scheduling_keys(n) if variant == "keyed" else []
    gc_time = _GCTime()

    async def main() -> ScheduledRun:
        t0 = clock()
        async with tb.open_background_runtime(_config(tb, queue=n, cap=cap)) as runtime:
            handle = runtime.handle()
            gc0 = gc_time.total
            s0 = clock()
            if variant == "delayed":
                for d in delays:
                    handle.spawn(noop, delay=d)
            elif variant == "keyed":
                for k in keys:
                    handle.spawn(noop, key=k)
            else:
                for _ in range(n):
                    handle.spawn(noop)
            spawned = since(s0)
            spawn_gc = gc_time.total - gc0
        elapsed = since(t0)
        _check(runtime, n)
        stats = runtime.statistics()
        if stats.timed_out or stats.rejected or stats.scheduled or stats.queued or stats.running:
            raise AssertionError(f"benchmark run went wrong: {stats!r}")
        # The delayed jobs waited for their (virtual) delays; the others waited for nothing.
        waited = trio.current_time()
        if not (waited >= max(delays) if delays else waited == 0):
            raise AssertionError(f"{variant}: the mock clock ended at {waited} s")
        return ScheduledRun(spawned, elapsed, spawn_gc, gc_time.total)

    gc.callbacks.append(gc_time)
    try:
        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        gc.callbacks.remove(gc_time)


def steady(tb: ModuleType, n: int, cap: int, queue: int, producers: int) -> Timing:
    """``producers`` tasks each ``await handle.send(noop)`` into a ``queue``-deep queue."""

    async def produce(handle: Any, k: int) -> None:
        for _ in range(k):
            await handle.send(noop)

    async def main() -> Timing:
        t0 = clock()
        async with tb.open_background_runtime(_config(tb, queue=queue, cap=cap)) as runtime:
            handle = runtime.handle()
            async with trio.open_nursery() as submitters:
                for _ in range(producers):
                    submitters.start_soon(produce, handle, n // producers)
        elapsed = since(t0)
        _check(runtime, n // producers * producers)
        return elapsed

    return trio.run(main)


def send_each(tb: ModuleType, n: int, cap: int) -> Timing:
    """One submitter, ``n`` x ``await handle.send(noop)``, slots free; leave the block."""

    async def main() -> Timing:
        t0 = clock()
        async with tb.open_background_runtime(_config(tb, queue=n, cap=cap)) as runtime:
            handle = runtime.handle()
            for _ in range(n):
                await handle.send(noop)
        elapsed = since(t0)
        _check(runtime, n)
        return elapsed

    return trio.run(main)


def spawn_then_checkpoint(tb: ModuleType, n: int, cap: int) -> Timing:
    """The reference for `send_each`: ``handle.spawn(noop)`` and one bare checkpoint per job."""

    async def main() -> Timing:
        t0 = clock()
        async with tb.open_background_runtime(_config(tb, queue=n, cap=cap)) as runtime:
            handle = runtime.handle()
            for _ in range(n):
                handle.spawn(noop)
                await trio.lowlevel.checkpoint()
        elapsed = since(t0)
        _check(runtime, n)
        return elapsed

    return trio.run(main)


def latency(tb: ModuleType, samples: int, cap: int, load: int) -> list[float]:
    """Spawn -> first line of the job, with ``load`` of ``cap`` slots busy (see ``_peers``)."""

    async def main() -> list[float]:
        out, busy, probe, stop = latency_jobs()
        async with tb.open_background_runtime(_config(tb, queue=1024, cap=cap)) as runtime:
            handle = runtime.handle()
            for _ in range(load):
                handle.spawn(busy)
            for _ in range(samples):
                event = trio.Event()
                t0 = perf_counter()
                handle.spawn(probe, t0, event)
                await event.wait()
            stop()
        return out

    return trio.run(main)


def idle_aclose(tb: ModuleType, samples: int) -> list[float]:
    """Seconds of ``await runtime.aclose()`` on a runtime that never had a job."""

    async def main() -> list[float]:
        out: list[float] = []
        for _ in range(samples):
            async with tb.open_background_runtime() as runtime:
                t0 = perf_counter()
                await runtime.aclose()
                out.append(perf_counter() - t0)
        return out

    return trio.run(main)


def nursery_exit(samples: int) -> list[float]:
    """Reference for ``idle_aclose``: leaving an empty ``trio.open_nursery()`` block."""

    async def main() -> list[float]:
        out: list[float] = []
        for _ in range(samples):
            cm = trio.open_nursery()
            await cm.__aenter__()
            t0 = perf_counter()
            await cm.__aexit__(None, None, None)
            out.append(perf_counter() - t0)
        return out

    return trio.run(main)


def drain(tb: ModuleType, n: int, cap: int) -> Timing:
    """Seconds of ``aclose()`` with ``n`` no-op jobs accepted (``cap`` started, rest queued)."""

    async def main() -> Timing:
        async with tb.open_background_runtime(_config(tb, queue=n, cap=cap)) as runtime:
            handle = runtime.handle()
            for _ in range(n):
                handle.spawn(noop)
            t0 = clock()
            await runtime.aclose()
            elapsed = since(t0)
        _check(runtime, n)
        return elapsed

    return trio.run(main)


# -- memory (tracemalloc must be tracing) -------------------------------------------------


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def bytes_per_queued_job(tb: ModuleType, queued: int, cap: int) -> float:
    """Traced bytes added by ``queued`` more ``spawn(noop)`` calls, all slots busy."""

    async def main() -> float:
        release = trio.Event()
        async with tb.open_background_runtime(_config(tb, queue=queued, cap=cap)) as runtime:
            handle = runtime.handle()
            for _ in range(cap):
                handle.spawn(release.wait)
            await trio.testing.wait_all_tasks_blocked()
            before = _traced()
            for _ in range(queued):
                handle.spawn(noop)
            after = _traced()
            assert runtime.statistics().queued == queued
            release.set()
        return (after - before) / queued

    return trio.run(main)


def _spawn_rejected(handle: Any, error: type[Exception], times: int) -> None:
    """``times`` x ``handle.spawn(noop)``, each expected to raise ``error``."""
    for _ in range(times):
        try:  # noqa: SIM105 (contextlib.suppress would allocate per call)
            handle.spawn(noop)
        except error:
            pass


def rejected_growth(tb: ModuleType, rejections: int, warmup: int = 10_000) -> int:
    """Traced bytes gained over ``rejections`` spawns that raise QueueFullError."""

    async def main() -> int:
        release = trio.Event()
        config = _config(tb, queue=0, cap=1)
        async with tb.open_background_runtime(config) as runtime:
            handle = runtime.handle()
            handle.spawn(release.wait)
            _spawn_rejected(handle, tb.QueueFullError, warmup)
            before = _traced()
            _spawn_rejected(handle, tb.QueueFullError, rejections)
            after = _traced()
            assert runtime.statistics().rejected == warmup + rejections
            release.set()
        return after - before

    return trio.run(main)


def aiojobs_bytes_per_pending_job(pending: int, cap: int) -> float:
    """Reference: traced bytes per job waiting in aiojobs' pending queue."""
    import asyncio

    import aiojobs

    async def main() -> float:
        release = asyncio.Event()
        scheduler = aiojobs.Scheduler(limit=cap, pending_limit=pending)
        for _ in range(cap):
            await scheduler.spawn(release.wait())
        await asyncio.sleep(0)
        before = _traced()
        for _ in range(pending):
            await scheduler.spawn(noop())
        after = _traced()
        release.set()
        await scheduler.wait_and_close()
        return (after - before) / pending

    return asyncio.run(main())


def pool_bytes_per_buffered_job(buffered: int) -> float:
    """Reference: traced bytes per ``(fn, args)`` item in a trio memory channel's buffer."""

    async def main() -> float:
        send, receive = trio.open_memory_channel[tuple[Any, tuple[Any, ...]]](buffered)
        before = _traced()
        for _ in range(buffered):
            send.send_nowait((noop, ()))
        after = _traced()
        send.close()
        receive.close()
        return (after - before) / buffered

    return trio.run(main)
