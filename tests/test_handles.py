"""Job handles: `BackgroundJob` status, cancel() and wait(), and `current_job`."""

from __future__ import annotations

import contextvars
import gc
import logging
import weakref
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing
from helpers import Recorder, all_counts, check_invariants, exc_of, expected, records

from trio_background import (
    BackgroundJob,
    BackgroundJobMetadata,
    BackgroundRuntime,
    BackgroundShutdownError,
    BackgroundTaskConfig,
    JobCancelledError,
    JobTimeoutError,
    QueueFullError,
    current_job,
    open_background_runtime,
)

STATUSES = ("queued", "running", "completed", "failed", "timed_out", "cancelled", "dropped")


def agree(runtime: BackgroundRuntime, jobs: list[BackgroundJob[Any]]) -> None:
    """Every job is counted under exactly its status (all jobs of the runtime are given)."""
    stats = runtime.statistics()
    check_invariants(stats)
    by_status = Counter(job.status for job in jobs)
    assert {s: by_status[s] for s in STATUSES} == {s: getattr(stats, s) for s in STATUSES}
    assert stats.accepted == len(jobs)


def config(**kwargs: Any) -> BackgroundTaskConfig:
    return BackgroundTaskConfig(**{"drain_timeout": 60.0, **kwargs})


async def returns(value: object) -> object:
    return value


# -- status ---------------------------------------------------------------------------------


async def test_status_follows_the_job_and_agrees_with_the_counters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()

    async def held() -> str:
        await gate.wait()
        return "done"

    async def fails() -> None:
        raise ValueError("no")

    async with open_background_runtime(config(max_concurrent_tasks=2)) as runtime:
        handle = runtime.handle()
        a = handle.spawn(held)
        b = handle.spawn(fails)
        c = handle.spawn(held, timeout=5)
        d = handle.spawn(held)
        jobs: list[BackgroundJob[Any]] = [a, b, c, d]
        assert [j.status for j in jobs] == ["running", "running", "queued", "queued"]
        agree(runtime, jobs)
        await trio.testing.wait_all_tasks_blocked()
        assert [j.status for j in jobs] == ["running", "failed", "running", "queued"]
        agree(runtime, jobs)
        await trio.sleep(6)
        assert [j.status for j in jobs] == ["running", "failed", "timed_out", "running"]
        agree(runtime, jobs)
        gate.set()
        await runtime.wait_idle()
        assert [j.status for j in jobs] == ["completed", "failed", "timed_out", "completed"]
        agree(runtime, jobs)
    assert a.metadata == BackgroundJobMetadata(
        name="test_status_follows_the_job_and_agrees_with_the_counters.<locals>.held"
    )
    assert a.attempt == 1
    assert isinstance(a, BackgroundJob)
    assert type(a).__module__ == "trio_background"
    assert repr(a).startswith("<trio_background.BackgroundJob '")
    assert "completed" in repr(a)


async def test_send_returns_the_job_too() -> None:
    async with open_background_runtime(config()) as runtime:
        job = await runtime.handle().send(returns, 7, name="seven", request_id="r")
        assert job.metadata == BackgroundJobMetadata(name="seven", request_id="r")
        assert await job.wait() == 7


# -- cancel(): queued -----------------------------------------------------------------------


async def test_cancelling_a_queued_job_drops_it_at_once_and_frees_its_place(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    ran: list[str] = []
    gate = trio.Event()

    async def job(name: str) -> None:
        ran.append(name)
        await gate.wait()

    cfg = config(max_concurrent_tasks=1, max_queue_size=2)
    async with open_background_runtime(cfg, instruments=[recorder]) as runtime:
        handle = runtime.handle()
        a = handle.spawn(job, "a", name="a")
        b = handle.spawn(job, "b", name="b")
        c = handle.spawn(job, "c", name="c")
        with pytest.raises(QueueFullError):
            handle.spawn(job, "x", name="x")
        b.cancel()
        assert b.status == "dropped"
        assert recorder.pairs()[-1] == ("dropped", "b")
        d = handle.spawn(job, "d", name="d")  # b's place is free at once
        del_ok: list[BackgroundJob[Any]] = [a, b, c, d]
        agree(runtime, del_ok)
        b.cancel()  # idempotent
        agree(runtime, del_ok)
        gate.set()
    assert ran == ["a", "c", "d"]
    assert all_counts(runtime.statistics()) == expected(completed=3, dropped=1, rejected=1)
    assert ("started", "b") not in recorder.pairs()


async def test_a_cancelled_queued_job_gives_its_place_to_the_first_waiting_sender(
    autojump_clock: trio.testing.MockClock,
) -> None:
    order: list[str] = []
    gate = trio.Event()

    async def job(name: str) -> None:
        order.append(name)
        await gate.wait()

    async with open_background_runtime(config(max_concurrent_tasks=1, max_queue_size=1)) as runtime:
        handle = runtime.handle()
        handle.spawn(job, "a")
        queued = handle.spawn(job, "b")
        sent: list[BackgroundJob[Any]] = []

        async def sender(name: str) -> None:
            sent.append(await handle.send(job, name, name=name))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender, "s1")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(sender, "s2")
            await trio.testing.wait_all_tasks_blocked()
            queued.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert [j.metadata.name for j in sent] == ["s1"]
            assert runtime.statistics().queued == 1
            gate.set()
    assert order == ["a", "s1", "s2"]


async def test_a_job_cancelled_in_the_middle_of_the_queue_keeps_the_order_of_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    order: list[int] = []
    gate = trio.Event()

    async def job(i: int) -> None:
        order.append(i)
        await gate.wait()

    async with open_background_runtime(
        config(max_concurrent_tasks=1, max_queue_size=10)
    ) as runtime:
        handle = runtime.handle()
        jobs = [handle.spawn(job, i) for i in range(8)]
        for i in (7, 1, 4, 2):  # the tail, near the head, the middle, next to a hole
            jobs[i].cancel()
        agree(runtime, jobs)
        gate.set()
    assert order == [0, 3, 5, 6]


# -- cancel(): running ----------------------------------------------------------------------


async def test_cancelling_a_running_job_cancels_only_it_and_its_slot_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    steps: list[str] = []

    async def long(name: str) -> None:
        try:
            async with trio.open_nursery() as nursery:  # a job with tasks of its own
                nursery.start_soon(trio.sleep_forever)
                await trio.sleep(10)
                nursery.cancel_scope.cancel()
            steps.append(f"{name} done")
        finally:
            steps.append(f"{name} unwound")

    async with open_background_runtime(config(max_concurrent_tasks=2)) as runtime:
        handle = runtime.handle()
        a = handle.spawn(long, "a")
        b = handle.spawn(long, "b")
        c = handle.spawn(long, "c")
        await trio.sleep(1)
        a.cancel()
        assert a.status == "running"  # until it has unwound
        agree(runtime, [a, b, c])
        await trio.testing.wait_all_tasks_blocked()
        assert a.status == "cancelled"
        assert c.status == "running"  # a's slot went on
        agree(runtime, [a, b, c])
        with pytest.raises(JobCancelledError) as info:
            await a.wait()
        assert info.value.job == a.metadata
    assert steps == ["a unwound", "b done", "b unwound", "c done", "c unwound"]
    assert all_counts(runtime.statistics()) == expected(completed=2, cancelled=1)
    assert records(caplog, logging.WARNING) == []  # a cancel the user asked for is no warning


async def test_slots_whose_jobs_were_cancelled_serve_the_jobs_after_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started: dict[int, float] = {}

    async def job(i: int) -> int:
        started[i] = trio.current_time()
        await trio.sleep(1)
        return i

    async with open_background_runtime(
        config(max_concurrent_tasks=2, max_queue_size=100)
    ) as runtime:
        handle = runtime.handle()
        jobs = [handle.spawn(job, i) for i in range(20)]
        cancels = 0
        for round_ in range(5):
            await trio.testing.wait_all_tasks_blocked()
            for running in [j for j in jobs if j.status == "running"]:
                running.cancel()
                cancels += 1
            agree(runtime, jobs)
            await trio.sleep(0.5 + round_)
        await runtime.wait_idle()
        agree(runtime, jobs)
    # FIFO: no job starts later than one accepted after it (at one instant: any order).
    times = [started[i] for i in sorted(started)]
    assert times == sorted(times)
    assert sorted(started) == list(range(len(started)))
    assert {j.status for j in jobs} <= {"completed", "cancelled"}
    stats = runtime.statistics()
    assert cancels >= 5  # at least one running job in each round
    assert (stats.cancelled, stats.completed) == (cancels, 20 - cancels)


async def test_a_job_that_returns_before_seeing_the_cancel_completed() -> None:
    async def shielded() -> str:
        with trio.CancelScope(shield=True):
            await trio.lowlevel.checkpoint()
            current_job().cancel()
            await trio.lowlevel.checkpoint()
        return "finished first"

    async with open_background_runtime(config()) as runtime:
        job = runtime.handle().spawn(shielded)
        assert await job.wait() == "finished first"
    assert job.status == "completed"
    assert all_counts(runtime.statistics()) == expected(completed=1)


async def test_cleanup_errors_of_a_cancelled_job_are_logged_and_it_counts_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def messy() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise RuntimeError("cleanup went wrong")

    async with open_background_runtime(config()) as runtime:
        job = runtime.handle().spawn(messy, name="messy")
        await trio.testing.wait_all_tasks_blocked()
        job.cancel()
        with pytest.raises(JobCancelledError):
            await job.wait()
    assert job.status == "cancelled"
    [error] = records(caplog, logging.ERROR)
    assert error.getMessage() == "background job 'messy' raised an error while being cancelled"
    assert isinstance(exc_of(error), RuntimeError)


async def test_a_job_cancelled_before_its_code_ran_never_runs_and_counts_cancelled() -> None:
    recorder = Recorder()
    ran: list[str] = []

    async def job() -> None:
        ran.append("ran")

    async with open_background_runtime(config(), instruments=[recorder]) as runtime:
        handle = runtime.handle()
        job_ = handle.spawn(job, name="j")
        assert job_.status == "running"  # it holds a slot; its task has not run yet
        job_.cancel()
        agree(runtime, [job_])
        await runtime.wait_idle()
    assert ran == []
    assert job_.status == "cancelled"
    assert recorder.pairs() == [("accepted", "j"), ("started", "j"), ("finished", "j")]
    assert recorder.of("finished")[0][2] == "cancelled"


async def test_a_finished_job_is_unaffected_by_cancel() -> None:
    async with open_background_runtime(config()) as runtime:
        job = runtime.handle().spawn(returns, 1)
        await runtime.wait_idle()
        job.cancel()
        assert job.status == "completed"
        assert await job.wait() == 1
    assert all_counts(runtime.statistics()) == expected(completed=1)


async def test_jobs_cancelled_by_handle_are_not_in_the_shutdown_report(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(BackgroundShutdownError) as info:
        async with open_background_runtime(
            config(max_concurrent_tasks=1, drain_timeout=5)
        ) as runtime:
            handle = runtime.handle()
            mine = handle.spawn(trio.sleep_forever, name="mine")
            queued_mine = handle.spawn(trio.sleep_forever, name="queued_mine")
            handle.spawn(trio.sleep_forever, name="cut")
            await trio.testing.wait_all_tasks_blocked()
            queued_mine.cancel()
            mine.cancel()
    error = info.value
    assert [m.name for m in error.cancelled] == ["cut"]
    assert error.dropped == ()
    assert all_counts(error.statistics) == expected(cancelled=2, dropped=1)


async def test_cancel_after_the_cut_off_began_leaves_the_job_to_the_report(
    autojump_clock: trio.testing.MockClock,
) -> None:
    jobs: list[BackgroundJob[Any]] = []

    async def stubborn() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                jobs[0].cancel()  # the cut-off is already cancelling it
                await trio.sleep(1)

    with pytest.raises(BackgroundShutdownError) as info:
        async with open_background_runtime(config(drain_timeout=1)) as runtime:
            jobs.append(runtime.handle().spawn(stubborn, name="stubborn"))
    assert [m.name for m in info.value.cancelled] == ["stubborn"]


def test_cancel_from_another_thread_is_refused() -> None:
    async def main() -> None:
        async with open_background_runtime(config()) as runtime:
            job = runtime.handle().spawn(trio.sleep_forever)
            with pytest.raises(RuntimeError, match=r"trio\.from_thread\.run_sync\(job\.cancel\)"):
                await trio.to_thread.run_sync(job.cancel)
            assert job.status == "running"
            await trio.to_thread.run_sync(trio.from_thread.run_sync, job.cancel)
            assert job.status in ("running", "cancelled")

    trio.run(main)


# -- wait() ---------------------------------------------------------------------------------


async def test_wait_raises_the_jobs_own_exception_which_is_still_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    raised: list[BaseException] = []

    async def fails() -> None:
        try:
            empty: dict[str, int] = {}
            empty["key"]
        except KeyError:
            error = ValueError("broken")
            raised.append(error)
            raise error from None

    async with open_background_runtime(config()) as runtime:
        job = runtime.handle().spawn(fails, name="fails")
        for _ in range(2):
            try:
                raise LookupError("the waiter's own")
            except LookupError:
                with pytest.raises(ValueError, match="broken") as info:
                    await job.wait()
            assert info.value is raised[0]
            assert info.value.__suppress_context__
            assert isinstance(info.value.__context__, KeyError)  # not the waiter's error
    [error] = records(caplog, logging.ERROR)
    assert exc_of(error) is raised[0]
    assert all_counts(runtime.statistics()) == expected(failed=1)


async def test_wait_for_timed_out_and_cut_off_jobs(autojump_clock: trio.testing.MockClock) -> None:
    jobs: list[BackgroundJob[Any]] = []
    with pytest.raises(BackgroundShutdownError):
        async with open_background_runtime(
            config(max_concurrent_tasks=2, drain_timeout=10)
        ) as runtime:
            handle = runtime.handle()
            jobs.append(handle.spawn(trio.sleep_forever, timeout=1, name="slow"))
            jobs.append(handle.spawn(trio.sleep_forever, name="cut"))
            jobs.append(handle.spawn(trio.sleep_forever, name="never"))
            jobs.append(handle.spawn(trio.sleep_forever, name="never"))
    slow, cut, _, _ = jobs
    # "slow" times out at 1 s and the first "never" takes its slot; the deadline cuts off
    # "cut" and that one, and drops the other.
    assert [j.status for j in jobs] == ["timed_out", "cancelled", "cancelled", "dropped"]
    with pytest.raises(JobTimeoutError) as timeout_info:
        await slow.wait()
    assert timeout_info.value.job == slow.metadata
    assert str(timeout_info.value) == "background job 'slow' timed out"
    with pytest.raises(JobCancelledError) as cancel_info:
        await cut.wait()
    assert cancel_info.value.job == cut.metadata
    with pytest.raises(JobCancelledError, match="dropped without running"):
        await jobs[3].wait()
    assert issubclass(JobCancelledError, Exception)
    assert issubclass(JobTimeoutError, Exception)


async def test_wait_is_a_checkpoint_even_for_a_finished_job() -> None:
    async with open_background_runtime(config()) as runtime:
        job = runtime.handle().spawn(returns, 1)
        await runtime.wait_idle()
        with trio.CancelScope() as scope:
            scope.cancel()
            await job.wait()
        assert scope.cancelled_caught


async def test_many_waiters_and_a_waiter_in_another_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    results: list[object] = []

    async def slow() -> str:
        await trio.sleep(5)
        return "value"

    async with open_background_runtime(config()) as runtime:
        handle = runtime.handle()
        target = handle.spawn(slow)

        async def waiter() -> None:
            results.append(await target.wait())

        async def impatient() -> None:
            with trio.move_on_after(1):
                results.append(await target.wait())
            results.append("gave up")

        handle.spawn(waiter)  # a job waiting for a job
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(waiter)
            nursery.start_soon(impatient)
    assert results == ["gave up", "value", "value", "value", "value"]
    assert target.status == "completed"


# -- current_job() --------------------------------------------------------------------------


async def test_current_job_is_the_jobs_own_handle_in_the_job_and_its_tasks() -> None:
    seen: list[BackgroundJob[Any]] = []

    async def child() -> None:
        seen.append(current_job())

    async def job() -> None:
        seen.append(current_job())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)

    async with open_background_runtime(config()) as runtime:
        handle = runtime.handle()
        one = handle.spawn(job)
        two = handle.spawn(job)
        await runtime.wait_idle()
        with pytest.raises(RuntimeError, match="inside a background job"):
            current_job()
    assert seen.count(one) == 2
    assert seen.count(two) == 2


async def test_a_job_submitted_from_a_job_is_its_own_current_job_and_its_hooks_see_no_job() -> None:
    in_hook: list[str] = []

    class Hook:
        def job_accepted(self, job: BackgroundJobMetadata) -> None:
            if job.name == "child":
                try:
                    current_job()
                except RuntimeError:
                    in_hook.append("no current job")

    children: list[BackgroundJob[Any]] = []
    seen: list[BackgroundJob[Any]] = []

    async def child() -> None:
        seen.append(current_job())

    async def parent() -> None:
        children.append(current_job_handle.spawn(child, name="child"))
        seen.append(current_job())

    async with open_background_runtime(
        config(max_concurrent_tasks=1), instruments=[Hook()]
    ) as runtime:
        current_job_handle = runtime.handle()
        parent_job = current_job_handle.spawn(parent)
        await runtime.wait_idle()
    assert seen == [parent_job, children[0]]
    assert in_hook == ["no current job"]


# -- memory ---------------------------------------------------------------------------------


class Thing:
    """Something a job holds, to watch with a weak reference."""


async def test_a_finished_job_keeps_only_its_result_and_only_while_its_handle_is_held() -> None:
    var: contextvars.ContextVar[Thing] = contextvars.ContextVar("var")

    class Job:
        async def __call__(self, arg: Thing) -> Thing:
            return Thing()

    fn, arg, value = Job(), Thing(), Thing()
    refs: dict[str, weakref.ref[Any]] = {
        "fn": weakref.ref(fn),
        "arg": weakref.ref(arg),
        "context value": weakref.ref(value),
    }
    async with open_background_runtime(config()) as runtime:
        var.set(value)
        job = runtime.handle().spawn(fn, arg)
        var.set(Thing())
        del fn, arg, value
        await runtime.wait_idle()
        gc.collect()
        assert {name: ref() is None for name, ref in refs.items()} == dict.fromkeys(refs, True)
        value_ = await job.wait()
        result = weakref.ref(value_)  # the result lives as long as the handle
        del value_
        gc.collect()
        assert result() is not None
        del job
        assert result() is None  # no collection needed: no cycle holds it
    assert result() is None


async def test_a_failed_jobs_exception_lives_only_as_long_as_its_handle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The log records pytest keeps would hold the exception: no record is made.
    monkeypatch.setattr(logging.getLogger("trio_background"), "disabled", True)

    class Boom(ValueError):
        pass

    async def fails(arg: Thing) -> None:
        raise Boom("no")

    gc.collect()
    gc.disable()  # any reference cycle would keep these alive
    try:
        async with open_background_runtime(config()) as runtime:
            arg = Thing()
            job = runtime.handle().spawn(fails, arg)
            await runtime.wait_idle()
            with pytest.raises(ValueError, match="no") as info:
                await job.wait()
            error = weakref.ref(info.value)
            del info
            assert error() is not None
            watched = weakref.ref(arg)
            del arg
            assert watched() is not None  # the traceback holds the job's frame, and its args
            del job
            assert error() is None
            assert watched() is None
    finally:
        gc.enable()


async def test_a_queued_job_from_a_finished_job_does_not_keep_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    handle_box: list[Any] = []

    async def parent() -> Thing:
        handle_box[0].spawn(gate.wait)  # queued behind the blocker, outlives this job
        return Thing()

    async with open_background_runtime(config(max_concurrent_tasks=2)) as runtime:
        handle_box.append(runtime.handle())
        handle_box[0].spawn(gate.wait)
        job = handle_box[0].spawn(parent)
        await trio.testing.wait_all_tasks_blocked()
        assert runtime.statistics().accepted == 3  # the one the parent submitted is alive
        result = weakref.ref(await job.wait())
        del job
        gc.collect()
        assert result() is None
        gate.set()


async def test_a_cancelled_queued_job_forgets_its_function_and_arguments_at_once() -> None:
    async with open_background_runtime(config(max_concurrent_tasks=1)) as runtime:
        handle = runtime.handle()
        handle.spawn(trio.sleep, 0)
        arg = Thing()
        watched = weakref.ref(arg)
        job = handle.spawn(returns, arg)
        del arg
        job.cancel()
        gc.collect()
        assert watched() is None
        assert job.status == "dropped"


# -- failures leaving the block -------------------------------------------------------------


async def test_a_keyboard_interrupt_waited_for_leaves_the_block_once() -> None:
    async def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        async with open_background_runtime(config()) as runtime:
            job = runtime.handle().spawn(interrupted)
            await job.wait()
    assert type(info.value) is KeyboardInterrupt


# -- the recipes in the docs ----------------------------------------------------------------


async def test_the_wait_with_a_deadline_recipe(autojump_clock: trio.testing.MockClock) -> None:
    # docs/recipes.rst: waiting gives up at the deadline; the job runs on to the end.
    async def build_report(seconds: float) -> str:
        await trio.sleep(seconds)
        return "url"

    async def handle_export(handle: Any, seconds: float) -> tuple[int, str]:
        job = handle.spawn(build_report, seconds, name="build_report")
        with trio.move_on_after(2.0):
            try:
                url = await job.wait()
            except JobTimeoutError:
                return (504, "too long")
            except JobCancelledError:
                return (503, "cancelled")
            return (200, url)
        return (202, f"still working: {job.status}")

    async with open_background_runtime(config(job_timeout=10)) as runtime:
        handle = runtime.handle()
        assert await handle_export(handle, 1) == (200, "url")
        assert await handle_export(handle, 5) == (202, "still working: running")
        await runtime.wait_idle()
        assert runtime.statistics().completed == 2  # the slow one finished all the same
        assert await handle_export(handle, 30) == (202, "still working: running")
        await runtime.wait_idle()
        assert runtime.statistics().timed_out == 1


# -- regressions: what an adversarial review found ------------------------------------------


def test_wait_from_another_thread_is_refused_and_the_runtime_is_unharmed() -> None:
    async def main() -> None:
        async with open_background_runtime(config()) as runtime:
            gate = trio.Event()
            job = runtime.handle().spawn(gate.wait)

            def other_thread() -> None:
                trio.run(job.wait)  # another Trio run, in another thread

            with pytest.raises(RuntimeError, match=r"trio\.from_thread\.run\(job\.wait\)"):
                await trio.to_thread.run_sync(other_thread)
            gate.set()
            await job.wait()
        assert all_counts(runtime.statistics()) == expected(completed=1)

    trio.run(main)


async def test_a_job_cannot_wait_for_itself() -> None:
    async def selfish() -> str:
        with pytest.raises(RuntimeError, match="cannot wait for itself"):
            await current_job().wait()

        async def child() -> None:
            with pytest.raises(RuntimeError, match="cannot wait for itself"):
                await current_job().wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
        return "fine"

    async with open_background_runtime(config()) as runtime:
        job = runtime.handle().spawn(selfish)
        assert await job.wait() == "fine"


async def test_waiting_again_does_not_pile_up_the_waiters_frames() -> None:
    async def fails() -> None:
        raise ValueError("no")

    def depth(tb: Any) -> int:
        n = 0
        while tb is not None:
            n, tb = n + 1, tb.tb_next
        return n

    async with open_background_runtime(config()) as runtime:
        job = runtime.handle().spawn(fails)
        await runtime.wait_idle()
        depths = []
        for _ in range(4):
            with pytest.raises(ValueError, match="no") as info:
                await job.wait()
            depths.append(depth(info.value.__traceback__))
        assert len(set(depths)) == 1, depths


async def test_the_default_name_is_read_at_submit_time_outside_the_bookkeeping() -> None:
    # A callable whose __qualname__ is computed: it runs in spawn(), before anything is
    # counted; nothing of the runtime's runs while the counters are half-updated.
    seen: list[Any] = []

    class Callable_:
        def __getattr__(self, name: str) -> str:
            if name == "__qualname__":
                seen.append(runtime.statistics())
                return "computed"
            raise AttributeError(name)

        async def __call__(self) -> None:
            pass

    async with open_background_runtime(config()) as runtime:
        job = runtime.handle().spawn(Callable_())
        assert [s.accepted for s in seen] == [0]
        await runtime.wait_idle()
        assert len(seen) == 1
        assert job.metadata.name == "computed"
        check_invariants(runtime.statistics())


async def test_a_job_cancelled_before_its_code_ran_stays_cancelled_through_a_cut_off() -> None:
    recorder = Recorder()
    with pytest.raises(BackgroundShutdownError) as info:
        async with open_background_runtime(
            config(max_concurrent_tasks=2, drain_timeout=0), instruments=[recorder]
        ) as runtime:
            handle = runtime.handle()
            mine = handle.spawn(trio.sleep_forever, name="mine")
            handle.spawn(trio.sleep_forever, name="cut")
            mine.cancel()  # its task has not run yet; the cut-off comes before it does
    assert mine.status == "cancelled"
    assert [m.name for m in info.value.cancelled] == []  # "cut" never ran: dropped
    assert [m.name for m in info.value.dropped] == ["cut"]
    assert all_counts(info.value.statistics) == expected(cancelled=1, dropped=1)
    assert [c for c in recorder.pairs() if c[1] == "mine"] == [
        ("accepted", "mine"),
        ("started", "mine"),
        ("finished", "mine"),
    ]


def test_a_keyboard_interrupt_in_a_log_handler_reports_admitted_senders_before_dropping() -> None:
    # A failing job's hand-off accepts a waiting send()'s job; the log handler for the
    # failure then raises KeyboardInterrupt, which cuts the runtime off and drops that job.
    # Instruments must see it accepted before they see it dropped.
    recorder = Recorder()

    class Interrupting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.ERROR:
                raise KeyboardInterrupt

    async def fails() -> None:
        await trio.sleep(1)
        raise ValueError("no")

    async def main() -> None:
        cfg = config(max_concurrent_tasks=1, max_queue_size=0)
        async with open_background_runtime(cfg, instruments=[recorder]) as runtime:
            handle = runtime.handle()
            handle.spawn(fails, name="f")
            await handle.send(trio.sleep_forever, name="w")

    logger = logging.getLogger("trio_background")
    handler = Interrupting()
    logger.addHandler(handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logger.removeHandler(handler)
    w_calls = [hook for hook, name in recorder.pairs() if name == "w"]
    assert w_calls[0] == "accepted"
    assert "dropped" in w_calls or "finished" in w_calls


def test_a_keyboard_interrupt_from_a_job_leaves_bare_when_the_body_has_a_nursery() -> None:
    async def interrupted() -> None:
        raise KeyboardInterrupt

    async def main() -> None:
        async with open_background_runtime(config()) as runtime, trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)  # two tasks: a group of Cancelled
            nursery.start_soon(trio.sleep_forever)
            runtime.handle().spawn(interrupted)

    with pytest.raises(KeyboardInterrupt) as info:
        trio.run(main)
    assert type(info.value) is KeyboardInterrupt


def test_a_closed_runtime_keeps_nothing_of_a_job_that_raised_keyboard_interrupt() -> None:
    things = [Thing()]
    watched = weakref.ref(things[0])
    box: list[BackgroundRuntime] = []

    async def interrupted(thing: Thing) -> None:
        raise KeyboardInterrupt

    async def main() -> None:
        async with open_background_runtime(config()) as runtime:
            box.append(runtime)
            runtime.handle().spawn(interrupted, things.pop())

    with pytest.raises(KeyboardInterrupt):
        trio.run(main)
    gc.collect()
    assert box  # the runtime is still referenced here
    assert watched() is None


@pytest.mark.parametrize(
    "line", ["lane.nursery = nursery", "lane.start_task = ", "self.start(starting, lane)"]
)
def test_ctrl_c_while_a_slot_starts_leaves_the_block_and_strands_nothing(line: str) -> None:
    # A real SIGINT (Trio's handler decides where it lands) on a line of the code that
    # opens a slot's nursery and starts its first job.
    import linecache
    import signal
    import sys

    from trio_background import _admission

    target = _admission.Admission.host_lane.__code__
    fired: list[bool] = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        source = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        if event == "line" and not fired and line in source:
            fired.append(True)
            signal.raise_signal(signal.SIGINT)
        return local

    def trace(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code is target else None

    async def returns_one() -> int:
        return 1

    box: list[BackgroundRuntime] = []

    async def main() -> None:
        async with open_background_runtime(config()) as runtime:
            box.append(runtime)
            old = sys.gettrace()
            sys.settrace(trace)
            try:
                runtime.handle().spawn(returns_one)
                await trio.sleep(0.1)
            finally:
                sys.settrace(old)

    with pytest.raises(KeyboardInterrupt) as info:
        trio.run(main)
    assert fired
    assert type(info.value) is KeyboardInterrupt
    stats = box[0].statistics()
    check_invariants(stats)
    assert (stats.queued, stats.running) == (0, 0)


async def test_a_job_whose_task_could_not_start_keeps_nothing_of_other_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # "b" gets its slot from "a"; starting b's task raises. b's handle keeps b's exception
    # (without the runtime's frames, which would hold "a" and a's result), and no cycle.
    real = trio.Nursery.start_soon
    starts = 0

    class StartFailure(MemoryError):
        pass

    def start_soon(self: trio.Nursery, *args: Any, **kwargs: Any) -> None:
        nonlocal starts
        if kwargs.get("name") == "trio_background job":
            starts += 1
            if starts == 2:
                raise StartFailure("no room for a task")
        real(self, *args, **kwargs)

    monkeypatch.setattr(trio.Nursery, "start_soon", start_soon)
    monkeypatch.setattr(logging.getLogger("trio_background"), "disabled", True)
    things = [Thing()]
    arg = weakref.ref(things[0])

    async def producer(thing: Thing) -> Thing:
        return Thing()

    gc.collect()
    gc.disable()
    try:
        async with open_background_runtime(config(max_concurrent_tasks=1)) as runtime:
            handle = runtime.handle()
            a = handle.spawn(producer, things.pop(), name="a")
            b = handle.spawn(returns, "b", name="b")
            result = weakref.ref(await a.wait())
            del a
            await runtime.wait_idle()
        assert b.status == "failed"
        assert result() is None
        assert arg() is None
        with pytest.raises(StartFailure) as info:
            await b.wait()
        error = weakref.ref(info.value)
        del info, b
        assert error() is None
    finally:
        gc.enable()


def test_cancel_after_the_cut_off_leaves_an_unstarted_job_to_the_cut_off() -> None:
    recorder = Recorder()
    jobs: list[BackgroundJob[Any]] = []

    async def main() -> None:
        async with open_background_runtime(config(), instruments=[recorder]) as runtime:
            jobs.append(runtime.handle().spawn(trio.sleep_forever, name="late"))
            runtime._runtime.shutdown.cut_off()  # as when the body raises, before it runs
            jobs[0].cancel()  # the cut-off already owns it

    trio.run(main)
    assert jobs[0].status == "dropped"
    assert [hook for hook, name in recorder.pairs() if name == "late"] == ["accepted", "dropped"]


async def test_a_rejected_spawn_leaves_no_reference_cycle() -> None:
    gc.collect()
    gc.disable()
    try:
        async with open_background_runtime(config(max_concurrent_tasks=1, max_queue_size=0)) as rt:
            handle = rt.handle()
            handle.spawn(trio.sleep, 0)
            arg = Thing()
            watched = weakref.ref(arg)
            with pytest.raises(QueueFullError) as info:
                handle.spawn(returns, arg)
            error = weakref.ref(info.value)
            del info, arg
            assert error() is None
            assert watched() is None
    finally:
        gc.enable()
