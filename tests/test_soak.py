"""The CI variant of ``bench/soak.py``: the same soak and bounds, with fewer jobs.

``python -m bench.soak`` runs 1,000,000 jobs; here 10,000 go through one
runtime in-process (about 4 s of CPU under tracemalloc on the reference
machine), with the same exact-count and memory checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import trio_background

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `pytest` (unlike `python -m pytest`) does not add the repo root
    sys.path.insert(0, _ROOT)

import bench.soak  # noqa: E402
from bench.soak import (  # noqa: E402
    PEAK_LIMIT_BYTES,
    RETAINED_LIMIT_BYTES,
    expected_mix,
    main,
    soak,
)

CI_JOBS = 10_000


def test_expected_mix() -> None:
    assert expected_mix(0) == (0, 0, 0)
    assert expected_mix(17) == (17, 0, 0)
    assert expected_mix(18) == (17, 1, 0)
    assert expected_mix(19) == (17, 2, 0)
    assert expected_mix(20) == (17, 2, 1)
    assert expected_mix(41) == (35, 4, 2)
    assert expected_mix(1_000_000) == (850_000, 100_000, 50_000)


@pytest.mark.slow
async def test_soak_ci_variant() -> None:
    result = await soak(CI_JOBS)
    assert result.problems == ()
    stats = result.statistics
    assert (stats.completed, stats.failed, stats.timed_out) == (8_500, 1_000, 500)
    assert (stats.queued, stats.running, stats.cancelled, stats.dropped, stats.rejected) == (
        0,
        0,
        0,
        0,
        0,
    )
    assert stats.accepted == CI_JOBS
    assert stats.closed
    # Backpressure really engaged: the producer found queue and slots full many times.
    assert result.stalls >= CI_JOBS // (stats.max_queue_size + stats.max_concurrent_tasks)
    assert 0 < result.peak_bytes < PEAK_LIMIT_BYTES
    assert result.retained_bytes < RETAINED_LIMIT_BYTES
    assert result.ok


async def test_soak_detects_a_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    # The retained-memory check bites: make every failing job leak 2 KB.
    leaked: list[bytearray] = []

    class LeakyError(trio_background.BackgroundJobError):
        def __init__(self, message: str) -> None:
            super().__init__(message)
            leaked.append(bytearray(2048))

    monkeypatch.setattr(bench.soak, "BackgroundJobError", LeakyError)
    result = await soak(2_000)  # 200 failing jobs: 400 KB leaked
    assert len(leaked) == 200
    assert not result.ok
    assert [p for p in result.problems if not p.startswith("retained memory")] == []
    assert result.retained_bytes >= 200 * 2048


def test_soak_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--jobs", "500"]) == 0
    out = capsys.readouterr().out
    assert "soak: 500 jobs through one runtime" in out
    assert "completed=425 failed=50 timed_out=25" in out
    assert out.rstrip().endswith("OK: exact counts, memory within bounds")
