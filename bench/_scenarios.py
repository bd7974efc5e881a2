"""The scenarios of the benchmark. Each returns a `Section` (table, bars, raw data)."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from . import _ours as ours
from . import _peers as peers
from ._util import (
    Timing,
    fmt_bytes,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    fmt_us,
    interleave,
    log,
    median,
    percentile,
    ratios,
)

CAP = 128
QUEUED_JOB_BYTES = 256  # the bar on traced bytes per queued job

OURS = "trio_background"
FLOOR = "hand-written floor"
AIOJOBS = "aiojobs 1.4"


@dataclass(frozen=True)
class Sizes:
    rounds: int
    burst: int
    steady: int
    steady_queue: int
    producers: int
    latency_samples: int
    latency_load: int
    mem_queued: int
    rejections: int
    idle_samples: int
    drain: int
    instruments: int
    instrument_rounds: int
    send: int
    scheduling: int
    durable: int


FULL = Sizes(
    rounds=5,
    burst=100_000,
    steady=102_400,
    steady_queue=1024,
    producers=2 * CAP,
    latency_samples=2_000,
    latency_load=CAP // 2,
    mem_queued=100_000,
    rejections=1_000_000,
    idle_samples=1_000,
    drain=10_000,
    instruments=20_000,
    instrument_rounds=21,
    send=100_000,
    scheduling=100_000,
    durable=5_000,
)

# The same rounds, queue, submitters and load as FULL; fewer jobs and samples.
QUICK = replace(
    FULL,
    burst=5_000,
    steady=5_120,
    latency_samples=200,
    mem_queued=10_000,
    rejections=50_000,
    idle_samples=200,
    drain=5_000,
    instruments=5_000,
    instrument_rounds=11,
    send=5_000,
    scheduling=5_000,
    durable=500,
)


@dataclass
class Bar:
    label: str
    measured: str
    target: str
    passed: bool | None  # None: could not be measured


@dataclass
class Section:
    key: str
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


THROUGHPUT_COLUMNS = ["contender", "jobs/s (CPU)", "CPU range", "jobs/s (wall)", "vs floor"]


def _throughput_rows(
    section: Section, n: int, timings: dict[str, list[Timing]], base: str, extra: dict[str, str]
) -> dict[str, list[float]]:
    """Add one row per contender; return jobs per CPU-second, per contender and round.

    The ratio column is each contender over ``base`` (n/a when ``base`` did not run).
    """
    rates = {name: [n / t.cpu for t in values] for name, values in timings.items()}
    wall = {name: [n / t.wall for t in values] for name, values in timings.items()}
    base_rates = rates.get(base)
    for name, values in rates.items():
        vs_base = median(ratios(values, base_rates)) if base_rates is not None else math.nan
        section.rows.append(
            [
                name,
                fmt_rate(median(values)),
                f"{min(values):,.0f} - {max(values):,.0f}",
                fmt_rate(median(wall[name])),
                fmt_ratio(vs_base),
                extra.get(name, ""),
            ]
        )
    section.data["jobs_per_cpu_second"] = rates
    section.data["jobs_per_wall_second"] = wall
    return rates


def _ratio_note(label: str, values: list[float]) -> str:
    return f"{label}: " + ", ".join(f"{x:.2f}x" for x in values) + f"; median {median(values):.2f}x"


# -- 1. burst -----------------------------------------------------------------------------

FLOOR_NOWAIT = "hand-written floor, nowait first"
FLOOR_AWAIT = "hand-written floor, await always"
SEMAPHORE = "floor, trio.Semaphore variant"
ANYIO = "anyio 4 task group + limiter (trio)"
AIOJOBS_COUNTED = "aiojobs 1.4, counted drain"
AIOJOBS_WAIT = "aiojobs 1.4, wait_and_close()"
POOL = "bare worker pool (ceiling)"


def _ratio_bar(label: str, value: float, target: float, *, at_most: bool = False) -> Bar:
    """A bar on a median ratio: ``value >= target`` (``<=`` with ``at_most``); NaN is n/a."""
    sign = "<=" if at_most else ">="
    if math.isnan(value):
        return Bar(label, "n/a", f"{sign} {target:.2f}x", None)
    passed = value <= target if at_most else value >= target
    return Bar(label, fmt_ratio(value), f"{sign} {target:.2f}x", passed)


BURST_FLOOR_BAR = "burst >= 1.0x hand-written floor (nowait first)"
BURST_AIOJOBS_BAR = "burst >= 6x aiojobs (wait_and_close)"


def burst(tb: ModuleType | None, sizes: Sizes) -> Section:
    n = sizes.burst
    log(f"burst: {n:,} no-op jobs, cap {CAP}, {sizes.rounds} interleaved rounds")
    # The table and the chart list the contenders in this order: the faster floor (the
    # bar's reference) first, and aiojobs' counted drain (the fair comparison) before
    # aiojobs as documented.
    contenders: dict[str, Callable[[], Timing]] = {}
    if tb is not None:
        contenders[OURS] = lambda: ours.burst(tb, n, CAP)
    contenders[FLOOR_NOWAIT] = lambda: peers.floor_nowait_burst(n, CAP)
    contenders[FLOOR_AWAIT] = lambda: peers.floor_burst(n, CAP)
    contenders[SEMAPHORE] = lambda: peers.floor_sem_burst(n, CAP)
    contenders[ANYIO] = lambda: peers.anyio_burst(n, CAP)
    contenders[AIOJOBS_COUNTED] = lambda: peers.aiojobs_counted_burst(n, CAP)
    contenders[AIOJOBS_WAIT] = lambda: peers.aiojobs_burst(n, CAP)
    contenders[POOL] = lambda: peers.pool_burst(n, CAP)
    timings = interleave(contenders, sizes.rounds, label="burst")
    data: dict[str, Any] = {"n": n, "rounds": sizes.rounds}
    section = Section(
        "burst",
        f"1. Burst: {n:,} no-op jobs, {CAP} slots, queue >= {n:,} (jobs/s, higher is better)",
        [*THROUGHPUT_COLUMNS[:-1], "vs nowait floor", "submission"],
        data=data,
    )
    how = {
        OURS: "handle.spawn(job) x N, leave the block",
        FLOOR_NOWAIT: "acquire_on_behalf_of_nowait(t), await on WouldBlock; start_soon",
        FLOOR_AWAIT: "await limiter.acquire_on_behalf_of(t); start_soon",
        SEMAPHORE: "await sem.acquire(); start_soon",
        ANYIO: "await limiter.acquire_on_behalf_of(t); start_soon",
        AIOJOBS_COUNTED: "await spawn(job()) x N; last job sets an Event",
        AIOJOBS_WAIT: "await spawn(job()) x N; wait_and_close()",
        POOL: "send_nowait to 128 looping workers",
    }
    rates = _throughput_rows(section, n, timings, FLOOR_NOWAIT, how)
    if tb is None:
        section.notes.append("trio_background could not be imported: its rows are missing.")
        section.bars += [
            _ratio_bar(BURST_FLOOR_BAR, math.nan, 1.0),
            _ratio_bar(BURST_AIOJOBS_BAR, math.nan, 6.0),
        ]
        return section
    wall = section.data["jobs_per_wall_second"]
    per_round = {
        "floor_nowait": (f"{OURS} / floor, nowait first (the bar)", FLOOR_NOWAIT),
        "floor_await": (f"{OURS} / floor, await always", FLOOR_AWAIT),
        "aiojobs_counted": (f"{OURS} / aiojobs, counted drain", AIOJOBS_COUNTED),
        "aiojobs": (f"{OURS} / aiojobs, wait_and_close (the bar)", AIOJOBS_WAIT),
        "pool": (f"{OURS} / worker pool", POOL),
    }
    cpu_ratios = {key: ratios(rates[OURS], rates[name]) for key, (_, name) in per_round.items()}
    wall_ratios = {key: ratios(wall[OURS], wall[name]) for key, (_, name) in per_round.items()}
    section.notes.append("per-round ratios of jobs per CPU-second (median of the rounds last):")
    section.notes += [
        _ratio_note(f"  {label}", cpu_ratios[key]) for key, (label, _) in per_round.items()
    ]
    section.notes.append("the same from wall-clock time:")
    section.notes += [
        _ratio_note(f"  {label}", wall_ratios[key])
        for key, (label, _) in per_round.items()
        if key != "pool"
    ]
    section.data["ratios"] = cpu_ratios
    section.data["wall_ratios"] = wall_ratios
    section.bars += [
        _ratio_bar(BURST_FLOOR_BAR, median(cpu_ratios["floor_nowait"]), 1.0),
        _ratio_bar(BURST_AIOJOBS_BAR, median(cpu_ratios["aiojobs"]), 6.0),
    ]
    return section


# -- 2. steady state with backpressure ----------------------------------------------------


def steady(tb: ModuleType | None, sizes: Sizes) -> Section:
    n, queue, producers = sizes.steady, sizes.steady_queue, sizes.producers
    n = n // producers * producers
    log(
        f"steady: {n:,} jobs from {producers} submitting tasks through a {queue}-deep queue, "
        f"{sizes.rounds} rounds"
    )
    contenders: dict[str, Callable[[], Timing]] = {}
    if tb is not None:
        contenders[OURS] = lambda: ours.steady(tb, n, CAP, queue, producers)
    contenders[FLOOR] = lambda: peers.floor_steady(n, CAP, producers)
    contenders[AIOJOBS] = lambda: peers.aiojobs_steady(n, CAP, queue, producers)
    contenders["bare worker pool (ceiling)"] = lambda: peers.pool_steady(n, CAP, queue, producers)
    timings = interleave(contenders, sizes.rounds, label="steady")
    section = Section(
        "steady",
        f"2. Steady state with backpressure: {n:,} jobs from {producers} submitting tasks, "
        f"{CAP} slots, queue {queue} (jobs/s, higher is better)",
        [*THROUGHPUT_COLUMNS, "each submitting task does"],
        data={"n": n, "producers": producers, "queue": queue, "rounds": sizes.rounds},
    )
    how = {
        OURS: f"await handle.send(job), max_queue_size={queue}",
        FLOOR: "await limiter.acquire_on_behalf_of(t); start_soon (no queue)",
        AIOJOBS: f"await spawn(job()), pending_limit={queue}",
        "bare worker pool (ceiling)": f"await send.send(job), buffer {queue}",
    }
    rates = _throughput_rows(section, n, timings, FLOOR, how)
    section.notes.append(
        f"{producers} submitters outpace {CAP} slots of no-op jobs, so the queue stays full "
        "and submitters wait: this measures the wait/wake path. (With one submitter, "
        "each send is a checkpoint and jobs finish faster than it submits: no backpressure.)"
    )
    if tb is not None:
        section.notes.append(
            _ratio_note(f"per-round {OURS} / floor (CPU)", ratios(rates[OURS], rates[FLOOR]))
        )
    return section


# -- 3. latency ---------------------------------------------------------------------------


def latency(tb: ModuleType | None, sizes: Sizes) -> Section:
    k, load = sizes.latency_samples, sizes.latency_load
    log(f"latency: {k:,} probes per round, {load}/{CAP} slots busy, {sizes.rounds} rounds")
    contenders: dict[str, Callable[[], list[float]]] = {}
    if tb is not None:
        contenders[OURS] = lambda: ours.latency(tb, k, CAP, load)
    contenders[FLOOR] = lambda: peers.floor_latency(k, CAP, load)
    contenders[AIOJOBS] = lambda: peers.aiojobs_latency(k, CAP, load)
    contenders["bare worker pool (ceiling)"] = lambda: peers.pool_latency(k, CAP, load)
    samples = interleave(contenders, sizes.rounds, label="latency")
    section = Section(
        "latency",
        f"3. Latency, submit -> first line of the job, {load} of {CAP} slots busy "
        f"({k:,} probes/round; lower is better)",
        ["contender", "p50", "p99", "p50 range", "p99 range"],
    )
    section.data.update(samples=k, load=load, rounds=sizes.rounds)
    section.data["p50"] = {}
    section.data["p99"] = {}
    for name, rounds in samples.items():
        p50 = [percentile(s, 50) for s in rounds]
        p99 = [percentile(s, 99) for s in rounds]
        section.data["p50"][name] = p50
        section.data["p99"][name] = p99
        section.rows.append(
            [
                name,
                fmt_us(median(p50)),
                fmt_us(median(p99)),
                f"{min(p50) * 1e6:,.1f} - {max(p50) * 1e6:,.1f} us",
                f"{min(p99) * 1e6:,.1f} - {max(p99) * 1e6:,.1f} us",
            ]
        )
    section.notes.append(
        "p50/p99 are computed per round, then the median over rounds is shown. "
        "The busy jobs loop on a checkpoint, so every scheduler batch holds "
        f"{load} tasks."
    )
    return section


# -- 4. memory ----------------------------------------------------------------------------


def memory(tb: ModuleType | None, sizes: Sizes) -> Section:
    q, r = sizes.mem_queued, sizes.rejections
    log(f"memory: {q:,} queued jobs, {r:,} rejected spawns (tracemalloc)")
    section = Section(
        "memory",
        "4. Memory (tracemalloc, after gc.collect())",
        ["measure", "value", "how"],
    )
    tracemalloc.start()
    try:
        per_job = ours.bytes_per_queued_job(tb, q, CAP) if tb is not None else math.nan
        growth = ours.rejected_growth(tb, r) if tb is not None else math.nan
        aiojobs_per_job = ours.aiojobs_bytes_per_pending_job(q, CAP)
        pool_per_job = ours.pool_bytes_per_buffered_job(q)
    finally:
        tracemalloc.stop()
    section.rows += [
        [
            f"{OURS}: bytes per queued job",
            fmt_bytes(per_job),
            f"{q:,} x spawn(job) with all {CAP} slots busy",
        ],
        [
            f"{OURS}: growth over {r:,} rejected spawns",
            fmt_bytes(growth),
            "QueueFullError each time (queue 0, slot busy)",
        ],
        [
            f"{AIOJOBS}: bytes per pending job",
            fmt_bytes(aiojobs_per_job),
            "reference (holds a coroutine object per job)",
        ],
        [
            "worker pool: bytes per buffered job",
            fmt_bytes(pool_per_job),
            "reference ((fn, args) tuple in a channel)",
        ],
    ]
    section.data.update(
        queued=q,
        bytes_per_queued_job=per_job,
        rejected_growth=growth,
        rejections=r,
        aiojobs_bytes_per_pending_job=aiojobs_per_job,
        pool_bytes_per_buffered_job=pool_per_job,
    )
    measured = not math.isnan(per_job)
    section.bars.append(
        Bar(
            f"<= {QUEUED_JOB_BYTES} bytes per queued job",
            fmt_bytes(per_job),
            f"<= {QUEUED_JOB_BYTES} B",
            per_job <= QUEUED_JOB_BYTES,
        )
        if measured
        else Bar(
            f"<= {QUEUED_JOB_BYTES} bytes per queued job", "n/a", f"<= {QUEUED_JOB_BYTES} B", None
        )
    )
    label = f"{r:,} rejected spawns grow memory < 1 MB"
    if r != 1_000_000:
        label += " (full run: 1,000,000)"
    section.bars.append(
        Bar(label, fmt_bytes(growth), "< 1,000,000 B", growth < 1_000_000)
        if measured
        else Bar(label, "n/a", "< 1,000,000 B", None)
    )
    return section


# -- 5. shutdown --------------------------------------------------------------------------


def shutdown(tb: ModuleType | None, sizes: Sizes) -> Section:
    k, n = sizes.idle_samples, sizes.drain
    log(f"shutdown: {k:,} idle aclose() per round; drain of {n:,} queued jobs")
    section = Section(
        "shutdown",
        f"5. Shutdown (idle: {k:,} samples/round; drain: {n:,} no-op jobs, {CAP} slots)",
        ["measure", "median", "p99 / range", "notes"],
    )
    idle: dict[str, Callable[[], list[float]]] = {}
    if tb is not None:
        idle[f"{OURS}: idle aclose()"] = lambda: ours.idle_aclose(tb, k)
    idle["reference: empty nursery exit"] = lambda: ours.nursery_exit(k)
    idle_samples = interleave(idle, sizes.rounds, label="idle aclose")
    section.data.update(n=n, idle_samples=k, rounds=sizes.rounds)
    section.data["idle"] = {}
    for name, rounds in idle_samples.items():
        p50 = [percentile(s, 50) for s in rounds]
        p99 = [percentile(s, 99) for s in rounds]
        section.data["idle"][name] = {"p50": p50, "p99": p99}
        section.rows.append(
            [name, fmt_us(median(p50)), f"p99 {fmt_us(median(p99))}", "per-round p50, median"]
        )
    drains: dict[str, Callable[[], Timing]] = {}
    if tb is not None:
        drains[f"{OURS}: drain"] = lambda: ours.drain(tb, n, CAP)
    drains[f"{AIOJOBS}: wait_and_close()"] = lambda: peers.aiojobs_drain(n, CAP)
    drains["worker pool: empty the channel"] = lambda: peers.pool_drain(n, CAP)
    drain_timings = interleave(drains, sizes.rounds, label="drain")
    section.data["drain_cpu"] = {k: [t.cpu for t in v] for k, v in drain_timings.items()}
    section.data["drain_wall"] = {k: [t.wall for t in v] for k, v in drain_timings.items()}
    for name, values in section.data["drain_wall"].items():
        cpu = median(section.data["drain_cpu"][name])
        section.rows.append(
            [
                name,
                fmt_ms(median(values)),
                f"{min(values) * 1e3:,.2f} - {max(values) * 1e3:,.2f} ms",
                f"CPU {fmt_ms(cpu)}: {n / cpu:,.0f} jobs per CPU-second",
            ]
        )
    key = f"{OURS}: idle aclose()"
    if key in section.data["idle"]:
        idle_p50 = median(section.data["idle"][key]["p50"])
        section.bars.append(
            Bar("idle aclose() < 1 ms (median)", fmt_us(idle_p50), "< 1,000 us", idle_p50 < 1e-3)
        )
    else:
        section.bars.append(Bar("idle aclose() < 1 ms (median)", "n/a", "< 1,000 us", None))
    return section


# -- 6. instruments -----------------------------------------------------------------------


def instruments(
    tb: ModuleType | None, sizes: Sizes, package_dir: Path | None, *, count_instructions: bool
) -> Section:
    """Instrument overhead; optionally also counted in instructions (see ``_instructions``).

    The differences involved are a few dictionary truth tests per job, far below the
    timing noise of a shared machine, so this section runs many short rounds (more
    pairs, each closer in time) and, with ``count_instructions``, also counts executed
    instructions per job under valgrind, which noise cannot move. The bar is judged on
    instructions when they were counted, on the median CPU-time ratio otherwise.
    """
    n, rounds = sizes.instruments, sizes.instrument_rounds
    log(f"instruments: burst of {n:,}, {rounds} interleaved rounds")
    section = Section(
        "instruments",
        f"6. Instruments: burst of {n:,} no-op jobs (jobs/s, higher is better)",
        ["variant", "jobs/s (CPU)", "CPU range", "jobs/s (wall)", "vs stripped", "what"],
        data={"n": n, "rounds": rounds},
    )
    bar_label = "instrument support costs < 3% with none installed"
    if tb is None:
        section.bars.append(Bar(bar_label, "n/a", "< 3.0%", None))
        return section
    stripped: ModuleType | None = None
    removed: list[str] = []
    try:
        assert package_dir is not None
        from . import _stripped

        stripped, removed = _stripped.build(package_dir)
        ours.burst(stripped, 1000, CAP)  # sanity: it still runs and counts right
    except Exception as exc:
        stripped = None
        section.notes.append(f"could not build the instrument-free copy: {exc!r}")

    class NoOpInstrument(tb.BackgroundInstrument):  # type: ignore[name-defined,misc]
        def job_accepted(self, job: object) -> None:
            pass

        def job_rejected(self, job: object) -> None:
            pass

        def job_started(self, job: object) -> None:
            pass

        def job_finished(self, job: object, outcome: str, duration: float) -> None:
            pass

        def job_dropped(self, job: object) -> None:
            pass

    noop_instrument = NoOpInstrument()
    contenders: dict[str, Callable[[], Timing]] = {
        "no instruments argument": lambda: ours.burst(tb, n, CAP),
        "instruments=()": lambda: ours.burst(tb, n, CAP, instruments=()),
        "one no-op instrument (5 hooks)": lambda: ours.burst(
            tb, n, CAP, instruments=(noop_instrument,)
        ),
    }
    if stripped is not None:
        contenders["stripped: no instrument code"] = lambda: ours.burst(stripped, n, CAP)
    timings = interleave(contenders, rounds, label="instruments")
    what = {
        "no instruments argument": "open_background_runtime(config)",
        "instruments=()": "open_background_runtime(config, instruments=())",
        "one no-op instrument (5 hooks)": "every hook overridden with `pass`",
        "stripped: no instrument code": "_runtime.py with the hook guards deleted",
    }
    rates = _throughput_rows(section, n, timings, "stripped: no instrument code", what)
    base = rates.get("stripped: no instrument code")
    section.data["stripped"] = removed
    if removed:
        section.notes.append("stripped from _runtime.py: " + "; ".join(removed))
    if base is None:
        section.bars.append(Bar(bar_label, "n/a", "< 3.0%", None))
        return section
    per_round = ratios(rates["no instruments argument"], base)
    cost = 1 - median(per_round)
    section.notes.append(
        "per-round no-instruments / stripped (CPU): "
        + ", ".join(f"{x:.3f}" for x in per_round)
        + f"; median {median(per_round):.3f} -> cost {cost * 100:+.1f}% "
        "(negative = within noise)"
    )
    section.data["cost"] = cost
    if count_instructions and stripped is not None:
        from . import _instructions

        if not _instructions.available():
            section.notes.append("--instructions: valgrind is not installed; not counted")
        else:
            log("instructions: counting under valgrind (about a minute)")
            kinds = {
                OURS: "ours",
                "stripped copy": f"stripped:{Path(str(stripped.__file__)).parent}",
                FLOOR_NOWAIT: "floor_nowait",
                FLOOR_AWAIT: "floor",
                "bare worker pool": "pool",
            }
            counts = _instructions.per_job(kinds)
            section.data["instructions_per_job"] = counts
            section.notes.append(
                "instructions per job, burst (valgrind cachegrind; I(9,000 jobs) - I(3,000 jobs) "
                "over 6,000): " + ", ".join(f"{k} {v:,.0f}" for k, v in counts.items())
            )
            cost_i = counts[OURS] / counts["stripped copy"] - 1
            section.notes.append(
                f"-> instrument support with none installed: {cost_i * 100:+.2f}% instructions; "
                f"instructions per job, floor / {OURS}: "
                f"nowait first {counts[FLOOR_NOWAIT] / counts[OURS]:.2f}x, "
                f"await always {counts[FLOOR_AWAIT] / counts[OURS]:.2f}x"
            )
            section.bars.append(
                Bar(
                    bar_label + " (instructions)",
                    f"{cost_i * 100:+.2f}%",
                    "< 3.0%",
                    cost_i < 0.03,
                )
            )
            return section
    section.bars.append(
        Bar(bar_label + " (CPU time)", f"{cost * 100:+.1f}%", "< 3.0%", cost < 0.03)
    )
    return section


# -- 7. send against spawn + checkpoint ---------------------------------------------------

SEND = f"{OURS}: await handle.send(job)"
SPAWN_CHECKPOINT = f"{OURS}: handle.spawn(job); await checkpoint()"
SEND_BAR = "send costs <= 1.2x spawn + checkpoint (CPU per job)"


def send(tb: ModuleType | None, sizes: Sizes) -> Section:
    """What ``send`` costs over the ``spawn`` it performs plus the checkpoint it is.

    One submitter, slots free enough that nothing ever waits (a job started by a
    submission finishes at the next checkpoint, so at most a couple run at once and the
    queue stays empty): ``await handle.send(noop)`` per job, against
    ``handle.spawn(noop)`` followed by one bare ``await trio.lowlevel.checkpoint()``.
    Both leave the block to drain. The ratio is taken per round on CPU time per job.
    """
    n = sizes.send
    log(f"send: {n:,} jobs from one submitter, {sizes.rounds} rounds")
    section = Section(
        "send",
        f"7. One submitter, nothing waits: {n:,} no-op jobs, {CAP} slots, queue {n:,} "
        "(CPU time per job, lower is better)",
        ["contender", "CPU per job", "CPU range", "wall per job", "vs spawn + checkpoint"],
        data={"n": n, "rounds": sizes.rounds},
    )
    if tb is None:
        section.notes.append("trio_background could not be imported: nothing to measure.")
        section.bars.append(_ratio_bar(SEND_BAR, math.nan, 1.2, at_most=True))
        return section
    contenders: dict[str, Callable[[], Timing]] = {
        SEND: lambda: ours.send_each(tb, n, CAP),
        SPAWN_CHECKPOINT: lambda: ours.spawn_then_checkpoint(tb, n, CAP),
    }
    timings = interleave(contenders, sizes.rounds, label="send")
    cpu = {name: [t.cpu / n for t in values] for name, values in timings.items()}
    wall = {name: [t.wall / n for t in values] for name, values in timings.items()}
    per_round = ratios(cpu[SEND], cpu[SPAWN_CHECKPOINT])
    for name, values in cpu.items():
        section.rows.append(
            [
                name,
                f"{median(values) * 1e6:,.2f} us",
                f"{min(values) * 1e6:,.2f} - {max(values) * 1e6:,.2f} us",
                f"{median(wall[name]) * 1e6:,.2f} us",
                fmt_ratio(median(ratios(values, cpu[SPAWN_CHECKPOINT]))),
            ]
        )
    section.notes += [
        "one submitting task; every job finishes at the submitter's next checkpoint, so "
        "the queue stays empty and send never waits (both leave the block to drain)",
        _ratio_note("per-round send / (spawn + checkpoint) (CPU)", per_round),
        _ratio_note("the same from wall-clock time", ratios(wall[SEND], wall[SPAWN_CHECKPOINT])),
    ]
    section.data.update(cpu_per_job=cpu, wall_per_job=wall, ratios=per_round)
    section.bars.append(_ratio_bar(SEND_BAR, median(per_round), 1.2, at_most=True))
    return section


# -- 8. this version against the last release ------------------------------------------------

RELEASE_BAR = "burst with handles returned >= 0.95x the last release"


def release(tb: ModuleType | None, sizes: Sizes, *, count_instructions: bool) -> Section:
    """Burst throughput and bytes per queued job against the last release, interleaved.

    Since 2.0 ``spawn`` returns a `BackgroundJob`; the burst ignores it, as most callers
    do. The release's package is rebuilt from git (see ``_release``).
    """
    from . import _release

    n = sizes.burst
    log(f"release: burst of {n:,} against {_release.RELEASE}, {sizes.rounds} interleaved rounds")
    section = Section(
        "release",
        f"8. Against the last release ({_release.RELEASE}): burst of {n:,} no-op jobs",
        ["version", "jobs/s (CPU)", "CPU range", "jobs/s (wall)", "vs release", "what"],
        data={"n": n, "release": _release.RELEASE},
    )
    try:
        old = _release.build()
    except Exception as exc:
        section.notes.append(f"could not build release {_release.RELEASE}: {exc}")
        section.bars.append(Bar(RELEASE_BAR, "n/a", ">= 0.95x", None))
        return section
    if tb is None:
        section.bars.append(Bar(RELEASE_BAR, "n/a", ">= 0.95x", None))
        return section
    label = f"release {_release.RELEASE}"
    contenders: dict[str, Callable[[], Timing]] = {
        OURS: lambda: ours.burst(tb, n, CAP),
        label: lambda: ours.burst(old, n, CAP),
    }
    timings = interleave(contenders, sizes.rounds, label="release")
    what = {OURS: "spawn returns a BackgroundJob (ignored)", label: "spawn returns None"}
    rates = _throughput_rows(section, n, timings, label, what)
    per_round = ratios(rates[OURS], rates[label])
    ratio = median(per_round)
    section.data["per_round"] = per_round
    section.notes.append(
        f"per-round {OURS} / {label} (CPU): " + ", ".join(f"{x:.2f}" for x in per_round)
    )
    tracemalloc.start()
    try:
        q = sizes.mem_queued
        new_bytes = ours.bytes_per_queued_job(tb, q, CAP)
        old_bytes = ours.bytes_per_queued_job(old, q, CAP)
    finally:
        tracemalloc.stop()
    section.notes.append(
        f"bytes per queued job: {OURS} {fmt_bytes(new_bytes)}, {label} {fmt_bytes(old_bytes)}"
    )
    section.data.update(bytes_per_queued_job=new_bytes, release_bytes_per_queued_job=old_bytes)
    judged = f"{ratio:.2f}x (CPU, median of rounds)"
    passed = ratio >= 0.95
    if count_instructions:
        from . import _instructions

        if _instructions.available():
            log("instructions: counting both under valgrind")
            counts = _instructions.per_job(
                {OURS: "ours", label: f"stripped:{Path(str(old.__file__)).parent}"}
            )
            section.data["instructions_per_job"] = counts
            instr_ratio = counts[label] / counts[OURS]
            section.notes.append(
                "instructions per job (valgrind; I(9,000) - I(3,000) over 6,000): "
                + ", ".join(f"{k} {v:,.0f}" for k, v in counts.items())
                + f" -> throughput ratio {instr_ratio:.3f}x"
            )
            judged += f"; {instr_ratio:.3f}x in instructions"
            passed = passed and instr_ratio >= 0.95
    section.bars.append(Bar(RELEASE_BAR, judged, ">= 0.95x", passed))
    return section


# -- 9. scheduling: delays and keys ----------------------------------------------------------

SCHEDULING_BAR = "delayed and keyed spawn cost per job at N within 2x of N/5"
SCHEDULING_HOW = {
    "plain": "handle.spawn(job)",
    "delayed": "handle.spawn(job, delay=(i * 7919 % 1000) / 100), 0 to 9.99 s",
    "keyed": f'handle.spawn(job, key=f"k{{i % {ours.SCHEDULING_KEYS}}}")',
}


def _us(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e6:,.2f} us"


def _us_range(values: list[float]) -> str:
    return f"{min(values) * 1e6:,.2f} - {max(values) * 1e6:,.2f} us"


def scheduling(tb: ModuleType | None, sizes: Sizes) -> Section:
    """What ``delay=`` and ``key=`` cost ``spawn``, and that the cost per job stays flat.

    Three variants of the burst -- plain ``spawn(job)``, ``spawn(job, delay=d)`` with
    delays spread over 0 to 10 s, ``spawn(job, key=k)`` over 1,000 keys -- each at N and
    at N/5, all six interleaved. Every run is under ``trio.testing.MockClock(
    autojump_threshold=0)``, so the delays cost no wall time. Each run reports the CPU
    time of its spawn loop alone and of the whole run (open, spawn, drain), and how much
    of each the cyclic garbage collector took; ratios to plain, and of N to N/5
    (flatness), are taken per round. The bar is on flatness: a heap or a per-key line
    costs O(log N) or O(1) per job, so at N the spawn loop's CPU per job stays within 2x
    of what it is at N/5.
    """
    n = sizes.scheduling
    small = n // 5
    log(
        f"scheduling: plain, delayed and keyed bursts of {n:,} and {small:,} no-op jobs, "
        f"{sizes.rounds} interleaved rounds (mock clock)"
    )
    section = Section(
        "scheduling",
        f"9. Scheduling: bursts of {n:,} and {small:,} no-op jobs, {CAP} slots, queue >= N, "
        "mock clock (CPU time per job, lower is better)",
        [
            "variant",
            "N",
            "spawn loop",
            "spawn range",
            "spawn GC",
            "whole run",
            "whole range",
            "whole GC",
            "wall (whole)",
            "spawn vs plain",
            "whole vs plain",
        ],
        data={"n": n, "small": small, "rounds": sizes.rounds, "keys": ours.SCHEDULING_KEYS},
    )
    label = f"{SCHEDULING_BAR} (N={n:,})"
    if tb is None:
        section.notes.append("trio_background could not be imported: nothing to measure.")
        section.bars.append(Bar(label, "n/a", "<= 2.00x", None))
        return section

    def name(variant: str, size: int) -> str:
        return f"{variant}, N={size:,}"

    def run(variant: str, size: int) -> Callable[[], ours.ScheduledRun]:
        return lambda: ours.scheduled_burst(tb, size, CAP, variant)

    variants = ours.SCHEDULING_VARIANTS
    contenders = {name(v, size): run(v, size) for size in (n, small) for v in variants}
    results = interleave(contenders, sizes.rounds, label="scheduling")
    # Per contender, one value per round, in seconds per job.
    spawn: dict[str, list[float]] = {}
    spawn_gc: dict[str, list[float]] = {}
    whole: dict[str, list[float]] = {}
    whole_gc: dict[str, list[float]] = {}
    wall: dict[str, list[float]] = {}
    for size in (n, small):
        for v in variants:
            key = name(v, size)
            spawn[key] = [r.spawn.cpu / size for r in results[key]]
            spawn_gc[key] = [r.spawn_gc / size for r in results[key]]
            whole[key] = [r.whole.cpu / size for r in results[key]]
            whole_gc[key] = [r.whole_gc / size for r in results[key]]
            wall[key] = [r.whole.wall / size for r in results[key]]
    vs_plain: dict[str, dict[str, list[float]]] = {"spawn": {}, "whole": {}}
    for size in (n, small):
        plain = name("plain", size)
        for v in variants:
            key = name(v, size)
            vs_plain["spawn"][key] = ratios(spawn[key], spawn[plain])
            vs_plain["whole"][key] = ratios(whole[key], whole[plain])
            section.rows.append(
                [
                    v,
                    f"{size:,}",
                    _us(median(spawn[key])),
                    _us_range(spawn[key]),
                    _us(median(spawn_gc[key])),
                    _us(median(whole[key])),
                    _us_range(whole[key]),
                    _us(median(whole_gc[key])),
                    _us(median(wall[key])),
                    fmt_ratio(median(vs_plain["spawn"][key])),
                    fmt_ratio(median(vs_plain["whole"][key])),
                ]
            )
    spawn_less_gc = {
        key: [a - b for a, b in zip(spawn[key], spawn_gc[key], strict=True)] for key in spawn
    }
    flat: dict[str, dict[str, list[float]]] = {"spawn": {}, "spawn_less_gc": {}, "whole": {}}
    for v in variants:
        big, little = name(v, n), name(v, small)
        flat["spawn"][v] = ratios(spawn[big], spawn[little])
        flat["spawn_less_gc"][v] = ratios(spawn_less_gc[big], spawn_less_gc[little])
        flat["whole"][v] = ratios(whole[big], whole[little])
    what = {"spawn": "spawn loop", "spawn_less_gc": "spawn loop less GC", "whole": "whole run"}
    section.notes += [
        "spawn: " + "; ".join(f"{v}: {how}" for v, how in SCHEDULING_HOW.items()),
        "every run is under trio.testing.MockClock(autojump_threshold=0): the delayed jobs "
        "wait their 0 to 9.99 s of virtual time (checked), at no wall-clock cost; "
        "'spawn loop' is the CPU time of the N spawn calls alone, 'whole run' from opening "
        "the runtime to the end of the drain, both per job; 'GC' is the part of each spent "
        "in the cyclic garbage collector (gc.callbacks)",
        "the delays take 1,000 distinct values, so a delayed run's drain wakes up 1,000 "
        "times (once per due time) whatever N: at small N, fewer jobs share those wake-ups",
        f"per-round ratios to plain at N={n:,} (CPU per job, lower is cheaper):",
        *(
            _ratio_note(f"  {v} / plain, {what[part]}", vs_plain[part][name(v, n)])
            for v in variants[1:]
            for part in ("spawn", "whole")
        ),
        f"flatness: CPU per job at N={n:,} / at N={small:,}, per round (1.00x: flat):",
        *(
            _ratio_note(f"  {v}, {what[part]}", flat[part][v])
            for v in variants
            for part in ("spawn", "spawn_less_gc", "whole")
        ),
    ]
    section.data.update(
        spawn_cpu_per_job=spawn,
        spawn_gc_per_job=spawn_gc,
        whole_cpu_per_job=whole,
        whole_gc_per_job=whole_gc,
        whole_wall_per_job=wall,
        vs_plain=vs_plain,
        flatness=flat,
    )
    judged = {v: median(flat["spawn"][v]) for v in ("delayed", "keyed")}
    section.bars.append(
        Bar(
            label,
            ", ".join(f"{v} {fmt_ratio(x)}" for v, x in judged.items()),
            "<= 2.00x",
            all(x <= 2.0 for x in judged.values()),
        )
    )
    return section
