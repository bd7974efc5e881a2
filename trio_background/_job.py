"""One job: its record, checking what a caller submits, and reading how a run ended."""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import sys
import threading
import types
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, final

import trio
from trio.lowlevel import disable_ki_protection

from ._config import BackgroundJobMetadata, Retry, check_finite_seconds, check_timeout
from ._exceptions import JobCancelledError, JobTimeoutError

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._runtime import Runtime

T = TypeVar("T")

#: Where a job is in its life (internal states; `BackgroundJob.status` shows the public
#: name). A job holds a slot exactly while it is STARTING, RUNNING or CANCELLING.
#: Waiting to become due (a delay, or the backoff before a retry): in the timers.
SCHEDULED = "scheduled"
QUEUED = "queued"
#: Holds a slot; its task has not run the job's code yet (see the runtime's design note).
STARTING = "starting"
RUNNING = "running"
#: Holds a slot and ``cancel()`` was called: it ends ``cancelled`` once it has unwound.
CANCELLING = "cancelling"
#: Final statuses, each counted under the `BackgroundStatistics` field of the same name.
COMPLETED = "completed"
FAILED = "failed"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"
DROPPED = "dropped"

_PUBLIC_STATUS = {STARTING: RUNNING, CANCELLING: RUNNING}
_FINAL_STATES = (COMPLETED, FAILED, TIMED_OUT, CANCELLED, DROPPED)
FINAL = frozenset({COMPLETED, FAILED, TIMED_OUT, CANCELLED, DROPPED})

_BUILTIN_TYPES = (
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
)

#: The job whose task (or a task it started) is running, for `current_job`. The context a
#: job captures from its submitter never holds another job here (see `capture_context`):
#: a job submitted from inside another must not keep that one (and its result) alive.
_CURRENT: contextvars.ContextVar[BackgroundJob[Any] | None] = contextvars.ContextVar(
    "trio_background.current_job"
)


def capture_context() -> contextvars.Context:
    """A copy of the caller's context for a job it submits, without the caller's own job."""
    context = contextvars.copy_context()
    if _CURRENT.get(None) is not None:
        context.run(_CURRENT.set, None)
    return context


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


@final
class BackgroundJob(Generic[T]):
    """A job you submitted: its status, its result, and a way to cancel it.

    `BackgroundHandle.spawn` and `BackgroundHandle.send` return one; the runtime makes
    them, you never do. Ignoring it is fine. Inside a job, `current_job` returns the
    job's own. The runtime forgets a job once it has ended: its function, arguments and
    context are released then, and its result (or exception) lives only as long as you
    hold the job.
    """

    __slots__ = (
        "_args",
        "_context",
        "_fn",
        "_name",
        "_next",
        "_prev",
        "_request_id",
        "_runtime",
        "_sched",
        "_seq",
        "_slot",
        "_started_at",
        "_state",
        "_timeout",
        "_value",
    )

    def __init__(
        self,
        runtime: Runtime,
        fn: Callable[..., object],
        args: tuple[object, ...],
        name: str,
        request_id: str | None,
        timeout: float | None,
    ) -> None:
        self._runtime = runtime
        self._fn: Callable[..., object] | None = fn
        self._args: tuple[object, ...] = args
        #: The name; once `_meta` was called, the metadata itself (which holds it).
        self._name: str | BackgroundJobMetadata = name
        self._request_id = request_id
        self._timeout = timeout
        #: A copy of the submitter's context, taken when the job was submitted. The job's
        #: task runs in a copy of it; everything done for the job before that (hooks,
        #: log records) runs in a copy of it too.
        self._context: contextvars.Context | None = None
        #: Ready order (for a job without a delay: acceptance order), from 1; 0 while
        #: not accepted. A job is ready when accepted without a delay, or when due.
        self._seq = 0
        #: Delay, retries and key, for a job that has any (see `Schedule`).
        self._sched: Schedule | None = None
        self._state = QUEUED
        #: The slot (a `Lane`) the job holds while it has one.
        self._slot: Any = None
        self._started_at = 0.0
        #: Neighbours in the queue while queued.
        self._prev: BackgroundJob[Any] | None = None
        self._next: BackgroundJob[Any] | None = None
        #: Once final: the return value (completed) or, failed, the exception and its own
        #: traceback. Before that: None, or the `trio.Event` that tasks in `wait` wait for.
        self._value: Any = None

    # -- the public face ----------------------------------------------------------------

    @property
    def metadata(self) -> BackgroundJobMetadata:
        """The job's name and request id, as logs, instruments and reports show them."""
        return self._meta()

    @property
    def status(self) -> str:
        """Where the job is now, or how it ended, as a status name.

        One of ``"scheduled"``, ``"queued"``, ``"running"``, ``"completed"``,
        ``"failed"``, ``"timed_out"``, ``"cancelled"``, ``"dropped"``. The job is
        counted in `BackgroundRuntime.statistics` under exactly this name.
        """
        return _PUBLIC_STATUS.get(self._state, self._state)

    @property
    def attempt(self) -> int:
        """The number of the job's current or last run (1 plus the retries so far)."""
        sched = self._sched
        return 1 if sched is None else sched.attempt

    def cancel(self) -> None:
        """Cancel the job. Synchronous, never blocks, and idempotent.

        A queued job leaves the queue at once, never runs, and counts ``dropped``;
        its place in the queue is free at once. A running job is cancelled and
        counts ``cancelled`` once it has unwound, or ``completed`` if it returned
        normally all the same (it finished first). A finished job is unaffected.

        Raises:
            RuntimeError: Called from a thread other than the runtime's.
        """
        self._runtime.cancel_job(self)

    async def wait(self) -> T:
        """Wait until the job has ended, then return its result or raise.

        This is a checkpoint, even if the job has ended already. Any number of
        tasks may wait for the same job; waiting changes nothing about how the job
        is counted or logged.

        Returns:
            What the job's function returned.

        Raises:
            Exception: The job's own exception, if it failed (the same object the
                runtime logged).
            JobTimeoutError: The job ran past its timeout.
            JobCancelledError: The job was cancelled, or dropped without running.
        """
        self._runtime.check_thread("wait", "run(job.wait)")
        if self._state in FINAL:
            await trio.lowlevel.checkpoint()
        else:
            if _CURRENT.get(None) is self:
                raise RuntimeError(
                    "a job cannot wait for itself (nor can the tasks it started): it would "
                    "wait forever"
                )
            done = self._value
            if done is None:
                done = self._value = trio.Event()
            await done.wait()
        state = self._state
        if state == COMPLETED:
            return self._value  # type: ignore[no-any-return]
        if state == FAILED:
            # This frame joins the exception's traceback: it must not hold the job, which
            # holds the exception (a reference cycle).
            error, traceback = self._value
            del self
            try:
                # From the job's own traceback each time: a waiter's frames do not pile up.
                raise_unchanged(error.with_traceback(traceback))
            finally:
                del error, traceback
        meta = self._meta()
        if state == TIMED_OUT:
            raise JobTimeoutError(f"background job {meta.name!r} timed out", job=meta)
        what = "was cancelled" if state == CANCELLED else "was dropped without running"
        raise JobCancelledError(f"background job {meta.name!r} {what}", job=meta)

    def __repr__(self) -> str:
        return (
            f"<trio_background.BackgroundJob {self._meta().name!r} {self.status} at {id(self):#x}>"
        )

    # -- for the runtime ----------------------------------------------------------------

    def _meta(self) -> BackgroundJobMetadata:
        name = self._name
        if type(name) is str:
            name = self._name = BackgroundJobMetadata(name, self._request_id)
        return name  # type: ignore[return-value]

    def _accepted_seq(self) -> int:
        """Acceptance order (for a job with a delay or retries, its ready order differs)."""
        sched = self._sched
        return self._seq if sched is None else sched.accepted

    def _end(self, state: str, value: object = None) -> None:
        """Record the final status (and result or exception) and wake waiting tasks."""
        done = self._value
        self._state = state
        self._value = value
        if done is not None:
            done.set()

    def _release(self) -> None:
        """Forget what the job would have run (its name is kept for reports)."""
        self._fn = None
        self._args = ()
        self._context = None


class Schedule:
    """What a job with a delay, a retry policy or a key carries besides its record."""

    __slots__ = (
        "accepted",
        "attempt",
        "delay",
        "due",
        "job",
        "key",
        "place",
        "retried",
        "retry",
        "retry_elsewhere",
        "unreported_due",
    )

    def __init__(self, retry: Retry | None, key: str | None) -> None:
        #: The job, from its acceptance while the runtime has it; None once it ended or
        #: left (cancelled, dropped). (Not before: a refused job must not be in a cycle.)
        self.job: BackgroundJob[Any] | None = None
        self.retry = retry
        self.key = key
        #: 1 + the retries so far.
        self.attempt = 1
        #: Its acceptance order (its ready order, ``_seq``, may differ).
        self.accepted = 0
        #: The delay it was submitted with (0: none), and when it is due, while scheduled.
        self.delay = 0.0
        self.due = 0.0
        #: Where a queued job waits: FIFO, RELEASED or LINE (see `Admission`).
        self.place = 0
        #: Whether it waits (scheduled or queued) for its second or later run: it then
        #: holds no queue place.
        self.retried = False
        #: When something else (a durable queue) runs the job again, as decided when
        #: this run ended: (seconds until then, runs allowed in all); None if it does not.
        self.retry_elsewhere: tuple[float, int] | None = None
        #: Whether it became due and instruments with ``job_due`` have not been told yet.
        self.unreported_due = False


def current_job() -> BackgroundJob[Any]:
    """Return the job that the calling task belongs to.

    Inside a job, and in every task the job starts, this is the job's own
    `BackgroundJob`: the same object `BackgroundHandle.spawn` returned.

    Raises:
        RuntimeError: Not called from inside a background job.
    """
    job = _CURRENT.get(None)
    if job is None:
        raise RuntimeError(
            "current_job() must be called from inside a background job or a task it started"
        )
    return job


def raise_unchanged(exc: BaseException) -> NoReturn:
    """Raise ``exc`` itself, keeping the ``__context__`` it had (raising would replace it)."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context  # this frame is in the traceback: no cycle through it


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
    runtime: Runtime,
    method: str,
    fn: object,
    args: tuple[object, ...],
    name: object,
    request_id: object,
    timeout: object,
    delay: object,
    retry: object,
    key: object,
) -> BackgroundJob[Any]:
    """Check what a caller passed to ``spawn``/``send`` and build the job record.

    A job with a delay, a retry policy or a key gets a `Schedule`. The defaults
    (timeout, retry policy) come from the runtime's configuration.

    Raises:
        RuntimeError: Called from a thread other than the runtime's.
        TypeError: ``fn`` is not an async function (a coroutine object, which is closed;
            a builtin; a class; not callable), or an option has the wrong type.
        ValueError: ``timeout`` or ``delay`` is out of range.
    """
    if threading.get_ident() != runtime.thread:
        if isinstance(fn, Coroutine):
            fn.close()  # it will never run: no "never awaited" warning for it
        runtime.check_thread(method, f"run_sync(handle.{method}, ...)")
    config = runtime.config
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, not {type(name).__name__}")
    if request_id is not None and not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str or None, not {type(request_id).__name__}")
    # The default name is read now, from the caller (a callable's __getattr__ may run):
    # the job forgets its function when it ends, and no user code runs in the runtime's
    # bookkeeping.
    if type(fn) is types.FunctionType:  # plain functions need no further look
        if name is None:
            name = fn.__qualname__
    else:
        _check_callable(method, fn)
        if name is None:
            name = _name_of(fn)
    assert callable(fn)
    assert name is None or isinstance(name, str)
    assert request_id is None or isinstance(request_id, str)
    if timeout is None:
        timeout = config.job_timeout
    else:
        check_timeout("timeout", timeout, allow_none=True, allow_zero=False)
        assert isinstance(timeout, (int, float))
        # math.inf means no limit: the same as None, without a cancel scope.
        timeout = None if timeout == math.inf else float(timeout)
    default_retry = config.retry
    if delay is None and retry is None and key is None and default_retry is None:
        return BackgroundJob(runtime, fn, args, name, request_id, timeout)
    check_finite_seconds("delay", delay, allow_none=True, allow_zero=True)
    assert delay is None or isinstance(delay, (int, float))
    if retry is not None and not isinstance(retry, Retry):
        raise TypeError(f"retry must be a Retry or None, not {type(retry).__name__}")
    if key is not None and not isinstance(key, str):
        raise TypeError(f"key must be a str or None, not {type(key).__name__}")
    job: BackgroundJob[Any] = BackgroundJob(runtime, fn, args, name, request_id, timeout)
    if retry is None:
        retry = default_retry
    if retry is None and key is None and not delay:
        return job
    job._sched = sched = Schedule(retry, key)
    sched.delay = float(delay) if delay else 0.0
    return job


@disable_ki_protection
async def call_job(
    fn: Callable[..., Any] | None, args: tuple[object, ...], job: BackgroundJob[Any]
) -> Any:
    """Run the job's own code: the only code of the runtime's that Ctrl-C may interrupt."""
    assert fn is not None
    coro = fn(*args)
    if type(coro) is not types.CoroutineType and not isinstance(coro, Coroutine):
        raise TypeError(
            f"background job {job._meta().name!r} did not return a coroutine "
            f"(got {type(coro).__name__}): jobs must be async functions; to run a "
            f"blocking function, submit trio.to_thread.run_sync and the function"
        )
    return await coro


def without_runtime_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without its leading frames of this package's own code (the job's task).

    A failed job's exception is kept on its handle; its traceback must not start in the
    runtime's frames, which hold the job (a reference cycle) and mean nothing to users.
    """
    while tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith(
        "trio_background."
    ):
        tb = tb.tb_next
    return tb


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
    error: BaseException | None, timed_out: bool, cut_off: bool, cancel_called: bool = False
) -> tuple[str, BaseException | None, BaseException | None]:
    """How a run that ended with ``error`` counts: ``(outcome, fatal, cleanup_error)``.

    A run the runtime cancelled (``cut_off``: its cut-off came while the job ran;
    ``timed_out``: its own deadline passed) counts ``cancelled`` or ``timed_out``
    whatever its error, and ``cleanup_error`` is what it raised besides the
    `trio.Cancelled` (to be logged). A run cancelled through its handle
    (``cancel_called``) counts ``cancelled`` likewise, unless it returned normally: it
    finished first, and counts ``completed``. ``fatal`` is what must leave the runtime
    (a KeyboardInterrupt or SystemExit, bare or in a group, any `trio.Cancelled` taken
    out); a run the runtime did not cancel then counts ``failed``. Any other error, a
    stray `trio.Cancelled` included, is the job's failure.
    """
    rest = None if error is None else split_cancelled(error)[1]
    fatal = rest if rest is not None and is_fatal(rest) else None
    if cut_off or (cancel_called and error is not None):
        return CANCELLED, fatal, None if fatal is not None else rest
    if timed_out:
        return TIMED_OUT, fatal, None if fatal is not None else rest
    if fatal is not None:
        return FAILED, fatal, None
    if error is None:
        return COMPLETED, None, None
    return FAILED, None, None
