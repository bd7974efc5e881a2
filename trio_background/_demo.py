"""The live demo, ``python -m trio_background``: a busy day of a web service in ~10 s."""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import shutil
import signal
import sys
import textwrap
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import NamedTuple, TextIO

import attrs
import trio

from . import (
    BackgroundHandle,
    BackgroundInstrument,
    BackgroundJobError,
    BackgroundJobMetadata,
    BackgroundRuntime,
    BackgroundShutdownError,
    BackgroundStatistics,
    BackgroundTaskConfig,
    QueueFullError,
    Retry,
    RuntimeClosedError,
    current_job,
    open_background_runtime,
)
from ._demo_durable import durable_demo

# Exit statuses besides 0 (as designed) and 1 (self-check failed): like other command-line
# tools, what a shell shows for a program stopped by SIGINT or SIGPIPE (128 + the signal).
INTERRUPTED = 130  # Ctrl-C (the runtime still drained and the report was printed)
OUTPUT_CUT = 141  # stdout was closed early, as by ``| head`` (the demo stopped at once)

_SHOWN = 3  # log records shown per level
_OUTCOMES = ("completed", "failed", "timed_out", "cancelled", "dropped", "rejected")
_STATES = ("queued", "running", *_OUTCOMES[:5])  # what every accepted job is, at any time


class DemoOptions(NamedTuple):
    """What the demo runs: length in seconds, jobs, the plan's seed; or the durable demo."""

    duration: float = 10.0
    jobs: int = 3000
    seed: int = 0
    durable: bool = False


def parse_args(argv: Sequence[str] | None = None) -> DemoOptions:
    """Parse the command line (`None`: ``sys.argv``); without ``--seed``, pick a seed."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_background",
        description="Live demo of trio_background: simulated jobs, a live statistics line, then"
        " a shutdown that cuts the last jobs off, and its report (Ctrl-C: shut down early).",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="approximate length of the demo, at least 0.1 (default: 10)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="number of jobs, at least 20 (default: 3000, or 400 with --durable; a busy"
        " machine may not keep up with much more than 1000 per second of --duration)",
    )
    parser.add_argument(
        "--durable",
        action="store_true",
        help="show durable jobs instead, in a temporary SQLite file: kill -9 the worker"
        " process mid-run, start another, lose nothing (--duration and --seed do not apply)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="fix the plan: which jobs are submitted, when, and which ones fail or hang"
        " (default: random; the demo prints it). It does not fix the outcome: timings vary"
        " on a loaded machine, and so do the counts that depend on them",
    )
    args = parser.parse_args(argv)
    if not (args.duration >= 0.1 and math.isfinite(args.duration)):
        parser.error(f"argument --duration: must be a finite number >= 0.1, got {args.duration}")
    jobs = args.jobs if args.jobs is not None else 400 if args.durable else 3000
    if jobs < 20:
        parser.error(f"argument --jobs: must be >= 20, got {jobs}")
    seed = random.randrange(100_000) if args.seed is None else args.seed
    return DemoOptions(args.duration, jobs, seed, args.durable)


# Ordinary jobs: weight, mean duration and timeout (in mean durations; None: job_timeout),
# chances of failing and of hanging until the timeout, whether submitted with ``await
# send()`` (must not be lost) rather than ``spawn()``, and the error they fail with.
_KINDS = {
    "send_email": (25, 1.5, None, 0.04, 0.005, True, BackgroundJobError, "SMTP 451 try later"),
    "warm_cache": (25, 0.5, 2.0, 0.1, 0.03, False, ConnectionError, "redis refused"),
    "write_audit": (30, 0.3, None, 0.005, 0.0, True, OSError, "audit log is read-only"),
    "resize_image": (10, 3.0, None, 0.03, 0.0, False, ValueError, "cannot decode the image"),
    "call_webhook": (10, 1.5, None, 0.08, 0.05, False, ConnectionError, "webhook returned 503"),
}


class PlannedJob(NamedTuple):
    """One submission: when (seconds after the start), what, and how it behaves."""

    at: float
    name: str
    seconds: float  # how long it works, unless it hangs until its timeout
    request_id: str
    timeout: float | None = None  # None: the config's job_timeout
    wait: bool = False  # submitted with ``await handle.send(...)``, not ``handle.spawn(...)``
    hang: bool = False
    failure: Exception | None = None  # raised after working (only the first run, if retried)
    key: str | None = None  # webhooks: one customer's never overlap
    retry: Retry | None = None  # cache warm-ups: a refused connection is tried again

    async def run(self) -> None:
        if self.hang:
            await trio.sleep_forever()
        await trio.sleep(self.seconds)
        if self.failure is not None and (self.retry is None or current_job().attempt == 1):
            raise self.failure


class Scenario(NamedTuple):
    """The runtime's configuration, the submissions in time order, and when to close."""

    config: BackgroundTaskConfig
    jobs: tuple[PlannedJob, ...]
    close_at: float
    resizes: tuple[tuple[float, int], ...] = ()  # (when, max_concurrent_tasks)


def _nice(seconds: float) -> float:
    return float(f"{seconds:.3g}")  # three significant digits read well in the output


def build_scenario(options: DemoOptions) -> Scenario:
    """Plan the demo from the options alone, in fractions of the duration D.

    * 0 to 0.7 D: ordinary jobs, keeping the runtime about half busy; a third of them
      arrive in two bursts (at 0.25 D and 0.5 D) that fill the queue for a moment.
    * 0.72 D: slow ``export_report`` jobs (with a timeout longer than the short
      ``job_timeout``), enough to fill every slot and half the queue.
    * 0.5 D, mid-burst: ``resize()`` doubles the slots (queued jobs start at once); 0.62 D:
      back to the first number (nothing is cancelled: the excess drains).
    * 0.8 D: ``aclose()`` with ``drain_timeout`` 0.15 D: the slow jobs are cut off (those
      running cancelled, the others dropped). At 0.85 D a few requests still arrive.
    """
    rng, d = random.Random(options.seed), options.duration
    slots = max(4, min(64, options.jobs // 60))
    n_slow = min(options.jobs // 4, 2 * slots)
    n_after = min(3, options.jobs // 20)
    n_regular = options.jobs - n_slow - n_after
    window = 0.7 * d
    mean = _nice(0.5 * slots * window / n_regular)
    config = BackgroundTaskConfig(
        max_queue_size=2 * slots,
        max_concurrent_tasks=slots,
        drain_timeout=_nice(0.15 * d),
        job_timeout=_nice(6 * mean),
    )
    ids = iter(f"req-{n:08x}" for n in rng.sample(range(2**32), options.jobs))

    def arrival() -> float:
        pick = rng.random()
        if pick < 0.3:
            at = rng.gauss((0.25 if pick < 0.15 else 0.5) * d, 0.02 * d)
        else:
            at = rng.uniform(0.0, window)
        return min(max(at, 0.0), window)

    def ordinary(at: float) -> PlannedJob:
        name = rng.choices(list(_KINDS), [kind[0] for kind in _KINDS.values()])[0]
        _, cost, timeout, fail, hang, wait, error, message = _KINDS[name]
        seconds, hangs = cost * mean * rng.uniform(0.3, 1.7), rng.random() < hang
        failure = error(message) if rng.random() < fail else None
        timeout = None if timeout is None else _nice(timeout * mean)
        key = f"customer-{rng.randrange(8)}" if name == "call_webhook" else None
        retry = Retry(attempts=3, backoff=mean, jitter=False) if name == "warm_cache" else None
        return PlannedJob(at, name, seconds, next(ids), timeout, wait, hangs, failure, key, retry)

    jobs = [ordinary(at) for at in sorted(arrival() for _ in range(n_regular))]
    for _ in range(n_slow):
        seconds = 0.5 * d * rng.uniform(1.0, 1.5)
        jobs.append(PlannedJob(0.72 * d, "export_report", seconds, next(ids), timeout=d))
    for _ in range(n_after):
        jobs.append(PlannedJob(0.85 * d, "write_audit", mean, next(ids), wait=True))
    resizes = ((0.5 * d, 2 * slots), (0.62 * d, slots))
    return Scenario(config, tuple(jobs), close_at=0.8 * d, resizes=resizes)


class _Console(logging.Handler):
    """Writes wrapped lines, the status line (in place on a terminal), a few log records.

    Once the reader has gone (``BrokenPipeError``), writes nothing more and calls ``on_gone``.
    """

    def __init__(self, out: TextIO, interactive: bool, width: int, on_gone: Callable[[], object]):
        super().__init__(logging.WARNING)
        self._out, self._interactive, self._on_gone = out, interactive, on_gone
        self.width = max(width, 30)
        self.gone = False
        self._status_len = 0  # length of the status line on screen (interactive)
        self._records: Counter[str] = Counter()  # log records seen, by level

    def _write(self, text: str) -> None:
        try:
            if not self.gone:
                self._out.write(text)
                self._out.flush()
        except BrokenPipeError:
            self.gone = True
            self._on_gone()

    def status(self, head: str, fields: list[tuple[str, str]], *, final: bool = False) -> None:
        line = " ".join([head, *(long for long, _ in fields)])
        parts = [head, *(short for _, short in fields)] if len(line) >= self.width else [line]
        if not self._interactive or final:
            return self.message(" ".join(parts))
        while len(" ".join(parts)) >= self.width and len(parts) > 1:
            parts.pop()  # drop whole fields: a cut number would mislead
        line = " ".join(parts)
        self._write("\r" + line.ljust(self._status_len))
        self._status_len = len(line)

    def message(self, text: str) -> None:
        self._write("\r" + " " * self._status_len + "\r" if self._status_len else "")
        self._status_len = 0
        indent = " " * (len(text) - len(text.lstrip()) + 4)
        lines = textwrap.wrap(text, self.width, subsequent_indent=indent, break_on_hyphens=False)
        self._write("".join(line + "\n" for line in lines or [""]))

    def emit(self, record: logging.LogRecord) -> None:
        level, text = record.levelname, record.getMessage()
        self._records[level] += 1
        if self._records[level] > _SHOWN:
            if self._records[level] == _SHOWN + 1:
                self.message(f"  log   (further {level} records not shown)")
            return
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        self.message(f"  log   {level}: {text}")


@attrs.define
class _Run(BackgroundInstrument):
    """A run: its plan, output, own count of its calls, and (as instrument) outcomes by name."""

    scenario: Scenario
    console: _Console
    outcomes: defaultdict[str, Counter[str]] = attrs.Factory(lambda: defaultdict(Counter))
    submitted: int = 0  # spawn/send calls made
    accepted: int = 0  # ... that returned normally
    rejected: int = 0  # ... that raised QueueFullError
    refused: int = 0  # ... that raised RuntimeClosedError
    deadline: float = math.inf  # of the drain, once closing
    stop: trio.CancelScope = attrs.Factory(trio.CancelScope)  # cancelled by Ctrl-C
    interrupted: bool = False
    keys: dict[str, str] = attrs.Factory(dict)  # request id -> key, for keyed jobs
    holders: dict[str, str] = attrs.Factory(dict)  # key -> request id of the job holding it
    overlaps: int = 0  # times a job started while another of its key held it

    def job_started(self, job: BackgroundJobMetadata) -> None:
        key = self.keys.get(job.request_id or "")
        if key is not None:
            self.overlaps += self.holders.setdefault(key, job.request_id or "") != job.request_id

    def job_rejected(self, job: BackgroundJobMetadata) -> None:
        self.outcomes[job.name]["rejected"] += 1

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        self.outcomes[job.name][outcome] += 1
        self.holders.pop(self.keys.get(job.request_id or "", ""), None)

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        self.outcomes[job.name]["dropped"] += 1

    def status(self, now: float, s: BackgroundStatistics, *, final: bool = False) -> None:
        if not s.closed:
            phase = "submitting"
        elif s.queued or s.running:
            phase = f"draining ({max(self.deadline - now, 0.0):.1f}s left)"
        else:
            phase = "closed"
        head = f"{now:5.1f}s {phase} {self.submitted}/{len(self.scenario.jobs)}"
        fields = [
            (f"| queued {s.queued:>3}/{s.max_queue_size}", f"q {s.queued}/{s.max_queue_size}"),
            (f"running {s.running:>3}/{s.max_concurrent_tasks}", f"run {s.running}"),
            (f"| completed {s.completed}", f"ok {s.completed}"),
            (f"failed {s.failed}", f"fail {s.failed}"),
            (f"timed_out {s.timed_out}", f"t/o {s.timed_out}"),
            (f"rejected {s.rejected}", f"rej {s.rejected}"),
        ]
        if s.cancelled or s.dropped:
            fields += [(f"| cancelled {s.cancelled}", f"cut {s.cancelled}")]
            fields += [(f"dropped {s.dropped}", f"drop {s.dropped}")]
        self.console.status(head, fields, final=final)

    async def submit(self, handle: BackgroundHandle, job: PlannedJob) -> None:
        self.submitted += 1
        try:
            if job.key is not None:
                self.keys[job.request_id] = job.key
            rid, key, retry, timeout = job.request_id, job.key, job.retry, job.timeout
            if job.wait:
                await handle.send(job.run, name=job.name, request_id=rid, timeout=timeout)
            else:
                handle.spawn(
                    job.run, name=job.name, request_id=rid, key=key, retry=retry, timeout=timeout
                )
        except QueueFullError:
            self.rejected += 1
        except RuntimeClosedError:
            self.refused += 1
        else:
            self.accepted += 1

    async def play(self, runtime: BackgroundRuntime) -> BackgroundShutdownError | None:
        """Submit the planned jobs, close the runtime when planned (or on Ctrl-C), drain."""
        start, handle = trio.current_time(), runtime.handle()
        close_at, drain = self.scenario.close_at, self.scenario.config.drain_timeout

        async def submit_all(jobs: Sequence[PlannedJob]) -> None:
            # Each job is a "request": those that wait in send() get a task each, as request
            # handlers would; the others spawn() right here. Jobs already due are submitted
            # without sleeping, so that a busy machine falls behind the plan less.
            for job in jobs:
                if start + job.at > trio.current_time():
                    await trio.sleep_until(start + job.at)
                if job.wait:
                    requests.start_soon(self.submit, handle, job)
                else:
                    await self.submit(handle, job)  # never yields

        async def resize_when_planned() -> None:
            for at, slots in self.scenario.resizes:
                await trio.sleep_until(start + at)
                old = runtime.statistics()
                runtime.resize(max_concurrent_tasks=slots)
                new = runtime.statistics()
                self.console.message(
                    f"{at:5.1f}s resize(max_concurrent_tasks={slots}): running {old.running}"
                    f" -> {new.running}, queued {old.queued} -> {new.queued}"
                )

        before = [job for job in self.scenario.jobs if job.at < close_at]
        async with trio.open_nursery() as requests:
            with self.stop:
                requests.start_soon(resize_when_planned)
                await submit_all(before)
                await trio.sleep_until(start + close_at)
            if not self.interrupted:  # the requests that arrive after aclose() began
                requests.start_soon(submit_all, self.scenario.jobs[len(before) :])
            now = trio.current_time() - start
            why = "Ctrl-C: aclose() early" if self.interrupted else "aclose()"
            self.console.message(f"{now:5.1f}s {why}: intake closed; draining up to {drain:g}s")
            self.deadline = now + drain
            try:
                await runtime.aclose()
            except BackgroundShutdownError as exc:
                return exc
        return None

    async def show_progress(self, runtime: BackgroundRuntime, interval: float) -> None:
        start = tick = trio.current_time()
        while True:
            tick += interval
            await trio.sleep_until(tick)
            self.status(tick - start, runtime.statistics())

    async def watch_ctrl_c(self, signals: AsyncIterator[int]) -> None:
        # On Ctrl-C, stop submitting: `play` then closes the runtime at once.
        async for _ in signals:
            self.interrupted = True
            self.stop.cancel()

    def check(self, s: BackgroundStatistics, report: BackgroundShutdownError | None) -> list[str]:
        """Compare the demo's own count of its calls with the statistics, report and instrument."""
        states = " + ".join(f"{name} {getattr(s, name)}" for name in _STATES)
        total = sum(getattr(s, name) for name in _STATES)
        seen = sum(self.outcomes.values(), Counter[str]())
        checks: list[tuple[str, object, object]] = [
            (f"accepted (counted by the demo) vs {states}", self.accepted, total),
            ("statistics' accepted vs the demo's count", s.accepted, self.accepted),
            ("statistics' rejected vs the demo's count", s.rejected, self.rejected),
            ("queued + running after aclose()", s.queued + s.running, 0),
            ("webhooks of one customer that overlapped", self.overlaps, 0),
            *((f"instrument's vs statistics' {n}", seen[n], getattr(s, n)) for n in _OUTCOMES),
        ]
        if report is not None:
            listed = (len(report.cancelled), len(report.dropped))
            checks.append(("report's jobs vs cancelled, dropped", listed, (s.cancelled, s.dropped)))
            checks.append(("report's statistics vs statistics()", report.statistics, s))
        problems = [f"{what}: {a} != {b}" for what, a, b in checks if a != b]
        if report is None and not self.interrupted:
            problems.append("aclose() cut nothing off: the demo fell behind (try fewer --jobs)")
        return problems

    def report(self, s: BackgroundStatistics, report: BackgroundShutdownError | None) -> list[str]:
        rows = [[k, *(str(n[o]) for o in _OUTCOMES)] for k, n in sorted(self.outcomes.items())]
        for header in (["job", *_OUTCOMES], ["job", "ok", "fail", "t/o", "cut", "drop", "rej"]):
            widths = [max(map(len, column)) for column in zip(header, *rows, strict=False)]
            if 1 + sum(w + 1 for w in widths) <= self.console.width:
                break  # else the short column names, for narrow terminals
        return [
            "",
            "Shutdown report",
            f"  BackgroundShutdownError: {report}"
            if report is not None
            else "  aclose() returned None: all work finished within drain_timeout",
            f"  final statistics: accepted {s.accepted} = completed {s.completed}"
            f" + failed {s.failed} + timed_out {s.timed_out} + cancelled {s.cancelled}"
            f" + dropped {s.dropped} (queued {s.queued}, running {s.running});"
            f" {s.retried} runs retried; webhooks keyed by customer, never overlapping",
            f"  submitted {self.submitted} = accepted {self.accepted}"
            f" + rejected {self.rejected} (QueueFullError)"
            f" + refused {self.refused} (RuntimeClosedError, after aclose() began)",
            "",
            "Outcomes by job name (counted by a BackgroundInstrument)",
            *(
                "  " + " ".join([row[0].ljust(widths[0]), *map(str.rjust, row[1:], widths[1:])])
                for row in [header, *rows]
            ),
        ]


async def run_demo(
    options: DemoOptions, out: TextIO, *, interactive: bool = False, width: int = 80
) -> int:
    """Run the demo in this Trio run; return 0, 1 (self-check failed), INTERRUPTED or OUTPUT_CUT."""
    scenario = build_scenario(options)
    logger = logging.getLogger("trio_background")
    with trio.CancelScope() as cancel_scope, trio.open_signal_receiver(signal.SIGINT) as ctrl_c:
        console = _Console(out, interactive, width, on_gone=cancel_scope.cancel)
        run = _Run(scenario, console)
        console.message(
            f"trio_background demo: {len(scenario.jobs)} jobs in ~{options.duration:g}s"
            f" (--seed {options.seed} repeats this plan)"
        )
        console.message(f"  {scenario.config!r}")
        start = trio.current_time()
        logger.addHandler(console)
        try:
            async with trio.open_nursery() as display:
                display.start_soon(run.watch_ctrl_c, ctrl_c)
                async with open_background_runtime(scenario.config, instruments=[run]) as runtime:
                    interval = min(0.1 if interactive else 1.0, options.duration / 10)
                    display.start_soon(run.show_progress, runtime, interval)
                    report = await run.play(runtime)
                display.cancel_scope.cancel()
        finally:
            logger.removeHandler(console)
        stats = runtime.statistics()
        run.status(trio.current_time() - start, stats, final=True)
        problems = run.check(stats, report)
        verdict = ["Self-check FAILED:", *(f"  {problem}" for problem in problems)]
        if not problems:
            verdict = ["Self-check passed: the counters add up; report and instrument agree."]
        for line in run.report(stats, report) + verdict:
            console.message(line)
    if console.gone:
        return OUTPUT_CUT
    return INTERRUPTED if run.interrupted else 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trio_background``: run the demo, return the exit status."""
    try:
        try:
            options = parse_args(argv)
            out, width = sys.stdout, shutil.get_terminal_size().columns  # honours COLUMNS
            if options.durable:
                status = durable_demo(options.jobs, out, width)
            else:
                status = trio.run(
                    lambda: run_demo(options, out, interactive=out.isatty(), width=width)
                )
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
    except KeyboardInterrupt:  # Ctrl-C before or after the demo watches for it
        status = INTERRUPTED
    except BrokenPipeError:
        status = OUTPUT_CUT
    if status == OUTPUT_CUT:
        # Python's advice (the signal module's "Note on SIGPIPE"): point stdout at devnull,
        # so that nothing more fails on the closed pipe (not even the final flush), and exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return status
