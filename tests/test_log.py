"""The runtime's log records: what they say, and log handlers that misbehave.

Which record each outcome gets is in the tests of that outcome (``test_job.py``,
``test_shutdown.py``); here is the shape common to them all, and the promise that a
handler that raises cannot derail the runtime.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from helpers import LOGGER, all_counts, check_invariants, expected, records, sleeper

from trio_background import BackgroundTaskConfig, open_background_runtime


async def test_request_id_is_in_the_message_text(caplog: pytest.LogCaptureFixture) -> None:
    # The text names the job and, when it has one, the request id (so a default
    # logging.basicConfig() shows it); both are record attributes too.
    async def fails() -> None:
        raise ValueError("boom")

    async with open_background_runtime() as runtime:
        runtime.handle().spawn(fails, name="send_email", request_id="req-7")
        runtime.handle().spawn(fails, name="reindex")
    errors = sorted(records(caplog, logging.ERROR), key=lambda r: r.getMessage())
    assert [r.getMessage() for r in errors] == [
        "background job 'reindex' failed",
        "background job 'send_email' failed (request_id='req-7')",
    ]
    assert [(r.job_name, r.request_id) for r in errors] == [  # type: ignore[attr-defined]
        ("reindex", None),
        ("send_email", "req-7"),
    ]


async def test_keyboard_interrupt_while_logging_a_failed_job_strands_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    interrupt = KeyboardInterrupt()
    ran: list[str] = []

    class InterruptOnce(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            pass

        def handle(self, record: logging.LogRecord) -> bool:
            if record.getMessage() == "background job 'fails' failed":
                raise interrupt
            return True

    async def fails() -> None:
        await trio.sleep(1)
        raise ValueError("boom")

    async def next_job() -> None:
        ran.append("next")

    handler = InterruptOnce()
    logger = logging.getLogger("trio_background")
    logger.addHandler(handler)
    try:
        config = BackgroundTaskConfig(max_concurrent_tasks=1)
        with trio.fail_after(10), pytest.raises(KeyboardInterrupt) as excinfo:
            async with open_background_runtime(config) as runtime:
                runtime.handle().spawn(fails, name="fails")
                runtime.handle().spawn(next_job, name="next")
                await trio.sleep_forever()
    finally:
        logger.removeHandler(handler)
    assert excinfo.value is interrupt
    s = runtime.statistics()
    assert (s.queued, s.running) == (0, 0)
    check_invariants(s)
    assert s.failed == 1
    assert s.completed + s.dropped == 1  # "next" ran or was reported, never stranded
    assert ran == ([] if s.dropped else ["next"])


async def test_a_log_handler_that_raises_is_reported_on_stderr_and_the_runtime_carries_on(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("handler broke")

    async def fails() -> None:
        await trio.sleep(1)
        raise ValueError("boom")

    handler = Broken()
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        config = BackgroundTaskConfig(max_concurrent_tasks=1)
        async with open_background_runtime(config) as runtime:
            runtime.handle().spawn(fails, name="fails")
            runtime.handle().spawn(sleeper, 1, name="next")
    finally:
        logger.removeHandler(handler)
    assert trio.current_time() == 2.0
    s = runtime.statistics()
    check_invariants(s)
    assert all_counts(s) == expected(completed=1, failed=1)
    err = capsys.readouterr().err
    assert err.startswith("--- trio_background: error while logging ---\n")
    assert err.count("--- trio_background: error while logging ---") == 1
    assert "RuntimeError: handler broke" in err


async def test_system_exit_from_a_logging_handler_leaves_the_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    exit_ = SystemExit(3)

    class Raises(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise exit_

    async def fails() -> None:
        raise ValueError("boom")

    handler = Raises()
    logger = logging.getLogger("trio_background")
    logger.addHandler(handler)
    try:
        with trio.fail_after(10), pytest.raises(SystemExit) as excinfo:
            async with open_background_runtime() as runtime:
                runtime.handle().spawn(fails)
                await trio.sleep(10)
    finally:
        logger.removeHandler(handler)
    assert excinfo.value is exit_
    s = runtime.statistics()
    assert (s.queued, s.running, s.failed) == (0, 0, 1)
