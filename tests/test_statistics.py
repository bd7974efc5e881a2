"""BackgroundStatistics: a frozen snapshot whose ``accepted`` is a counter of its own."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing
from helpers import sleeper

from trio_background import (
    BackgroundStatistics,
    BackgroundTaskConfig,
    QueueFullError,
    open_background_runtime,
)


def test_accepted_is_a_counter_of_its_own() -> None:
    assert "accepted" in attrs.fields_dict(BackgroundStatistics)
    # So a snapshot whose counters disagree can exist, and an identity check can fail.
    stats = BackgroundStatistics(
        scheduled=0,
        queued=0,
        running=0,
        completed=1,
        failed=0,
        timed_out=0,
        cancelled=0,
        dropped=0,
        rejected=0,
        max_queue_size=1,
        max_concurrent_tasks=1,
        closed=False,
        accepted=2,
        retried=0,
    )
    assert stats.accepted != stats.completed
    assert attrs.has(type(stats))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.accepted = 1  # type: ignore[misc]
    assert stats == attrs.evolve(stats)


async def test_accepted_counts_successful_submissions_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ok = 0
    config = BackgroundTaskConfig(max_concurrent_tasks=1, max_queue_size=1)
    async with open_background_runtime(config) as runtime:
        handle = runtime.handle()
        for _ in range(5):
            try:
                handle.spawn(sleeper, 1)
            except QueueFullError:
                pass
            else:
                ok += 1
        assert runtime.statistics().accepted == ok == 2
        assert runtime.statistics().rejected == 3
