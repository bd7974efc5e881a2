"""Admission and hand-off: the queue, the slots, waiting senders, and passing a slot on."""

from __future__ import annotations

import contextvars
import functools
from collections import OrderedDict
from typing import TYPE_CHECKING

import trio
from trio.lowlevel import enable_ki_protection

from ._exceptions import QueueFullError, RuntimeClosedError
from ._job import FAILED, RUNNING, Job
from ._shutdown import Phase

if TYPE_CHECKING:
    from ._runtime import Runtime

_TASK_NAME = "trio_background job"


class HandOff:
    """What a hand-off did that must be reported once the bookkeeping is complete."""

    __slots__ = ("admitted", "failed_to_start")

    def __init__(self) -> None:
        #: Jobs of waiting send() calls accepted into the room the hand-off made.
        self.admitted: list[Job] = []
        #: Jobs whose task could not be started (counted failed), with the error.
        self.failed_to_start: list[tuple[Job, BaseException]] = []


class Admission:
    """Where accepted jobs wait for a slot, and how a freed slot is handed on.

    The queue is a trio memory channel used only through its ``*_nowait`` methods;
    ``queued`` counts the jobs in its buffer and never passes ``max_queue_size``, so
    nobody ever blocks on it. A slot is a token of a `trio.CapacityLimiter`, borrowed on
    behalf of a slot object that running jobs pass on: when a job ends and another is
    queued, the slot goes straight to that job without being released and borrowed again.
    """

    __slots__ = (
        "accepted",
        "last_seq",
        "limiter",
        "max_concurrent_tasks",
        "max_queue_size",
        "queued",
        "receive_channel",
        "rejected",
        "runtime",
        "send_channel",
        "start_task",
        "waiters",
    )

    def __init__(self, runtime: Runtime, max_queue_size: int, max_concurrent_tasks: int) -> None:
        self.runtime = runtime
        self.max_queue_size = max_queue_size
        self.max_concurrent_tasks = max_concurrent_tasks
        self.send_channel, self.receive_channel = trio.open_memory_channel[Job](max_queue_size)
        self.limiter = trio.CapacityLimiter(max_concurrent_tasks)
        #: Tasks blocked in send(), in arrival order, each with the job it submits.
        self.waiters: OrderedDict[trio.lowlevel.Task, Job] = OrderedDict()
        self.queued = 0
        #: Successful spawn()/send() calls: counted here, never derived from other counters.
        self.accepted = 0
        self.rejected = 0
        self.last_seq = 0
        self.start_task: functools.partial[None] | None = None

    def open(self, nursery: trio.Nursery) -> None:
        """Start jobs' tasks in ``nursery`` from now on."""
        # A partial (no Python frame per call); mypy cannot see through the bound args.
        self.start_task = functools.partial(
            nursery.start_soon,
            self.runtime.run,  # type: ignore[arg-type]
            name=_TASK_NAME,
        )

    def is_idle(self) -> bool:
        return not self.queued and not self.limiter.borrowed_tokens

    # -- accepting --------------------------------------------------------------------

    def try_accept(self, job: Job) -> bool:
        """Start ``job`` or queue it; False when it can neither start nor wait.

        Atomic: if this raises, nothing was accepted, counted or taken.
        """
        runtime = self.runtime
        if runtime.shutdown.phase is not Phase.OPEN:
            raise RuntimeClosedError
        # Every step that can fail comes before the first change of state. A task started
        # for a job that then fails to get its slot finds the job not RUNNING and returns.
        if not self.queued and self.limiter.borrowed_tokens < self.max_concurrent_tasks:
            slot = object()
            self.start(job)
            self.limiter.acquire_on_behalf_of_nowait(slot)
            job.slot = slot
            job.status = RUNNING
        elif self.queued < self.max_queue_size:
            job.context = contextvars.copy_context()
            self.send_channel.send_nowait(job)
            self.queued += 1
        else:
            return False
        self.count_accepted(job)
        if "job_accepted" in runtime.instruments.hooks:
            runtime.call_hook(job, "job_accepted")
        return True

    @enable_ki_protection
    def spawn(self, job: Job) -> None:
        if self.try_accept(job):
            return
        error = QueueFullError()
        self.rejected += 1
        instruments = self.runtime.instruments
        if "job_rejected" in instruments.hooks:
            try:
                contextvars.copy_context().run(instruments.call, "job_rejected", job.metadata())
            except BaseException as exc:  # the call itself failed (say, RecursionError)
                raise error from exc
        raise error

    @enable_ki_protection
    async def send(self, job: Job) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.try_accept(job):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        job.context = contextvars.copy_context()
        task = trio.lowlevel.current_task()
        waiters = self.waiters
        waiters[task] = job

        def abort_fn(_: object) -> trio.lowlevel.Abort:
            del waiters[task]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort_fn)
        if not job.seq:
            raise RuntimeClosedError

    def admit_waiter(self) -> Job:
        """Accept the longest-waiting send()'s job; its task wakes up and returns."""
        task, job = self.waiters.popitem(last=False)
        self.count_accepted(job)
        trio.lowlevel.reschedule(task)
        return job

    def count_accepted(self, job: Job) -> None:
        """Give ``job`` its place in acceptance order and count it: the one place that does."""
        self.last_seq += 1
        job.seq = self.last_seq
        self.accepted += 1

    def refuse_waiters(self) -> None:
        """Wake every waiting send(); each finds its job unaccepted and raises."""
        waiters = list(self.waiters)
        self.waiters.clear()
        for task in waiters:
            trio.lowlevel.reschedule(task)

    # -- starting and handing on ------------------------------------------------------

    def start(self, job: Job) -> None:
        """Start ``job``'s task, or raise having started nothing.

        The task does nothing unless the caller then gives the job a slot and makes it
        RUNNING, in the same synchronous step.
        """
        context = job.context
        if context is None:
            context = job.context = contextvars.copy_context()
        assert self.start_task is not None
        context.run(self.start_task, job)  # the task runs in a copy of the job's context

    def hand_off(self, job: Job) -> HandOff | None:
        """Pass the slot of ``job``, which has ended, to the next queued job, if any.

        A slot is released only when no job can take it. Returns what needs reporting:
        jobs of waiting ``send()`` calls accepted just now, and jobs whose task could not
        be started (now counted failed); None if nothing.
        """
        slot = job.slot
        job.slot = None
        events: HandOff | None = None
        runtime = self.runtime
        if runtime.shutdown.phase is not Phase.CUT_OFF:
            while True:
                if self.queued:
                    following = self.receive_channel.receive_nowait()
                    self.queued -= 1
                    if self.waiters:
                        admitted = self.admit_waiter()
                        self.send_channel.send_nowait(admitted)
                        self.queued += 1
                        events = events or HandOff()
                        events.admitted.append(admitted)
                elif self.waiters:  # only with max_queue_size == 0: straight to a slot
                    following = self.admit_waiter()
                    events = events or HandOff()
                    events.admitted.append(following)
                else:
                    break
                try:
                    self.start(following)
                    following.slot = slot
                    following.status = RUNNING
                except BaseException as exc:  # e.g. MemoryError: that job fails, counted
                    runtime.failed += 1
                    following.status = FAILED
                    events = events or HandOff()
                    events.failed_to_start.append((following, exc))
                    continue
                return events
        self.give_back(slot)
        return events

    def release(self, job: Job) -> None:
        """Give back the slot of ``job``, which ends without handing it on."""
        slot = job.slot
        job.slot = None
        self.give_back(slot)

    def give_back(self, slot: object) -> None:
        """Release ``slot``'s token: no job takes it. The runtime may be idle now."""
        self.limiter.release_on_behalf_of(slot)
        if self.is_idle():
            self.runtime.shutdown.became_idle()
