"""Measurement helpers: interleaved rounds, medians, percentiles."""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

T = TypeVar("T")


class Timing(NamedTuple):
    """Seconds of wall-clock time and of CPU time of this process, for one measurement.

    Every contender is single-threaded and never blocks (its jobs never sleep), so on an
    idle machine the two agree; on a shared machine CPU time leaves out the moments the
    process was not running, which makes ratios between contenders much steadier.
    """

    wall: float
    cpu: float


def clock() -> Timing:
    return Timing(time.perf_counter(), time.process_time())


def since(start: Timing) -> Timing:
    return Timing(time.perf_counter() - start.wall, time.process_time() - start.cpu)


def log(message: str) -> None:
    """Progress goes to stderr so that stdout carries only the table."""
    print(message, file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def interleave(
    contenders: dict[str, Callable[[], T]], rounds: int, *, label: str = ""
) -> dict[str, list[T]]:
    """Run every contender once per round, rounds interleaved (A B C, B C A, ...).

    The order rotates by one each round so that no contender always runs right
    after the same neighbour (garbage left behind, caches, a noisy moment). A full
    garbage collection runs before each measurement, outside the timed region.
    """
    names = list(contenders)
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            results[name].append(contenders[name]())
        if label:
            log(f"  {label}: round {r + 1}/{rounds} done")
    return results


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-round ratios (round i of one contender over round i of another)."""
    return [a / b if b else math.nan for a, b in zip(numerators, denominators, strict=True)]


def fmt_rate(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}/s"


def fmt_ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def fmt_us(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e6:,.1f} us"


def fmt_ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:,.2f} ms"


def fmt_bytes(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f} B"
