"""Offline intersphinx inventories for the external names these docs link to.

CI and most build machines cannot reach readthedocs.io or docs.python.org, so
intersphinx cannot download ``objects.inv`` at build time. Instead, ``conf.py``
writes small inventories from the tables below (in Sphinx's own format) into
the build's doctree directory and points ``intersphinx_mapping`` at them.

This keeps ``nitpicky = True`` meaningful: a reference to one of *our* names
that does not exist still fails the build, and so does a reference to a trio or
Python name that is not listed here (misspelt, or new). To link a new external
name, add one row with the page it lives on; the anchor is the name itself, as
Sphinx generates it upstream.

With network access, set ``TRIO_BACKGROUND_DOCS_ONLINE=1`` to build against
the real upstream inventories instead; that checks every row here too.
"""

from __future__ import annotations

import zlib
from pathlib import Path

TRIO_URL = "https://trio.readthedocs.io/en/stable/"
PYTHON_URL = "https://docs.python.org/3/"

# (name, "domain:role", page)
TRIO: list[tuple[str, str, str]] = [
    ("trio", "py:module", "reference-core.html"),
    ("trio.run", "py:function", "reference-core.html"),
    ("trio.open_nursery", "py:function", "reference-core.html"),
    ("trio.Nursery", "py:class", "reference-core.html"),
    ("trio.Nursery.start_soon", "py:method", "reference-core.html"),
    ("trio.Nursery.start", "py:method", "reference-core.html"),
    ("trio.CancelScope", "py:class", "reference-core.html"),
    ("trio.TaskStatus", "py:class", "reference-core.html"),
    ("trio.CancelScope.shield", "py:attribute", "reference-core.html"),
    ("trio.Cancelled", "py:exception", "reference-core.html"),
    ("trio.move_on_after", "py:function", "reference-core.html"),
    ("trio.fail_after", "py:function", "reference-core.html"),
    ("trio.TooSlowError", "py:exception", "reference-core.html"),
    ("trio.current_time", "py:function", "reference-core.html"),
    ("trio.sleep", "py:function", "reference-core.html"),
    ("trio.sleep_forever", "py:function", "reference-core.html"),
    ("trio.CapacityLimiter", "py:class", "reference-core.html"),
    ("trio.Event", "py:class", "reference-core.html"),
    ("trio.open_memory_channel", "py:function", "reference-core.html"),
    ("trio.MemorySendChannel", "py:class", "reference-core.html"),
    ("trio.MemoryReceiveChannel", "py:class", "reference-core.html"),
    ("trio.WouldBlock", "py:exception", "reference-core.html"),
    ("trio.from_thread.run_sync", "py:function", "reference-core.html"),
    ("trio.from_thread.run", "py:function", "reference-core.html"),
    ("trio.to_thread.run_sync", "py:function", "reference-core.html"),
    ("trio.open_signal_receiver", "py:function", "reference-io.html"),
    ("trio.testing.MockClock", "py:class", "reference-testing.html"),
    ("trio.testing.MockClock.autojump_threshold", "py:attribute", "reference-testing.html"),
    ("trio.testing.MockClock.jump", "py:method", "reference-testing.html"),
    ("trio.testing.wait_all_tasks_blocked", "py:function", "reference-testing.html"),
    ("trio.abc.Instrument", "py:class", "reference-lowlevel.html"),
    ("trio.lowlevel.checkpoint", "py:function", "reference-lowlevel.html"),
    ("trio.lowlevel.current_task", "py:function", "reference-lowlevel.html"),
    ("trio.lowlevel.Task", "py:class", "reference-lowlevel.html"),
    ("trio.Lock", "py:class", "reference-core.html"),
    ("trio.lowlevel.current_trio_token", "py:function", "reference-lowlevel.html"),
]

PYTHON: list[tuple[str, str, str]] = [
    ("int", "py:class", "library/functions.html"),
    ("float", "py:class", "library/functions.html"),
    ("bool", "py:class", "library/functions.html"),
    ("object", "py:class", "library/functions.html"),
    ("str", "py:class", "library/stdtypes.html"),
    ("tuple", "py:class", "library/stdtypes.html"),
    ("dict", "py:class", "library/stdtypes.html"),
    ("list", "py:class", "library/stdtypes.html"),
    ("None", "py:data", "library/constants.html"),
    ("True", "py:data", "library/constants.html"),
    ("False", "py:data", "library/constants.html"),
    ("BaseException", "py:exception", "library/exceptions.html"),
    ("Exception", "py:exception", "library/exceptions.html"),
    ("BaseExceptionGroup", "py:exception", "library/exceptions.html"),
    ("ExceptionGroup", "py:exception", "library/exceptions.html"),
    ("KeyboardInterrupt", "py:exception", "library/exceptions.html"),
    ("SystemExit", "py:exception", "library/exceptions.html"),
    ("RuntimeError", "py:exception", "library/exceptions.html"),
    ("TypeError", "py:exception", "library/exceptions.html"),
    ("ValueError", "py:exception", "library/exceptions.html"),
    ("math.inf", "py:data", "library/math.html"),
    ("math.nan", "py:data", "library/math.html"),
    ("functools.partial", "py:function", "library/functools.html"),
    ("contextvars", "py:module", "library/contextvars.html"),
    ("contextvars.ContextVar", "py:class", "library/contextvars.html"),
    ("contextvars.copy_context", "py:function", "library/contextvars.html"),
    ("contextvars.Context", "py:class", "library/contextvars.html"),
    ("contextvars.Context.run", "py:method", "library/contextvars.html"),
    ("types.coroutine", "py:function", "library/types.html"),
    ("time.sleep", "py:function", "library/time.html"),
    ("logging", "py:module", "library/logging.html"),
    ("logging.getLogger", "py:function", "library/logging.html"),
    ("logging.basicConfig", "py:function", "library/logging.html"),
    ("logging.Logger", "py:class", "library/logging.html"),
    ("logging.LogRecord", "py:class", "library/logging.html"),
    ("logging.Formatter", "py:class", "library/logging.html"),
    ("logging.Filter", "py:class", "library/logging.html"),
    ("logging.Handler", "py:class", "library/logging.html"),
    ("signal", "py:module", "library/signal.html"),
    ("signal.SIGTERM", "py:data", "library/signal.html"),
    ("signal.SIGINT", "py:data", "library/signal.html"),
    ("threading", "py:module", "library/threading.html"),
    ("collections.abc.Callable", "py:class", "library/collections.abc.html"),
    ("collections.abc.Awaitable", "py:class", "library/collections.abc.html"),
    ("collections.abc.Coroutine", "py:class", "library/collections.abc.html"),
    ("collections.abc.Iterable", "py:class", "library/collections.abc.html"),
    ("collections.abc.AsyncIterator", "py:class", "library/collections.abc.html"),
    ("collections.abc.AsyncGenerator", "py:class", "library/collections.abc.html"),
    ("contextlib.AbstractAsyncContextManager", "py:class", "library/contextlib.html"),
    ("contextlib.asynccontextmanager", "py:function", "library/contextlib.html"),
    ("typing.Any", "py:data", "library/typing.html"),
    ("typing.Literal", "py:data", "library/typing.html"),
    ("typing.TypeVarTuple", "py:class", "library/typing.html"),
    ("typing.Unpack", "py:data", "library/typing.html"),
    ("typing.assert_type", "py:function", "library/typing.html"),
    ("typing.TYPE_CHECKING", "py:data", "library/typing.html"),
    ("asyncio", "py:module", "library/asyncio.html"),
    ("asyncio.Semaphore", "py:class", "library/asyncio-sync.html"),
    ("asyncio.TaskGroup", "py:class", "library/asyncio-task.html"),
]


def _anchor(name: str, role: str) -> str:
    # Sphinx anchors a module as "module-<name>" and every other object as its name.
    return f"module-{name}" if role == "py:module" else name


def inventory_bytes(project: str, rows: list[tuple[str, str, str]]) -> bytes:
    """Render ``rows`` as a version 2 ``objects.inv`` (the format intersphinx reads)."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        "# Version: \n"
        "# The remainder of this file is compressed using zlib.\n"
    ).encode()
    body = "".join(
        f"{name} {role} 1 {page}#{_anchor(name, role)} -\n" for name, role, page in sorted(rows)
    )
    return header + zlib.compress(body.encode(), 9)


def write_inventories(directory: Path) -> dict[str, tuple[str, str]]:
    """Write the inventories into ``directory``; return an ``intersphinx_mapping``."""
    directory.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, tuple[str, str]] = {}
    for key, project, url, rows in (
        ("trio", "Trio", TRIO_URL, TRIO),
        ("python", "Python", PYTHON_URL, PYTHON),
    ):
        path = directory / f"{key}-objects.inv"
        path.write_bytes(inventory_bytes(project, rows))
        mapping[key] = (url, str(path))
    return mapping
