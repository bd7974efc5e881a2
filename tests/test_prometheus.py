"""Tests for trio_background.prometheus: exact metric values after scripted runs."""

from __future__ import annotations

import contextlib
import math
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from helpers import Tracker, random_waits
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest

import trio_background
from trio_background import (
    BackgroundInstrument,
    BackgroundJob,
    BackgroundShutdownError,
    BackgroundTaskConfig,
    QueueFullError,
    Retry,
    open_background_runtime,
)
from trio_background.prometheus import DEFAULT_BUCKETS, PrometheusInstrument


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def snapshot(registry: CollectorRegistry, job: str) -> dict[str, float | None]:
    """Every per-job series except the histogram, for one job name."""
    result = {
        metric: value(registry, f"trio_background_{metric}", job=job)
        for metric in (
            "jobs_accepted_total",
            "jobs_rejected_total",
            "jobs_dropped_total",
            "jobs_retried_total",
            "jobs_queued",
            "jobs_scheduled",
            "jobs_running",
        )
    }
    for outcome in ("completed", "failed", "timed_out", "cancelled"):
        result[outcome] = value(
            registry, "trio_background_jobs_finished_total", job=job, outcome=outcome
        )
    return result


def expected(**values: float) -> dict[str, float | None]:
    """The snapshot() of a job name seen before, whose series not named here are 0."""
    result: dict[str, float | None] = dict.fromkeys(
        (
            "jobs_accepted_total",
            "jobs_rejected_total",
            "jobs_dropped_total",
            "jobs_retried_total",
            "jobs_queued",
            "jobs_scheduled",
            "jobs_running",
            "completed",
            "failed",
            "timed_out",
            "cancelled",
        ),
        0.0,
    )
    result.update(values)
    return result


async def fail_after_sleeping(seconds: float) -> None:
    await trio.sleep(seconds)
    raise ValueError("boom")


def test_is_a_background_instrument_not_exported_from_the_package() -> None:
    instrument = PrometheusInstrument(CollectorRegistry())
    assert isinstance(instrument, BackgroundInstrument)
    assert "PrometheusInstrument" not in trio_background.__all__
    assert "prometheus" not in trio_background.__all__
    assert repr(instrument).startswith("<trio_background.prometheus.PrometheusInstrument at 0x")


def test_importing_the_package_does_not_import_prometheus_client() -> None:
    code = (
        "import sys, trio_background\n"
        "assert 'prometheus_client' not in sys.modules, 'prometheus_client imported'\n"
        "assert 'trio_background.prometheus' not in sys.modules, 'submodule imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


async def test_jobs_move_from_queued_to_running_to_completed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CollectorRegistry()
    instrument = PrometheusInstrument(registry)
    config = BackgroundTaskConfig(max_concurrent_tasks=1, max_queue_size=2)
    async with open_background_runtime(config, instruments=[instrument]) as runtime:
        handle = runtime.handle()
        handle.spawn(trio.sleep, 1.5, name="resize")
        handle.spawn(trio.sleep, 1, name="resize")
        handle.spawn(trio.sleep, 2, name="email")
        # The first job took the only slot at once and starts running (job_started) on
        # its task's first step; the other two wait.
        assert snapshot(registry, "resize") == expected(jobs_accepted_total=2, jobs_queued=2)
        await trio.testing.wait_all_tasks_blocked()
        assert snapshot(registry, "resize") == expected(
            jobs_accepted_total=2, jobs_queued=1, jobs_running=1
        )
        assert snapshot(registry, "email") == expected(
            jobs_accepted_total=1, jobs_queued=1, jobs_running=0
        )
        await trio.sleep(1.75)
        # The first resize ended at 1.5; the second runs until 2.5.
        assert snapshot(registry, "resize") == expected(
            jobs_accepted_total=2, jobs_queued=0, jobs_running=1, completed=1
        )
        assert snapshot(registry, "email") == expected(
            jobs_accepted_total=1, jobs_queued=1, jobs_running=0
        )
        await runtime.wait_idle()
        assert trio.current_time() == 4.5
    assert snapshot(registry, "resize") == expected(
        jobs_accepted_total=2, jobs_queued=0, jobs_running=0, completed=2
    )
    assert snapshot(registry, "email") == expected(
        jobs_accepted_total=1, jobs_queued=0, jobs_running=0, completed=1
    )
    duration = "trio_background_job_duration_seconds"
    assert value(registry, f"{duration}_count", job="resize") == 2
    assert value(registry, f"{duration}_sum", job="resize") == 2.5
    assert value(registry, f"{duration}_bucket", job="resize", le="0.5") == 0
    assert value(registry, f"{duration}_bucket", job="resize", le="1.0") == 1
    assert value(registry, f"{duration}_bucket", job="resize", le="2.5") == 2
    assert value(registry, f"{duration}_bucket", job="resize", le="+Inf") == 2
    assert value(registry, f"{duration}_count", job="email") == 1
    assert value(registry, f"{duration}_sum", job="email") == 2.0
    assert value(registry, f"{duration}_bucket", job="email", le="1.0") == 0
    assert value(registry, f"{duration}_bucket", job="email", le="2.5") == 1


async def test_failed_and_timed_out_outcomes_and_their_durations(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CollectorRegistry()
    instrument = PrometheusInstrument(registry)
    async with open_background_runtime(instruments=[instrument]) as runtime:
        handle = runtime.handle()
        handle.spawn(fail_after_sleeping, 0.25, name="sync")
        handle.spawn(trio.sleep, 100, name="sync", timeout=3)
        handle.spawn(trio.sleep, 0.5, name="sync")
        await runtime.wait_idle()
        assert trio.current_time() == 3
    assert snapshot(registry, "sync") == expected(
        jobs_accepted_total=3,
        jobs_queued=0,
        jobs_running=0,
        completed=1,
        failed=1,
        timed_out=1,
    )
    duration = "trio_background_job_duration_seconds"
    assert value(registry, f"{duration}_count", job="sync") == 3
    assert value(registry, f"{duration}_sum", job="sync") == 3.75
    assert value(registry, f"{duration}_bucket", job="sync", le="0.25") == 1
    assert value(registry, f"{duration}_bucket", job="sync", le="0.5") == 2
    assert value(registry, f"{duration}_bucket", job="sync", le="2.5") == 2
    assert value(registry, f"{duration}_bucket", job="sync", le="5.0") == 3


async def test_rejected_spawns_are_counted_by_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CollectorRegistry()
    instrument = PrometheusInstrument(registry)
    config = BackgroundTaskConfig(max_concurrent_tasks=1, max_queue_size=1)
    async with open_background_runtime(config, instruments=[instrument]) as runtime:
        handle = runtime.handle()
        handle.spawn(trio.sleep, 1, name="upload")
        handle.spawn(trio.sleep, 1, name="upload")
        for _ in range(3):
            with pytest.raises(QueueFullError):
                handle.spawn(trio.sleep, 1, name="upload")
        with pytest.raises(QueueFullError):
            handle.spawn(trio.sleep, 1, name="thumbnail")
        assert runtime.statistics().rejected == 4
        await trio.testing.wait_all_tasks_blocked()  # the first upload has started
        assert snapshot(registry, "upload") == expected(
            jobs_accepted_total=2, jobs_rejected_total=3, jobs_queued=1, jobs_running=1
        )
        # A name that was only ever rejected has all its series too.
        assert snapshot(registry, "thumbnail") == expected(jobs_rejected_total=1)
        # A name never seen has none.
        assert set(snapshot(registry, "never").values()) == {None}
    assert trio.current_time() == 2
    assert snapshot(registry, "upload") == expected(
        jobs_accepted_total=2, jobs_rejected_total=3, jobs_queued=0, jobs_running=0, completed=2
    )


async def test_cut_off_at_the_drain_deadline_counts_cancelled_and_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CollectorRegistry()
    instrument = PrometheusInstrument(registry)
    config = BackgroundTaskConfig(max_concurrent_tasks=2, max_queue_size=3, drain_timeout=1.5)
    async with open_background_runtime(config, instruments=[instrument]) as runtime:
        handle = runtime.handle()
        handle.spawn(trio.sleep, 1, name="report")  # finishes during the drain
        handle.spawn(trio.sleep, 10, name="report")  # cancelled at 1.5
        handle.spawn(trio.sleep, 10, name="report")  # starts at 1, cancelled at 1.5
        handle.spawn(trio.sleep, 10, name="archive")  # dropped
        handle.spawn(trio.sleep, 10, name="report")  # dropped
        with pytest.raises(BackgroundShutdownError) as excinfo:
            await runtime.aclose()
    assert trio.current_time() == 1.5
    assert len(excinfo.value.cancelled) == 2
    assert len(excinfo.value.dropped) == 2
    assert snapshot(registry, "report") == expected(
        jobs_accepted_total=4,
        jobs_dropped_total=1,
        jobs_queued=0,
        jobs_running=0,
        completed=1,
        cancelled=2,
    )
    assert snapshot(registry, "archive") == expected(
        jobs_accepted_total=1, jobs_dropped_total=1, jobs_queued=0, jobs_running=0
    )
    duration = "trio_background_job_duration_seconds"
    assert value(registry, f"{duration}_count", job="report") == 3
    # 1 (completed) + 1.5 (started at 0, cancelled at 1.5) + 0.5 (started at 1)
    assert value(registry, f"{duration}_sum", job="report") == 3.0
    assert value(registry, f"{duration}_count", job="archive") == 0


async def test_a_waiting_send_is_counted_when_it_is_accepted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CollectorRegistry()
    config = BackgroundTaskConfig(max_concurrent_tasks=1, max_queue_size=0)
    async with (
        open_background_runtime(config, instruments=[PrometheusInstrument(registry)]) as runtime,
        trio.open_nursery() as nursery,
    ):
        handle = runtime.handle()
        handle.spawn(trio.sleep, 1, name="first")
        nursery.start_soon(partial(handle.send, trio.sleep, 1, name="second"))
        await trio.testing.wait_all_tasks_blocked()
        # The sender waits for a slot: nothing of "second" exists yet.
        assert set(snapshot(registry, "second").values()) == {None}
        await trio.sleep(1.5)
        assert snapshot(registry, "first") == expected(jobs_accepted_total=1, completed=1)
        assert snapshot(registry, "second") == expected(jobs_accepted_total=1, jobs_running=1)
    assert trio.current_time() == 2
    assert snapshot(registry, "second") == expected(jobs_accepted_total=1, completed=1)


async def test_one_instrument_adds_up_several_runtimes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CollectorRegistry()
    instrument = PrometheusInstrument(registry)
    config = BackgroundTaskConfig(max_concurrent_tasks=1, max_queue_size=5)
    async with (
        open_background_runtime(config, instruments=[instrument]) as first,
        open_background_runtime(config, instruments=[instrument]) as second,
    ):
        for _ in range(3):
            first.handle().spawn(trio.sleep, 1, name="job")
            second.handle().spawn(trio.sleep, 1, name="job")
        await trio.testing.wait_all_tasks_blocked()  # each runtime's first job has started
        assert snapshot(registry, "job") == expected(
            jobs_accepted_total=6, jobs_queued=4, jobs_running=2
        )
        await first.wait_idle()
        await second.wait_idle()
        assert trio.current_time() == 3
    assert snapshot(registry, "job") == expected(
        jobs_accepted_total=6, jobs_queued=0, jobs_running=0, completed=6
    )


async def test_default_job_name_label_is_the_function_qualname(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CollectorRegistry()

    async def send_receipt() -> None:
        await trio.sleep(1)

    async with open_background_runtime(instruments=[PrometheusInstrument(registry)]) as runtime:
        runtime.handle().spawn(send_receipt)
    label = send_receipt.__qualname__
    assert label.endswith("<locals>.send_receipt")
    assert snapshot(registry, label) == expected(
        jobs_accepted_total=1, jobs_queued=0, jobs_running=0, completed=1
    )


async def test_namespace_and_buckets_are_configurable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CollectorRegistry()
    instrument = PrometheusInstrument(registry, namespace="mailer", buckets=[1, 4])
    async with open_background_runtime(instruments=[instrument]) as runtime:
        runtime.handle().spawn(trio.sleep, 2, name="send")
    assert value(registry, "mailer_jobs_accepted_total", job="send") == 1
    assert value(registry, "mailer_jobs_finished_total", job="send", outcome="completed") == 1
    assert value(registry, "mailer_job_duration_seconds_bucket", job="send", le="1.0") == 0
    assert value(registry, "mailer_job_duration_seconds_bucket", job="send", le="4.0") == 1
    assert value(registry, "mailer_job_duration_seconds_bucket", job="send", le="+Inf") == 1
    assert value(registry, "trio_background_jobs_accepted_total", job="send") is None


def test_default_buckets_are_sorted_and_cover_five_minutes() -> None:
    assert list(DEFAULT_BUCKETS) == sorted(DEFAULT_BUCKETS)
    assert DEFAULT_BUCKETS[0] == 0.005
    assert DEFAULT_BUCKETS[-1] == 300.0
    assert all(math.isfinite(bound) for bound in DEFAULT_BUCKETS)


async def test_exposition_text_lists_every_metric_family(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CollectorRegistry()
    async with open_background_runtime(instruments=[PrometheusInstrument(registry)]) as runtime:
        runtime.handle().spawn(trio.sleep, 0.5, name="index")
    text = generate_latest(registry).decode()
    for line in (
        "# TYPE trio_background_jobs_accepted_total counter",
        "# TYPE trio_background_jobs_rejected_total counter",
        "# TYPE trio_background_jobs_dropped_total counter",
        "# TYPE trio_background_jobs_finished_total counter",
        "# TYPE trio_background_job_duration_seconds histogram",
        "# TYPE trio_background_jobs_queued gauge",
        "# TYPE trio_background_jobs_running gauge",
        'trio_background_jobs_accepted_total{job="index"} 1.0',
        'trio_background_jobs_rejected_total{job="index"} 0.0',
        'trio_background_jobs_finished_total{job="index",outcome="failed"} 0.0',
        'trio_background_jobs_finished_total{job="index",outcome="completed"} 1.0',
        'trio_background_job_duration_seconds_sum{job="index"} 0.5',
        'trio_background_jobs_queued{job="index"} 0.0',
        'trio_background_jobs_running{job="index"} 0.0',
    ):
        assert line in text.splitlines(), line


def test_default_registry_is_prometheus_clients_global_one() -> None:
    instrument = PrometheusInstrument()
    try:
        assert instrument.registry is REGISTRY
        instrument.job_rejected(trio_background.BackgroundJobMetadata(name="x"))
        assert REGISTRY.get_sample_value("trio_background_jobs_rejected_total", {"job": "x"}) == 1
    finally:
        for collector in (
            instrument._accepted,
            instrument._rejected,
            instrument._dropped,
            instrument._finished,
            instrument._duration,
            instrument._queued,
            instrument._running,
        ):
            REGISTRY.unregister(collector)
    assert REGISTRY.get_sample_value("trio_background_jobs_rejected_total", {"job": "x"}) is None


def test_name_clash_raises_and_registers_nothing() -> None:
    registry = CollectorRegistry()
    PrometheusInstrument(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        PrometheusInstrument(registry)
    # Another namespace in the same registry is fine.
    PrometheusInstrument(registry, namespace="other")

    clashing = CollectorRegistry()
    Gauge("trio_background_jobs_running", "taken", registry=clashing)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        PrometheusInstrument(clashing)
    # The metrics registered before the clash were rolled back.
    names = {metric.name for metric in clashing.collect()}
    assert names == {"trio_background_jobs_running"}
    PrometheusInstrument(clashing, namespace="retry")


async def test_gauges_stay_exact_when_jobs_are_cancelled_through_their_handles(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Cancel jobs in every state: queued, holding a slot before their code ran, running,
    # finished; then check the gauges against the runtime's own counters at each step.
    registry = CollectorRegistry()
    instrument = PrometheusInstrument(registry)

    def gauges() -> tuple[float | None, float | None]:
        return (
            value(registry, "trio_background_jobs_queued", job="j"),
            value(registry, "trio_background_jobs_running", job="j"),
        )

    def agree() -> None:
        # A job holding a slot counts as running at once, but instruments see it start
        # only when its code begins: until then the gauges show it queued.
        stats = runtime.statistics()
        queued, running = gauges()
        assert queued is not None
        assert running is not None
        assert queued >= 0
        assert running >= 0
        assert queued + running == stats.queued + stats.running

    async def settled() -> None:
        await trio.testing.wait_all_tasks_blocked()
        agree()
        assert gauges() == (runtime.statistics().queued, runtime.statistics().running)

    config = BackgroundTaskConfig(max_concurrent_tasks=2, max_queue_size=10, drain_timeout=60)
    async with open_background_runtime(config, instruments=[instrument]) as runtime:
        handle = runtime.handle()
        jobs = [handle.spawn(trio.sleep, 1 + i, name="j") for i in range(8)]
        jobs[0].cancel()  # holds a slot, code not yet run
        agree()
        jobs[5].cancel()  # queued
        agree()
        await settled()
        for job in jobs:
            if job.status == "running":
                job.cancel()
        agree()
        await settled()
        await trio.sleep(2.5)
        for job in jobs:  # some running, some finished, some queued
            job.cancel()
            agree()
        await runtime.wait_idle()
        await settled()
    stats = runtime.statistics()
    assert snapshot(registry, "j") == expected(
        jobs_accepted_total=8,
        jobs_dropped_total=stats.dropped,
        completed=stats.completed,
        cancelled=stats.cancelled,
    )
    assert stats.dropped + stats.cancelled + stats.completed == 8
    assert stats.dropped >= 2
    assert stats.cancelled >= 2


@pytest.mark.parametrize("seed", range(8))
async def test_the_gauges_follow_job_statuses_by_name_through_random_programs(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    # Delays, keys, retries, cancels, waiting sends and resizes; after every step each
    # gauge of each job name equals the number of that name's handles in that status.
    registry = CollectorRegistry()
    instrument = PrometheusInstrument(registry)
    handles: list[BackgroundJob[None]] = []
    rng = random.Random(seed)

    def check() -> None:
        for name in "xy":
            statuses = Counter(job.status for job in handles if job.metadata.name == name)
            gauges = {
                status: value(registry, f"trio_background_jobs_{status}", job=name) or 0
                for status in ("scheduled", "queued", "running")
            }
            assert gauges == {status: statuses[status] for status in gauges}
            assert value(registry, "trio_background_jobs_dropped_total", job=name) in (
                None,
                statuses["dropped"],
            )
        assert (
            sum(value(registry, "trio_background_jobs_scheduled", job=name) or 0 for name in "xy")
            == runtime.statistics().scheduled
        )

    config = BackgroundTaskConfig(
        max_concurrent_tasks=2, max_queue_size=3, drain_timeout=rng.choice((0.75, 60))
    )
    with contextlib.suppress(BackgroundShutdownError):
        async with open_background_runtime(config, instruments=[instrument]) as runtime:
            await random_waits(rng, runtime, handles, check, steps=40)
    check()
    assert runtime.statistics().retried == sum(
        value(registry, "trio_background_jobs_retried_total", job=name) or 0 for name in "xy"
    )


async def test_retries_are_counted_and_the_gauges_stay_exact(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CollectorRegistry()
    instrument = PrometheusInstrument(registry)
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        await trio.sleep(1)
        if runs < 3:
            raise ValueError("again")

    retry = trio_background.Retry(attempts=3, backoff=1.0, jitter=False)
    config = BackgroundTaskConfig(drain_timeout=60)
    async with open_background_runtime(config, instruments=[instrument]) as runtime:
        runtime.handle().spawn(flaky, name="flaky", retry=retry)
        await trio.sleep(1.5)  # the first run failed at 1; the retry is due at 2
        assert snapshot(registry, "flaky") == expected(
            jobs_accepted_total=1, jobs_retried_total=1, jobs_scheduled=1
        )
    assert snapshot(registry, "flaky") == expected(
        jobs_accepted_total=1, jobs_retried_total=2, completed=1
    )
    assert value(registry, "trio_background_job_duration_seconds_count", job="flaky") == 1


# -- hooks that interrupt or re-enter the runtime -------------------------------------------


class Interrupting:
    """An instrument whose hook ``hook`` raises KeyboardInterrupt once, or calls ``act``."""

    def __init__(self, hook: str, act: Callable[[], None] | None = None) -> None:
        self.fired = False

        def fire(*args: object) -> None:
            if not self.fired:
                self.fired = True
                if act is None:
                    raise KeyboardInterrupt
                act()

        setattr(self, f"job_{hook}", fire)


async def sleeps() -> None:
    await trio.sleep(50)


async def returns() -> None:
    pass


async def fails() -> None:
    raise ValueError("again")


Plan = list[tuple[str, Callable[[], Any], dict[str, Any]]]
SCENARIOS: dict[str, tuple[str | None, Plan]] = {
    # KeyboardInterrupt from an instrument listed first, in the hook of each wait.
    "interrupt in job_scheduled": ("scheduled", [("j", returns, {"delay": 5})]),
    "interrupt in job_due": ("due", [("busy", sleeps, {}), ("j", returns, {"delay": 5})]),
    "interrupt in job_retrying": ("retrying", [("j", fails, {"retry": Retry(backoff=5)})]),
    # A retry with no backoff is due at once: it is reported retrying, then due.
    "no backoff": (
        None,
        [("j", fails, {"retry": Retry(attempts=2, backoff=0)}), ("busy", sleeps, {})],
    ),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gauges_and_hook_order_survive_an_interrupting_instrument(scenario: str) -> None:
    hook, jobs = SCENARIOS[scenario]
    registry = CollectorRegistry()
    tracker = Tracker()
    instruments: list[object] = [tracker, PrometheusInstrument(registry)]
    if hook is not None:
        instruments.insert(0, Interrupting(hook))

    async def main() -> None:
        config = BackgroundTaskConfig(max_concurrent_tasks=1, drain_timeout=60)
        async with open_background_runtime(config, instruments=instruments) as runtime:
            for name, fn, options in jobs:
                runtime.handle().spawn(fn, name=name, **options)
            await trio.sleep(10)

    clock = trio.testing.MockClock(autojump_threshold=0)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, clock=clock)
    assert tracker.errors == []
    for name in {name for name, _, _ in jobs}:
        for gauge in ("scheduled", "queued", "running"):
            assert value(registry, f"trio_background_jobs_{gauge}", job=name) == 0, (name, gauge)


@pytest.mark.parametrize("act", ["cancel", "interrupt", "grow", "grow, and no task starts"])
async def test_a_due_hook_that_drops_or_starts_the_next_due_job_keeps_the_order(
    act: str, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two jobs due at once behind a busy slot; the first one's job_due hook cancels the
    # second, interrupts the runtime (the cut-off drops the second), or grows the slots
    # (the second starts, or fails to: its task cannot be started). Each job's hooks stay
    # in order, and the gauges exact.
    if act == "grow, and no task starts":
        real = trio.Nursery.start_soon

        def start_soon(self: trio.Nursery, *args: Any, **kwargs: Any) -> None:
            if runtimes and runtimes[0].statistics().max_concurrent_tasks == 3:
                raise MemoryError("no room for a task")
            real(self, *args, **kwargs)

        monkeypatch.setattr(trio.Nursery, "start_soon", start_soon)
    registry = CollectorRegistry()
    tracker = Tracker()
    handles: dict[str, BackgroundJob[None]] = {}
    runtimes: list[Any] = []

    def second() -> None:
        if act == "cancel":
            handles["b"].cancel()
        elif act.startswith("grow"):
            runtimes[0].resize(max_concurrent_tasks=3)
        else:
            raise KeyboardInterrupt

    interrupting = Interrupting("due", second) if act != "interrupt" else Interrupting("due")
    config = BackgroundTaskConfig(max_concurrent_tasks=1, drain_timeout=60)
    with contextlib.suppress(KeyboardInterrupt):
        async with open_background_runtime(
            config, instruments=[tracker, PrometheusInstrument(registry), interrupting]
        ) as runtime:
            runtimes.append(runtime)
            handle = runtime.handle()
            handles["busy"] = handle.spawn(sleeps, name="busy")
            handles["a"] = handle.spawn(returns, name="a", delay=5)
            handles["b"] = handle.spawn(returns, name="b", delay=5)
            await trio.sleep(6)
            await trio.testing.wait_all_tasks_blocked()
            stats = runtime.statistics()
            gauges = {
                status: sum(
                    value(registry, f"trio_background_jobs_{status}", job=name) or 0
                    for name in "ab"
                )
                for status in ("scheduled", "queued")
            }
            assert gauges == {"scheduled": stats.scheduled, "queued": stats.queued}
            handles["busy"].cancel()
    assert tracker.errors == []
    for name in ("busy", "a", "b"):
        for gauge in ("scheduled", "queued", "running"):
            assert value(registry, f"trio_background_jobs_{gauge}", job=name) == 0, (name, gauge)
