"""Admission and hand-off: the queue, the slots, waiting senders, and passing a slot on."""

from __future__ import annotations

import contextvars
import functools
import heapq
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import trio
from trio.lowlevel import enable_ki_protection

from ._exceptions import QueueFullError, RuntimeClosedError
from ._job import (
    _CURRENT,
    DROPPED,
    FAILED,
    FINAL,
    QUEUED,
    SCHEDULED,
    STARTING,
    capture_context,
)
from ._shutdown import Phase

if TYPE_CHECKING:
    from ._job import BackgroundJob, Schedule
    from ._runtime import Runtime

    Job = BackgroundJob[Any]

_TASK_NAME = "trio_background job"
_LANE_TASK_NAME = "trio_background slot"
_TIMER_TASK_NAME = "trio_background timers"


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

    __slots__ = ("admitted", "due", "failed_to_start")

    def __init__(self) -> None:
        #: Scheduled jobs that became due (only when an instrument has ``job_due``).
        self.due: list[Job] = []
        #: Jobs of waiting send() calls accepted into the room the hand-off made.
        self.admitted: list[Job] = []
        #: Jobs whose task could not be started (counted failed), with the error.
        self.failed_to_start: list[tuple[Job, BaseException]] = []


#: Where a queued job with a `Schedule` waits (``Schedule.place``).
FIFO = 1  # the ready queue: jobs that can start as soon as a slot is free
RELEASED = 2  # the heap of ready jobs whose key was freed after they became ready
LINE = 3  # its key's line: ready, but another job of the key is ahead of it


class KeyLine:
    """The jobs of one key: the one that holds it, the next in line, and the rest."""

    __slots__ = ("candidate", "head", "holder", "tail")

    def __init__(self) -> None:
        #: The job that holds the key: from its first start until its final outcome.
        self.holder: Job | None = None
        #: The ready job that takes the key next, once free: queued in FIFO or RELEASED.
        self.candidate: Job | None = None
        #: The ready jobs after it, in ready order (linked through the jobs).
        self.head: Job | None = None
        self.tail: Job | None = None

    def is_free(self) -> bool:
        return self.holder is None and self.candidate is None and self.head is None


class Admission:
    """Where accepted jobs wait for a slot, and how a freed slot is handed on.

    Ready jobs wait in the *ready queue*, a doubly linked list threaded through the jobs
    themselves, in ready order: FIFO, with removal from the middle
    (`BackgroundJob.cancel`) in constant time and a bound, ``max_queue_size``, that can
    change while it runs. A job becomes ready when accepted (without a delay) or when due;
    ``_seq`` is its ready order. A job with a delay waits in ``timers``, a heap by due
    time, until then. A job with a key is in the ready queue only while it is its key's
    candidate (see `KeyLine`); the others wait in their key's line, and a candidate chosen
    after it became ready (its key was busy) waits in ``released``, a heap by ready order,
    so that whenever a slot is free the job that starts is the earliest-ready one whose key
    is free. ``taken`` counts the queue places in use: jobs queued or scheduled for their
    first run (retries hold none). A slot is a `Lane`: when a job ends and another can
    start, the lane goes straight to that job, its limiter token neither released nor
    borrowed again.
    """

    __slots__ = (
        "accepted",
        "excess",
        "free_lanes",
        "head",
        "keys",
        "last_seq",
        "limiter",
        "max_concurrent_tasks",
        "max_queue_size",
        "nursery",
        "queued",
        "rejected",
        "released",
        "retrying",
        "runtime",
        "scheduled",
        "tail",
        "taken",
        "timer_scope",
        "timers",
        "waiters",
    )

    def __init__(self, runtime: Runtime, max_queue_size: int, max_concurrent_tasks: int) -> None:
        self.runtime = runtime
        self.max_queue_size = max_queue_size
        self.max_concurrent_tasks = max_concurrent_tasks
        self.limiter = trio.CapacityLimiter(max_concurrent_tasks)
        #: The ready queue's first and last jobs.
        self.head: Job | None = None
        self.tail: Job | None = None
        #: (ready order, schedule) of key candidates chosen after they became ready.
        self.released: list[tuple[int, Schedule]] = []
        #: (due, acceptance order, schedule) of the scheduled jobs; entries of jobs that
        #: left (cancelled, dropped) stay until they surface, holding nothing of the job.
        self.timers: list[tuple[float, int, Schedule]] = []
        #: The cancel scope whose deadline wakes the timer task (None: not started yet).
        self.timer_scope: trio.CancelScope | None = None
        #: Keys with a job holding, about to take, or waiting for them.
        self.keys: dict[str, KeyLine] = {}
        #: Lanes whose host task runs and that no job holds, for the next job to take.
        self.free_lanes: list[Lane] = []
        #: Tasks blocked in send(), in arrival order, each with the job it submits.
        self.waiters: OrderedDict[trio.lowlevel.Task, Job] = OrderedDict()
        self.queued = 0
        self.scheduled = 0
        #: Queue places in use; and retried jobs queued or scheduled (which use none).
        self.taken = 0
        self.retrying = 0
        #: Running jobs beyond max_concurrent_tasks after a shrink: their slots go back.
        self.excess = 0
        #: Successful spawn()/send() calls: counted here, never derived from other counters.
        self.accepted = 0
        self.rejected = 0
        #: The last acceptance or ready order given out (one sequence for both).
        self.last_seq = 0
        #: Where the lanes' host tasks run: the jobs' nursery.
        self.nursery: trio.Nursery | None = None

    def open(self, nursery: trio.Nursery) -> None:
        """Run the lanes' host tasks in ``nursery`` from now on."""
        self.nursery = nursery

    def is_idle(self) -> bool:
        return not self.queued and not self.scheduled and not self.limiter.borrowed_tokens

    # -- the ready queue ----------------------------------------------------------------

    def push(self, job: Job) -> None:
        tail = self.tail
        job._prev = tail
        if tail is None:
            self.head = job
        else:
            tail._next = job
        self.tail = job

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

    def enqueue(self, job: Job) -> None:
        """Make ``job`` (accepted, with its ready order in ``_seq``) wait for a slot."""
        self.queued += 1
        job._state = QUEUED
        sched = job._sched
        if sched is None:
            self.push(job)
            return
        key = sched.key
        if key is None:
            sched.place = FIFO
            self.push(job)
            return
        line = self.keys.get(key)
        if line is None:
            line = self.keys[key] = KeyLine()
        if line.holder is job or line.is_free():  # a retry of the holder, or a free key
            if line.holder is not job:
                line.candidate = job
            sched.place = FIFO
            self.push(job)
            return
        sched.place = LINE
        tail = line.tail
        job._prev = tail
        if tail is None:
            line.head = job
        else:
            tail._next = job
        line.tail = job

    def ready_head(self) -> Job | None:
        """The queued job that starts next when a slot is free, or None; it stays queued."""
        released = self.released
        while released and released[0][1].job is None:  # (left: cancelled or dropped)
            heapq.heappop(released)
        head = self.head
        if released and (head is None or released[0][0] < head._seq):
            return released[0][1].job
        return head

    def pick(self) -> Job | None:
        """Take the queued job that starts next out of the queue (see `ready_head`)."""
        job = self.ready_head()
        if job is None:
            return None
        sched = job._sched
        self.queued -= 1
        if sched is None:
            self.pop()
            self.taken -= 1
            return job
        if sched.place == RELEASED:
            heapq.heappop(self.released)
        else:
            self.unlink(job)
        sched.place = 0
        if sched.key is not None:
            line = self.keys[sched.key]
            if line.candidate is job:
                line.candidate = None
            line.holder = job
        if sched.retried:
            sched.retried = False
            self.retrying -= 1
        else:
            self.taken -= 1
        return job

    def leave_key(self, job: Job) -> None:
        """``job`` no longer holds, awaits or waits for its key: pass the key on."""
        sched = job._sched
        assert sched is not None
        key = sched.key
        assert key is not None
        line = self.keys.get(key)
        if line is None:
            return
        if line.holder is job:
            line.holder = None
        elif line.candidate is job:
            line.candidate = None
        if line.holder is not None or line.candidate is not None:
            return
        following = line.head
        if following is None:
            del self.keys[key]
            return
        line.head = following._next
        if line.head is None:
            line.tail = None
        else:
            line.head._prev = None
            following._next = None
        line.candidate = following
        following_sched = following._sched
        assert following_sched is not None
        following_sched.place = RELEASED
        heapq.heappush(self.released, (following._seq, following_sched))

    def remove_queued(self, job: Job) -> None:
        """Take the queued ``job`` out of wherever it waits (a cancel)."""
        self.queued -= 1
        sched = job._sched
        if sched is None:
            self.unlink(job)
            self.taken -= 1
            return
        place = sched.place
        if place == FIFO:
            self.unlink(job)
        elif place == LINE:
            line = self.keys[sched.key]  # type: ignore[index]
            before, after = job._prev, job._next
            if before is None:
                line.head = after
            else:
                before._next = after
            if after is None:
                line.tail = before
            else:
                after._prev = before
            job._prev = job._next = None
        # (RELEASED: its heap entry stays, and is skipped once sched.job is None.)
        sched.place = 0
        if sched.retried:
            sched.retried = False
            self.retrying -= 1
        else:
            self.taken -= 1

    # -- the timers -----------------------------------------------------------------------

    def schedule(self, job: Job, delay: float) -> None:
        """Make ``job`` wait ``delay`` seconds before it becomes ready."""
        sched = job._sched
        assert sched is not None
        sched.due = due = trio.current_time() + delay
        job._state = SCHEDULED
        self.scheduled += 1
        heapq.heappush(self.timers, (due, job._accepted_seq(), sched))
        scope = self.timer_scope
        if scope is None:
            assert self.nursery is not None
            self.timer_scope = trio.CancelScope(deadline=due)
            contextvars.Context().run(
                functools.partial(self.nursery.start_soon, name=_TIMER_TASK_NAME),
                self.run_timers,
            )
        elif due < scope.deadline:
            scope.deadline = due

    def refill_soon(self) -> None:
        """Have the timer task refill at once, in a step of its own (from an abort, say)."""
        if self.runtime.shutdown.phase is not Phase.OPEN:
            return  # (waiting senders are refused from now on)
        scope = self.timer_scope
        if scope is None:
            assert self.nursery is not None
            self.timer_scope = trio.CancelScope(deadline=-math.inf)
            contextvars.Context().run(
                functools.partial(self.nursery.start_soon, name=_TIMER_TASK_NAME),
                self.run_timers,
            )
        else:
            scope.deadline = -math.inf

    def next_due(self) -> float:
        timers = self.timers
        while timers and timers[0][2].job is None:
            heapq.heappop(timers)
        return timers[0][0] if timers else math.inf

    def promote_due(self, events: HandOff | None = None) -> HandOff | None:
        """Every scheduled job that is due becomes ready, in due order.

        Returns ``events``, with the jobs that became due added if an instrument
        has the ``job_due`` hook.
        """
        now = trio.current_time()
        timers = self.timers
        due = None
        if "job_due" in self.runtime.instruments.hooks:
            events = events or HandOff()
            due = events.due
        while timers and timers[0][0] <= now:
            _, _, sched = heapq.heappop(timers)
            job = sched.job
            if job is None or job._state is not SCHEDULED:
                continue
            self.scheduled -= 1
            self.last_seq += 1
            job._seq = self.last_seq
            self.enqueue(job)
            if due is not None:
                due.append(job)
                sched.unreported_due = True
        return events

    @enable_ki_protection
    async def run_timers(self) -> None:
        """The timer task: at each due time, due jobs become ready and start if they can."""
        runtime = self.runtime
        while True:
            scope = self.timer_scope
            assert scope is not None
            with scope:
                await trio.sleep_forever()
            events = self.refill(self.promote_due())
            self.timer_scope = trio.CancelScope(deadline=self.next_due())
            runtime.report_events(events)
            if self.is_idle():
                runtime.shutdown.became_idle()
            runtime.shutdown.nudge()

    # -- accepting --------------------------------------------------------------------

    def try_accept(self, job: Job) -> bool:
        """Start ``job`` or queue it; False when it can neither start nor wait.

        Atomic: if this raises, nothing was accepted, counted or taken.
        """
        runtime = self.runtime
        if runtime.shutdown.phase is not Phase.OPEN:
            raise RuntimeClosedError
        if self.timers and self.timers[0][0] <= trio.current_time():
            # Due jobs become ready before a job accepted at the same instant.
            runtime.report_events(self.refill(self.promote_due()))
            if runtime.shutdown.phase is not Phase.OPEN:  # a hook just interrupted it
                raise RuntimeClosedError
        if job._sched is not None:
            return self.try_accept_scheduled(job)
        # Every step that can fail comes before the first change of state. A task started
        # for a job that then fails to get its slot finds the job not STARTING and returns.
        if (
            self.head is None
            and not self.released
            and self.limiter.borrowed_tokens < self.max_concurrent_tasks
        ):
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
            self.count_accepted(job)
        elif self.taken < self.max_queue_size:
            job._context = context = contextvars.copy_context()
            if _CURRENT.get(None) is not None:  # (capture_context, inline)
                context.run(_CURRENT.set, None)
            self.count_accepted(job)
            self.push(job)
            self.queued += 1
            self.taken += 1
        else:
            return False
        if "job_accepted" in runtime.instruments.hooks:
            runtime.call_hook(job, "job_accepted")
        return True

    def try_accept_scheduled(self, job: Job) -> bool:
        """`try_accept` for a job with a delay, a retry policy or a key."""
        if self.startable(job) and self.limiter.borrowed_tokens < self.max_concurrent_tasks:
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
            self.count_accepted(job)
            self.claim_key(job)
        elif self.taken < self.max_queue_size:
            job._context = capture_context()
            self.count_accepted(job)
            self.place(job)
        else:
            return False
        runtime = self.runtime
        if "job_accepted" in runtime.instruments.hooks:
            runtime.call_hook(job, "job_accepted")
        if job._state is SCHEDULED and "job_scheduled" in runtime.instruments.hooks:
            runtime.call_hook(job, "job_scheduled", job._sched.delay)  # type: ignore[union-attr]
        return True

    def startable(self, job: Job) -> bool:
        """Whether ``job``, just accepted, may take a free slot at once (it is first)."""
        if self.ready_head() is not None:
            return False
        sched = job._sched
        if sched is None:
            return True
        return not sched.delay and (sched.key is None or sched.key not in self.keys)

    def claim_key(self, job: Job) -> None:
        """``job`` starts at once: it holds its (free) key from now on."""
        sched = job._sched
        if sched is not None and sched.key is not None:
            line = self.keys[sched.key] = KeyLine()
            line.holder = job

    def place(self, job: Job) -> None:
        """Give the accepted ``job`` a queue place: scheduled if it has a delay, else queued."""
        self.taken += 1
        sched = job._sched
        if sched is not None and sched.delay:
            self.schedule(job, sched.delay)
        else:
            self.enqueue(job)

    def retry_later(self, job: Job, delay: float) -> None:
        """Schedule ``job``, whose run failed, to run again in ``delay`` seconds.

        It keeps its key, and holds no queue place: a retry is never refused.
        """
        sched = job._sched
        assert sched is not None
        sched.attempt += 1
        sched.retried = True
        self.retrying += 1
        self.schedule(job, delay)

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
            first = next(iter(waiters)) is task
            del waiters[task]
            if first and waiters:  # it held up the senders behind it: one may fit now
                self.refill_soon()
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
        sched = job._sched
        if sched is not None:  # its ready order may change (a delay, a retry): keep it
            sched.accepted = job._seq
            sched.job = job

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
        sched = job._sched
        if sched is not None:
            if sched.key is not None:
                self.leave_key(job)
            sched.job = None
        self.give_back(lane)
        events = events or HandOff()
        events.failed_to_start.append((job, exc))
        return events

    def hand_off(self, job: Job) -> HandOff | None:
        """Pass the slot of ``job``, which has ended (or waits to retry), on, if it can.

        A slot is released only when no job can take it (or the slots were shrunk
        below the jobs running). Returns what needs reporting: jobs of waiting
        ``send()`` calls accepted just now, and jobs whose task could not be started
        (now counted failed); None if nothing.
        """
        lane = job._slot
        job._slot = None
        sched = job._sched
        if sched is not None and job._state in FINAL:
            if sched.key is not None:
                self.leave_key(job)
            sched.job = None
        if self.excess or self.runtime.shutdown.phase is Phase.CUT_OFF:
            self.give_back(lane)
            return None
        events: HandOff | None = None
        promoted = False
        if self.timers and self.timers[0][0] <= trio.current_time():
            events = self.promote_due()
            promoted = True
        following = self.head
        if following is not None and following._sched is None and not self.released:
            self.pop()  # (what pick() does, for a job without a schedule)
            self.queued -= 1
            self.taken -= 1
        else:
            following = self.pick()
            if following is None:
                self.give_back(lane)
                return self.refill(events) if self.waiters else events
        if self.waiters and self.taken < self.max_queue_size:
            admitted = self.admit_waiter()
            self.place(admitted)
            events = events or HandOff()
            events.admitted.append(admitted)
        if lane.alive:
            try:
                self.start(following, lane)
            except BaseException as exc:  # e.g. MemoryError: that job fails, counted
                return self.refill(self.start_failure(following, lane, exc, events))
            following._slot = lane
            following._state = STARTING
            if (promoted or self.waiters) and (
                self.limiter.borrowed_tokens < self.max_concurrent_tasks
            ):
                # Other slots are free: for the other jobs that became due, or a waiting
                # send() behind the one just let in that can start at once.
                return self.refill(events)
            return events
        return self.refill(self.take(following, lane, events))

    def refill(self, events: HandOff | None = None) -> HandOff | None:
        """Start ready jobs on free slots, and accept waiting senders into free room.

        For when slots or places were freed other than by a job ending: a resize, a
        cancelled job, a failed start, jobs that became due.
        """
        if self.runtime.shutdown.phase is Phase.CUT_OFF:
            return events
        while True:
            while self.limiter.borrowed_tokens < self.max_concurrent_tasks:
                following = self.pick()
                if following is None:
                    break
                events = self.take(following, None, events)
            queued_one = False
            while self.waiters:
                job = next(iter(self.waiters.values()))
                if self.limiter.borrowed_tokens < self.max_concurrent_tasks and self.startable(job):
                    admitted = self.admit_waiter()
                    self.claim_key(admitted)
                    events = events or HandOff()
                    events.admitted.append(admitted)
                    events = self.take(admitted, None, events)
                elif self.taken < self.max_queue_size:
                    admitted = self.admit_waiter()
                    self.place(admitted)
                    events = events or HandOff()
                    events.admitted.append(admitted)
                    queued_one = True
                else:
                    break
            if not queued_one:
                return events

    def withdraw(self, job: Job) -> HandOff | None:
        """Take the queued or scheduled ``job`` out, counted dropped; its place is free."""
        sched = job._sched
        if job._state is SCHEDULED:
            assert sched is not None
            self.scheduled -= 1
            if len(self.timers) > 2 * self.scheduled + 16:
                # Entries of cancelled jobs stay until they surface; when they are most of
                # the heap, rebuild it from the live ones (amortized constant per cancel).
                sched.job = None
                self.timers = [entry for entry in self.timers if entry[2].job is not None]
                heapq.heapify(self.timers)
            if sched.retried:
                sched.retried = False
                self.retrying -= 1
            else:
                self.taken -= 1
        else:
            self.remove_queued(job)
        if sched is not None:
            if sched.key is not None:
                self.leave_key(job)
            sched.job = None
        self.runtime.dropped += 1
        job._end(DROPPED)
        events = self.refill()
        if self.is_idle():
            self.runtime.shutdown.became_idle()
        self.runtime.shutdown.nudge()
        return events

    def drop_all(self) -> list[Job]:
        """Take every queued and scheduled job out (the cut-off); return them."""
        dropped: list[Job] = []
        while self.head is not None:
            dropped.append(self.pop())
        for _, sched in self.released:
            if sched.job is not None and sched.place == RELEASED:
                dropped.append(sched.job)
        for line in self.keys.values():
            job = line.head
            while job is not None:
                following = job._next
                job._prev = job._next = None
                dropped.append(job)
                job = following
        for _, _, sched in self.timers:
            if sched.job is not None and sched.job._state is SCHEDULED:
                dropped.append(sched.job)
        self.released.clear()
        self.timers.clear()
        self.keys.clear()  # (a running job that ends later finds its key gone: nothing to do)
        self.queued = self.scheduled = self.taken = self.retrying = 0
        for job in dropped:
            plan = job._sched
            if plan is not None:
                plan.job = None
                plan.place = 0
        return dropped

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
        if not self.queued and not self.limiter.borrowed_tokens:
            self.runtime.shutdown.nudge()
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
