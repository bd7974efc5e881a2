"""Exceptions raised by trio_background."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._config import BackgroundJobMetadata
    from ._statistics import BackgroundStatistics


class BackgroundJobError(Exception):
    """An error a job may raise to report a failure with a plain message.

    Any `Exception` a job raises counts as ``failed``; this one only gives the
    failure a readable `message`.

    Args:
        message: What went wrong.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        #: What went wrong.
        self.message: str = message


class BackgroundSpawnError(Exception):
    """Base class of the errors `BackgroundHandle.spawn` and `BackgroundHandle.send` raise.

    A job that raised one of these was not accepted.
    """


class QueueFullError(BackgroundSpawnError):
    """Raised by `BackgroundHandle.spawn` when every slot is busy and the queue is full.

    It is counted in `BackgroundStatistics.rejected`. Use `BackgroundHandle.send`
    to wait for room instead.
    """

    def __init__(self, message: str = "background task queue is full") -> None:
        super().__init__(message)


class RuntimeClosedError(BackgroundSpawnError):
    """Raised by `BackgroundHandle.spawn` and `BackgroundHandle.send` once shutdown began.

    A `BackgroundHandle.send` that is waiting for room when shutdown begins is
    woken with this error too.
    """

    def __init__(self, message: str = "background runtime is closed") -> None:
        super().__init__(message)


class BackgroundShutdownError(Exception):
    """Raised by `BackgroundRuntime.aclose` when the drain timed out and jobs were cut off.

    Args:
        message: A one-line summary.
        cancelled: Jobs that were running at the deadline and were cancelled.
        dropped: Jobs that were queued at the deadline and never started.
        statistics: The runtime's final statistics.
    """

    def __init__(
        self,
        message: str,
        *,
        cancelled: tuple[BackgroundJobMetadata, ...],
        dropped: tuple[BackgroundJobMetadata, ...],
        statistics: BackgroundStatistics,
    ) -> None:
        super().__init__(message)
        #: Jobs that were running at the deadline, in acceptance order.
        self.cancelled: tuple[BackgroundJobMetadata, ...] = cancelled
        #: Jobs discarded without starting, in acceptance order.
        self.dropped: tuple[BackgroundJobMetadata, ...] = dropped
        #: The final statistics snapshot.
        self.statistics: BackgroundStatistics = statistics


class JobCancelledError(Exception):
    """Raised by `BackgroundJob.wait` for a job that was cancelled or dropped.

    A job ends this way when `BackgroundJob.cancel` was called, or when shutdown
    cut it off (cancelled while running, or dropped before it started).

    Args:
        message: A one-line summary.
        job: The job's metadata.
    """

    def __init__(self, message: str, *, job: BackgroundJobMetadata) -> None:
        super().__init__(message)
        #: The job's metadata.
        self.job: BackgroundJobMetadata = job


class JobTimeoutError(Exception):
    """Raised by `BackgroundJob.wait` for a job that ran past its timeout.

    Args:
        message: A one-line summary.
        job: The job's metadata.
    """

    def __init__(self, message: str, *, job: BackgroundJobMetadata) -> None:
        super().__init__(message)
        #: The job's metadata.
        self.job: BackgroundJobMetadata = job
