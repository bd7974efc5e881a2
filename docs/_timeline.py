"""The ready-order timeline in docs/semantics.rst, drawn from a real run.

docs/conf.py calls `write` at ``builder-inited``: it runs a small fixed scenario
on a real runtime under `trio.testing.MockClock` (virtual time, so it takes
milliseconds and is the same on every machine), checks that what happened obeys
the scheduling rules of docs/semantics.rst, and draws it with matplotlib as
docs/_generated/timeline.svg (gitignored). A scheduler that breaks the rules
fails the docs build here instead of drawing a wrong picture.

To look at the picture alone: ``python docs/_timeline.py [out.svg]``.
"""

from __future__ import annotations

import io
import itertools
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio.testing

from trio_background import (
    BackgroundTaskConfig,
    Retry,
    current_job,
    open_background_runtime,
)

SLOTS = 2
RETRY = Retry(attempts=2, backoff=1, jitter=False)
KEY_A = "customer A"
KEY_B = "customer B"


@dataclass(frozen=True)
class Plan:
    """One job of the scenario; every run but the last raises."""

    name: str
    key: str | None
    runs: tuple[float, ...]  # seconds each run takes
    delay: float | None = None

    @property
    def retry(self) -> Retry | None:
        return RETRY if len(self.runs) > 1 else None


# Spawned in this order, all at t = 0.
PLANS = (
    Plan("A1", KEY_A, (2,)),
    Plan("A2", KEY_A, (1,)),
    Plan("B1", KEY_B, (1,)),
    Plan("B2", KEY_B, (2,)),
    Plan("plain", None, (1,)),
    Plan("retried", None, (1, 1)),
    Plan("delay=1.5", None, (1,), delay=1.5),
    Plan("A3", KEY_A, (1,)),
)


@dataclass
class Record:
    plan: Plan
    order: int  # acceptance order
    accepted: float = 0.0
    ready: list[float] = field(default_factory=list)  # when each run became ready
    runs: list[tuple[float, float]] = field(default_factory=list)  # (start, end)

    @property
    def held(self) -> tuple[float, float]:
        """When the job held its key: first start to final end, backoffs included."""
        return self.runs[0][0], self.runs[-1][1]


class RunFailed(Exception):
    pass


async def _job(record: Record) -> None:
    attempt = current_job().attempt
    start = trio.current_time()
    await trio.sleep(record.plan.runs[attempt - 1])
    record.runs.append((start, trio.current_time()))
    if attempt < len(record.plan.runs):
        raise RunFailed(f"{record.plan.name}: run {attempt} fails on purpose")


class _Retries:
    """Instrument: a retried job becomes ready again when its backoff is over."""

    def __init__(self, records: dict[str, Record]) -> None:
        self.records = records

    def job_retrying(self, job: object, exception: BaseException, delay: float) -> None:
        name = job.name  # type: ignore[attr-defined]
        self.records[name].ready.append(trio.current_time() + delay)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _scenario(records: dict[str, Record]) -> None:
    config = BackgroundTaskConfig(max_concurrent_tasks=SLOTS, max_queue_size=len(PLANS))
    jobs = []
    async with open_background_runtime(config, instruments=[_Retries(records)]) as runtime:
        handle = runtime.handle()
        for record in records.values():
            plan = record.plan
            record.accepted = trio.current_time()
            record.ready.append(record.accepted + (plan.delay or 0))
            jobs.append(
                handle.spawn(
                    _job, record, name=plan.name, key=plan.key, delay=plan.delay, retry=plan.retry
                )
            )
    statuses = [job.status for job in jobs]
    assert statuses == ["completed"] * len(PLANS), statuses


def run() -> list[Record]:
    """Run the scenario under a MockClock; return the records, checked."""
    records = {plan.name: Record(plan, order) for order, plan in enumerate(PLANS)}
    # The retry's WARNING would print to stderr during the docs build: keep it.
    logger = logging.getLogger("trio_background")
    capture = _Capture()
    propagate = logger.propagate
    logger.addHandler(capture)
    logger.propagate = False
    try:
        trio.run(_scenario, records, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logger.removeHandler(capture)
        logger.propagate = propagate
    retries = sum(len(plan.runs) - 1 for plan in PLANS)
    levels = [record.levelname for record in capture.records]
    assert levels == ["WARNING"] * retries, [record.getMessage() for record in capture.records]
    result = list(records.values())
    check(result)
    return result


def check(records: list[Record]) -> None:
    """Assert the rules of docs/semantics.rst ("Scheduling: delay, retries, keys")."""
    runs = []  # (record, run number, ready, start, end)
    for r in records:
        name, plan = r.plan.name, r.plan
        assert len(r.runs) == len(plan.runs), f"{name} ran {len(r.runs)} times"
        assert len(r.ready) == len(plan.runs), f"{name} became ready {len(r.ready)} times"
        assert r.ready[0] == r.accepted + (plan.delay or 0), f"{name}: ready at {r.ready[0]}"
        steps = zip(r.ready, r.runs, plan.runs, strict=True)
        for n, (ready, (start, end), seconds) in enumerate(steps):
            assert ready <= start, f"{name} run {n + 1} started at {start} before ready {ready}"
            assert end - start == seconds, f"{name} run {n + 1} took {end - start}"
            if n:
                due = r.runs[n - 1][1] + RETRY.delay(n, lambda: 1.0)
                assert ready == due, f"{name} run {n + 1} due at {ready}, not {due}"
            runs.append((r, n, ready, start, end))

    def running(t: float) -> int:
        return sum(start <= t < end for _, _, _, start, end in runs)

    def key_held(r: Record, t: float) -> bool:
        """Whether another job holds r's key at t (one starting at t included)."""
        return r.plan.key is not None and any(
            o is not r and o.plan.key == r.plan.key and o.held[0] <= t < o.held[1] for o in records
        )

    def rank(r: Record, n: int) -> tuple[float, int, int]:
        # ready order: a job that becomes due goes before one accepted at that instant
        accepted_now = n == 0 and not r.plan.delay
        return r.ready[n], int(accepted_now), r.order

    events = sorted({t for _, _, ready, _, end in runs for t in (ready, end)})
    for t in events:
        assert running(t) <= SLOTS, f"{running(t)} jobs running at {t} with {SLOTS} slots"
    for r, n, ready, start, _ in runs:
        # No slot is free while a ready job's key is free.
        for t in events:
            if ready <= t < start:
                assert running(t) == SLOTS or key_held(r, t), (
                    f"{r.plan.name} run {n + 1} waited at {t} with a slot and its key free"
                )
        # The job that starts is the earliest-ready one whose key is free.
        for w, m, w_ready, w_start, _ in runs:
            if w_ready <= start < w_start and not key_held(w, start):
                assert rank(r, n) < rank(w, m), (
                    f"{r.plan.name} run {n + 1} started at {start} before"
                    f" {w.plan.name} run {m + 1}, which was ready earlier"
                )
    for key in {r.plan.key for r in records} - {None}:
        mine = [r for r in records if r.plan.key == key]
        held = sorted(r.held for r in mine)
        for (_, end), (start, _) in itertools.pairwise(held):
            assert end <= start, f"two jobs of key {key!r} ran at the same time"
        by_start = sorted(mine, key=lambda r: r.held[0])
        assert by_start == sorted(mine, key=lambda r: rank(r, 0)), (
            f"the jobs of key {key!r} did not start in ready order"
        )


COLOURS = {KEY_A: "#0072B2", KEY_B: "#E69F00", None: "#8C8C8C"}  # Okabe-Ito: colour-blind safe


def draw(records: list[Record]) -> bytes:
    """The timeline as SVG (text as paths, white background: any page theme)."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rc = {"svg.hashsalt": "trio-background-timeline", "svg.fonttype": "path", "font.size": 9}
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=(7.2, 3.9), facecolor="white", layout="constrained")
        ax = fig.add_subplot()
        ax.set_facecolor("white")
        for y, r in enumerate(records):
            colour = COLOURS[r.plan.key]
            if r.plan.delay:
                ax.hlines(y, r.accepted, r.ready[0], colors="#555555", linestyles=(0, (1, 2)))
            for n, (ready, (start, end)) in enumerate(zip(r.ready, r.runs, strict=True)):
                if n:  # backoff before a retry
                    ax.hlines(y, r.runs[n - 1][1], ready, colors="#555555", linestyles=(0, (1, 2)))
                if start > ready:  # ready, waiting for a slot or its key
                    ax.hlines(y, ready, start, colors=colour, linewidth=1.5)
                failed = n < len(r.runs) - 1
                ax.barh(
                    y,
                    end - start,
                    left=start,
                    height=0.6,
                    color=colour,
                    edgecolor="black",
                    linewidth=0.6,
                    hatch="///" if failed else None,
                    zorder=2,
                )
                ax.plot(ready, y, marker="D", markersize=5, color="black", zorder=3)
        ax.set_yticks(range(len(records)), [r.plan.name for r in records])
        ax.invert_yaxis()
        end = max(r.runs[-1][1] for r in records)
        ax.set_xlim(-0.2, end + 0.2)
        ax.set_xticks(range(int(end) + 1))
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_xlabel("seconds (trio.current_time() under MockClock)")
        ax.set_ylabel("jobs, in spawn order")
        ax.set_title(f"{SLOTS} slots, all {len(records)} jobs spawned at t = 0", fontsize=9)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        legend = [
            Patch(facecolor=COLOURS[KEY_A], edgecolor="black", label=f'key="{KEY_A}"'),
            Patch(facecolor=COLOURS[KEY_B], edgecolor="black", label=f'key="{KEY_B}"'),
            Patch(facecolor=COLOURS[None], edgecolor="black", label="no key"),
            Patch(facecolor="white", edgecolor="black", hatch="///", label="run failed, retried"),
            Line2D([], [], marker="D", color="black", ls="", label="ready (accepted or due)"),
            Line2D([], [], color="black", linewidth=1.5, label="waiting: slots or key busy"),
            Line2D([], [], color="#555555", linestyle=(0, (1, 2)), label="delay / backoff"),
        ]
        fig.legend(
            handles=legend,
            loc="outside lower center",
            ncol=4,
            frameon=False,
            handlelength=1.8,
            columnspacing=1.2,
        )
        out = io.BytesIO()
        fig.savefig(out, format="svg", facecolor="white", metadata={"Date": None})
    return out.getvalue()


def write(path: Path) -> None:
    """Run, check and draw the scenario into ``path`` (left alone if unchanged)."""
    svg = draw(run())
    if not path.exists() or path.read_bytes() != svg:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(svg)


if __name__ == "__main__":
    for r in run():
        print(f"{r.plan.name:10} ready {r.ready} runs {r.runs}")
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "timeline.svg"))
