"""The public API is typed precisely enough that mypy flags a wrong job argument.

Two layers:

* static: the ``_static_*`` functions below are never called; mypy (run on ``tests/`` in CI
  with ``warn_unused_ignores``) checks them, so each ``# type: ignore[arg-type]`` must be
  needed (the line really is an error) and each ``assert_type`` must hold;
* dynamic: `test_mypy_flags_wrong_spawn_argument` runs mypy on a snippet and asserts the exact
  errors, so this test fails even where mypy is not run on the test suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from typing_extensions import assert_type

from trio_background import (
    BackgroundHandle,
    BackgroundJob,
    BackgroundJobMetadata,
    BackgroundRuntime,
    BackgroundStatistics,
    current_job,
    open_background_runtime,
)
from trio_background.durable import DurableQueue, DurableStatistics, TaskRegistry

REPO = Path(__file__).resolve().parent.parent


async def takes_int(x: int) -> None:
    """A job taking one int."""


async def takes_int_str(x: int, s: str) -> None:
    """A job taking an int and a str."""


def _static_spawn(handle: BackgroundHandle) -> None:  # checked by mypy, never called
    handle.spawn(takes_int, 1)
    handle.spawn(takes_int_str, 1, "a", name="n", request_id="r", timeout=1.5)
    handle.spawn(takes_int, "wrong")  # type: ignore[arg-type]
    handle.spawn(takes_int)  # type: ignore[arg-type]
    handle.spawn(takes_int, 1, 2)  # type: ignore[arg-type]
    handle.spawn(takes_int_str, "a", 1)  # type: ignore[arg-type]
    handle.spawn(takes_int, 1, name=3)  # type: ignore[arg-type]
    handle.spawn(takes_int, 1, request_id=4)  # type: ignore[arg-type]
    handle.spawn(takes_int, 1, timeout="5")  # type: ignore[arg-type]
    handle.spawn(takes_int(1))  # type: ignore[arg-type]


async def _static_enqueue(queue: DurableQueue) -> None:  # checked by mypy, never called
    assert_type(await queue.enqueue(takes_int, 1), str)
    await queue.enqueue(takes_int_str, 1, "a", delay=1.5, request_id="r", dedupe_key="k")
    await queue.enqueue(takes_int, "wrong")  # type: ignore[arg-type]
    await queue.enqueue(takes_int)  # type: ignore[arg-type]
    await queue.enqueue(takes_int, 1, dedupe_key=3)  # type: ignore[arg-type]
    registered: Callable[[int], Coroutine[Any, Any, None]] = TaskRegistry().task(takes_int)
    assert registered is takes_int  # (the decorator returns the function, type and all)
    assert_type(await queue.statistics(), DurableStatistics)


async def _static_send(handle: BackgroundHandle) -> None:  # checked by mypy, never called
    await handle.send(takes_int, 1)
    await handle.send(takes_int, "wrong")  # type: ignore[arg-type]
    await handle.send(takes_int_str, 1)  # type: ignore[arg-type]


async def returns_str(x: int) -> str:
    """A job returning a str."""
    return str(x)


async def _static_handles(handle: BackgroundHandle) -> None:  # checked by mypy, never called
    job = handle.spawn(returns_str, 1)
    assert_type(job, BackgroundJob[str])
    assert_type(await job.wait(), str)
    assert_type(await (await handle.send(returns_str, 2)).wait(), str)
    assert_type(handle.spawn(takes_int, 1), BackgroundJob[None])
    assert_type(job.status, str)
    assert_type(job.attempt, int)
    assert_type(job.metadata, BackgroundJobMetadata)
    assert_type(job.cancel(), None)
    number: int = await job.wait()  # type: ignore[assignment]
    handle.spawn(returns_str, "wrong")  # type: ignore[arg-type]
    assert_type(current_job(), BackgroundJob[Any])
    del number


def _static_runtime(runtime: BackgroundRuntime) -> None:  # checked by mypy, never called
    assert_type(runtime.handle(), BackgroundHandle)
    assert_type(runtime.statistics(), BackgroundStatistics)
    assert_type(runtime.statistics().accepted, int)
    assert_type(runtime.statistics().closed, bool)
    assert_type(open_background_runtime(), AbstractAsyncContextManager[BackgroundRuntime])
    runtime.resize(max_concurrent_tasks=2, max_queue_size=10)
    runtime.resize(max_concurrent_tasks="2")  # type: ignore[arg-type]
    runtime.resize(2)  # type: ignore[call-arg]


SNIPPET = textwrap.dedent(
    """\
    from trio_background import BackgroundHandle


    async def takes_int(x: int) -> None: ...


    def use(handle: BackgroundHandle) -> None:
        handle.spawn(takes_int, 1)
        handle.spawn(takes_int, 2, name="n", request_id="r", timeout=1.5)
        handle.spawn(takes_int, "wrong")


    async def use_send(handle: BackgroundHandle) -> None:
        await handle.send(takes_int, 3)
        await handle.send(takes_int, "wrong")
    """
)


def _mypy(snippet: Path) -> subprocess.CompletedProcess[str]:
    """mypy's report on ``snippet``, with the repository's configuration and cache."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(REPO / "pyproject.toml"),
            "--show-error-codes",
            "--no-error-summary",
            "--no-pretty",
            str(snippet),
        ],
        cwd=REPO,  # reuse the repository's mypy cache
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_mypy_flags_wrong_spawn_argument(tmp_path: Path) -> None:
    snippet = tmp_path / "spawn_typing_snippet.py"
    snippet.write_text(SNIPPET)
    result = _mypy(snippet)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(errors) == 2, result.stdout
    # "path:line: error: message  [code]". Compare the file name only: mypy's incremental
    # cache may replay an error with the path of an earlier run's temporary directory.
    located = []
    for line in errors:
        path, lineno, rest = line.split(":", 2)
        located.append((Path(path).name, int(lineno), rest))
    (spawn_file, spawn_line, spawn_msg), (send_file, send_line, send_msg) = located
    # Only the two "wrong" lines are flagged; the correct calls above them are clean.
    assert (spawn_file, spawn_line) == (snippet.name, 10)
    assert 'Argument 1 to "spawn" of "BackgroundHandle"' in spawn_msg
    assert spawn_msg.endswith("[arg-type]")
    assert (send_file, send_line) == (snippet.name, 15)
    assert 'Argument 1 to "send" of "BackgroundHandle"' in send_msg
    assert send_msg.endswith("[arg-type]")


REVEAL_SNIPPET = textwrap.dedent(
    """\
    from trio_background import BackgroundHandle


    async def count(x: int) -> list[int]:
        return [x]


    async def use(handle: BackgroundHandle) -> None:
        job = handle.spawn(count, 1)
        reveal_type(job)
        reveal_type(await job.wait())
        reveal_type(await (await handle.send(count, 2)).wait())
        handle.spawn(count, "wrong")
    """
)


def test_mypy_reveals_the_jobs_return_type_through_wait(tmp_path: Path) -> None:
    snippet = tmp_path / "wait_typing_snippet.py"
    snippet.write_text(REVEAL_SNIPPET)
    result = _mypy(snippet)
    lines = [line.split(":", 2) for line in result.stdout.splitlines() if ": " in line]
    found = [(int(lineno), rest.strip()) for _, lineno, rest in lines]
    assert len(found) == 4, result.stdout
    # mypy spells builtins as "list[int]" or "builtins.list[builtins.int]" by version, and
    # names the class by the module that defines it.
    reveals = [(n, text.replace("builtins.", "")) for n, text in found[:3]]
    job_line, wait_line, send_line = reveals
    assert job_line[0] == 10
    assert job_line[1].startswith('note: Revealed type is "trio_background.')
    assert job_line[1].endswith('BackgroundJob[list[int]]"')
    assert wait_line == (11, 'note: Revealed type is "list[int]"')
    assert send_line == (12, 'note: Revealed type is "list[int]"')
    assert found[3][0] == 13
    assert 'to "spawn" of "BackgroundHandle"' in found[3][1]
    assert found[3][1].endswith("[arg-type]")
