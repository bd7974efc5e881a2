"""Live limits: `BackgroundRuntime.resize`."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from helpers import Recorder, all_counts, check_invariants, expected

from trio_background import (
    BackgroundJob,
    BackgroundShutdownError,
    BackgroundTaskConfig,
    QueueFullError,
    open_background_runtime,
)


def config(**kwargs: Any) -> BackgroundTaskConfig:
    return BackgroundTaskConfig(**{"drain_timeout": 60.0, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_concurrent_tasks": 0}, ValueError, "max_concurrent_tasks must be >= 1, got 0"),
        ({"max_concurrent_tasks": "2"}, TypeError, "max_concurrent_tasks must be an int, not str"),
        (
            {"max_concurrent_tasks": True},
            TypeError,
            "max_concurrent_tasks must be an int, not bool",
        ),
        (
            {"max_concurrent_tasks": 2.0},
            TypeError,
            "max_concurrent_tasks must be an int, not float",
        ),
        ({"max_queue_size": -1}, ValueError, "max_queue_size must be >= 0, got -1"),
        ({"max_queue_size": None, "max_concurrent_tasks": -5}, ValueError, "max_concurrent_tasks"),
        # A valid value next to a bad one changes nothing either.
        ({"max_queue_size": 5, "max_concurrent_tasks": 0}, ValueError, "max_concurrent_tasks"),
        ({"max_concurrent_tasks": 5, "max_queue_size": "x"}, TypeError, "max_queue_size"),
    ],
)
async def test_bad_values_are_refused_and_change_nothing(
    kwargs: dict[str, Any],
    error: type[Exception],
    message: str,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_background_runtime(config(max_concurrent_tasks=1, max_queue_size=1)) as runtime:
        runtime.handle().spawn(trio.sleep, 1)
        before = runtime.statistics()
        with pytest.raises(error, match=message):
            runtime.resize(**kwargs)
        assert runtime.statistics() == before


async def test_growing_the_slots_starts_queued_jobs_at_once_in_order() -> None:
    started: list[int] = []
    gate = trio.Event()

    async def job(i: int) -> None:
        started.append(i)
        await gate.wait()

    async with open_background_runtime(
        config(max_concurrent_tasks=1, max_queue_size=10)
    ) as runtime:
        handle = runtime.handle()
        jobs = [handle.spawn(job, i) for i in range(6)]
        runtime.resize(max_concurrent_tasks=4)
        # At once: before any checkpoint, jobs 1-3 hold slots.
        assert [j.status for j in jobs] == ["running"] * 4 + ["queued"] * 2
        stats = runtime.statistics()
        assert (stats.running, stats.queued, stats.max_concurrent_tasks) == (4, 2, 4)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(started) == [0, 1, 2, 3]
        gate.set()
    assert sorted(started) == list(range(6))


async def test_shrinking_the_slots_cancels_nothing_and_starts_nothing_until_below(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    most = 0
    running = 0

    async def job(seconds: float) -> None:
        nonlocal most, running
        running += 1
        most = max(most, running)
        await trio.sleep(seconds)
        running -= 1

    cfg = config(max_concurrent_tasks=4, max_queue_size=20)
    async with open_background_runtime(cfg, instruments=[recorder]) as runtime:
        handle = runtime.handle()
        jobs = [handle.spawn(job, 1.0 + i) for i in range(4)]
        jobs += [handle.spawn(job, 1.0) for _ in range(6)]
        await trio.testing.wait_all_tasks_blocked()
        runtime.resize(max_concurrent_tasks=2)
        assert runtime.statistics().running == 4  # the excess runs on
        most = running = 4
        seen_running: list[int] = []
        while runtime.statistics().queued:
            await trio.sleep(0.25)
            stats = runtime.statistics()
            seen_running.append(stats.running)
        # 4 -> 3 -> 2 as the running jobs end (nothing starts above 2), then 2 at a time.
        assert seen_running[0] == 4
        assert max(seen_running[seen_running.index(2) :]) == 2
    assert all_counts(runtime.statistics()) == expected(completed=10)
    assert recorder.of("dropped") == []
    assert all(outcome == "completed" for _, _, outcome, _ in recorder.of("finished"))


async def test_shrinking_the_queue_refuses_new_jobs_until_it_is_below() -> None:
    gate = trio.Event()
    async with open_background_runtime(config(max_concurrent_tasks=1, max_queue_size=4)) as runtime:
        handle = runtime.handle()
        jobs: list[BackgroundJob[Any]] = [handle.spawn(gate.wait) for _ in range(5)]
        runtime.resize(max_queue_size=2)
        stats = runtime.statistics()
        assert (stats.queued, stats.max_queue_size) == (4, 2)  # nothing dropped
        with pytest.raises(QueueFullError):
            handle.spawn(gate.wait)
        jobs[1].cancel()
        jobs[2].cancel()
        with pytest.raises(QueueFullError):  # 2 queued: still not below 2
            handle.spawn(gate.wait)
        jobs[3].cancel()
        jobs.append(handle.spawn(gate.wait))  # 1 queued: room
        check_invariants(runtime.statistics())
        gate.set()
    assert all_counts(runtime.statistics()) == expected(completed=3, dropped=3, rejected=2)


async def test_growing_the_queue_admits_waiting_senders_in_order() -> None:
    gate = trio.Event()
    admitted: list[str] = []
    async with open_background_runtime(config(max_concurrent_tasks=1, max_queue_size=0)) as runtime:
        handle = runtime.handle()
        handle.spawn(gate.wait)

        async def sender(name: str) -> None:
            await handle.send(gate.wait, name=name)
            admitted.append(name)

        async with trio.open_nursery() as nursery:
            for name in "abc":
                nursery.start_soon(sender, name)
                await trio.testing.wait_all_tasks_blocked()
            runtime.resize(max_queue_size=2)
            assert runtime.statistics().queued == 2
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(admitted) == ["a", "b"]  # the first two to wait ("c" still waits)
            runtime.resize(max_concurrent_tasks=2)  # "a" starts; "c" takes its queue place
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(admitted) == ["a", "b", "c"]
            gate.set()
    assert all_counts(runtime.statistics()) == expected(completed=4)


async def test_resize_while_draining_helps_the_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def job() -> None:
        await trio.sleep(1)

    async with open_background_runtime(config(max_concurrent_tasks=1)) as runtime:
        handle = runtime.handle()
        for _ in range(10):
            handle.spawn(job)

        async def grow_soon() -> None:
            await trio.sleep(1.5)
            runtime.resize(max_concurrent_tasks=10)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(grow_soon)
            await runtime.aclose()
    # One at a time until 1.5 s, when the other eight start at once and end at 2.5 s.
    assert trio.current_time() - start == pytest.approx(2.5)
    assert all_counts(runtime.statistics()) == expected(completed=10)


async def test_shrink_then_grow_before_the_excess_drained(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_background_runtime(
        config(max_concurrent_tasks=3, max_queue_size=10)
    ) as runtime:
        handle = runtime.handle()
        for i in range(8):
            handle.spawn(trio.sleep, 1 + i % 3)
        runtime.resize(max_concurrent_tasks=1)
        runtime.resize(max_concurrent_tasks=3)
        assert runtime.statistics().running == 3
        while runtime.statistics().queued:
            await trio.sleep(0.5)
            stats = runtime.statistics()
            # Work conservation: a job waits only while every slot is busy.
            assert not stats.queued or stats.running == 3
    assert all_counts(runtime.statistics()) == expected(completed=8)


def _slot_tasks() -> int:
    """Tasks named like the runtime's slot hosts, anywhere in this Trio run."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        count += task.name == "trio_background slot"
        stack.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return count


async def test_slots_host_tasks_stay_within_the_slots_after_a_shrink(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_background_runtime(
        config(max_concurrent_tasks=2, max_queue_size=50)
    ) as runtime:
        handle = runtime.handle()
        for _ in range(40):
            handle.spawn(trio.sleep, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert _slot_tasks() == 2
        runtime.resize(max_concurrent_tasks=1)
        for _ in range(5):
            await trio.sleep(1)
            await trio.testing.wait_all_tasks_blocked()
        assert runtime.statistics().running == 1
        assert _slot_tasks() == 1


async def test_shrinking_after_the_cut_off_is_harmless(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_background_runtime(config(max_concurrent_tasks=2, drain_timeout=0)) as runtime:
        handle = runtime.handle()
        handle.spawn(trio.sleep_forever)
        handle.spawn(trio.sleep_forever)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(BackgroundShutdownError):
            await runtime.aclose()
        await trio.testing.wait_all_tasks_blocked()  # the slots' host tasks have ended
        runtime.resize(max_concurrent_tasks=1)
        assert runtime.statistics().max_concurrent_tasks == 1
    assert all_counts(runtime.statistics()) == expected(cancelled=2)
