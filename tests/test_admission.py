"""Admission: spawn/send accept a job completely or not at all, and count it for real."""

from __future__ import annotations

import functools
import gc
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from helpers import all_counts, expected, sleeper

from trio_background import (
    BackgroundHandle,
    BackgroundStatistics,
    open_background_runtime,
)


@pytest.mark.parametrize("error", [RecursionError, MemoryError])
async def test_spawn_is_atomic_when_starting_the_task_fails(
    error: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trio.Nursery.start_soon
    failing = False

    def start_soon(self: trio.Nursery, *args: Any, **kwargs: Any) -> None:
        if failing:
            raise error("inside Trio")
        real(self, *args, **kwargs)

    monkeypatch.setattr(trio.Nursery, "start_soon", start_soon)
    async with open_background_runtime() as runtime:
        handle = runtime.handle()
        before = runtime.statistics()
        failing = True
        with pytest.raises(error):
            handle.spawn(sleeper, 1)
        failing = False
        assert runtime.statistics() == before
        # No slot was kept: the runtime still takes and runs jobs, and closes.
        handle.spawn(sleeper, 0)
        await runtime.wait_idle()
    assert all_counts(runtime.statistics()) == expected(completed=1)


async def test_rejected_coroutine_object_is_closed() -> None:
    async def job() -> None:
        pass

    coro = job()
    async with open_background_runtime() as runtime:
        with pytest.raises(TypeError, match=r"not a coroutine object"):
            runtime.handle().spawn(coro)  # type: ignore[arg-type]
    assert inspect.getcoroutinestate(coro) == "CORO_CLOSED"  # no "never awaited" warning
    gc.collect()


@pytest.mark.parametrize(
    ("fn", "label"),
    [
        (time.sleep, "sleep"),
        (functools.partial(time.sleep, 1), "sleep"),
        (print, "print"),
        ([].append, "list.append"),
    ],
)
async def test_builtins_are_refused_with_the_to_thread_hint(fn: object, label: str) -> None:
    async with open_background_runtime() as runtime:
        with pytest.raises(TypeError) as excinfo:
            runtime.handle().spawn(fn)  # type: ignore[arg-type]
        assert f"not the builtin {label!r}" in str(excinfo.value)
        assert f"spawn(trio.to_thread.run_sync, {label}, *args)" in str(excinfo.value)
        assert runtime.statistics().accepted == 0


async def test_classes_are_refused() -> None:
    class Job:
        async def __call__(self) -> None:
            pass

    async with open_background_runtime() as runtime:
        with pytest.raises(
            TypeError, match=r"not the class 'test_classes_are_refused.<locals>.Job'"
        ):
            runtime.handle().spawn(Job)  # type: ignore[arg-type]
        runtime.handle().spawn(Job())  # an instance with an async __call__ is fine
    assert runtime.statistics().completed == 1


@pytest.mark.parametrize("method", ["spawn", "send"])
async def test_huge_int_timeout_is_a_value_error(method: str) -> None:
    async with open_background_runtime() as runtime:
        handle = runtime.handle()
        with pytest.raises(ValueError, match=r"^timeout is too large for a number of seconds"):
            if method == "spawn":
                handle.spawn(sleeper, 1, timeout=10**400)
            else:
                await handle.send(sleeper, 1, timeout=10**400)
        assert runtime.statistics().accepted == 0


def test_runtime_belongs_to_the_thread_that_enters_the_block() -> None:
    manager = open_background_runtime()  # created in this thread
    results: list[BackgroundStatistics] = []

    async def main() -> None:
        async with manager as runtime:
            runtime.handle().spawn(sleeper, 0)
            await runtime.wait_idle()
        results.append(runtime.statistics())

    thread = threading.Thread(target=trio.run, args=(main,))
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    [stats] = results
    assert all_counts(stats) == expected(completed=1)


async def test_spawn_from_a_foreign_thread_accepts_nothing() -> None:
    async with open_background_runtime() as runtime:
        handle = runtime.handle()
        errors: list[BaseException] = []

        def foreign(spawn: Callable[..., None]) -> None:
            try:
                spawn(sleeper, 0)
            except RuntimeError as exc:
                errors.append(exc)

        await trio.to_thread.run_sync(foreign, handle.spawn)
        [error] = errors
        assert "trio.from_thread.run_sync(handle.spawn" in str(error)
        assert runtime.statistics().accepted == 0


async def test_handles_are_typed_public_objects() -> None:
    async with open_background_runtime() as runtime:
        assert type(runtime.handle()) is BackgroundHandle
