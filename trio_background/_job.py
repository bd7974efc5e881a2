"""One job: its record, checking what a caller submits, and reading how a run ended."""

from __future__ import annotations

import functools
import inspect
import math
import sys
import types
from collections.abc import Coroutine
from typing import TYPE_CHECKING

import trio
from trio.lowlevel import disable_ki_protection

from ._config import BackgroundJobMetadata, check_timeout

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    import contextvars
    from collections.abc import Callable

#: Where a job is in its life. A job holds a slot exactly while it is RUNNING (its code
#: may not have been called yet: see the runtime's design note).
QUEUED = "queued"
RUNNING = "running"
#: Final statuses, each counted under the `BackgroundStatistics` field of the same name.
COMPLETED = "completed"
FAILED = "failed"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"
DROPPED = "dropped"

_BUILTIN_TYPES = (
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
)


def _unwrap(fn: object) -> object:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _name_of(fn: object) -> str:
    fn = _unwrap(fn)
    try:
        name = getattr(fn, "__qualname__", None)
    except Exception:  # a __getattr__ that raises something else than AttributeError
        name = None
    if isinstance(name, str):
        return name
    return type(fn).__qualname__


class Job:
    """One submitted job: what to call, in which context, and where it is in its life.

    The runtime forgets a job once it has ended: nothing but its metadata is kept, and
    `release` drops the function, arguments and context of a job that ends without
    running.
    """

    __slots__ = (
        "_metadata",
        "args",
        "context",
        "fn",
        "name",
        "request_id",
        "seq",
        "slot",
        "started_at",
        "status",
        "timeout",
    )

    def __init__(
        self,
        fn: Callable[..., object],
        args: tuple[object, ...],
        name: str | None,
        request_id: str | None,
        timeout: float | None,
    ) -> None:
        self.fn: Callable[..., object] | None = fn
        self.args: tuple[object, ...] = args
        self.name = name
        self.request_id = request_id
        self.timeout = timeout
        #: A copy of the submitter's context, taken when the job was submitted. The job's
        #: task runs in a copy of it; everything done for the job before that (hooks,
        #: log records) runs in a copy of it too.
        self.context: contextvars.Context | None = None
        #: Acceptance order, from 1; 0 while not accepted.
        self.seq = 0
        self.status = QUEUED
        #: The slot object the job holds while RUNNING (see `Admission`).
        self.slot: object = None
        self.started_at = 0.0
        self._metadata: BackgroundJobMetadata | None = None

    def metadata(self) -> BackgroundJobMetadata:
        if self._metadata is None:
            name = self.name if self.name is not None else _name_of(self.fn)
            self._metadata = BackgroundJobMetadata(name, self.request_id)
        return self._metadata

    def release(self) -> None:
        """Forget what the job would have run (its name is kept for reports)."""
        self.metadata()
        self.fn = None
        self.args = ()
        self.context = None


def _check_callable(method: str, fn: object) -> None:
    if not callable(fn):
        if isinstance(fn, Coroutine):
            fn.close()  # it will never run: no "never awaited" warning for it
            raise TypeError(
                f"{method}() expects an async function, not a coroutine object: pass the "
                f"function and its arguments separately, e.g. {method}(fn, arg) instead "
                f"of {method}(fn(arg))"
            )
        raise TypeError(f"{method}() expects an async function, not {type(fn).__name__}")
    target = _unwrap(fn)
    if isinstance(target, _BUILTIN_TYPES) or inspect.isbuiltin(target):
        label = _name_of(target)
        raise TypeError(
            f"{method}() expects an async function, not the builtin {label!r}, which would "
            f"block the event loop: to run blocking work in a thread, write "
            f"{method}(trio.to_thread.run_sync, {label}, *args)"
        )
    if isinstance(target, type):
        raise TypeError(
            f"{method}() expects an async function, not the class {target.__qualname__!r}: "
            f"pass an async function that creates and uses it (to run blocking work in a "
            f"thread, write {method}(trio.to_thread.run_sync, fn, *args))"
        )


def make_job(
    method: str,
    fn: object,
    args: tuple[object, ...],
    name: object,
    request_id: object,
    timeout: object,
    default_timeout: float | None,
) -> Job:
    """Check what a caller passed to ``spawn``/``send`` and build the job record.

    Raises:
        TypeError: ``fn`` is not an async function (a coroutine object, which is closed;
            a builtin; a class; not callable), or an option has the wrong type.
        ValueError: ``timeout`` is out of range.
    """
    if type(fn) is not types.FunctionType:  # plain functions need no further look
        _check_callable(method, fn)
    assert callable(fn)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, not {type(name).__name__}")
    if request_id is not None and not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str or None, not {type(request_id).__name__}")
    assert name is None or isinstance(name, str)
    assert request_id is None or isinstance(request_id, str)
    if timeout is None:
        return Job(fn, args, name, request_id, default_timeout)
    check_timeout("timeout", timeout, allow_none=True, allow_zero=False)
    assert isinstance(timeout, (int, float))
    # math.inf means no limit: the same as None, without a cancel scope.
    return Job(fn, args, name, request_id, None if timeout == math.inf else float(timeout))


@disable_ki_protection
async def call_job(job: Job) -> None:
    """Run the job's own code: the only code of the runtime's that Ctrl-C may interrupt."""
    assert job.fn is not None
    coro = job.fn(*job.args)
    if type(coro) is not types.CoroutineType and not isinstance(coro, Coroutine):
        raise TypeError(
            f"background job {job.metadata().name!r} did not return a coroutine "
            f"(got {type(coro).__name__}): jobs must be async functions; to run a "
            f"blocking function, submit trio.to_thread.run_sync and the function"
        )
    await coro


def split_cancelled(error: BaseException) -> tuple[bool, BaseException | None]:
    """Split ``error`` into whether it holds a `trio.Cancelled` and what else it holds.

    Groups keep their shape (`BaseExceptionGroup.split`): no sibling is lost, and a
    group none of whose members is a `trio.Cancelled` comes back as the same object.
    """
    if isinstance(error, trio.Cancelled):
        return True, None
    if isinstance(error, BaseExceptionGroup):
        matched, rest = error.split(trio.Cancelled)
        return matched is not None, rest
    return False, error


def is_fatal(error: BaseException) -> bool:
    """Whether ``error`` (with no `trio.Cancelled` in it) must leave the runtime.

    That is any `BaseException` that is not an `Exception` (KeyboardInterrupt,
    SystemExit), bare or anywhere inside a group.
    """
    return not isinstance(error, Exception)


def outcome_of(
    error: BaseException | None, timed_out: bool, cut_off: bool
) -> tuple[str, BaseException | None, BaseException | None]:
    """How a run that ended with ``error`` counts: ``(outcome, fatal, cleanup_error)``.

    A run the runtime cancelled (``cut_off``: its cut-off came while the job ran;
    ``timed_out``: its own deadline passed) counts ``cancelled`` or ``timed_out``
    whatever its error, and ``cleanup_error`` is what it raised besides the
    `trio.Cancelled` (to be logged). ``fatal`` is what must leave the runtime (a
    KeyboardInterrupt or SystemExit, bare or in a group, any `trio.Cancelled` taken
    out); a run the runtime did not cancel then counts ``failed``. Any other error, a
    stray `trio.Cancelled` included, is the job's failure.
    """
    rest = None if error is None else split_cancelled(error)[1]
    fatal = rest if rest is not None and is_fatal(rest) else None
    if cut_off:
        return CANCELLED, fatal, None if fatal is not None else rest
    if timed_out:
        return TIMED_OUT, fatal, None if fatal is not None else rest
    if fatal is not None:
        return FAILED, fatal, None
    if error is None:
        return COMPLETED, None, None
    return FAILED, None, None
