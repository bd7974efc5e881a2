"""The statistics snapshot."""

from __future__ import annotations

import attrs


@attrs.frozen
class BackgroundStatistics:
    """A snapshot of a runtime's state, returned by `BackgroundRuntime.statistics`.

    At every instant ``accepted == scheduled + queued + running + completed +
    failed + timed_out + cancelled + dropped``, ``queued + scheduled <=
    max_queue_size`` and ``running <= max_concurrent_tasks`` (after
    `BackgroundRuntime.resize` shrinks a limit, until the excess has drained).
    """

    #: Jobs accepted that wait to become due (not yet queued).
    scheduled: int
    #: Jobs accepted but not started yet.
    queued: int
    #: Jobs running now.
    running: int
    #: Jobs that returned normally.
    completed: int
    #: Jobs that raised an `Exception` (or were not async functions).
    failed: int
    #: Jobs cancelled because they ran past their timeout.
    timed_out: int
    #: Jobs cancelled while running: at shutdown (drain deadline, cancelled close, or
    #: error) or through `BackgroundJob.cancel`.
    cancelled: int
    #: Jobs discarded without ever running: at shutdown or through `BackgroundJob.cancel`.
    dropped: int
    #: Calls to `BackgroundHandle.spawn` that raised `QueueFullError`.
    rejected: int
    #: The queue's capacity (`BackgroundTaskConfig.max_queue_size`).
    max_queue_size: int
    #: The number of slots (`BackgroundTaskConfig.max_concurrent_tasks`).
    max_concurrent_tasks: int
    #: Whether shutdown has begun (no more jobs are accepted).
    closed: bool

    #: Successful `BackgroundHandle.spawn` and `BackgroundHandle.send` calls. A counter
    #: of its own (not the sum of the others), so the identity above is a real check.
    accepted: int
    #: Retries: runs that failed and were scheduled to run again (a job retried twice
    #: counts 2).
    retried: int
