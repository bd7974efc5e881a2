"""Helpers shared by several test modules (imported as ``from helpers import ...``).

``tests/`` has no ``__init__.py``, so pytest's default ``prepend`` import mode puts
``tests/`` itself first on ``sys.path`` and mypy takes it as the base directory of the
test modules: both resolve this module as plain ``helpers``.
Only code used by more than one test module lives here; a helper that one module needs
stays in that module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable
from typing import Any, TypeAlias

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, settings

from trio_background import (
    BackgroundJob,
    BackgroundJobMetadata,
    BackgroundRuntime,
    BackgroundStatistics,
    QueueFullError,
    Retry,
    RuntimeClosedError,
)

#: The name of the runtime's logger.
LOGGER = "trio_background"

#: Every status a job can have, in the contract's order.
STATUSES = (
    "scheduled",
    "queued",
    "running",
    "completed",
    "failed",
    "timed_out",
    "cancelled",
    "dropped",
)

#: The per-job counters of `BackgroundStatistics`, in the contract's order.
COUNT_FIELDS = (
    "queued",
    "running",
    "completed",
    "failed",
    "timed_out",
    "cancelled",
    "dropped",
    "rejected",
)


# -- counters -------------------------------------------------------------------------------


def check_invariants(stats: BackgroundStatistics) -> None:
    """Assert the contract's accounting identity and bounds on one snapshot.

    ``accepted`` is the sum of every state an accepted job can be in, and the queue and
    the slots never hold more than their configured capacity.
    """
    s = stats
    assert s.accepted == (
        s.scheduled
        + s.queued
        + s.running
        + s.completed
        + s.failed
        + s.timed_out
        + s.cancelled
        + s.dropped
    )
    assert 0 <= s.queued + s.scheduled <= s.max_queue_size
    assert 0 <= s.running <= s.max_concurrent_tasks


def all_counts(stats: BackgroundStatistics) -> dict[str, int]:
    """Every counter of ``stats`` by name, zeros included (compare with `expected`)."""
    return {name: getattr(stats, name) for name in COUNT_FIELDS}


def expected(**nonzero: int) -> dict[str, int]:
    """What `all_counts` returns when the named counters are as given and the rest are 0."""
    result = dict.fromkeys(COUNT_FIELDS, 0)
    result.update(nonzero)
    return result


def counts(runtime: BackgroundRuntime) -> dict[str, int]:
    """Non-zero counters of a fresh snapshot, after checking the contract's invariants."""
    s = runtime.statistics()
    check_invariants(s)
    return {name: value for name, value in all_counts(s).items() if value}


# -- logs -----------------------------------------------------------------------------------


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    """The records the runtime's logger emitted at exactly ``level``, in order."""
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """The messages of `records` at exactly ``level``, in order."""
    return [r.getMessage() for r in records(caplog, level)]


def job_names(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """The ``job_name`` attributes of the records at exactly ``level``, sorted."""
    return sorted(str(r.__dict__["job_name"]) for r in records(caplog, level))


def exc_of(record: logging.LogRecord) -> BaseException:
    """The exception a record was logged with (it must have one)."""
    assert record.exc_info is not None
    exc = record.exc_info[1]
    assert exc is not None
    return exc


# -- jobs and instruments -------------------------------------------------------------------


def meta(name: str, request_id: str | None = None) -> BackgroundJobMetadata:
    """Shorthand for ``BackgroundJobMetadata(name=name, request_id=request_id)``."""
    return BackgroundJobMetadata(name=name, request_id=request_id)


async def sleeper(seconds: float) -> None:
    """A job that sleeps ``seconds`` and returns (its default job name is ``"sleeper"``)."""
    await trio.sleep(seconds)


#: One instrument hook call: ``(hook, job name, outcome, duration)``; the last two are
#: ``None`` except for ``"finished"``.
Call: TypeAlias = tuple[str, str, str | None, float | None]


class Recorder:
    """An instrument recording ``(hook, job name, outcome, duration)`` for every call.

    It implements all five hooks and, like a third-party instrument, does not inherit from
    `BackgroundInstrument`. Hook names are recorded without their ``job_`` prefix.
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def job_accepted(self, job: BackgroundJobMetadata) -> None:
        self.calls.append(("accepted", job.name, None, None))

    def job_rejected(self, job: BackgroundJobMetadata) -> None:
        self.calls.append(("rejected", job.name, None, None))

    def job_started(self, job: BackgroundJobMetadata) -> None:
        self.calls.append(("started", job.name, None, None))

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        self.calls.append(("finished", job.name, outcome, duration))

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        self.calls.append(("dropped", job.name, None, None))

    def of(self, hook: str) -> list[Call]:
        """The calls of one hook (``"finished"``, not ``"job_finished"``), in order."""
        return [call for call in self.calls if call[0] == hook]

    def pairs(self) -> list[tuple[str, str]]:
        """Every call as ``(hook, job name)``, in order: outcome and duration left out."""
        return [(hook, name) for hook, name, _, _ in self.calls]


#: Every phase but "explain", which reruns failing examples under a tracer (slow).
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
settings.register_profile(
    "ci",
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
    phases=PHASES,
)
settings.register_profile(
    "long",
    max_examples=3000,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
    phases=PHASES,
)
#: Long hypothesis runs: ``TRIO_BACKGROUND_LONG=1`` (CI keeps example counts modest).
LONG = (
    os.environ.get("TRIO_BACKGROUND_LONG") == "1" or settings.get_current_profile_name() == "long"
)
#: The hypothesis profile the property and stateful tests run under.
PROFILE = settings.get_profile("long" if LONG else "ci")


# -- scheduling -----------------------------------------------------------------------------


class Tracker:
    """An instrument that follows every job through its hooks, by its metadata object.

    Each hook must be a legal next step for the job (``job_accepted`` first, then
    ``job_scheduled`` and ``job_due`` around every wait for a due time, ``job_started``
    only when queued, ``job_retrying`` or ``job_finished`` only when running, and so on),
    and `statuses` counts the jobs in each state: for jobs whose code has begun, these
    are the runtime's statuses, counted here from the hooks alone.
    """

    def __init__(self) -> None:
        self.state: dict[int, tuple[BackgroundJobMetadata, str]] = {}
        #: Illegal steps, as ``"name: state -> hook"`` (a hook that raised would be removed).
        self.errors: list[str] = []

    def move(self, job: BackgroundJobMetadata, before: tuple[str | None, ...], after: str) -> None:
        now = self.state.get(id(job))
        if (now[1] if now else None) not in before:
            self.errors.append(f"{job.name}: {now[1] if now else None} -> {after}")
        self.state[id(job)] = (job, after)

    def job_accepted(self, job: BackgroundJobMetadata) -> None:
        self.move(job, (None,), "queued")

    def job_scheduled(self, job: BackgroundJobMetadata, delay: float) -> None:
        self.move(job, ("queued",) if delay > 0 else (), "scheduled")

    def job_due(self, job: BackgroundJobMetadata) -> None:
        self.move(job, ("scheduled",), "queued")

    def job_started(self, job: BackgroundJobMetadata) -> None:
        self.move(job, ("queued",), "running")

    def job_retrying(
        self, job: BackgroundJobMetadata, exception: BaseException, delay: float
    ) -> None:
        self.move(job, ("running",), "scheduled")

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        self.move(job, ("running",), outcome)

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        self.move(job, ("queued", "scheduled"), "dropped")

    def statuses(self) -> dict[str, int]:
        result = dict.fromkeys(STATUSES, 0)
        for _, status in self.state.values():
            result[status] += 1
        return result


async def random_waits(
    rng: random.Random,
    runtime: BackgroundRuntime,
    handles: list[BackgroundJob[None]],
    check: Callable[[], None],
    *,
    steps: int = 30,
) -> None:
    """Drive ``runtime`` through a random program that puts jobs in every waiting state.

    Spawns and (blocking) sends of jobs named ``"x"`` or ``"y"`` with a random delay,
    key and retry policy, some failing their first runs; cancels random handles; resizes;
    lets virtual time pass. Every accepted job's handle is appended to ``handles``.
    ``check()`` runs whenever all tasks are blocked, and once more at the end of the
    program (which leaves the runtime open, with jobs in any state).
    """
    retry = Retry(attempts=3, backoff=0.5, jitter=False)
    handle = runtime.handle()

    async def job(seconds: float, failures: list[int]) -> None:
        await trio.sleep(seconds)
        if failures[0] > 0:
            failures[0] -= 1
            raise ValueError("fails on purpose")

    def options() -> dict[str, Any]:
        return {
            "name": rng.choice("xy"),
            "delay": rng.choice((0, 0, 0.5, 1.5)),
            "key": rng.choice((None, None, "a", "b")),
            "retry": rng.choice((None, retry)),
        }

    async def send(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with contextlib.suppress(RuntimeClosedError):
            handles.append(await handle.send(job, *args, **kwargs))

    async with trio.open_nursery() as nursery:
        for _ in range(steps):
            action = rng.random()
            args = (rng.choice((0.25, 1.0, 2.0)), [rng.choice((0, 0, 1, 3))])
            if action < 0.45:
                with contextlib.suppress(QueueFullError):
                    handles.append(handle.spawn(job, *args, **options()))
            elif action < 0.55:
                nursery.start_soon(send, args, options())
            elif action < 0.7 and handles:
                rng.choice(handles).cancel()
            elif action < 0.8:
                runtime.resize(
                    max_concurrent_tasks=rng.randint(1, 3), max_queue_size=rng.randint(1, 5)
                )
            else:
                await trio.sleep(rng.choice((0.25, 0.5, 1.0)))
            await trio.testing.wait_all_tasks_blocked()
            check()
        nursery.cancel_scope.cancel()  # the sends still waiting were not accepted
    check()
