"""Soak test: push many mixed jobs through ONE runtime and check that nothing is lost.

Run it as::

    python -m bench.soak [--jobs N]

``N`` (default 1,000,000) jobs go through a single runtime with the default
configuration (``max_queue_size=1024``, ``max_concurrent_tasks=128``), all
submitted by one producer with ``await handle.send``. The mix is deterministic,
by job index ``i``:

* ``i % 20 <= 16`` (85 %): completes;
* ``i % 20 in (17, 18)`` (10 %): fails (raises `BackgroundJobError`);
* ``i % 20 == 19`` (5 %): times out (``trio.sleep_forever`` with a 1 ms
  per-job timeout, under the real clock).

Backpressure is made to engage, deterministically, over and over: a completing
job waits for a *gate* before it returns. A releaser task opens the gate each
time the whole program is blocked (`trio.testing.wait_all_tasks_blocked`) --
which, while the producer still has jobs to send, can only mean that the
producer is blocked in ``send`` because every slot is busy and the queue is
full. The soak checks that this is so at every release, so the producer is held
back by the queue roughly once per 1,150 jobs, and peak memory is measured with
the queue full. Jobs still finish as fast as the loop can run them.

Checked at the end, exactly: every counter of ``statistics()``, the outcomes an
instrument saw, and how many job bodies actually ran; along the way, the caps
and the accounting identity every 1,000 sends. Memory is measured with
`tracemalloc` from just before the runtime opens: the peak must stay under
16 MB, and what is still allocated after the runtime has closed (and
``gc.collect()``, with the closed runtime object still referenced) under
256 KB. The exit status is non-zero if any check fails.

The ``trio_background`` logger is raised to CRITICAL for the duration of the
soak (and restored afterwards): otherwise every failed job writes an ERROR
record with a traceback and every timed-out job a WARNING, which would measure
the logging system rather than the runtime. The counters still record every
outcome.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
import trio.testing

from trio_background import (
    BackgroundJobError,
    BackgroundJobMetadata,
    BackgroundStatistics,
    BackgroundTaskConfig,
    open_background_runtime,
)

DEFAULT_JOBS = 1_000_000
PEAK_LIMIT_BYTES = 16 * 1024 * 1024
RETAINED_LIMIT_BYTES = 256 * 1024
JOB_TIMEOUT = 0.001
MIX_PERIOD = 20
FAIL_FROM = 17  # i % 20 in [17, 19) fails
TIME_OUT_FROM = 19  # i % 20 == 19 times out
SAMPLE_EVERY = 1_000  # check a statistics() snapshot this often


def expected_mix(jobs: int) -> tuple[int, int, int]:
    """Return ``(completed, failed, timed_out)`` for ``jobs`` jobs of the soak's mix."""
    full, rest = divmod(jobs, MIX_PERIOD)
    completed = full * FAIL_FROM + min(rest, FAIL_FROM)
    failed = full * (TIME_OUT_FROM - FAIL_FROM) + max(0, min(rest, TIME_OUT_FROM) - FAIL_FROM)
    return completed, failed, jobs - completed - failed


class OutcomeCounter:
    """An instrument that counts outcomes: an independent check of the statistics."""

    def __init__(self) -> None:
        self.outcomes = {"completed": 0, "failed": 0, "timed_out": 0, "cancelled": 0}
        self.accepted = 0

    def job_accepted(self, job: BackgroundJobMetadata) -> None:
        self.accepted += 1

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        self.outcomes[outcome] += 1


@dataclass(frozen=True)
class SoakResult:
    """What one soak run measured."""

    jobs: int
    statistics: BackgroundStatistics
    wall_seconds: float
    peak_bytes: int
    retained_bytes: int
    stalls: int
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        s = self.statistics
        lines = [
            f"soak: {self.jobs:,} jobs through one runtime "
            f"(max_queue_size={s.max_queue_size}, max_concurrent_tasks={s.max_concurrent_tasks})",
            f"  completed={s.completed:,} failed={s.failed:,} timed_out={s.timed_out:,} "
            f"cancelled={s.cancelled} dropped={s.dropped} rejected={s.rejected} "
            f"queued={s.queued} running={s.running} accepted={s.accepted:,}",
            f"  backpressure: the producer waited in send() with queue and slots full "
            f"{self.stalls:,} times",
            f"  wall time {self.wall_seconds:.1f} s "
            f"({self.jobs / max(self.wall_seconds, 1e-9):,.0f} jobs/s, under tracemalloc)",
            f"  peak traced memory {self.peak_bytes / 2**20:.2f} MB "
            f"(limit {PEAK_LIMIT_BYTES / 2**20:.0f} MB)",
            f"  retained after close {self.retained_bytes / 1024:.1f} KB "
            f"(limit {RETAINED_LIMIT_BYTES / 1024:.0f} KB)",
            "  logger 'trio_background' was raised to CRITICAL during the soak: "
            "per-job ERROR/WARNING records were suppressed",
        ]
        if self.problems:
            lines.append("FAILED:")
            lines.extend(f"  - {problem}" for problem in self.problems)
        else:
            lines.append("OK: exact counts, memory within bounds")
        return "\n".join(lines)


async def soak(
    jobs: int = DEFAULT_JOBS,
    *,
    config: BackgroundTaskConfig | None = None,
    job_timeout: float = JOB_TIMEOUT,
) -> SoakResult:
    """Run the soak in the current Trio run and return what it measured.

    Args:
        jobs: How many jobs to submit.
        config: The runtime's configuration (default: `BackgroundTaskConfig()`).
        job_timeout: The per-job timeout of the jobs that time out.
    """
    problems: list[str] = []
    ran = [0, 0, 0]  # job bodies entered: completing, failing, timing out
    gate = [trio.Event()]  # completing jobs wait for gate[0]; the releaser replaces it
    producing = True
    stalls = 0

    async def completes() -> None:
        ran[0] += 1
        await gate[0].wait()

    async def fails() -> None:
        ran[1] += 1
        raise BackgroundJobError("soak failure")

    async def times_out() -> None:
        ran[2] += 1
        await trio.sleep_forever()

    logger = logging.getLogger("trio_background")
    old_level = logger.level
    logger.setLevel(logging.CRITICAL)
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    try:
        gc.collect()
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        counter = OutcomeCounter()
        start = time.perf_counter()
        async with open_background_runtime(config, instruments=[counter]) as runtime:

            async def releaser() -> None:
                nonlocal stalls
                while True:
                    await trio.testing.wait_all_tasks_blocked()
                    if producing:
                        # Only the producer can be runnable-but-waiting: it is in send().
                        stalls += 1
                        snapshot = runtime.statistics()
                        if (
                            snapshot.queued != snapshot.max_queue_size
                            or snapshot.running != snapshot.max_concurrent_tasks
                        ):
                            problems.append(f"producer blocked without a full queue: {snapshot}")
                    opened, gate[0] = gate[0], trio.Event()
                    opened.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(releaser)
                send = runtime.handle().send
                for i in range(jobs):
                    kind = i % MIX_PERIOD
                    if kind < FAIL_FROM:
                        await send(completes)
                    elif kind < TIME_OUT_FROM:
                        await send(fails)
                    else:
                        await send(times_out, timeout=job_timeout)
                    if i % SAMPLE_EVERY == 0:
                        _check_snapshot(runtime.statistics(), i + 1, problems)
                producing = False
                await runtime.wait_idle()
                nursery.cancel_scope.cancel()
        wall = time.perf_counter() - start
        final = runtime.statistics()
        peak = tracemalloc.get_traced_memory()[1] - baseline
        del send, nursery
        gc.collect()  # `runtime` stays referenced: a closed runtime must hold no job state
        retained = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        if started_tracing:
            tracemalloc.stop()
        logger.setLevel(old_level)

    completed, failed, timed_out = expected_mix(jobs)
    want = {
        "queued": 0,
        "running": 0,
        "completed": completed,
        "failed": failed,
        "timed_out": timed_out,
        "cancelled": 0,
        "dropped": 0,
        "rejected": 0,
        "accepted": jobs,
    }
    got = {name: getattr(final, name) for name in want}
    if got != want:
        problems.append(f"statistics {got} != expected {want}")
    if not final.closed:
        problems.append("runtime not closed after the block")
    seen = {"completed": completed, "failed": failed, "timed_out": timed_out, "cancelled": 0}
    if counter.outcomes != seen or counter.accepted != jobs:
        problems.append(
            f"instrument saw accepted={counter.accepted} outcomes={counter.outcomes}, "
            f"expected accepted={jobs} outcomes={seen}"
        )
    if ran != [completed, failed, timed_out]:
        problems.append(f"job bodies ran {ran}, expected {[completed, failed, timed_out]}")
    if peak >= PEAK_LIMIT_BYTES:
        problems.append(f"peak traced memory {peak:,} B >= {PEAK_LIMIT_BYTES:,} B")
    if retained >= RETAINED_LIMIT_BYTES:
        problems.append(f"retained memory {retained:,} B >= {RETAINED_LIMIT_BYTES:,} B")
    return SoakResult(
        jobs=jobs,
        statistics=final,
        wall_seconds=wall,
        peak_bytes=peak,
        retained_bytes=retained,
        stalls=stalls,
        problems=tuple(problems),
    )


def _check_snapshot(stats: BackgroundStatistics, submitted: int, problems: list[str]) -> None:
    if stats.accepted != submitted:
        problems.append(f"after {submitted} sends, accepted == {stats.accepted}")
    if stats.queued > stats.max_queue_size or stats.running > stats.max_concurrent_tasks:
        problems.append(f"caps exceeded after {submitted} sends: {stats}")
    if stats.cancelled or stats.dropped or stats.rejected or stats.closed:
        problems.append(f"unexpected counters after {submitted} sends: {stats}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak from the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Push mixed jobs through one trio_background runtime and check every count.",
    )
    parser.add_argument(
        "--jobs", type=int, default=DEFAULT_JOBS, help=f"jobs to submit (default {DEFAULT_JOBS:,})"
    )
    args = parser.parse_args(argv)
    if args.jobs < 0:
        parser.error("--jobs must be >= 0")
    result = trio.run(soak, args.jobs)
    print(result.summary(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
