"""Admission: the queue of jobs waiting for a slot, the slots, and waiting senders."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ._job import Job


class Admission:
    """Where accepted jobs wait, and the count of every job ever accepted.

    The queue is a trio memory channel used only through its ``*_nowait`` methods, and
    the slots are the tokens of a `trio.CapacityLimiter`, borrowed on each running
    job's behalf. ``queued`` counts the jobs in the channel's buffer; the runtime never
    lets it pass ``max_queue_size``, so nobody ever blocks on the channel.
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
        "send_channel",
        "waiters",
    )

    def __init__(self, max_queue_size: int, max_concurrent_tasks: int) -> None:
        self.max_queue_size = max_queue_size
        self.max_concurrent_tasks = max_concurrent_tasks
        self.send_channel, self.receive_channel = trio.open_memory_channel["Job"](max_queue_size)
        self.limiter = trio.CapacityLimiter(max_concurrent_tasks)
        #: Tasks blocked in send(), in arrival order, each with the job it submits.
        self.waiters: OrderedDict[trio.lowlevel.Task, Job] = OrderedDict()
        self.queued = 0
        #: Successful spawn()/send() calls: counted here, never derived from other counters.
        self.accepted = 0
        self.rejected = 0
        self.last_seq = 0

    @property
    def running(self) -> int:
        return self.limiter.borrowed_tokens

    def slot_free(self) -> bool:
        """Whether a job accepted now could take a slot at once (FIFO: nothing queued)."""
        return not self.queued and self.limiter.borrowed_tokens < self.max_concurrent_tasks

    def room(self) -> bool:
        return self.queued < self.max_queue_size

    def accept(self, job: Job) -> None:
        self.last_seq += 1
        job.seq = self.last_seq
        self.accepted += 1

    def enqueue(self, job: Job) -> None:
        self.send_channel.send_nowait(job)
        self.queued += 1

    def dequeue(self) -> Job:
        job = self.receive_channel.receive_nowait()
        self.queued -= 1
        return job

    def admit_waiter(self) -> Job:
        """Accept the longest-waiting send()'s job; its task wakes up and returns."""
        task, job = self.waiters.popitem(last=False)
        self.accept(job)
        trio.lowlevel.reschedule(task)
        return job

    def refuse_waiters(self) -> None:
        """Wake every waiting send(); each finds its job unaccepted and raises."""
        waiters = list(self.waiters)
        self.waiters.clear()
        for task in waiters:
            trio.lowlevel.reschedule(task)

    def is_idle(self) -> bool:
        return not self.queued and not self.limiter.borrowed_tokens
