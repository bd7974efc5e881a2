"""The ``async with`` block and the public classes: what leaves the block, misuse, reprs.

How the block drains when it ends normally is in ``test_shutdown.py``; here is what happens
when its body raises or is cancelled, what `open_background_runtime` refuses, the
messages that say how to use it instead, and the public classes it hands out.
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

import pytest
import trio
import trio.testing
from helpers import Recorder, counts, job_names, records

from trio_background import (
    BackgroundHandle,
    BackgroundRuntime,
    BackgroundTaskConfig,
    open_background_runtime,
)

#: A private name of the package (``_runtime``, ``trio_background._job``...).
PRIVATE = re.compile(r"\b_[A-Za-z]\w*|trio_background\._")

USE_ASYNC_WITH = "write `async with open_background_runtime(...) as runtime:`"


# -- what leaves the block ------------------------------------------------------------------


async def test_body_raises(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    problem = LookupError("body failed")
    config = BackgroundTaskConfig(max_queue_size=5, max_concurrent_tasks=1, drain_timeout=60.0)
    cancelled: list[float] = []
    ran: list[str] = []
    opened: list[BackgroundRuntime] = []

    async def running() -> None:
        try:
            await trio.sleep(5)
        except trio.Cancelled:
            cancelled.append(trio.current_time())
            raise

    async def queued() -> None:
        ran.append("queued")  # pragma: no cover (never runs)

    async def scenario() -> None:
        async with open_background_runtime(config) as runtime:
            opened.append(runtime)
            handle = runtime.handle()
            handle.spawn(running, name="running")
            handle.spawn(queued, name="queued")
            await trio.sleep(0.5)
            raise problem

    with pytest.raises(LookupError, match=r"^body failed$") as excinfo:
        await scenario()
    [runtime] = opened
    # Unchanged, unwrapped, and no drain: cut off at once.
    assert excinfo.value is problem
    assert trio.current_time() == 0.5
    assert cancelled == [0.5]
    assert ran == []
    assert runtime.statistics().closed
    assert counts(runtime) == {"cancelled": 1, "dropped": 1}
    assert job_names(caplog, logging.WARNING) == ["queued", "running"]
    assert records(caplog, logging.ERROR) == []


async def test_body_cancelled_from_outside(
    autojump_clock: trio.testing.MockClock, small_config: BackgroundTaskConfig
) -> None:
    config = small_config  # two slots, two queued, drain_timeout=5 (never reached)
    cancelled_at: list[float] = []
    t0 = trio.current_time()

    async def job() -> None:
        try:
            await trio.sleep(100)
        except trio.Cancelled:
            cancelled_at.append(trio.current_time() - t0)
            raise

    runtime: BackgroundRuntime | None = None
    with trio.move_on_after(2.5) as scope:
        async with open_background_runtime(config) as runtime:
            for _ in range(3):
                runtime.handle().spawn(job)
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() - t0 == 2.5  # no drain
    assert cancelled_at == [2.5, 2.5]
    assert runtime is not None
    assert counts(runtime) == {"cancelled": 2, "dropped": 1}


# -- open_background_runtime() refuses bad arguments ----------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config": "x"}, "config must be a BackgroundTaskConfig or None, not str"),
        (
            {"config": {"max_queue_size": 1}},
            "config must be a BackgroundTaskConfig or None, not dict",
        ),
        ({"instruments": 5}, "instruments must be an iterable of instruments, not int"),
        ({"instruments": "abc"}, "instruments must be an iterable of instruments, not a string"),
    ],
)
async def test_open_runtime_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    recorder = Recorder()
    entered = False
    args: dict[str, Any] = {"instruments": [recorder], **kwargs}
    with pytest.raises(TypeError, match=rf"^{message}$"):
        async with open_background_runtime(**args):
            entered = True  # pragma: no cover
    assert not entered
    assert recorder.calls == []


# -- misuse gets a message that says what to write instead ----------------------------------


def test_plain_with_says_async_with() -> None:
    message = (
        f"open_background_runtime() is an async context manager: {USE_ASYNC_WITH} instead of `with`"
    )
    with (
        pytest.raises(TypeError, match=rf"^{re.escape(message)}$") as excinfo,
        open_background_runtime(),  # type: ignore[attr-defined]
    ):
        pass
    assert not PRIVATE.search(str(excinfo.value))


@pytest.mark.parametrize("name", ["handle", "statistics", "spawn", "aclose"])
def test_using_the_manager_without_entering_it_says_async_with(name: str) -> None:
    message = (
        f"open_background_runtime() returns an async context manager, not the runtime, "
        f"so it has no attribute {name!r}: {USE_ASYNC_WITH} and use `runtime` inside the block"
    )
    with pytest.raises(AttributeError, match=rf"^{re.escape(message)}$") as excinfo:
        getattr(open_background_runtime(), name)
    assert not PRIVATE.search(str(excinfo.value))


async def test_awaiting_the_manager_says_async_with() -> None:
    message = f"open_background_runtime() is not awaitable: {USE_ASYNC_WITH}"
    with pytest.raises(TypeError, match=rf"^{re.escape(message)}$") as excinfo:
        await open_background_runtime()  # type: ignore[misc]
    assert not PRIVATE.search(str(excinfo.value))


async def test_entering_the_manager_twice_is_refused() -> None:
    manager = open_background_runtime()
    async with manager as runtime:
        runtime.handle().spawn(trio.lowlevel.checkpoint)
    with pytest.raises(
        RuntimeError, match=r"^this open_background_runtime\(\) was already entered once$"
    ):
        async with manager:
            pass  # pragma: no cover
    assert counts(runtime) == {"completed": 1}


@pytest.mark.parametrize("name", ["spawn", "send"])
async def test_runtime_spawn_says_use_a_handle(name: str) -> None:
    message = (
        f"'BackgroundRuntime' object has no attribute {name!r}: jobs are submitted "
        f"through a handle, e.g. runtime.handle().{name}(fn, *args)"
    )
    async with open_background_runtime() as runtime:
        with pytest.raises(AttributeError, match=rf"^{re.escape(message)}$") as excinfo:
            getattr(runtime, name)
        # Any other missing attribute is a plain AttributeError.
        with pytest.raises(
            AttributeError, match=r"^'BackgroundRuntime' object has no attribute 'spawn_soon'$"
        ):
            getattr(runtime, "spawn_soon")  # noqa: B009 (mypy would refuse the attribute)
    assert not PRIVATE.search(str(excinfo.value))


# -- the public classes ---------------------------------------------------------------------


async def test_handle_and_runtime_api_shape() -> None:
    assert inspect.isclass(BackgroundHandle)
    assert inspect.isclass(BackgroundRuntime)
    assert callable(BackgroundHandle.spawn)
    assert inspect.iscoroutinefunction(BackgroundHandle.send)
    assert inspect.iscoroutinefunction(BackgroundRuntime.aclose)
    assert inspect.iscoroutinefunction(BackgroundRuntime.wait_idle)
    async with open_background_runtime() as runtime:
        assert type(runtime) is BackgroundRuntime
        handle = runtime.handle()
        assert type(handle) is BackgroundHandle
        assert runtime.handle() is not handle  # a new handle each time


async def test_reprs_name_the_public_classes_and_the_runtimes_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    address = r"at 0x[0-9a-f]+"
    manager = open_background_runtime(
        BackgroundTaskConfig(max_queue_size=2, max_concurrent_tasks=1)
    )
    assert re.fullmatch(rf"<trio_background\.open_background_runtime\(\) {address}>", repr(manager))
    release = trio.Event()
    async with manager as runtime:
        handle = runtime.handle()
        assert re.fullmatch(rf"<trio_background\.BackgroundHandle {address}>", repr(handle))

        def state() -> str:
            found = re.fullmatch(
                rf"<trio_background\.BackgroundRuntime {address}, (.*)>", repr(runtime)
            )
            assert found is not None, repr(runtime)
            return found.group(1)

        assert state() == "open, 0/1 running, 0/2 queued"
        handle.spawn(release.wait)
        handle.spawn(release.wait)
        assert state() == "open, 1/1 running, 1/2 queued"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runtime.aclose)
            await trio.testing.wait_all_tasks_blocked()
            assert state() == "draining, 1/1 running, 1/2 queued"
            release.set()
    assert state() == "closed, 0/1 running, 0/2 queued"


def test_the_manager_reports_the_package_as_its_module() -> None:
    assert type(open_background_runtime()).__module__ == "trio_background"
