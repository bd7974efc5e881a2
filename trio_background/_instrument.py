"""Observability hooks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Literal

from ._config import BackgroundJobMetadata

logger = logging.getLogger("trio_background")

#: How a job that started ended.
Outcome = Literal["completed", "failed", "timed_out", "cancelled"]

HOOKS = ("job_accepted", "job_rejected", "job_started", "job_finished", "job_dropped")


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

    def job_finished(self, job: BackgroundJobMetadata, outcome: Outcome, duration: float) -> None:
        """Called when a job that started has ended.

        Args:
            job: The job's metadata.
            outcome: One of ``"completed"``, ``"failed"``, ``"timed_out"``,
                ``"cancelled"``.
            duration: Seconds from start to end, by `trio.current_time`.
        """

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        """Called when a queued job is discarded at shutdown without starting.

        Args:
            job: The job's metadata.
        """


class Instruments:
    """The installed instruments, indexed by hook so absent hooks cost nothing."""

    __slots__ = ("hooks",)

    def __init__(self, instruments: Iterable[object]) -> None:
        #: For each hook name with at least one implementation, the bound methods.
        self.hooks: dict[str, list[Callable[..., object]]] = {}
        for instrument in instruments:
            for hook in HOOKS:
                method = getattr(instrument, hook, None)
                if method is None or getattr(method, "__func__", None) is getattr(
                    BackgroundInstrument, hook
                ):
                    continue
                self.hooks.setdefault(hook, []).append(method)

    def call(self, hook: str, *args: object) -> None:
        """Call ``hook`` on every instrument that has it, removing any that raises."""
        # _remove() replaces the lists instead of changing them, so this loop is safe.
        for method in self.hooks.get(hook, ()):
            try:
                method(*args)
            except Exception:
                instrument = getattr(method, "__self__", method)
                logger.exception("instrument %r raised in %s; removing it", instrument, hook)
                self._remove(instrument)

    def _remove(self, instrument: object) -> None:
        for hook in list(self.hooks):
            methods = [m for m in self.hooks[hook] if getattr(m, "__self__", m) is not instrument]
            if methods:
                self.hooks[hook] = methods
            else:
                del self.hooks[hook]
