"""A live demonstration of trio_background, run by ``python -m trio_background``.

The demo plays a short, busy day of a web service, compressed into about ten seconds:

* "requests" submit a few thousand simulated jobs (``send_email``, ``warm_cache``,
  ``write_audit``, ``resize_image``, ``call_webhook``), each with a request id. Jobs
  that must not be lost use ``await handle.send(...)`` and wait for room (backpressure);
  the others use ``handle.spawn(...)`` and are shed with `QueueFullError` when the queue
  is full. Two traffic bursts fill the queue on purpose.
* Some jobs fail (logged at ERROR) and some hang until their timeout (WARNING).
* Just before shutdown a batch of slow ``export_report`` jobs is spawned, so that the
  drain deadline cuts jobs off and `BackgroundShutdownError` carries a non-empty report;
  a few requests arrive after shutdown began and get `RuntimeClosedError`.

It uses the public API only, and prints a one-line `BackgroundStatistics` display
(rewritten in place on a terminal, one plain line per period otherwise), a few of the
library's log records followed by a summary, and finally the shutdown report.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import random
import shutil
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO, TypeVar

import attrs
import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

from . import (
    BackgroundHandle,
    BackgroundInstrument,
    BackgroundJobError,
    BackgroundJobMetadata,
    BackgroundShutdownError,
    BackgroundStatistics,
    BackgroundTaskConfig,
    QueueFullError,
    RuntimeClosedError,
    open_background_runtime,
)

__all__ = ["DemoOptions", "build_scenario", "main", "parse_args", "run_demo"]

_LOGGER_NAME = "trio_background"
_LOG_RECORDS_SHOWN_PER_LEVEL = 3
_REPORT_ITEMS_SHOWN = 5

_Number = TypeVar("_Number", int, float)


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


@attrs.frozen
class DemoOptions:
    """What the demo runs.

    Attributes:
        duration: Approximate length of the demo, in seconds (of `trio.current_time`).
        jobs: Number of jobs the simulated requests try to submit.
        seed: Seed of the random generator that plans the jobs.
    """

    duration: float = 10.0
    jobs: int = 3000
    seed: int = 0


def _number_arg(text: str, convert: Callable[[str], _Number], what: str) -> _Number:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def _duration_arg(text: str) -> float:
    value = _number_arg(text, float, "a number")
    if not (0.1 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0.1, got {text}")
    return value


def _jobs_arg(text: str) -> int:
    value = _number_arg(text, int, "an integer")
    if value < 20:
        raise argparse.ArgumentTypeError(f"must be >= 20, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> DemoOptions:
    """Parse the command line of ``python -m trio_background``.

    Args:
        argv: The arguments, without the program name; `None` means `sys.argv`.

    Returns:
        The options. Without ``--seed`` a random seed is chosen (and printed by the
        demo, so that a run can be repeated).

    Raises:
        SystemExit: For ``--help`` (status 0) or a bad argument (status 2), as
            `argparse` does.
    """
    parser = argparse.ArgumentParser(
        prog="python -m trio_background",
        description=(
            "Live demo of trio_background: a few thousand simulated background jobs "
            "(some fail, some time out) with a live statistics line, then a shutdown "
            "whose drain deadline cuts the last jobs off and prints the report."
        ),
    )
    parser.add_argument(
        "--duration",
        type=_duration_arg,
        default=10.0,
        metavar="SECONDS",
        help="approximate length of the demo (default: 10)",
    )
    parser.add_argument(
        "--jobs",
        type=_jobs_arg,
        default=3000,
        metavar="N",
        help=(
            "number of jobs to submit, at least 20 (default: 3000); much more than 1000 per"
            " second of --duration may be more than a busy machine can keep up with"
        ),
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="SEED",
        help="seed for the job plan (default: random; the demo prints it)",
    )
    namespace = parser.parse_args(argv)
    seed: int | None = namespace.seed
    if seed is None:
        seed = random.randrange(100_000)
    return DemoOptions(duration=namespace.duration, jobs=namespace.jobs, seed=seed)


# ---------------------------------------------------------------------------
# The simulated jobs
# ---------------------------------------------------------------------------


@attrs.frozen
class Work:
    """What one simulated job does.

    Attributes:
        subject: What the job is about (a user, a cache key, ...), for its error message.
        seconds: How long the job works when it does not hang.
        hang: Whether the job waits forever (until its timeout cuts it off).
        failure: The exception the job raises after working, if any.
    """

    subject: str
    seconds: float
    hang: bool = False
    failure: Exception | None = None


JobFunction = Callable[[Work], Awaitable[None]]


def _simulated_job(name: str, doc: str) -> JobFunction:
    """Make the job function ``name``: it plays out its `Work` (sleep, hang, or raise).

    Every kind of job gets a function of its own because the library names a job after
    its function's ``__qualname__``: in log records, statistics and the shutdown report.
    """

    async def job(work: Work) -> None:
        if work.hang:
            await trio.sleep_forever()
        await trio.sleep(work.seconds)
        if work.failure is not None:
            raise work.failure

    job.__name__ = job.__qualname__ = name
    job.__doc__ = doc
    return job


send_email = _simulated_job(
    "send_email", "Pretend to send an e-mail (submitted with ``send``: must not be lost)."
)
warm_cache = _simulated_job(
    "warm_cache", "Pretend to refill a cache entry (``spawn``, short per-job timeout)."
)
write_audit = _simulated_job(
    "write_audit", "Pretend to append to an audit log (submitted with ``send``)."
)
resize_image = _simulated_job(
    "resize_image", "Pretend to make thumbnails of an upload (``spawn``)."
)
call_webhook = _simulated_job(
    "call_webhook", "Pretend to notify a customer's webhook (``spawn``; some endpoints hang)."
)
export_report = _simulated_job(
    "export_report", "Pretend to build a large export (slow; arrives just before shutdown)."
)
rebuild_search_index = _simulated_job(
    "rebuild_search_index",
    "Pretend to rebuild a search index (very slow; arrives just before shutdown).",
)


@attrs.frozen
class _Kind:
    fn: JobFunction
    weight: float
    cost: float  # mean duration, in units of the scenario's mean job duration
    fail: float  # probability of raising
    hang: float  # probability of hanging until the timeout
    wait: bool  # submit with ``await send()`` instead of ``spawn()``
    subject: Callable[[random.Random], str]
    error: Callable[[str], Exception]
    timeout: float | None = None  # per-job timeout, in units of the mean duration


_KINDS = (
    _Kind(
        send_email,
        weight=25,
        cost=1.5,
        fail=0.04,
        hang=0.005,
        wait=True,
        subject=lambda rng: f"user {rng.randrange(1, 90_000)}",
        error=lambda s: BackgroundJobError(f"SMTP 451 4.7.1 try again later ({s})"),
    ),
    _Kind(
        warm_cache,
        weight=25,
        cost=0.5,
        fail=0.01,
        hang=0.03,
        wait=False,
        subject=lambda rng: f"/products/{rng.randrange(1, 5_000)}",
        error=lambda s: ConnectionRefusedError(f"redis:6379 refused the connection ({s})"),
        timeout=2.0,
    ),
    _Kind(
        write_audit,
        weight=30,
        cost=0.3,
        fail=0.005,
        hang=0.0,
        wait=True,
        subject=lambda rng: f"event {rng.randrange(10**6, 10**7)}",
        error=lambda s: OSError(f"audit log is read-only ({s})"),
    ),
    _Kind(
        resize_image,
        weight=10,
        cost=3.0,
        fail=0.03,
        hang=0.0,
        wait=False,
        subject=lambda rng: f"upload_{rng.randrange(1, 10**6)}.heic",
        error=lambda s: ValueError(f"cannot decode image {s}"),
    ),
    _Kind(
        call_webhook,
        weight=10,
        cost=1.5,
        fail=0.08,
        hang=0.05,
        wait=False,
        subject=lambda rng: f"https://hooks.example.com/{rng.getrandbits(24):06x}",
        error=lambda s: ConnectionError(f"POST {s} returned 503"),
    ),
)


@attrs.frozen
class PlannedJob:
    """One submission the simulated requests will make.

    Attributes:
        at: When to submit, in seconds after the start of the demo.
        fn: The job function.
        work: Its argument.
        request_id: The request id passed to ``spawn``/``send``.
        timeout: The per-job timeout (`None`: the config's ``job_timeout``).
        wait: Submit with ``await handle.send(...)`` rather than ``handle.spawn(...)``.
    """

    at: float
    fn: JobFunction
    work: Work
    request_id: str
    timeout: float | None
    wait: bool


@attrs.frozen
class Scenario:
    """The demo's configuration and job plan, derived from `DemoOptions`.

    Attributes:
        config: The runtime configuration.
        jobs: The submissions, in time order.
        close_at: When ``aclose()`` is called, in seconds after the start.
        mean_job_seconds: The mean duration of an ordinary job.
    """

    config: BackgroundTaskConfig
    jobs: tuple[PlannedJob, ...]
    close_at: float
    mean_job_seconds: float


def _nice(seconds: float) -> float:
    """Round to three significant digits, so that configs and log lines read well."""
    return float(f"{seconds:.3g}")


def build_scenario(options: DemoOptions) -> Scenario:
    """Plan the demo: size the runtime and draw every job from ``options.seed``.

    Times are fractions of ``options.duration`` (D):

    * 0 to 0.7 D: ordinary jobs, a third of them in two sharp bursts that fill the
      queue for a moment. Their mean duration keeps the runtime about half busy.
    * 0.72 D: a batch job spawns slow ``export_report`` and ``rebuild_search_index`` jobs
      (half of D and more; explicit timeouts override the short ``job_timeout``), as
      many as the slots plus half the queue.
    * 0.74 to 0.79 D: a few more ordinary jobs, queued behind the slow ones.
    * 0.8 D: ``aclose()``, with ``drain_timeout`` 0.15 D: the slow jobs are cancelled,
      the late ones dropped, and `BackgroundShutdownError` reports them.
    * 0.85 D: a few requests arrive after shutdown began and get `RuntimeClosedError`.

    Args:
        options: The demo options.

    Returns:
        The scenario (the same for the same options).
    """
    rng = random.Random(options.seed)
    duration = options.duration
    slots = max(4, min(64, options.jobs // 60))
    queue = 2 * slots
    n_slow = min(options.jobs // 4, slots + queue // 2)
    n_late = min(options.jobs // 10, queue // 4)
    n_after = min(3, options.jobs // 20)
    n_regular = options.jobs - n_slow - n_late - n_after
    window = 0.7 * duration
    mean = _nice(0.5 * slots * window / n_regular)
    config = BackgroundTaskConfig(
        max_queue_size=queue,
        max_concurrent_tasks=slots,
        drain_timeout=_nice(0.15 * duration),
        job_timeout=_nice(6 * mean),
    )

    def arrival() -> float:
        pick = rng.random()
        if pick < 0.15:
            at = rng.gauss(0.25 * duration, 0.02 * duration)
        elif pick < 0.3:
            at = rng.gauss(0.5 * duration, 0.02 * duration)
        else:
            at = rng.uniform(0.0, window)
        return min(max(at, 0.0), window)

    used: set[int] = set()

    def request_id() -> str:
        number = rng.getrandbits(32)
        while number in used:
            number = rng.getrandbits(32)
        used.add(number)
        return f"req-{number:08x}"

    def ordinary(at: float) -> PlannedJob:
        kind = rng.choices(_KINDS, [kind.weight for kind in _KINDS])[0]
        subject = kind.subject(rng)
        work = Work(
            subject=subject,
            seconds=kind.cost * mean * rng.uniform(0.3, 1.7),
            hang=rng.random() < kind.hang,
            failure=kind.error(subject) if rng.random() < kind.fail else None,
        )
        timeout = None if kind.timeout is None else _nice(kind.timeout * mean)
        return PlannedJob(at, kind.fn, work, request_id(), timeout, kind.wait)

    jobs = [ordinary(at) for at in sorted(arrival() for _ in range(n_regular))]
    for i in range(n_slow):
        # One in twenty is an index rebuild, the rest are exports. The explicit
        # timeout overrides the config's (short) job_timeout.
        slow: JobFunction = rebuild_search_index if i % 20 == 19 else export_report
        work = Work(
            subject=f"account {rng.randrange(1, 9_000)}",
            seconds=0.5 * duration * rng.uniform(1.0, 1.5),
        )
        jobs.append(PlannedJob(0.72 * duration, slow, work, request_id(), duration, False))
    for at in sorted(rng.uniform(0.74, 0.79) * duration for _ in range(n_late)):
        jobs.append(ordinary(at))
    for _ in range(n_after):
        work = Work(subject=f"event {rng.randrange(10**6, 10**7)}", seconds=mean)
        jobs.append(PlannedJob(0.85 * duration, write_audit, work, request_id(), None, True))
    return Scenario(config=config, jobs=tuple(jobs), close_at=0.8 * duration, mean_job_seconds=mean)


# ---------------------------------------------------------------------------
# Output: the status line, log records, the instrument
# ---------------------------------------------------------------------------


class _Console:
    """Writes the status line (in place on a terminal) and messages above it."""

    def __init__(self, out: TextIO, *, interactive: bool, width: int) -> None:
        self._out = out
        self._interactive = interactive
        self._width = max(width, 20)
        self._status_len = 0  # length of the status line now on screen (interactive)

    def status(self, line: str, short: str) -> None:
        """Show ``line``, or ``short`` on a terminal too narrow for it."""
        if self._interactive:
            if len(line) >= self._width:
                line = short[: self._width - 1]
            self._out.write("\r" + line.ljust(self._status_len))
            self._status_len = len(line)
        else:
            self._out.write(line + "\n")
        self._out.flush()

    def message(self, text: str) -> None:
        if self._interactive and self._status_len:
            # Overwrite the status line; the next status() call draws it again below.
            self._out.write("\r" + " " * self._status_len + "\r")
            self._status_len = 0
        self._out.write(text + "\n")
        self._out.flush()

    def finish(self) -> None:
        if self._interactive and self._status_len:
            self._out.write("\n")
            self._status_len = 0
        self._out.flush()


class _JobLogHandler(logging.Handler):
    """Shows the first few records of each level, then only counts them."""

    def __init__(self, console: _Console) -> None:
        super().__init__(logging.WARNING)
        self._console = console
        self.shown: Counter[str] = Counter()
        self.hidden: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname
            if self.shown[level] >= _LOG_RECORDS_SHOWN_PER_LEVEL:
                if not self.hidden[level]:
                    self._console.message(f"  log   (more {level} records: counted, not shown)")
                self.hidden[level] += 1
                return
            self.shown[level] += 1
            text = f"  log   {level}: {record.getMessage()}"
            request_id = getattr(record, "request_id", None)
            if request_id is not None:
                text += f" (request_id={request_id})"
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                text += f": {type(exc).__name__}: {exc}"
            self._console.message(text)
        except Exception:
            self.handleError(record)

    def summary(self) -> str:
        """Say how many records were shown and how many only counted."""
        shown, hidden = sum(self.shown.values()), sum(self.hidden.values())
        text = f"Log records from {_LOGGER_NAME!r}: {shown} shown"
        if hidden:
            levels = ", ".join(f"{n} {level}" for level, n in sorted(self.hidden.items()))
            text += f", {hidden} more counted ({levels})"
        return text


@contextmanager
def _quiet_job_logs(console: _Console) -> Iterator[_JobLogHandler]:
    """Route the library's log records through a `_JobLogHandler` for a while."""
    logger = logging.getLogger(_LOGGER_NAME)
    handler = _JobLogHandler(console)
    saved_level, saved_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate


_OUTCOMES = ("completed", "failed", "timed_out", "cancelled", "dropped", "rejected")


class OutcomeTally(BackgroundInstrument):
    """An instrument that counts outcomes and running time per job name."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Counter[str]] = {}
        self.busy: dict[str, float] = {}

    def _count(self, job: BackgroundJobMetadata, outcome: str) -> None:
        self.outcomes.setdefault(job.name, Counter())[outcome] += 1

    def job_rejected(self, job: BackgroundJobMetadata) -> None:
        """Count a job refused with `QueueFullError`."""
        self._count(job, "rejected")

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        """Count a job that ran, and add up its running time."""
        self._count(job, outcome)
        self.busy[job.name] = self.busy.get(job.name, 0.0) + duration

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        """Count a job discarded at shutdown."""
        self._count(job, "dropped")

    def table(self) -> list[str]:
        """Return the per-name table as lines of text."""
        width = max([len(name) for name in self.outcomes] + [3])
        header = "".join(f"{outcome:>10}" for outcome in _OUTCOMES)
        lines = ["  " + "job".ljust(width) + header + "   mean run"]
        for name in sorted(self.outcomes):
            counts = self.outcomes[name]
            ran = sum(counts[outcome] for outcome in _OUTCOMES[:4])
            mean = f"{self.busy.get(name, 0.0) / ran:10.3f}s" if ran else "          -"
            cells = "".join(f"{counts[outcome]:>10}" for outcome in _OUTCOMES)
            lines.append("  " + name.ljust(width) + cells + mean)
        return lines


@attrs.define
class _Progress:
    """What the submitting side knows, for the status line and the self-check."""

    planned: int
    phase: str = "submitting"
    submitted: int = 0  # spawn/send calls made
    accepted: int = 0  # ... that returned normally
    rejected: int = 0  # ... that raised QueueFullError
    refused: list[str] = attrs.Factory(list)  # names of those that raised RuntimeClosedError
    waiting: int = 0  # send() calls waiting now
    deadline: float = math.inf  # drain deadline, once closing
    # Set once every job planned before the close has been submitted.
    caught_up: trio.Event = attrs.Factory(trio.Event)
    # Set when aclose() is about to be called.
    closing: trio.Event = attrs.Factory(trio.Event)


def _status_lines(now: float, progress: _Progress, stats: BackgroundStatistics) -> tuple[str, str]:
    """Return the status line, and a shorter form of it for narrow terminals."""
    phase = short_phase = progress.phase
    if phase == "draining":
        left = max(progress.deadline - now, 0.0)
        phase += f" ({left:.1f}s left)"
        short_phase = f"drain {left:.1f}s"
    elif phase == "submitting":
        short_phase = "jobs"
    jobs = f"{now:5.1f}s {{}} {progress.submitted}/{progress.planned}"
    line = (
        jobs.format(phase) + f" | queued {stats.queued:>3}/{stats.max_queue_size}"
        f" running {stats.running:>3}/{stats.max_concurrent_tasks}"
        f" | completed {stats.completed} failed {stats.failed} timed_out {stats.timed_out}"
        f" rejected {stats.rejected}"
    )
    short = (
        jobs.format(short_phase) + f" q {stats.queued}/{stats.max_queue_size}"
        f" run {stats.running}/{stats.max_concurrent_tasks} ok {stats.completed}"
        f" fail {stats.failed} t/o {stats.timed_out} rej {stats.rejected}"
    )
    if stats.closed:
        line += f" | cancelled {stats.cancelled} dropped {stats.dropped}"
        short += f" cut {stats.cancelled} drop {stats.dropped}"
    if progress.waiting:
        line += f" | send() waiting {progress.waiting}"
        short += f" wait {progress.waiting}"
    return line, short


def _describe(jobs: Sequence[BackgroundJobMetadata]) -> list[str]:
    if not jobs:
        return []
    by_name = Counter(job.name for job in jobs)
    lines = ["      by name: " + ", ".join(f"{name} x{n}" for name, n in by_name.most_common())]
    lines += [
        f"      {job.name} (request_id={job.request_id})" for job in jobs[:_REPORT_ITEMS_SHOWN]
    ]
    if len(jobs) > _REPORT_ITEMS_SHOWN:
        lines.append(f"      ... and {len(jobs) - _REPORT_ITEMS_SHOWN} more")
    return lines


# ---------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------


async def _send(handle: BackgroundHandle, job: PlannedJob, progress: _Progress) -> None:
    progress.waiting += 1
    try:
        await handle.send(job.fn, job.work, request_id=job.request_id, timeout=job.timeout)
    except RuntimeClosedError:
        progress.refused.append(job.fn.__name__)
    else:
        progress.accepted += 1
    finally:
        progress.waiting -= 1


async def _submit_all(
    handle: BackgroundHandle, scenario: Scenario, progress: _Progress, start: float
) -> None:
    # Each planned job is one "request". Requests whose job must not be lost wait in
    # send(), each in its own task as a request handler would; the others spawn() and
    # shed the job when the queue is full. Jobs already due are submitted without
    # sleeping, so that a busy machine falls behind the plan as little as possible.
    async with trio.open_nursery() as requests:
        for job in scenario.jobs:
            if job.at >= scenario.close_at and not progress.caught_up.is_set():
                progress.caught_up.set()
                await progress.closing.wait()
            if start + job.at > trio.current_time():
                await trio.sleep_until(start + job.at)
            progress.submitted += 1
            if job.wait:
                requests.start_soon(_send, handle, job, progress)
                continue
            try:
                handle.spawn(job.fn, job.work, request_id=job.request_id, timeout=job.timeout)
            except QueueFullError:
                progress.rejected += 1
            except RuntimeClosedError:
                progress.refused.append(job.fn.__name__)
            else:
                progress.accepted += 1
        progress.caught_up.set()


async def _show_progress(
    console: _Console,
    runtime_statistics: Callable[[], BackgroundStatistics],
    progress: _Progress,
    start: float,
    interval: float,
) -> None:
    tick = start
    while True:
        tick += interval
        await trio.sleep_until(tick)
        console.status(*_status_lines(trio.current_time() - start, progress, runtime_statistics()))


def _self_check(
    progress: _Progress,
    stats: BackgroundStatistics,
    report: BackgroundShutdownError | None,
    tally: OutcomeTally,
) -> list[str]:
    """Compare what the demo did with what the statistics, report and instrument say."""
    problems = []
    states = (
        stats.queued
        + stats.running
        + stats.completed
        + stats.failed
        + stats.timed_out
        + stats.cancelled
        + stats.dropped
    )
    if stats.accepted != states:
        problems.append(f"accepted {stats.accepted} != sum of the states {states}")
    if stats.queued or stats.running or not stats.closed:
        problems.append(
            f"after aclose(): queued {stats.queued}, running {stats.running}, closed {stats.closed}"
        )
    if stats.accepted != progress.accepted:
        problems.append(f"accepted {stats.accepted}, but {progress.accepted} calls succeeded")
    if stats.rejected != progress.rejected:
        problems.append(f"rejected {stats.rejected}, but {progress.rejected} QueueFullErrors")
    calls = progress.accepted + progress.rejected + len(progress.refused)
    if calls != progress.submitted:
        problems.append(f"{progress.submitted} calls made, {calls} came back")
    if report is None:
        problems.append(
            "aclose() cut nothing off: expected a BackgroundShutdownError"
            " (did the demo fall behind its plan? try fewer --jobs or a longer --duration)"
        )
    elif (len(report.cancelled), len(report.dropped)) != (stats.cancelled, stats.dropped):
        problems.append(
            f"report lists {len(report.cancelled)} cancelled / {len(report.dropped)} dropped,"
            f" statistics count {stats.cancelled} / {stats.dropped}"
        )
    elif report.statistics != stats:
        problems.append(f"report.statistics {report.statistics} != statistics() {stats}")
    totals: Counter[str] = Counter()
    for counts in tally.outcomes.values():
        totals.update(counts)
    for outcome in _OUTCOMES:
        if totals[outcome] != getattr(stats, outcome):
            problems.append(
                f"instrument saw {totals[outcome]} {outcome},"
                f" statistics count {getattr(stats, outcome)}"
            )
    return problems


def _report_lines(
    progress: _Progress,
    stats: BackgroundStatistics,
    report: BackgroundShutdownError | None,
    drain_timeout: float,
) -> list[str]:
    lines = ["", "Shutdown report"]
    if report is not None:
        lines.append(f"  BackgroundShutdownError: {report}")
        lines.append(f"  cancelled while running: {len(report.cancelled)}")
        lines += _describe(report.cancelled)
        lines.append(f"  dropped before starting: {len(report.dropped)}")
        lines += _describe(report.dropped)
    else:
        lines.append(f"  aclose() returned None: all work finished within {drain_timeout:g}s")
    if progress.refused:
        names = ", ".join(f"{n} x{c}" for n, c in Counter(progress.refused).most_common())
        lines.append(
            f"  refused after aclose() began (RuntimeClosedError): {len(progress.refused)}"
            f" ({names})"
        )
    lines.append(
        f"  final statistics: accepted {stats.accepted} = completed {stats.completed}"
        f" + failed {stats.failed} + timed_out {stats.timed_out}"
        f" + cancelled {stats.cancelled} + dropped {stats.dropped}"
        f" (queued {stats.queued}, running {stats.running})"
    )
    lines.append(
        f"  submitted {progress.submitted} = accepted {stats.accepted}"
        f" + rejected {stats.rejected} (QueueFullError) + refused {len(progress.refused)}"
    )
    return lines


async def run_demo(
    options: DemoOptions,
    out: TextIO,
    *,
    interactive: bool = False,
    width: int = 80,
) -> int:
    r"""Run the demo in the current Trio run.

    Args:
        options: What to run.
        out: Where to write the output.
        interactive: Rewrite one status line in place with ``\r`` (for a terminal)
            instead of writing one plain line per period.
        width: Terminal width; interactive status lines are cut to fit.

    Returns:
        The exit status: 0 when the demo ran as designed (the shutdown report is
        expected), 1 when its self-check found the statistics, the report and the
        instrument disagreeing with each other or with what the demo submitted.
    """
    scenario = build_scenario(options)
    config = scenario.config
    console = _Console(out, interactive=interactive, width=width)
    interval = min(0.1 if interactive else 1.0, options.duration / 10)
    tally = OutcomeTally()
    progress = _Progress(planned=len(scenario.jobs))
    report: BackgroundShutdownError | None = None

    console.message(
        f"trio_background demo: {len(scenario.jobs)} jobs in ~{options.duration:g}s"
        f" (seed {options.seed}; repeat with --seed {options.seed})"
    )
    console.message(
        f"  config: max_concurrent_tasks={config.max_concurrent_tasks}"
        f" max_queue_size={config.max_queue_size} job_timeout={config.job_timeout:g}s"
        f" drain_timeout={config.drain_timeout:g}s"
    )
    with _quiet_job_logs(console) as log_handler:
        start = trio.current_time()
        async with trio.open_nursery() as display:
            async with open_background_runtime(config, instruments=[tally]) as runtime:
                display.start_soon(
                    _show_progress, console, runtime.statistics, progress, start, interval
                )
                async with trio.open_nursery() as requests:
                    requests.start_soon(_submit_all, runtime.handle(), scenario, progress, start)
                    await trio.sleep_until(start + scenario.close_at)
                    # On a machine too busy to keep to the plan, close only once the
                    # submitter has made every call planned before the close.
                    await progress.caught_up.wait()
                    now = trio.current_time() - start
                    console.message(
                        f"{now:5.1f}s aclose(): intake closed; draining for up to"
                        f" {config.drain_timeout:g}s"
                    )
                    progress.phase = "draining"
                    progress.deadline = now + config.drain_timeout
                    progress.closing.set()
                    try:
                        await runtime.aclose()
                    except BackgroundShutdownError as exc:
                        report = exc
                    progress.phase = "closed"
                stats = runtime.statistics()
            display.cancel_scope.cancel()
        console.status(*_status_lines(trio.current_time() - start, progress, stats))
        console.finish()

    lines = _report_lines(progress, stats, report, config.drain_timeout)
    lines += ["", "Outcomes by job name (counted by a BackgroundInstrument)", *tally.table()]
    lines += ["", log_handler.summary()]
    problems = _self_check(progress, stats, report, tally)
    if problems:
        lines.append("Self-check FAILED:")
        lines += [f"  {problem}" for problem in problems]
    else:
        lines.append("Self-check passed: the counters add up; report and instrument agree.")
    for line in lines:
        console.message(line)
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trio_background``.

    Args:
        argv: Command-line arguments without the program name (`None`: `sys.argv`).

    Returns:
        The process exit status (130 after Ctrl-C).
    """
    options = parse_args(argv)
    out = sys.stdout
    interactive = out.isatty()
    width = shutil.get_terminal_size().columns
    demo = functools.partial(run_demo, options, out, interactive=interactive, width=width)
    try:
        return trio.run(demo)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        # Ctrl-C arrives in the main task, inside the demo's nurseries.
        if group.split(KeyboardInterrupt)[1] is not None:
            raise
    out.write("\ninterrupted\n")
    return 130
