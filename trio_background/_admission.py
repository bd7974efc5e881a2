"""Admission and hand-off: the queue, the slots, waiting senders, and passing a slot on."""

from __future__ import annotations

import contextvars
import functools
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import trio
from trio.lowlevel import enable_ki_protection

from ._exceptions import QueueFullError, RuntimeClosedError
from ._job import _CURRENT, DROPPED, FAILED, STARTING, capture_context
from ._shutdown import Phase

if TYPE_CHECKING:
    from ._job import BackgroundJob
    from ._runtime import Runtime

    Job = BackgroundJob[Any]

_TASK_NAME = "trio_background job"
_LANE_TASK_NAME = "trio_background slot"


class Lane:
    """A slot: a token of the runtime's limiter, and a nursery for its jobs' tasks.

    The token of the runtime's `trio.CapacityLimiter` is borrowed on behalf of this
    object. The nursery is a slot's own, so that `BackgroundJob.cancel` can cancel the one job
    running in it (its cancel scope encloses that job's task and no other job's) at no
    cost to jobs that are never cancelled: a cancel scope of their own would cost about
    as much as their task. A lane whose job was cancelled is dead: it is never used
    again, and its host task ends once that job has unwound.
    """

    __slots__ = ("alive", "nursery", "start_task")

    def __init__(self) -> None:
        self.alive = True
        self.nursery: trio.Nursery | None = None
        #: ``nursery.start_soon(runtime.run, job)``, once the lane's host task has run.
        self.start_task: functools.partial[None] | None = None

    def kill(self) -> None:
        """Cancel the job running in this lane; the lane is not used again."""
        self.alive = False
        if self.nursery is not None:  # (None: its host task has ended already)
            self.nursery.cancel_scope.cancel()


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

    The queue is a doubly linked list threaded through the queued jobs themselves: FIFO,
    with removal from the middle (`BackgroundJob.cancel`) in constant time and a bound,
    ``max_queue_size``, that can change while it runs. ``queued`` counts its jobs. A slot
    is a `Lane`: when a job ends and another is queued, the lane goes straight to that
    job, its limiter token neither released nor borrowed again.
    """

    __slots__ = (
        "accepted",
        "excess",
        "free_lanes",
        "head",
        "last_seq",
        "limiter",
        "max_concurrent_tasks",
        "max_queue_size",
        "nursery",
        "queued",
        "rejected",
        "runtime",
        "tail",
        "waiters",
    )

    def __init__(self, runtime: Runtime, max_queue_size: int, max_concurrent_tasks: int) -> None:
        self.runtime = runtime
        self.max_queue_size = max_queue_size
        self.max_concurrent_tasks = max_concurrent_tasks
        self.limiter = trio.CapacityLimiter(max_concurrent_tasks)
        #: The queue's first and last jobs.
        self.head: Job | None = None
        self.tail: Job | None = None
        #: Lanes whose host task runs and that no job holds, for the next job to take.
        self.free_lanes: list[Lane] = []
        #: Tasks blocked in send(), in arrival order, each with the job it submits.
        self.waiters: OrderedDict[trio.lowlevel.Task, Job] = OrderedDict()
        self.queued = 0
        #: Running jobs beyond max_concurrent_tasks after a shrink: their slots go back.
        self.excess = 0
        #: Successful spawn()/send() calls: counted here, never derived from other counters.
        self.accepted = 0
        self.rejected = 0
        self.last_seq = 0
        #: Where the lanes' host tasks run: the jobs' nursery.
        self.nursery: trio.Nursery | None = None

    def open(self, nursery: trio.Nursery) -> None:
        """Run the lanes' host tasks in ``nursery`` from now on."""
        self.nursery = nursery

    def is_idle(self) -> bool:
        return not self.queued and not self.limiter.borrowed_tokens

    # -- the queue ----------------------------------------------------------------------

    def push(self, job: Job) -> None:
        tail = self.tail
        job._prev = tail
        if tail is None:
            self.head = job
        else:
            tail._next = job
        self.tail = job
        self.queued += 1

    def pop(self) -> Job:
        job = self.head
        assert job is not None
        following = job._next
        self.head = following
        if following is None:
            self.tail = None
        else:
            following._prev = None
            job._next = None
        self.queued -= 1
        return job

    def unlink(self, job: Job) -> None:
        before, after = job._prev, job._next
        if before is None:
            self.head = after
        else:
            before._next = after
        if after is None:
            self.tail = before
        else:
            after._prev = before
        job._prev = job._next = None
        self.queued -= 1

    # -- accepting --------------------------------------------------------------------

    def try_accept(self, job: Job) -> bool:
        """Start ``job`` or queue it; False when it can neither start nor wait.

        Atomic: if this raises, nothing was accepted, counted or taken.
        """
        runtime = self.runtime
        if runtime.shutdown.phase is not Phase.OPEN:
            raise RuntimeClosedError
        # Every step that can fail comes before the first change of state. A task started
        # for a job that then fails to get its slot finds the job not STARTING and returns.
        if not self.queued and self.limiter.borrowed_tokens < self.max_concurrent_tasks:
            free = self.free_lanes
            lane = free.pop() if free else Lane()
            try:
                self.start(job, lane)
                self.limiter.acquire_on_behalf_of_nowait(lane)
            except BaseException:
                if lane.start_task is not None:
                    free.append(lane)
                raise
            job._slot = lane
            job._state = STARTING
        elif self.queued < self.max_queue_size:
            job._context = context = contextvars.copy_context()
            if _CURRENT.get(None) is not None:  # (capture_context, inline)
                context.run(_CURRENT.set, None)
            self.push(job)
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
        try:
            if "job_rejected" in instruments.hooks:
                try:
                    contextvars.copy_context().run(instruments.call, "job_rejected", job._meta())
                except BaseException as exc:  # the call itself failed (say, RecursionError)
                    raise error from exc
            raise error
        finally:
            del error  # this frame is in its traceback: no reference cycle through it

    @enable_ki_protection
    async def send(self, job: Job) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.try_accept(job):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        job._context = capture_context()
        task = trio.lowlevel.current_task()
        waiters = self.waiters
        waiters[task] = job

        def abort_fn(_: object) -> trio.lowlevel.Abort:
            del waiters[task]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort_fn)
        if not job._seq:
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
        job._seq = self.last_seq
        self.accepted += 1

    def refuse_waiters(self) -> None:
        """Wake every waiting send(); each finds its job unaccepted and raises."""
        waiters = list(self.waiters)
        self.waiters.clear()
        for task in waiters:
            trio.lowlevel.reschedule(task)

    # -- starting and handing on ------------------------------------------------------

    def start(self, job: Job, lane: Lane) -> None:
        """Start ``job``'s task in ``lane``, or raise having started nothing.

        The task does nothing unless the caller then gives the job the lane and makes it
        STARTING, in the same synchronous step.
        """
        context = job._context
        if context is None:
            context = job._context = contextvars.copy_context()
            if _CURRENT.get(None) is not None:  # (capture_context, inline)
                context.run(_CURRENT.set, None)
        if lane.start_task is not None:
            context.run(lane.start_task, job)  # the task runs in a copy of the job's context
        else:
            # A new lane: its host task opens the lane's nursery, then starts the job. It
            # runs in a context of its own: it outlives the job and must not keep the
            # job's context alive.
            assert self.nursery is not None
            start = functools.partial(self.nursery.start_soon, name=_LANE_TASK_NAME)
            contextvars.Context().run(start, self.host_lane, lane, job)

    @enable_ki_protection
    async def host_lane(self, lane: Lane, job: Job) -> None:
        """The host task of ``lane``: owns its nursery until the lane dies or the runtime ends.

        KI-protected: Ctrl-C must not come between the lane's start and its first job's.
        """
        first: Job | None = job
        del job  # the lane outlives its first job: hold nothing of it
        try:
            async with trio.open_nursery() as nursery:
                lane.nursery = nursery
                lane.start_task = functools.partial(
                    nursery.start_soon,
                    self.runtime.run,  # type: ignore[arg-type]
                    name=_TASK_NAME,
                )
                starting, first = first, None
                assert starting is not None
                try:
                    self.start(starting, lane)
                except BaseException as exc:  # e.g. MemoryError: that job fails, counted
                    self.runtime.start_failed(starting, exc)
                del starting
                await trio.sleep_forever()
        except BaseException as exc:
            if first is not None:  # the nursery could not be opened: the job fails
                lane.alive = False
                self.runtime.start_failed(first, exc)
                del first
            raise
        finally:
            lane.alive = False
            lane.start_task = None
            lane.nursery = None

    def take(self, job: Job, lane: Lane | None, events: HandOff | None) -> HandOff | None:
        """Start ``job`` on ``lane``, or on a free or new lane if None or dead.

        The lane's token is held (a dead lane's is moved to the new lane).
        """
        if lane is None or not lane.alive:
            if lane is not None:
                self.limiter.release_on_behalf_of(lane)
            free = self.free_lanes
            lane = free.pop() if free else Lane()
            self.limiter.acquire_on_behalf_of_nowait(lane)
        try:
            self.start(job, lane)
        except BaseException as exc:  # e.g. MemoryError: that job fails, counted
            return self.start_failure(job, lane, exc, events)
        job._slot = lane
        job._state = STARTING
        return events

    def start_failure(
        self, job: Job, lane: Lane, exc: BaseException, events: HandOff | None
    ) -> HandOff:
        """Count ``job``, whose task could not be started, failed; give ``lane`` back."""
        self.runtime.failed += 1
        job._end(FAILED, (exc, None))  # (its traceback: see report_start_failure)
        self.give_back(lane)
        events = events or HandOff()
        events.failed_to_start.append((job, exc))
        return events

    def hand_off(self, job: Job) -> HandOff | None:
        """Pass the slot of ``job``, which has ended, to the next queued job, if any.

        A slot is released only when no job can take it (or the slots were shrunk
        below the jobs running). Returns what needs reporting: jobs of waiting
        ``send()`` calls accepted just now, and jobs whose task could not be started
        (now counted failed); None if nothing.
        """
        lane = job._slot
        job._slot = None
        events: HandOff | None = None
        if not self.excess and self.runtime.shutdown.phase is not Phase.CUT_OFF:
            if self.queued:
                following = self.pop()
                if self.waiters and self.queued < self.max_queue_size:
                    admitted = self.admit_waiter()
                    self.push(admitted)
                    events = HandOff()
                    events.admitted.append(admitted)
            elif self.waiters:  # only with a queue of size 0: straight to a slot
                following = self.admit_waiter()
                events = HandOff()
                events.admitted.append(following)
            else:
                self.give_back(lane)
                return None
            if lane.alive:
                try:
                    self.start(following, lane)
                except BaseException as exc:  # e.g. MemoryError: that job fails, counted
                    return self.refill(self.start_failure(following, lane, exc, events))
                following._slot = lane
                following._state = STARTING
                return events
            return self.refill(self.take(following, lane, events))
        self.give_back(lane)
        return events

    def refill(self, events: HandOff | None = None) -> HandOff | None:
        """Start queued jobs on free slots, then accept waiting senders into free places.

        For when slots or places were freed other than by a job ending: a resize, a
        cancelled job, a failed start.
        """
        if self.runtime.shutdown.phase is Phase.CUT_OFF:
            return events
        while self.limiter.borrowed_tokens < self.max_concurrent_tasks:
            if self.queued:
                following = self.pop()
            elif self.waiters:
                following = self.admit_waiter()
                events = events or HandOff()
                events.admitted.append(following)
            else:
                break
            events = self.take(following, None, events)
        while self.waiters and self.queued < self.max_queue_size:
            admitted = self.admit_waiter()
            self.push(admitted)
            events = events or HandOff()
            events.admitted.append(admitted)
        return events

    def withdraw(self, job: Job) -> HandOff | None:
        """Take the queued ``job`` out of the queue, counted dropped; its place is free."""
        self.unlink(job)
        self.runtime.dropped += 1
        job._end(DROPPED)
        events = self.refill()
        if self.is_idle():
            self.runtime.shutdown.became_idle()
        return events

    def resize(
        self, max_concurrent_tasks: int | None, max_queue_size: int | None
    ) -> HandOff | None:
        """Change the limits; start and accept what the new room allows."""
        if max_queue_size is not None:
            self.max_queue_size = max_queue_size
        if max_concurrent_tasks is not None:
            self.limiter.total_tokens = max_concurrent_tasks
            self.max_concurrent_tasks = max_concurrent_tasks
            self.excess = max(0, self.limiter.borrowed_tokens - max_concurrent_tasks)
            surplus = len(self.free_lanes) - max_concurrent_tasks
            for _ in range(max(0, surplus)):
                self.free_lanes.pop().kill()
        return self.refill()

    def release(self, job: Job) -> None:
        """Give back the slot of ``job``, which ends without handing it on."""
        lane = job._slot
        job._slot = None
        self.give_back(lane)

    def give_back(self, lane: Lane) -> None:
        """Release ``lane``'s token: no job takes it. The runtime may be idle now."""
        self.limiter.release_on_behalf_of(lane)
        if self.excess:  # (the slots were shrunk below the jobs running)
            self.excess = max(0, self.limiter.borrowed_tokens - self.max_concurrent_tasks)
        if lane.alive and lane.start_task is not None:
            # Lanes in use and free ones together stay within the slots (after a shrink too).
            if len(self.free_lanes) + self.limiter.borrowed_tokens < self.max_concurrent_tasks:
                self.free_lanes.append(lane)
            else:
                lane.kill()
        if self.is_idle():
            self.runtime.shutdown.became_idle()
