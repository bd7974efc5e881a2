"""Configuration and job metadata."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs


def _type_name(value: object) -> str:
    return type(value).__name__


def check_int(field: str, value: object, minimum: int) -> None:
    """Validate an int field (`bool` is rejected), raising errors that name ``field``."""
    if type(value) is bool or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, not {_type_name(value)}")
    if value < minimum:
        raise ValueError(f"{field} must be >= {minimum}, got {value!r}")


def check_timeout(field: str, value: object, *, allow_none: bool, allow_zero: bool) -> None:
    """Validate a timeout-like number of seconds, raising errors that name ``field``.

    Args:
        field: The argument's name, used in the message.
        value: The value to check.
        allow_none: Whether `None` is valid.
        allow_zero: Whether 0 is valid (otherwise the value must be > 0).

    Raises:
        TypeError: ``value`` is not a real number (`bool` is rejected).
        ValueError: ``value`` is NaN, out of range, or an int too large for a float.
    """
    if value is None and allow_none:
        return
    if type(value) is bool or not isinstance(value, (int, float)):
        kind = "a number or None" if allow_none else "a number"
        raise TypeError(f"{field} must be {kind}, not {_type_name(value)}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(
            f"{field} is too large for a number of seconds (it does not fit in a float); "
            f"use math.inf for no limit"
        ) from None
    if math.isnan(seconds):
        raise ValueError(f"{field} must not be NaN")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{field} must be {bound}, got {value!r}")


def check_finite_seconds(field: str, value: object, *, allow_none: bool, allow_zero: bool) -> None:
    """`check_timeout`, where `math.inf` is refused too (a delay, a lease: not a limit).

    Raises:
        TypeError: As for `check_timeout`.
        ValueError: As for `check_timeout`, or ``value`` is infinite.
    """
    check_timeout(field, value, allow_none=allow_none, allow_zero=allow_zero)
    if value == math.inf:
        raise ValueError(f"{field} must be finite, got inf")


def _queue_size(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    check_int(attribute.name, value, 0)


def _slots(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    check_int(attribute.name, value, 1)


def _drain_timeout(_: Any, attribute: attrs.Attribute[float], value: float) -> None:
    check_timeout(attribute.name, value, allow_none=False, allow_zero=True)


def _job_timeout(_: Any, attribute: attrs.Attribute[float | None], value: float | None) -> None:
    check_timeout(attribute.name, value, allow_none=True, allow_zero=False)


def _attempts(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    check_int(attribute.name, value, 1)


def _seconds(_: Any, attribute: attrs.Attribute[float], value: float) -> None:
    check_timeout(attribute.name, value, allow_none=False, allow_zero=True)
    if attribute.name == "backoff" and value == math.inf:
        raise ValueError("backoff must be finite; use max_backoff to cap the delays")


def _multiplier(_: Any, attribute: attrs.Attribute[float], value: float) -> None:
    check_timeout(attribute.name, value, allow_none=False, allow_zero=False)
    if value < 1 or value == math.inf:
        raise ValueError(f"multiplier must be >= 1 and finite, got {value!r}")


def _jitter(_: Any, attribute: attrs.Attribute[bool], value: bool) -> None:
    if type(value) is not bool:
        raise TypeError(f"jitter must be a bool, not {_type_name(value)}")


def _exception_types(value: object) -> object:
    return (value,) if isinstance(value, type) else value


def _on(_: Any, attribute: attrs.Attribute[tuple[type[Exception], ...]], value: object) -> None:
    if value == ():
        raise ValueError("on must name at least one exception class")
    if not isinstance(value, tuple):
        raise TypeError(
            f"on must be an exception class or a non-empty tuple of them, not {_type_name(value)}"
        )
    for item in value:
        if not (isinstance(item, type) and issubclass(item, Exception)):
            raise TypeError(
                f"on must hold Exception subclasses (KeyboardInterrupt, SystemExit and "
                f"trio.Cancelled are never retried), not {item!r}"
            )


@attrs.frozen(kw_only=True)
class Retry:
    """How to retry a job whose run failed: how often, and how long to wait between runs.

    A run that raises an instance of one of ``on`` (a job timeout counts as
    `trio.TooSlowError`) is run again, up to ``attempts`` runs in all, after
    ``min(max_backoff, backoff * multiplier ** (n - 1))`` seconds, where ``n`` is the
    number of the run that failed; with ``jitter``, after a uniformly random delay
    between 0 and that. Construct it with keywords; instances are immutable and
    compare by value. A wrong type raises `TypeError` and an out-of-range value
    `ValueError`; both name the field.

    Args:
        attempts: Runs in all, the first included (``>= 1``; 1 never retries).
        backoff: Seconds before the second run (``>= 0``, finite).
        multiplier: Factor by which each further delay grows (``>= 1``).
        max_backoff: The longest delay, in seconds (``>= 0``; `math.inf` for none).
        jitter: Whether to draw each delay uniformly from 0 to its value.
        on: The exception classes to retry: an `Exception` subclass or a tuple of
            them.
    """

    attempts: int = attrs.field(default=3, validator=_attempts)
    backoff: float = attrs.field(default=1.0, validator=_seconds)
    multiplier: float = attrs.field(default=2.0, validator=_multiplier)
    max_backoff: float = attrs.field(default=60.0, validator=_seconds)
    jitter: bool = attrs.field(default=True, validator=_jitter)
    on: tuple[type[Exception], ...] = attrs.field(
        default=(Exception,), converter=_exception_types, validator=_on
    )

    def delay(self, run: int, random: Callable[[], float]) -> float:
        """Seconds to wait after run number ``run`` failed (``random()`` in [0, 1))."""
        try:
            delay = self.backoff * self.multiplier ** (run - 1)
        except OverflowError:  # (the growth is past any float: as long as it gets, or 0)
            delay = math.inf if self.backoff else 0.0
        delay = min(self.max_backoff, delay)
        return delay * random() if self.jitter else delay


def _retry(_: Any, attribute: attrs.Attribute[Retry | None], value: Retry | None) -> None:
    if value is not None and not isinstance(value, Retry):
        raise TypeError(f"retry must be a Retry or None, not {_type_name(value)}")


@attrs.frozen(kw_only=True)
class BackgroundTaskConfig:
    """How a runtime queues, runs and drains jobs.

    Construct it with keywords; instances are immutable and compare by value.
    A wrong type raises `TypeError` and an out-of-range value (or NaN) raises
    `ValueError`; both name the field.

    Args:
        max_queue_size: Jobs that may wait for a slot (``>= 0``). With 0, a
            job is accepted only if it can start at once.
        max_concurrent_tasks: Jobs that may run at once (``>= 1``).
        drain_timeout: Seconds shutdown waits for queued and running jobs
            before cutting them off (``>= 0``; `math.inf` waits forever).
        job_timeout: Default per-job time limit in seconds (``> 0``), or
            `None` for no limit.
        retry: Default retry policy of jobs submitted without ``retry=``, or
            `None` for no retries.
    """

    max_queue_size: int = attrs.field(default=1024, validator=_queue_size)
    max_concurrent_tasks: int = attrs.field(default=128, validator=_slots)
    drain_timeout: float = attrs.field(default=30.0, validator=_drain_timeout)
    job_timeout: float | None = attrs.field(default=None, validator=_job_timeout)
    retry: Retry | None = attrs.field(default=None, validator=_retry)


def _name(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"name must be a str, not {_type_name(value)}")


def _request_id(_: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"request_id must be a str or None, not {_type_name(value)}")


@attrs.frozen
class BackgroundJobMetadata:
    """What a runtime knows about a job: used in logs, instruments and reports.

    Args:
        name: The job's name (by default the function's ``__qualname__``).
        request_id: An optional id tying the job to the request that made it.
    """

    name: str = attrs.field(default="background_task", validator=_name)
    request_id: str | None = attrs.field(default=None, validator=_request_id)
