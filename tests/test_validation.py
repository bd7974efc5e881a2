"""Bad input and misuse: every wrong argument is refused at once and leaves no trace.

Each test that calls into a live runtime proves that nothing was accepted or
counted: ``statistics()`` is equal before and after the bad call, and no
instrument hook fired. The table in ``docs/reliability.rst`` lists these tests.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from helpers import Recorder, all_counts, expected

from trio_background import (
    BackgroundStatistics,
    BackgroundTaskConfig,
    open_background_runtime,
)

# Two slots and room for four queued jobs: the refusal scenario keeps two jobs
# running and one queued, so an accidental acceptance would show in any counter.
CONFIG = BackgroundTaskConfig(max_queue_size=4, max_concurrent_tasks=2, drain_timeout=5.0)


# -- BackgroundTaskConfig --------------------------------------------------------------------


# -- BackgroundJobMetadata ------------------------------------------------------------------


# -- open_background_runtime ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"config": "x"}, r"^config must be a BackgroundTaskConfig or None, not str$"),
        ({"config": {"max_queue_size": 1}}, r"^config must be a BackgroundTaskConfig or None"),
        ({"instruments": 5}, r"^instruments must be an iterable of instruments, not int$"),
        ({"instruments": "abc"}, r"^instruments must be an iterable of instruments"),
    ],
)
async def test_open_runtime_rejects_bad_arguments(kwargs: dict[str, Any], pattern: str) -> None:
    recorder = Recorder()
    entered = False
    args: dict[str, Any] = {"instruments": [recorder], **kwargs}
    with pytest.raises(TypeError, match=pattern):
        async with open_background_runtime(**args):
            entered = True  # pragma: no cover
    assert not entered
    assert recorder.calls == []


async def test_instrument_without_hooks_is_accepted() -> None:
    # Objects need not subclass BackgroundInstrument: missing hooks are skipped.
    async with open_background_runtime(CONFIG, instruments=[object()]) as runtime:
        runtime.handle().spawn(trio.lowlevel.checkpoint)
    assert all_counts(runtime.statistics()) == expected(completed=1)


# -- spawn / send: bad arguments ------------------------------------------------------------


# -- the thread rule ------------------------------------------------------------------------


# -- after shutdown began -------------------------------------------------------------------


# -- calls that would wait for themselves ---------------------------------------------------


async def test_wait_idle_from_a_job_raises_at_once(autojump_clock: trio.testing.MockClock) -> None:
    errors: list[BaseException] = []
    snapshots: list[tuple[BackgroundStatistics, BackgroundStatistics]] = []
    async with open_background_runtime(CONFIG) as runtime:

        async def waits_for_itself() -> None:
            before = runtime.statistics()
            try:
                await runtime.wait_idle()
            except RuntimeError as exc:
                errors.append(exc)
            snapshots.append((before, runtime.statistics()))
            await trio.sleep(1.0)

        runtime.handle().spawn(waits_for_itself)
        await runtime.wait_idle()  # fine from the body
        assert trio.current_time() == 1.0
    assert len(errors) == 1
    assert "would wait for itself" in str(errors[0])
    [(before, after)] = snapshots
    assert before == after
    assert all_counts(runtime.statistics()) == expected(completed=1)
