"""Misuse of the public API gets a message that says what to write instead."""

from __future__ import annotations

import inspect
import logging
import re

import pytest
import trio

import trio_background
from trio_background import open_background_runtime

PRIVATE = re.compile(r"\b_[A-Za-z]\w*|trio_background\._")


def test_plain_with_says_async_with() -> None:
    with pytest.raises(TypeError) as excinfo, open_background_runtime():  # type: ignore[attr-defined]
        pass
    assert "async with open_background_runtime(...) as runtime" in str(excinfo.value)
    assert not PRIVATE.search(str(excinfo.value))


@pytest.mark.parametrize("name", ["handle", "statistics", "spawn", "aclose"])
def test_using_the_manager_without_entering_it_says_async_with(name: str) -> None:
    with pytest.raises(AttributeError) as excinfo:
        getattr(open_background_runtime(), name)
    assert "async with open_background_runtime(...) as runtime" in str(excinfo.value)
    assert not PRIVATE.search(str(excinfo.value))


async def test_awaiting_the_manager_says_async_with() -> None:
    with pytest.raises(TypeError) as excinfo:
        await open_background_runtime()  # type: ignore[misc]
    assert "async with open_background_runtime(...) as runtime" in str(excinfo.value)


@pytest.mark.parametrize("name", ["spawn", "send"])
async def test_runtime_spawn_says_use_a_handle(name: str) -> None:
    async with open_background_runtime() as runtime:
        with pytest.raises(AttributeError) as excinfo:
            getattr(runtime, name)
    assert f"runtime.handle().{name}(fn, *args)" in str(excinfo.value)
    assert not PRIVATE.search(str(excinfo.value))


def test_public_classes_report_the_package_as_their_module() -> None:
    for name in trio_background.__all__:
        obj = getattr(trio_background, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "trio_background", name


async def test_request_id_is_in_the_message_text(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise ValueError("boom")

    async with open_background_runtime() as runtime:
        runtime.handle().spawn(fails, name="send_email", request_id="req-7")
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == "background job 'send_email' failed (request_id='req-7')"
    assert record.request_id == "req-7"  # type: ignore[attr-defined]
    assert record.job_name == "send_email"  # type: ignore[attr-defined]
    await trio.lowlevel.checkpoint()
