"""Observability hooks."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Literal

from ._config import BackgroundJobMetadata
from ._log import emit

#: How a job that started ended.
Outcome = Literal["completed", "failed", "timed_out", "cancelled"]

HOOKS = (
    "job_accepted",
    "job_scheduled",
    "job_due",
    "job_rejected",
    "job_started",
    "job_failed",
    "job_retrying",
    "job_finished",
    "job_dropped",
)


class BackgroundInstrument:
    """Base class for objects that observe a runtime's jobs.

    Pass instances to `open_background_runtime` with ``instruments=``. Every
    method does nothing; override the ones you need. Objects that do not
    inherit from this class work too: hooks they lack are skipped. Hooks are
    called synchronously in the runtime's Trio thread. A hook that raises is
    logged once and its instrument is removed; the runtime and the job carry
    on undisturbed.
    """

    def job_accepted(self, job: BackgroundJobMetadata) -> None:
        """Called when a job is accepted (queued or started at once).

        Args:
            job: The job's metadata.
        """

    def job_scheduled(self, job: BackgroundJobMetadata, delay: float) -> None:
        """Called right after `job_accepted` for a job accepted with a delay.

        The job is scheduled: it joins the queue in ``delay`` seconds (`job_due`
        is called then). A job that will be retried is scheduled too: `job_retrying`
        says so, and this hook is not called for it.

        Args:
            job: The job's metadata.
            delay: Seconds until the job is due.
        """

    def job_due(self, job: BackgroundJobMetadata) -> None:
        """Called when a scheduled job (delayed, or waiting to be retried) is due.

        It joins the queue, or takes a free slot at once (`job_started` follows
        when its code begins).

        Args:
            job: The job's metadata.
        """

    def job_rejected(self, job: BackgroundJobMetadata) -> None:
        """Called when `BackgroundHandle.spawn` raises `QueueFullError` for a job.

        Args:
            job: The job's metadata.
        """

    def job_started(self, job: BackgroundJobMetadata) -> None:
        """Called when a job takes a slot.

        Args:
            job: The job's metadata.
        """

    def job_failed(self, job: BackgroundJobMetadata, exception: BaseException) -> None:
        """Called when a job failed, right before `job_finished` with ``"failed"``.

        For error trackers: ``exception`` is the job's own exception, the one the
        runtime logs and `BackgroundJob.wait` raises.

        Args:
            job: The job's metadata.
            exception: What the job raised.
        """

    def job_retrying(
        self, job: BackgroundJobMetadata, exception: BaseException, delay: float
    ) -> None:
        """Called when a run failed and the job will run again after ``delay`` seconds.

        Such a run ends with this hook instead of `job_finished`; `job_started`
        is called again when the next run starts.

        Args:
            job: The job's metadata.
            exception: What the run raised (`trio.TooSlowError` for a timeout).
            delay: Seconds until the job is due again.
        """

    def job_finished(self, job: BackgroundJobMetadata, outcome: Outcome, duration: float) -> None:
        """Called when a job that started has ended.

        Args:
            job: The job's metadata.
            outcome: One of ``"completed"``, ``"failed"``, ``"timed_out"``,
                ``"cancelled"``.
            duration: Seconds from start to end, by `trio.current_time`.
        """

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        """Called when a job is discarded without running: at shutdown, or cancelled.

        Args:
            job: The job's metadata.
        """


class _Installed:
    """One instrument as given, and whether it is still installed."""

    __slots__ = ("alive", "instrument")

    def __init__(self, instrument: object) -> None:
        self.instrument = instrument
        self.alive = True


class Instruments:
    """The installed instruments, indexed by hook so absent hooks cost nothing.

    A hook that raises is logged once and its whole instrument is removed: every hook
    of that object, whether it is a class instance or a bag of plain functions. A hook
    raising `KeyboardInterrupt` is not removed: the exception is handed to
    ``on_interrupt`` (the runtime then shuts down and re-raises it, as for a job) once
    every instrument has had this call, and every call it is nested in: instruments see
    each event before they see what the shutdown does (a job it drops, say).
    """

    __slots__ = ("depth", "hooks", "interrupts", "on_interrupt")

    def __init__(self, instruments: Iterable[object]) -> None:
        #: For each hook name with at least one implementation: (instrument, method) pairs.
        self.hooks: dict[str, list[tuple[_Installed, Callable[..., object]]]] = {}
        self.on_interrupt: Callable[[BaseException], None] = _reraise
        #: How many calls are under way (a hook may re-enter the runtime), and the
        #: KeyboardInterrupts they raised, handed on when the outermost one is done.
        self.depth = 0
        self.interrupts: list[BaseException] = []
        seen: list[object] = []
        for instrument in instruments:
            if any(instrument is other for other in seen):
                continue  # installed once, as trio does with its own instruments
            seen.append(instrument)
            installed = _Installed(instrument)
            for hook in HOOKS:
                method = getattr(instrument, hook, None)
                if method is None or getattr(method, "__func__", None) is getattr(
                    BackgroundInstrument, hook
                ):
                    continue
                self.hooks.setdefault(hook, []).append((installed, method))

    def call(self, hook: str, *args: object) -> None:
        """Call ``hook`` on every installed instrument that has it, in the current context."""
        # _remove() replaces the lists instead of changing them, so this loop is safe, and
        # an instrument removed meanwhile (by a hook that re-entered the runtime) is skipped.
        self.depth += 1
        try:
            for installed, method in self.hooks.get(hook, ()):
                if not installed.alive:
                    continue
                try:
                    method(*args)
                except KeyboardInterrupt as exc:
                    self.interrupts.append(exc)
                except BaseException:
                    if installed.alive:
                        self._remove(installed)
                        emit(
                            self.interrupts.append,
                            logging.ERROR,
                            "instrument %r raised in %s; removing it",
                            installed.instrument,
                            hook,
                            exc_info=sys.exc_info()[1],
                        )
        finally:
            self.depth -= 1
        if not self.depth and self.interrupts:
            interrupts, self.interrupts = self.interrupts, []
            for interrupt in interrupts:
                self.on_interrupt(interrupt)

    def _remove(self, installed: _Installed) -> None:
        installed.alive = False
        for hook in list(self.hooks):
            methods = [pair for pair in self.hooks[hook] if pair[0] is not installed]
            if methods:
                self.hooks[hook] = methods
            else:
                del self.hooks[hook]


def _reraise(exc: BaseException) -> None:
    raise exc
