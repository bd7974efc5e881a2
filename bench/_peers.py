"""The contenders that are not trio_background, written the way their users write them.

Every function runs its own event loop (one ``trio.run`` / ``anyio.run`` /
``asyncio.run`` per measurement) and returns a `Timing` (wall-clock and process
CPU seconds) of the work inside it, from just before the first job is submitted
(nursery/scheduler opening included) to just after the last one has finished
(closing included).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple

import trio

from ._util import Timing, clock, since

perf_counter = time.perf_counter

_Item = tuple[Any, tuple[Any, ...]]  # (fn, args): what the worker pool's channel carries


async def noop() -> None:
    """The job of every throughput scenario: returns at once (no checkpoint)."""


# -- the hand-written floor ------------------------------------------------------------
#
# What a Trio user writes without a library: acquire a CapacityLimiter token, start the
# job in a nursery, release the token in ``finally``. The token must be acquired on the
# job's behalf (a CapacityLimiter remembers its borrower, and the job's task is not the
# task that acquired), so each job gets a fresh ``object()`` as its borrower.


async def _run_and_release(
    limiter: trio.CapacityLimiter, token: object, fn: Callable[..., Awaitable[object]], *args: Any
) -> None:
    try:
        await fn(*args)
    finally:
        limiter.release_on_behalf_of(token)


def floor_burst(n: int, cap: int) -> Timing:
    async def main() -> Timing:
        t0 = clock()
        limiter = trio.CapacityLimiter(cap)
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                token = object()
                await limiter.acquire_on_behalf_of(token)
                nursery.start_soon(_run_and_release, limiter, token, noop)
        return since(t0)

    return trio.run(main)


# The careful Trio user's floor: try ``acquire_on_behalf_of_nowait`` first and await
# ``acquire_on_behalf_of`` only on ``trio.WouldBlock``. The await-always loop above
# checkpoints once per job; this one yields only when every slot is taken (in a burst,
# about once per ``cap`` jobs: the job that frees a slot hands it to the waiting
# submitter, and the others free theirs in the same scheduler batch). This is the
# faster floor, and the one the burst bar is judged against.


def floor_nowait_burst(n: int, cap: int) -> Timing:
    async def main() -> Timing:
        t0 = clock()
        limiter = trio.CapacityLimiter(cap)
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                token = object()
                try:
                    limiter.acquire_on_behalf_of_nowait(token)
                except trio.WouldBlock:
                    await limiter.acquire_on_behalf_of(token)
                nursery.start_soon(_run_and_release, limiter, token, noop)
        return since(t0)

    return trio.run(main)


# The same await-always loop with a trio.Semaphore (no borrower bookkeeping): a slightly
# faster floor that some users write instead. Reported for reference only.


async def _run_and_release_sem(
    sem: trio.Semaphore, fn: Callable[..., Awaitable[object]], *args: Any
) -> None:
    try:
        await fn(*args)
    finally:
        sem.release()


def floor_sem_burst(n: int, cap: int) -> Timing:
    async def main() -> Timing:
        t0 = clock()
        sem = trio.Semaphore(cap)
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                await sem.acquire()
                nursery.start_soon(_run_and_release_sem, sem, noop)
        return since(t0)

    return trio.run(main)


# -- the ceiling: a bare worker pool ----------------------------------------------------
#
# ``cap`` long-lived tasks looping over a memory channel. No per-job task, no per-job
# context, no isolation (a job that raises kills the pool), no accounting: the fastest
# a Trio program can push jobs through ``cap`` slots.


async def _worker(receive: trio.MemoryReceiveChannel[_Item]) -> None:
    async with receive:
        async for fn, args in receive:
            await fn(*args)


def _start_workers(
    nursery: trio.Nursery, receive: trio.MemoryReceiveChannel[_Item], cap: int
) -> None:
    """Start ``cap`` workers on clones of ``receive``, then close the original."""
    for _ in range(cap):
        nursery.start_soon(_worker, receive.clone())
    receive.close()


def pool_burst(n: int, cap: int) -> Timing:
    async def main() -> Timing:
        t0 = clock()
        send, receive = trio.open_memory_channel[_Item](n)
        async with trio.open_nursery() as nursery:
            _start_workers(nursery, receive, cap)
            async with send:
                for _ in range(n):
                    send.send_nowait((noop, ()))
        return since(t0)

    return trio.run(main)


def pool_steady(n: int, cap: int, queue: int, producers: int) -> Timing:
    """The pool with a ``queue``-deep channel; ``producers`` tasks ``await send()``."""

    async def produce(send: trio.MemorySendChannel[_Item], k: int) -> None:
        async with send:
            for _ in range(k):
                await send.send((noop, ()))

    async def main() -> Timing:
        t0 = clock()
        send, receive = trio.open_memory_channel[_Item](queue)
        async with trio.open_nursery() as nursery:
            _start_workers(nursery, receive, cap)
            async with send:
                for _ in range(producers):
                    nursery.start_soon(produce, send.clone(), n // producers)
        return since(t0)

    return trio.run(main)


def floor_steady(n: int, cap: int, producers: int) -> Timing:
    """The floor with ``producers`` tasks submitting: they wait on the limiter when full."""

    async def produce(nursery: trio.Nursery, limiter: trio.CapacityLimiter, k: int) -> None:
        for _ in range(k):
            token = object()
            await limiter.acquire_on_behalf_of(token)
            nursery.start_soon(_run_and_release, limiter, token, noop)

    async def main() -> Timing:
        t0 = clock()
        limiter = trio.CapacityLimiter(cap)
        async with trio.open_nursery() as jobs, trio.open_nursery() as submitters:
            for _ in range(producers):
                submitters.start_soon(produce, jobs, limiter, n // producers)
        return since(t0)

    return trio.run(main)


# -- anyio 4: task group + CapacityLimiter, on the trio backend ------------------------


def anyio_burst(n: int, cap: int) -> Timing:
    import anyio

    async def run_and_release(limiter: anyio.CapacityLimiter, token: object) -> None:
        try:
            await noop()
        finally:
            limiter.release_on_behalf_of(token)

    async def main() -> Timing:
        t0 = clock()
        limiter = anyio.CapacityLimiter(cap)
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                token = object()
                await limiter.acquire_on_behalf_of(token)
                tg.start_soon(run_and_release, limiter, token)
        return since(t0)

    result: Timing = anyio.run(main, backend="trio")
    return result


# -- aiojobs 1.4 (asyncio) --------------------------------------------------------------


def aiojobs_burst(n: int, cap: int) -> Timing:
    """aiojobs as documented: spawn every job, then ``wait_and_close()`` drains.

    This is what ``async with aiojobs.Scheduler(...)`` does on exit, i.e. the same
    shape as leaving ``async with open_background_runtime()``.
    """
    import aiojobs

    async def main() -> Timing:
        t0 = clock()
        scheduler = aiojobs.Scheduler(limit=cap, pending_limit=n)
        for _ in range(n):
            await scheduler.spawn(noop())
        await scheduler.wait_and_close()
        return since(t0)

    return asyncio.run(main())


def aiojobs_counted_burst(n: int, cap: int) -> Timing:
    """aiojobs tuned by hand: each job counts itself done; the last one sets an Event.

    ``wait_and_close()`` gathers one waiter task per outstanding job, which dominates a
    100k-job burst. A user who counts completions in the job body avoids it; we report
    this variant too so that the aiojobs comparison is not a straw man.
    """
    import aiojobs

    async def main() -> Timing:
        t0 = clock()
        left = n
        done = asyncio.Event()

        async def counted() -> None:
            nonlocal left
            try:
                await noop()
            finally:
                left -= 1
                if not left:
                    done.set()

        scheduler = aiojobs.Scheduler(limit=cap, pending_limit=n)
        for _ in range(n):
            await scheduler.spawn(counted())
        await done.wait()
        await scheduler.close()
        return since(t0)

    return asyncio.run(main())


def aiojobs_steady(n: int, cap: int, queue: int, producers: int) -> Timing:
    """aiojobs with ``pending_limit=queue``: ``await spawn()`` waits while it is full."""
    import aiojobs

    async def produce(scheduler: aiojobs.Scheduler, k: int) -> None:
        for _ in range(k):
            await scheduler.spawn(noop())

    async def main() -> Timing:
        t0 = clock()
        scheduler = aiojobs.Scheduler(limit=cap, pending_limit=queue)
        await asyncio.gather(*(produce(scheduler, n // producers) for _ in range(producers)))
        await scheduler.wait_and_close()
        return since(t0)

    return asyncio.run(main())


def aiojobs_drain(n: int, cap: int) -> Timing:
    """Seconds for ``wait_and_close()`` after ``n`` jobs were spawned (not timed)."""
    import aiojobs

    async def main() -> Timing:
        scheduler = aiojobs.Scheduler(limit=cap, pending_limit=n)
        for _ in range(n):
            await scheduler.spawn(noop())
        t0 = clock()
        await scheduler.wait_and_close()
        return since(t0)

    return asyncio.run(main())


def pool_drain(n: int, cap: int) -> Timing:
    """Seconds for the worker pool to empty a channel holding ``n`` jobs, then stop."""

    async def main() -> Timing:
        send, receive = trio.open_memory_channel[_Item](n)
        for _ in range(n):
            send.send_nowait((noop, ()))
        send.close()
        t0 = clock()
        async with trio.open_nursery() as nursery:
            _start_workers(nursery, receive, cap)
        return since(t0)

    return trio.run(main)


# -- latency: spawn -> first line of the job, with half the slots busy ------------------
#
# ``load`` jobs occupy half the slots and checkpoint in a loop (so the scheduler has
# real work in every batch); then ``samples`` probes are submitted one at a time. The
# clock starts just before the submission call and stops on the probe's first line.


class LatencyJobs(NamedTuple):
    """The jobs of a latency run, made by `latency_jobs`."""

    samples: list[float]  # seconds from submission to a probe's first line
    busy: Callable[[], Coroutine[Any, Any, None]]  # loops on a checkpoint until ``stop()``
    probe: Callable[[float, Any], Coroutine[Any, Any, None]]  # probe(t0, event): record, set event
    stop: Callable[[], None]  # make every ``busy`` job return


def latency_jobs(*, on_asyncio: bool = False) -> LatencyJobs:
    """Make the load and probe jobs of one latency run (Trio's or asyncio's checkpoint).

    They are closures over the run's sample list and stop flag, exactly as if written
    inside each contender's ``main``: sharing them adds no indirection inside a job.
    """
    out: list[float] = []
    stop = False

    if on_asyncio:

        async def busy() -> None:
            while not stop:  # noqa: ASYNC110 (busy on purpose: load for the scheduler)
                await asyncio.sleep(0)

    else:

        async def busy() -> None:
            while not stop:
                await trio.lowlevel.checkpoint()

    async def probe(t0: float, event: trio.Event | asyncio.Event) -> None:
        out.append(perf_counter() - t0)
        event.set()

    def halt() -> None:
        nonlocal stop
        stop = True

    return LatencyJobs(out, busy, probe, halt)


def floor_latency(samples: int, cap: int, load: int) -> list[float]:
    async def main() -> list[float]:
        out, busy, probe, stop = latency_jobs()
        limiter = trio.CapacityLimiter(cap)
        async with trio.open_nursery() as nursery:
            for _ in range(load):
                token = object()
                await limiter.acquire_on_behalf_of(token)
                nursery.start_soon(_run_and_release, limiter, token, busy)
            for _ in range(samples):
                event = trio.Event()
                t0 = perf_counter()
                token = object()
                await limiter.acquire_on_behalf_of(token)
                nursery.start_soon(_run_and_release, limiter, token, probe, t0, event)
                await event.wait()
            stop()
        return out

    return trio.run(main)


def pool_latency(samples: int, cap: int, load: int) -> list[float]:
    async def main() -> list[float]:
        out, busy, probe, stop = latency_jobs()
        send, receive = trio.open_memory_channel[_Item](samples + load)
        async with trio.open_nursery() as nursery:
            _start_workers(nursery, receive, cap)
            async with send:
                for _ in range(load):
                    send.send_nowait((busy, ()))
                for _ in range(samples):
                    event = trio.Event()
                    t0 = perf_counter()
                    send.send_nowait((probe, (t0, event)))
                    await event.wait()
                stop()
        return out

    return trio.run(main)


def aiojobs_latency(samples: int, cap: int, load: int) -> list[float]:
    import aiojobs

    async def main() -> list[float]:
        out, busy, probe, stop = latency_jobs(on_asyncio=True)
        scheduler = aiojobs.Scheduler(limit=cap, pending_limit=samples + load)
        for _ in range(load):
            await scheduler.spawn(busy())
        for _ in range(samples):
            event = asyncio.Event()
            t0 = perf_counter()
            await scheduler.spawn(probe(t0, event))
            await event.wait()
        stop()
        await scheduler.wait_and_close()
        return out

    return asyncio.run(main())
